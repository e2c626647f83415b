"""Deterministic splits of a dataset: IID, label-skewed (Dirichlet) and by-column partitions,
and held-out fractions."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pydantic

from gptfl.config_loading import StrictModel
from gptfl.errors import ValidationError

#: how many Dirichlet draws :func:`dirichlet_partition` tries before giving up
MAX_PARTITION_ATTEMPTS = 100


PartitionScheme = Literal["dirichlet", "iid", "column"]


class PartitionSpec(StrictModel):
    """Which part of a split a silo holds.

    Attributes:
        index: this part's position, ``0 <= index < count``.
        count: number of parts the data is split into.
        scheme: ``dirichlet``: label-skewed parts (:func:`dirichlet_partition`); ``iid``:
            equal-sized random parts (:func:`iid_partition`); ``column``: one part per value
            of an array of the ``.npz`` (a site, a scanner, a patient group:
            :func:`column_partition`).
        alpha: Dirichlet concentration (``dirichlet`` only); small values give strongly
            skewed label mixes, large values give nearly IID parts.
        column: the ``.npz`` array of group values, shape ``(N,)`` (``column`` only).
        seed: seed of the split; every silo must use the same one to get disjoint parts.
    """

    index: int = pydantic.Field(ge=0)
    count: int = pydantic.Field(ge=1)
    scheme: PartitionScheme = "dirichlet"
    alpha: float = pydantic.Field(default=0.5, gt=0)
    column: str | None = pydantic.Field(default=None, min_length=1)
    seed: int = 0

    @pydantic.model_validator(mode="after")
    def _index_in_range(self) -> PartitionSpec:
        if self.index >= self.count:
            raise ValueError(f"index must be < count ({self.count}), got {self.index}")
        if (self.scheme == "column") != (self.column is not None):
            raise ValueError("column names the group array of scheme 'column' (and only of it)")
        return self

    def parts(self, labels: np.ndarray, groups: np.ndarray | None = None) -> list[np.ndarray]:
        """Every part's indices into ``labels`` (``groups``: the column's values)."""
        if self.scheme == "iid":
            return iid_partition(labels.shape[0], count=self.count, seed=self.seed)
        if self.scheme == "column":
            if groups is None:
                raise ValidationError(f"partition by column {self.column!r} needs its values")
            return column_partition(groups, count=self.count, name=str(self.column))
        return dirichlet_partition(labels, count=self.count, alpha=self.alpha, seed=self.seed)


def iid_partition(n: int, *, count: int, seed: int) -> list[np.ndarray]:
    """Splits ``range(n)`` into ``count`` random parts whose sizes differ by at most one.

    Raises:
        ValidationError: fewer examples than parts.
    """
    if count < 1 or n < count:
        raise ValidationError(f"cannot split {n} examples into {count} non-empty parts")
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, count)]


def column_partition(groups: np.ndarray, *, count: int, name: str) -> list[np.ndarray]:
    """One part per distinct value of ``groups``, in sorted order of the values.

    Raises:
        ValidationError: ``groups`` is not one value per example, or it holds another number
            of distinct values than ``count``.
    """
    groups = np.asarray(groups)
    if groups.ndim != 1:
        raise ValidationError(f"column {name!r} must have shape (N,), got {groups.shape}")
    values = np.unique(groups)
    if values.size != count:
        shown = ", ".join(str(v) for v in values[:8]) + (", ..." if values.size > 8 else "")
        raise ValidationError(
            f"column {name!r} has {values.size} distinct values ({shown}) but the partition "
            f"count is {count}: one part per value"
        )
    return [np.flatnonzero(groups == value).astype(np.int64) for value in values]


def dirichlet_partition(
    labels: np.ndarray, *, count: int, alpha: float, seed: int, min_per_part: int = 2
) -> list[np.ndarray]:
    """Splits example indices into ``count`` label-skewed parts.

    For each class, proportions are drawn from ``Dir(alpha)`` and that class's (shuffled)
    indices are cut accordingly. The whole draw is repeated until every part holds at least
    ``min_per_part`` examples.

    Args:
        labels: integer labels, shape ``(N,)``.
        count: number of parts.
        alpha: Dirichlet concentration, > 0.
        seed: the same seed and labels always give the same parts.
        min_per_part: smallest acceptable part size.

    Returns:
        ``count`` sorted int64 index arrays; together they hold every index exactly once.

    Raises:
        ValidationError: bad arguments, or no draw met ``min_per_part`` within
            :data:`MAX_PARTITION_ATTEMPTS` attempts.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValidationError(f"labels must have shape (N,), got {labels.shape}")
    if count < 1:
        raise ValidationError(f"count must be >= 1, got {count}")
    if not alpha > 0:
        raise ValidationError(f"alpha must be > 0, got {alpha}")
    if min_per_part < 0:
        raise ValidationError(f"min_per_part must be >= 0, got {min_per_part}")
    if count * min_per_part > labels.shape[0]:
        raise ValidationError(
            f"cannot split {labels.shape[0]} examples into {count} parts of at least "
            f"{min_per_part} each"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    smallest = 0
    for _ in range(MAX_PARTITION_ATTEMPTS):
        parts: list[list[np.ndarray]] = [[] for _ in range(count)]
        for cls in classes:
            members = rng.permutation(np.flatnonzero(labels == cls))
            proportions = rng.dirichlet(np.full(count, alpha))
            cuts = (np.cumsum(proportions)[:-1] * members.size).astype(np.int64)
            for part, chunk in zip(parts, np.split(members, cuts), strict=True):
                part.append(chunk)
        result = [np.sort(np.concatenate(part)).astype(np.int64) for part in parts]
        smallest = min(part.size for part in result)
        if smallest >= min_per_part:
            return result
    raise ValidationError(
        f"no Dirichlet(alpha={alpha}) split of {labels.shape[0]} examples into {count} parts "
        f"gave every part >= {min_per_part} examples in {MAX_PARTITION_ATTEMPTS} attempts "
        f"(last smallest part: {smallest}); use a larger alpha or fewer parts"
    )


def held_out_count(n: int, fraction: float) -> int:
    """How many of ``n`` examples :func:`split_fraction` holds out: ``round(fraction * n)``."""
    return int(round(fraction * n))


def split_fraction(n: int, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Randomly holds out a fraction of ``n`` examples.

    Args:
        n: number of examples.
        fraction: share held out, ``0 <= fraction < 1``; the held-out count is
            ``round(fraction * n)``.
        seed: the same seed always gives the same split.

    Returns:
        ``(kept, held_out)`` sorted int64 index arrays, disjoint, covering ``range(n)``.

    Raises:
        ValidationError: ``n`` is negative or ``fraction`` is outside ``[0, 1)``.
    """
    if n < 0:
        raise ValidationError(f"n must be >= 0, got {n}")
    if not 0.0 <= fraction < 1.0:
        raise ValidationError(f"fraction must be in [0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(n)
    held = held_out_count(n, fraction)
    return np.sort(order[held:]).astype(np.int64), np.sort(order[:held]).astype(np.int64)
