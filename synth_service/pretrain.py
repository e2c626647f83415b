"""Centralised pretraining of a zoo model on a synthetic dataset (GPT-FL's server-side step).

The synthetic data is split (stratified, seeded) into a training part and a held-out
validation part. Training uses SGD with momentum and a cosine learning-rate schedule, or
AdamW, with light augmentation (random shifts of a pixel or two, done on tensors without
torchvision). After every epoch the progress callback receives the epoch's metrics, which the
service streams to its caller.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional

from gptfl.data.dataset import ArrayDataset
from gptfl.errors import ValidationError
from gptfl.models import ModelSpec, build_model
from gptfl.synth_spec import PretrainSettings
from gptfl.training import evaluate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochMetrics:
    """One epoch's progress.

    Attributes:
        epoch: 1-based epoch number.
        epochs: total epochs.
        train_loss: mean training cross-entropy over the epoch (augmented inputs).
        val_loss: held-out synthetic validation loss (``nan`` without a validation split).
        val_accuracy: held-out synthetic validation accuracy (``nan`` without one).
        learning_rate: learning rate at the end of the epoch.
        seconds: wall time of the epoch.
    """

    epoch: int
    epochs: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    learning_rate: float
    seconds: float


@dataclass(frozen=True)
class PretrainResult:
    """The outcome of :func:`pretrain`.

    Attributes:
        state_dict: the trained weights, on the CPU.
        history: per-epoch metrics.
        initial_val_accuracy: validation accuracy of the freshly initialised model.
        train_size: examples trained on.
        val_size: examples held out.
        seconds: total wall time.
    """

    state_dict: dict[str, torch.Tensor]
    history: tuple[EpochMetrics, ...]
    initial_val_accuracy: float
    train_size: int
    val_size: int
    seconds: float

    @property
    def final_val_accuracy(self) -> float:
        """Validation accuracy after the last epoch."""
        return self.history[-1].val_accuracy


def pretrain(
    spec: ModelSpec,
    data: ArrayDataset,
    settings: PretrainSettings,
    *,
    device: torch.device | str = "cpu",
    initial_state: Mapping[str, torch.Tensor] | None = None,
    progress: Callable[[EpochMetrics], None] | None = None,
) -> PretrainResult:
    """Trains a fresh ``spec`` model on ``data``.

    Args:
        spec: the downstream model (architecture, classes, input shape).
        data: the synthetic dataset, float32 ``(N, C, S, S)`` in [0, 1] at the spec's shape.
        settings: optimizer, schedule, augmentation and split settings.
        device: where to train.
        initial_state: optional starting weights instead of the seeded initialisation.
        progress: called after every epoch; raising from it aborts the run.

    Returns:
        The trained weights (CPU) and the metrics.

    Raises:
        ValidationError: the data's shape or labels do not fit ``spec``, or too little data.
        ConfigError: the spec cannot be built.
    """
    _check_data(spec, data)
    started = time.perf_counter()
    torch_device = torch.device(device)
    train, val = stratified_split(data, fraction=settings.val_fraction, seed=settings.seed)
    if len(train) == 0:
        raise ValidationError("no training examples left after the validation split")
    model = build_model(spec, seed=settings.seed).to(torch_device)
    if initial_state is not None:
        model.load_state_dict(dict(initial_state))
    initial = evaluate(model, val, device=torch_device).accuracy if len(val) else math.nan
    optimizer = _optimizer(model, settings)
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    warmup_steps = steps_per_epoch * min(settings.warmup_epochs, settings.epochs - 1)

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if settings.schedule == "constant":
            return 1.0
        progress_ = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(settings.seed)
    x_all, y_all = torch.from_numpy(train.x), torch.from_numpy(train.y)
    history: list[EpochMetrics] = []
    for epoch in range(1, settings.epochs + 1):
        epoch_started = time.perf_counter()
        model.train()
        order = torch.randperm(len(train), generator=generator)
        loss_sum = torch.zeros((), dtype=torch.float64, device=torch_device)
        for start in range(0, len(train), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            inputs = random_shift(x_all[batch], settings.max_shift, generator=generator)
            inputs = inputs.to(torch_device)
            targets = y_all[batch].to(torch_device)
            loss = functional.cross_entropy(
                model(inputs), targets, label_smoothing=settings.label_smoothing
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach().double() * targets.shape[0]
        if len(val):
            result = evaluate(model, val, device=torch_device)
            val_loss, val_accuracy = result.loss, result.accuracy
        else:
            val_loss = val_accuracy = math.nan
        metrics = EpochMetrics(
            epoch=epoch,
            epochs=settings.epochs,
            train_loss=float(loss_sum.item()) / len(train),
            val_loss=val_loss,
            val_accuracy=val_accuracy,
            learning_rate=float(optimizer.param_groups[0]["lr"]),
            seconds=time.perf_counter() - epoch_started,
        )
        history.append(metrics)
        logger.info(
            "pretrain epoch %d/%d: train loss %.4f, val accuracy %.4f",
            epoch,
            settings.epochs,
            metrics.train_loss,
            metrics.val_accuracy,
        )
        if progress is not None:
            progress(metrics)
    model.eval()
    state = {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}
    return PretrainResult(
        state_dict=state,
        history=tuple(history),
        initial_val_accuracy=initial,
        train_size=len(train),
        val_size=len(val),
        seconds=time.perf_counter() - started,
    )


def stratified_split(
    data: ArrayDataset, *, fraction: float, seed: int
) -> tuple[ArrayDataset, ArrayDataset]:
    """Holds out ``fraction`` of every label (rounded, at least one when a label has two).

    Returns:
        (train, validation); validation is empty when ``fraction`` is 0.
    """
    rng = np.random.default_rng(seed)
    train_parts: list[np.ndarray] = []
    val_parts: list[np.ndarray] = []
    for label in np.unique(data.y):
        indices = np.flatnonzero(data.y == label)
        rng.shuffle(indices)
        held = round(fraction * len(indices))
        if fraction > 0 and held == 0 and len(indices) >= 2:
            held = 1
        val_parts.append(indices[:held])
        train_parts.append(indices[held:])
    empty = np.zeros(0, dtype=np.int64)
    train_index = np.sort(np.concatenate(train_parts)) if train_parts else empty
    val_index = np.sort(np.concatenate(val_parts)) if val_parts else empty
    return data.subset(train_index), data.subset(val_index)


def random_shift(x: torch.Tensor, max_shift: int, *, generator: torch.Generator) -> torch.Tensor:
    """Shifts each image by up to ``max_shift`` pixels per axis, filling with zeros.

    Implemented as zero padding followed by a random crop back to the original size.
    """
    if max_shift <= 0 or x.shape[0] == 0:
        return x
    count, _, height, width = x.shape
    padded = functional.pad(x, (max_shift, max_shift, max_shift, max_shift))
    offsets = torch.randint(0, 2 * max_shift + 1, (count, 2), generator=generator)
    out = torch.empty_like(x)
    # Group by offset: at most (2s+1)^2 slicing operations instead of one per image.
    keys = offsets[:, 0] * (2 * max_shift + 1) + offsets[:, 1]
    for key in torch.unique(keys).tolist():
        chosen = torch.nonzero(keys == key).flatten()
        dy, dx = divmod(int(key), 2 * max_shift + 1)
        out[chosen] = padded[chosen, :, dy : dy + height, dx : dx + width]
    return out


def _optimizer(model: torch.nn.Module, settings: PretrainSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=settings.learning_rate, weight_decay=settings.weight_decay
        )
    return torch.optim.SGD(
        params,
        lr=settings.learning_rate,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )


def _check_data(spec: ModelSpec, data: ArrayDataset) -> None:
    expected = (spec.in_channels, spec.image_size, spec.image_size)
    if tuple(data.x.shape[1:]) != expected:
        raise ValidationError(
            f"synthetic images have shape {tuple(data.x.shape[1:])}, model "
            f"{spec.arch!r} expects {expected}"
        )
    if len(data) == 0:
        raise ValidationError("cannot pretrain on an empty dataset")
    if int(data.y.max()) >= spec.num_classes:
        raise ValidationError(
            f"label {int(data.y.max())} is out of range for {spec.num_classes} classes"
        )
