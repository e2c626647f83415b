"""Datasets, data sources and partitioning used by silos, the server and the synth service."""

from gptfl.data.dataset import ArrayDataset, fit_to_shape
from gptfl.data.partition import PartitionSpec, dirichlet_partition, split_fraction
from gptfl.data.sources import (
    DataSource,
    ImageFolderSource,
    NpzSource,
    SklearnDigitsSource,
    load_source,
)

__all__ = [
    "ArrayDataset",
    "DataSource",
    "ImageFolderSource",
    "NpzSource",
    "PartitionSpec",
    "SklearnDigitsSource",
    "dirichlet_partition",
    "fit_to_shape",
    "load_source",
    "split_fraction",
]
