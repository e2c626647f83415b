"""Local training and evaluation of a downstream model on an in-memory dataset.

Local training comes in pieces that a wrapper (a DP-SGD engine such as Opacus) can take
over one by one:

- :func:`make_loader`: a seeded :class:`~torch.utils.data.DataLoader` over the examples;
- :func:`make_optimizer`: SGD from a task's :class:`~gptfl.task.LocalSettings`;
- :class:`ProximalTerm`: FedProx's ``mu/2 ||w - w_global||^2``, added to the gradient at
  each optimizer step (so a DP optimizer that replaces the gradients keeps it);
- :func:`run_epochs`: the epoch loop over whatever model, optimizer and loader it is given.

:func:`train_local` composes them: the silo's plain SGD trainer, the benches and scripts.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.hooks import RemovableHandle

from gptfl.data.dataset import ArrayDataset
from gptfl.errors import ConfigError, ValidationError
from gptfl.task import LocalSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What a training call reports.

    Attributes:
        num_examples: examples in the training data (the FedAvg weight).
        loss: mean cross-entropy over the last epoch's samples (without the proximal term).
        accuracy: share of the last epoch's samples classified correctly while training.
        seconds: wall-clock duration of the call.
    """

    num_examples: int
    loss: float
    accuracy: float
    seconds: float


@dataclass(frozen=True)
class EpochStats:
    """What :func:`run_epochs` measured over the last epoch.

    Attributes:
        examples: examples the last epoch went through (the dataset's size with the plain
            loader; it varies under Poisson sampling).
        loss: their mean cross-entropy, without the proximal term (``nan`` when the epoch
            drew no example at all).
        accuracy: the share of them classified correctly while training (``nan`` likewise).
    """

    examples: int
    loss: float
    accuracy: float


@dataclass(frozen=True)
class EvalResult:
    """Loss and accuracy of a model on a dataset (``nan`` for an empty one).

    Attributes:
        num_examples: examples evaluated.
        loss: mean cross-entropy.
        accuracy: share classified correctly.
    """

    num_examples: int
    loss: float
    accuracy: float


def resolve_device(name: str = "auto") -> torch.device:
    """Turns a configured device name into a :class:`torch.device`.

    Args:
        name: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or
            ``"cuda:N"``.

    Returns:
        The device.

    Raises:
        ConfigError: the name is malformed, or CUDA (or that CUDA index) is not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unsupported = f"unsupported device {name!r} (expected 'auto', 'cpu', 'cuda' or 'cuda:N')"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(unsupported) from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(unsupported)
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
        )
    return device


class ExamplePairs(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """An :class:`ArrayDataset` as ``(image, label)`` tensor pairs, sharing its memory.

    The dataset :func:`make_loader` loads from; a wrapper that samples on its own (Opacus's
    Poisson sampling) reads the same examples from it.
    """

    def __init__(self, data: ArrayDataset) -> None:
        self.x = torch.from_numpy(data.x)
        self.y = torch.from_numpy(data.y)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


class SeededShuffle(Sampler[int]):
    """A new random order of ``size`` examples for every pass, from one private generator.

    Pass ``k`` is the ``k``-th ``torch.randperm(size, generator=generator)``: the orders
    depend only on the generator's seed, and the global RNG is untouched.

    Attributes:
        generator: the generator the orders are drawn from (the attribute Opacus's
            ``switch_generator`` replaces in secure mode).
    """

    def __init__(self, size: int, generator: torch.Generator) -> None:
        self.size = size
        self.generator = generator

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        yield from torch.randperm(self.size, generator=self.generator).tolist()


def make_loader(
    data: ArrayDataset, *, batch_size: int, seed: int
) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
    """A loader of shuffled ``(images, labels)`` batches, the same for the same seed.

    Every epoch visits each example once in a new order (:class:`SeededShuffle`); the last
    batch of an epoch may be smaller. The loader's own generator (which a DataLoader draws a
    worker seed from at each epoch, and which Opacus's ``DPDataLoader`` samples batches
    with) is private and seeded too, so neither touches the global RNG.

    Args:
        data: the examples; not copied.
        batch_size: examples per batch.
        seed: seed of the order.

    Raises:
        ValidationError: ``data`` is empty.
        ConfigError: ``batch_size`` is not positive.
    """
    if len(data) == 0:
        raise ValidationError("cannot train on an empty dataset")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    return DataLoader(
        ExamplePairs(data),
        batch_size=batch_size,
        sampler=SeededShuffle(len(data), torch.Generator().manual_seed(seed)),
        generator=torch.Generator().manual_seed(seed),
    )


def make_optimizer(model: torch.nn.Module, settings: LocalSettings) -> torch.optim.SGD:
    """SGD over the model's trainable parameters (momentum buffers start at zero)."""
    return torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=settings.learning_rate,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )


class ProximalTerm:
    """FedProx's ``(mu / 2) * sum ||w - w_global||^2`` over a model's trainable parameters.

    It is applied as its gradient, ``mu * (w - w_global)``, added to each parameter's
    gradient just before the base optimizer's update (:meth:`attach`). With plain SGD that
    is the gradient of the objective ``loss + proximal``. With a DP optimizer that clips,
    noises and replaces the gradients in its ``step`` before it calls the optimizer it
    wraps (Opacus's ``DPOptimizer``), the term is added after that, to the private
    gradient: it depends on no example, so adding it costs no privacy and is not clipped.
    """

    def __init__(self, mu: float, pairs: Sequence[tuple[torch.nn.Parameter, torch.Tensor]]):
        """Use :meth:`toward` rather than this.

        Args:
            mu: the coefficient, > 0.
            pairs: each trainable parameter with its anchor (same shape, dtype and device).
        """
        self.mu = mu
        self._pairs = tuple(pairs)

    @classmethod
    def toward(
        cls,
        model: torch.nn.Module,
        mu: float,
        *,
        device: torch.device,
        global_params: Mapping[str, torch.Tensor] | None = None,
    ) -> ProximalTerm | None:
        """The term pulling ``model`` toward ``global_params``; None when ``mu`` is 0.

        Build it from the bare model (its own parameter names), before any wrapper; a wrapper
        that keeps the parameter objects (Opacus's ``GradSampleModule`` does) keeps the term.

        Args:
            model: the model, already on ``device``.
            mu: the FedProx coefficient.
            device: where the anchors go.
            global_params: the round's global parameters by name; by default a copy of the
                model's parameters now (the global model when a silo has just loaded it).

        Raises:
            ValidationError: ``global_params`` lacks a trainable parameter or has one of
                another shape.
        """
        if mu == 0:
            return None
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if global_params is None:
            return cls(mu, [(p, p.detach().clone()) for _, p in trainable])
        pairs = []
        for name, p in trainable:
            reference = global_params.get(name)
            if reference is None:
                raise ValidationError(f"global_params lacks parameter {name!r}")
            if reference.shape != p.shape:
                raise ValidationError(
                    f"global_params[{name!r}] has shape {tuple(reference.shape)}, "
                    f"the model has {tuple(p.shape)}"
                )
            pairs.append((p, reference.detach().to(device=device, dtype=p.dtype)))
        return cls(mu, pairs)

    def add_gradient(self) -> None:
        """Adds ``mu * (w - w_global)`` to each parameter's gradient (sets it if unset)."""
        with torch.no_grad():
            for p, anchor in self._pairs:
                grad = (p - anchor) * self.mu
                if p.grad is None:
                    p.grad = grad
                else:
                    p.grad.add_(grad)

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Adds the gradient before every update of ``optimizer``'s base optimizer.

        A wrapper that hands the step on to the optimizer it wraps (``original_optimizer``,
        Opacus's attribute) has the hook on that one, so it runs after the wrapper's own work.

        Returns:
            The handle that detaches it.
        """
        base: torch.optim.Optimizer = getattr(optimizer, "original_optimizer", optimizer)

        def before_step(_: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.add_gradient()

        return base.register_step_pre_hook(before_step)


def run_epochs(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    epochs: int,
    device: torch.device,
    proximal: ProximalTerm | None = None,
) -> EpochStats:
    """Trains ``model`` for ``epochs`` passes over ``loader`` with cross-entropy.

    Each batch is one step: ``optimizer.zero_grad()``, forward, mean cross-entropy, backward,
    ``optimizer.step()``
    (with ``proximal``'s gradient added just before the base optimizer's update). The
    pieces may be wrappers: a model that computes per-sample gradients, a DP optimizer, a
    Poisson-sampling loader. A batch that sampling left empty still makes its step (under
    DP-SGD that step adds the noise its accountant counts; skipping it would make the
    accounting wrong) but adds nothing to the figures.

    Args:
        model: the model (or a wrapper of it), already on ``device``; left in eval mode.
        optimizer: the optimizer of its parameters.
        loader: yields ``(images, labels)`` batches (on any device).
        epochs: passes over ``loader``, >= 1.
        device: where to train.
        proximal: the FedProx term, or None.

    Returns:
        The last epoch's example count, mean loss and training accuracy.

    Raises:
        ConfigError: ``epochs`` is below 1.
    """
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    handle = proximal.attach(optimizer) if proximal is not None else None
    model.train()
    seen = 0
    loss_sum = 0.0
    correct = 0
    try:
        for _ in range(epochs):
            seen = 0
            loss_sum_t = torch.zeros((), device=device)
            correct_t = torch.zeros((), dtype=torch.int64, device=device)
            for batch_x, batch_y in loader:
                inputs = batch_x.to(device, non_blocking=True)
                targets = batch_y.to(device, non_blocking=True)
                count = int(targets.shape[0])
                # Before the forward pass: Opacus's expanded weights ("ew") refuse a forward
                # while the last step's per-sample gradients are still there.
                optimizer.zero_grad(set_to_none=True)
                logits = model(inputs)
                # The mean of no example is nan; their sum is 0 and still has a graph.
                loss = functional.cross_entropy(
                    logits, targets, reduction="mean" if count else "sum"
                )
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                if count:
                    # Accumulated on the device so no step waits for a host sync.
                    loss_sum_t += loss.detach() * count
                    correct_t += (logits.detach().argmax(dim=1) == targets).sum()
                    seen += count
            loss_sum, correct = float(loss_sum_t.item()), int(correct_t.item())
    finally:
        if handle is not None:
            handle.remove()
        model.eval()
    if seen == 0:
        return EpochStats(examples=0, loss=math.nan, accuracy=math.nan)
    return EpochStats(examples=seen, loss=loss_sum / seen, accuracy=correct / seen)


def train_local(
    model: torch.nn.Module,
    data: ArrayDataset,
    settings: LocalSettings,
    *,
    device: torch.device,
    global_params: Mapping[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Trains ``model`` in place with SGD and cross-entropy: the pieces above, composed.

    Args:
        model: the model; it is moved to ``device`` and left there, in eval mode.
        data: the training examples.
        settings: hyper-parameters (epochs, batch size, SGD, FedProx, the order's seed).
        device: where to train.
        global_params: the round's global parameters, by name, for the FedProx term; by
            default a copy of the model's parameters at the start of the call (see
            :meth:`ProximalTerm.toward`). Ignored when ``settings.proximal_mu`` is 0.

    Returns:
        Example count, last-epoch loss and accuracy, and duration.

    Raises:
        ValidationError: ``data`` is empty, or ``global_params`` lacks a trainable parameter
            or has one of another shape.
    """
    loader = make_loader(data, batch_size=settings.batch_size, seed=settings.seed)
    started = time.perf_counter()
    model.to(device)
    proximal = ProximalTerm.toward(
        model, settings.proximal_mu, device=device, global_params=global_params
    )
    stats = run_epochs(
        model,
        make_optimizer(model, settings),
        loader,
        epochs=settings.epochs,
        device=device,
        proximal=proximal,
    )
    seconds = time.perf_counter() - started
    result = TrainResult(
        num_examples=len(data), loss=stats.loss, accuracy=stats.accuracy, seconds=seconds
    )
    logger.debug(
        "trained %d epochs on %d examples: loss %.4f, accuracy %.4f, %.2fs",
        settings.epochs,
        result.num_examples,
        result.loss,
        result.accuracy,
        seconds,
    )
    return result


def evaluate(
    model: torch.nn.Module, data: ArrayDataset, *, device: torch.device, batch_size: int = 512
) -> EvalResult:
    """Mean cross-entropy and accuracy of ``model`` on ``data``.

    The model is moved to ``device`` and left in eval mode.

    Args:
        model: the model.
        data: the examples.
        device: where to run.
        batch_size: examples per forward pass.

    Returns:
        The result; loss and accuracy are ``nan`` when ``data`` is empty.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if len(data) == 0:
        return EvalResult(num_examples=0, loss=math.nan, accuracy=math.nan)
    model.to(device)
    model.eval()
    x_all = torch.from_numpy(data.x)
    y_all = torch.from_numpy(data.y)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            inputs = x_all[start : start + batch_size].to(device)
            targets = y_all[start : start + batch_size].to(device)
            logits = model(inputs)
            loss_sum += functional.cross_entropy(logits, targets, reduction="sum").double()
            correct += (logits.argmax(dim=1) == targets).sum()
    return EvalResult(
        num_examples=len(data),
        loss=float(loss_sum.item()) / len(data),
        accuracy=int(correct.item()) / len(data),
    )
