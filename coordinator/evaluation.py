"""Server-side evaluation of the global model on a data set the coordinator holds."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from gptfl.data.sources import DataSource, load_source
from gptfl.models import ModelSpec, build_model
from gptfl.training import EvalResult, evaluate

log = logging.getLogger(__name__)


class ServerEvaluator:
    """Loads the validation set once and evaluates each new global model on it."""

    def __init__(self, source: DataSource, model_spec: ModelSpec) -> None:
        self._data = load_source(
            source, in_channels=model_spec.in_channels, image_size=model_spec.image_size
        )
        self._model = build_model(model_spec)
        self._device = torch.device("cpu")
        log.info("server-side evaluation on %d examples", len(self._data))

    def evaluate(self, weights: Mapping[str, torch.Tensor]) -> EvalResult:
        self._model.load_state_dict(dict(weights))
        return evaluate(self._model, self._data, device=self._device)
