"""Fixtures of the model-zoo tests."""

from tests.plugin_dists import plugin_path

__all__ = ["plugin_path"]
