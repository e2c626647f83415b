"""Local training and evaluation of a downstream model on an in-memory dataset.

The one training loop shared by silos (local epochs each round, optionally with the FedProx
term) and the synth service (centralized pretraining on synthetic data).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.nn import functional

from gptfl.data.dataset import ArrayDataset
from gptfl.errors import ConfigError, ValidationError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters of one call to :func:`train_local`.

    Attributes:
        epochs: passes over the data.
        batch_size: examples per SGD step; the last batch of an epoch may be smaller.
        learning_rate: SGD step size.
        momentum: SGD momentum (the momentum buffer starts at zero on every call).
        weight_decay: L2 penalty applied by SGD.
        proximal_mu: FedProx coefficient; 0 is plain local SGD (FedAvg).
        seed: seed of the shuffling order.
    """

    epochs: int
    batch_size: int
    learning_rate: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    proximal_mu: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise ConfigError(f"learning_rate must be a positive number, got {self.learning_rate}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.proximal_mu >= 0 or not math.isfinite(self.proximal_mu):
            raise ConfigError(f"proximal_mu must be >= 0, got {self.proximal_mu}")


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


def train_local(
    model: torch.nn.Module,
    data: ArrayDataset,
    settings: TrainSettings,
    *,
    device: torch.device,
    global_params: Mapping[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Trains ``model`` in place with SGD and cross-entropy.

    Args:
        model: the model; it is moved to ``device`` and left there, in eval mode.
        data: the training examples.
        settings: hyper-parameters.
        device: where to train.
        global_params: the round's global parameters, by name, for the FedProx term
            ``(mu / 2) * sum ||w - w_global||^2``; by default a copy of the model's parameters
            at the start of the call (which is the global model when a silo has just loaded
            it). Ignored when ``settings.proximal_mu`` is 0.

    Returns:
        Example count, last-epoch loss and accuracy, and duration.

    Raises:
        ValidationError: ``data`` is empty, or ``global_params`` lacks a trainable parameter
            or has one of another shape.
    """
    if len(data) == 0:
        raise ValidationError("cannot train on an empty dataset")
    started = time.perf_counter()
    model.to(device)
    model.train()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable]
    anchors = _proximal_anchors(trainable, settings, device=device, global_params=global_params)
    optimizer = torch.optim.SGD(
        params,
        lr=settings.learning_rate,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    x_all = torch.from_numpy(data.x)
    y_all = torch.from_numpy(data.y)
    # A private generator: the order depends only on the seed, and the global RNG is untouched.
    generator = torch.Generator().manual_seed(settings.seed)
    loss_sum = 0.0
    correct = 0
    for _ in range(settings.epochs):
        order = torch.randperm(len(data), generator=generator)
        loss_sum_t = torch.zeros((), device=device)
        correct_t = torch.zeros((), dtype=torch.int64, device=device)
        for start in range(0, len(data), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            inputs = x_all[batch].to(device, non_blocking=True)
            targets = y_all[batch].to(device, non_blocking=True)
            logits = model(inputs)
            loss = functional.cross_entropy(logits, targets)
            objective = loss
            if anchors is not None:
                proximal = sum(
                    ((p - a).pow(2).sum() for p, a in zip(params, anchors, strict=True)),
                    torch.zeros((), device=device),
                )
                objective = loss + 0.5 * settings.proximal_mu * proximal
            optimizer.zero_grad(set_to_none=True)
            objective.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            # Accumulated on the device so no step waits for a host sync.
            loss_sum_t += loss.detach() * targets.shape[0]
            correct_t += (logits.detach().argmax(dim=1) == targets).sum()
        loss_sum, correct = float(loss_sum_t.item()), int(correct_t.item())
    model.eval()
    seconds = time.perf_counter() - started
    result = TrainResult(
        num_examples=len(data),
        loss=loss_sum / len(data),
        accuracy=correct / len(data),
        seconds=seconds,
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


def _proximal_anchors(
    trainable: list[tuple[str, torch.nn.Parameter]],
    settings: TrainSettings,
    *,
    device: torch.device,
    global_params: Mapping[str, torch.Tensor] | None,
) -> list[torch.Tensor] | None:
    """The FedProx reference tensor of each trainable parameter, or None when mu is 0."""
    if settings.proximal_mu == 0:
        return None
    if global_params is None:
        return [p.detach().clone() for _, p in trainable]
    anchors = []
    for name, p in trainable:
        reference = global_params.get(name)
        if reference is None:
            raise ValidationError(f"global_params lacks parameter {name!r}")
        if reference.shape != p.shape:
            raise ValidationError(
                f"global_params[{name!r}] has shape {tuple(reference.shape)}, "
                f"the model has {tuple(p.shape)}"
            )
        anchors.append(reference.detach().to(device=device, dtype=p.dtype))
    return anchors


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
