"""Tiny ``transformers`` vision models (a few thousand parameters) for CPU tests."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from gptfl.models import ModelSpec
from gptfl.models.hf_vision import (
    CONVNEXT,
    RESNET,
    VIT,
    HfVisionFamily,
    build_hf_classifier,
    hf_config,
)

#: tiny configurations of each family (a few thousand parameters), for the CPU
TINY: dict[str, tuple[HfVisionFamily, dict[str, object]]] = {
    "resnet": (
        RESNET,
        {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"},
    ),
    "resnet-bottleneck": (
        RESNET,
        {"embedding_size": 8, "hidden_sizes": [16, 32], "depths": [1, 1]},
    ),
    "convnext": (CONVNEXT, {"hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2}),
    "vit": (
        VIT,
        {
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "patch_size": 8,
        },
    ),
}


def tiny_model(kind: str, spec: ModelSpec) -> nn.Module:
    """The zoo's wrapper around the tiny ``kind`` of :data:`TINY`, random weights."""
    family, fields = TINY[kind]
    return build_hf_classifier(family, spec, hf_config(family, spec, **fields))


def save_tiny_checkpoint(kind: str, spec: ModelSpec, folder: Path, *, num_labels: int) -> Path:
    """Saves the stock ``transformers`` model (BatchNorm for the ResNets) of the tiny ``kind``
    at ``spec``'s image size with ``num_labels`` classes, as ``save_pretrained`` does for a
    downloaded checkpoint; returns ``folder``."""
    family, fields = TINY[kind]
    config = hf_config(family, spec, **fields)
    config.num_labels = num_labels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        stock = getattr(importlib.import_module("transformers"), family.model_class)(config)
    stock.save_pretrained(str(folder))
    return folder


def save_random_resnet18(folder: Path) -> Path:
    """A full-size ResNet-18 checkpoint with random weights (BatchNorm, 1000 classes, 45 MB),
    shaped like ``microsoft/resnet-18``; returns ``folder``."""
    transformers = importlib.import_module("transformers")
    from gptfl.models.hf_vision import HF_ARCHITECTURES

    fields = dict(HF_ARCHITECTURES["resnet18-gn"].fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        net = transformers.ResNetForImageClassification(
            transformers.ResNetConfig(num_labels=1000, **fields)
        )
    net.save_pretrained(str(folder))
    return folder
