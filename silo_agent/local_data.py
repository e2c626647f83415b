"""The silo's private data, loaded once per model input shape and split for evaluation."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np

from gptfl.data.dataset import ArrayDataset
from gptfl.data.partition import held_out_count, split_fraction
from gptfl.data.sources import check_source, count_examples, load_source
from gptfl.errors import ConfigError, GptflError, ValidationError
from gptfl.models.spec import ModelSpec
from silo_agent.config import DataConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalSplits:
    train: ArrayDataset
    eval: ArrayDataset


class LocalData:
    """Caches the silo's data per (channels, image size): silos stay warm between rounds."""

    def __init__(self, config: DataConfig) -> None:
        """Checks that the data is there (:func:`~gptfl.data.sources.check_source`); the
        images are read at the first task, when the model's input shape is known.

        Raises:
            ConfigError: a source is missing or unusable, naming its key.
        """
        counts: dict[str, int] = {}
        for key, source in (("data.train", config.train), ("data.eval", config.eval)):
            if source is None:
                continue
            try:
                check_source(source)
                counts[key] = count_examples(source)
            except GptflError as exc:
                raise ConfigError(f"{key}: {exc}") from None
        self._config = config
        self._cache: dict[tuple[int, int], LocalSplits] = {}
        self._lock = threading.Lock()
        total = counts["data.train"]
        if config.eval is not None:
            self._registered = (total, counts["data.eval"])
        elif config.eval_fraction > 0:
            held = held_out_count(total, config.eval_fraction)  # as split_fraction holds out
            self._registered = (total - held, held)
        else:
            self._registered = (total, 0)

    @property
    def registered_counts(self) -> tuple[int, int]:
        """(training, evaluation) examples every task will use, counted at start without
        reading an image: what the silo registers, so the coordinator knows them before the
        first update (an update may not claim more than its silo registered)."""
        return self._registered

    def train_count(self) -> int:
        """The training examples a task will train on (the same for every input shape)."""
        return self._registered[0]

    def counts(self) -> tuple[int, int]:
        """(training, evaluation) examples of the data loaded last; (0, 0) before any task."""
        with self._lock:
            if not self._cache:
                return 0, 0
            last = next(reversed(self._cache.values()))
            return len(last.train), len(last.eval)

    def for_model(self, spec: ModelSpec) -> LocalSplits:
        key = (spec.in_channels, spec.image_size)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._load(spec)
            return self._cache[key]

    def _load(self, spec: ModelSpec) -> LocalSplits:
        cfg = self._config
        shape = {"in_channels": spec.in_channels, "image_size": spec.image_size}
        data = load_source(cfg.train, resize_mode=cfg.resize_mode, **shape)
        if cfg.eval is not None:
            train = data
            evaluation = load_source(cfg.eval, resize_mode=cfg.resize_mode, **shape)
        elif cfg.eval_fraction > 0:
            kept, held = split_fraction(len(data), fraction=cfg.eval_fraction, seed=cfg.split_seed)
            train, evaluation = data.subset(kept), data.subset(held)
        else:
            train = data
            evaluation = data.subset(np.arange(0))
        log.info(
            "local data for %dx%dx%d inputs: %d training, %d evaluation examples",
            spec.in_channels,
            spec.image_size,
            spec.image_size,
            len(train),
            len(evaluation),
        )
        for name, split in (("training", train), ("evaluation", evaluation)):
            if len(split) and int(split.y.max()) >= spec.num_classes:
                raise ValidationError(
                    f"the {name} data has label {int(split.y.max())}, but the job's model "
                    f"has {spec.num_classes} classes (labels 0..{spec.num_classes - 1})"
                )
        return LocalSplits(train, evaluation)
