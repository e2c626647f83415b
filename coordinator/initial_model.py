"""Where a job's first global model comes from.

In order of precedence: the weights file the spec names (``initial_model``), the GPT-FL
pretrain phase (a model trained on synthetic data by the synth service), or a seeded random
initialisation of the zoo architecture. Each returns the weights and a provenance record
that ends up in the job state, the final model's metadata and the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptfl.job_spec import JobSpec
from gptfl.models import build_model
from gptfl.weights import WeightMap, build_manifest, check_manifest, specs_of
from gptfl.weights_io import load_weights


def random_initial_model(spec: JobSpec) -> tuple[WeightMap, dict[str, Any]]:
    model = build_model(spec.model, seed=spec.seed)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return weights, {"kind": "random", "seed": spec.seed}


def file_initial_model(spec: JobSpec, path: Path) -> tuple[WeightMap, dict[str, Any]]:
    """Loads ``path`` and checks that it fits the spec's architecture exactly."""
    expected = specs_of(build_model(spec.model).state_dict())
    weights, metadata = load_weights(path)
    manifest = build_manifest(weights)
    check_manifest(manifest, expected=expected)
    return weights, {"kind": "file", "path": str(path), "blake3": manifest.digest, **metadata}
