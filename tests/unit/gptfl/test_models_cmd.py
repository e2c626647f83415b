"""``gptfl models``: the architectures this installation resolves, and its broken plugins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from coordinator.initial_model import file_initial_model
from gptfl.cli.main import main
from gptfl.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK
from gptfl.job_spec import JobSpec
from gptfl.models import architecture
from gptfl.models.fingerprint import fingerprint
from gptfl.weights_io import load_weights
from tests.hf_tiny import save_random_resnet18
from tests.plugin_dists import PluginPath, plugin_path

__all__ = ["plugin_path"]


def test_lists_every_architecture_with_its_fingerprint(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["arch", "provider", "version", "layout"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    expected = fingerprint(architecture("resnet20"))
    assert rows["resnet20"] == [
        "resnet20",
        "gpt-fl",
        expected.provider_version,
        expected.layout_sha256[:12],
    ]


def test_a_broken_plugin_is_reported_and_exits_1(
    tmp_path: Path, plugin_path: PluginPath, capsys: pytest.CaptureFixture[str]
) -> None:
    plugin_path.install(
        tmp_path / "site",
        dist="broken-models",
        module="broken_cli_models",
        source="raise ImportError('needs libfoo')\n",
        entry_points={"broken-net": "broken_cli_models:BUILD"},
    )
    assert main(["models", "--json"]) == EXIT_FAILURE
    document = json.loads(capsys.readouterr().out)
    assert "needs libfoo" in document["problems"]["broken-net"]
    assert "cnn-small" in {a["arch"] for a in document["architectures"]}


def test_import_writes_an_initial_model_the_coordinator_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = save_random_resnet18(tmp_path / "resnet-18")
    out = tmp_path / "init.safetensors"
    args = ["models", "import", "--arch", "resnet18-gn", "--num-classes", "4"]
    args += ["--image-size", "32", "--from", str(folder), "--out", str(out)]
    assert main(args) == EXIT_OK
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and printed[0].endswith(
        "60 tensors copied, head new (4 classes, seed 0), 0 resized, 62 dropped"
    )
    model = {"arch": "resnet18-gn", "num_classes": 4, "in_channels": 3, "image_size": 32}
    spec = JobSpec.model_validate({"name": "p", "model": model, "rounds": 1, "initial_model": out})
    weights, provenance = file_initial_model(spec, out)  # the coordinator's own check
    assert provenance["kind"] == "file"
    assert provenance["pretrained"]["pretrained_folder"] == str(folder)
    assert provenance["pretrained"]["model"] == model
    source = load_weights(folder / "model.safetensors")[0]
    assert any(torch.equal(weights[f"net.{k}"], v) for k, v in source.items() if v.ndim == 4)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--arch", "cnn-small", "--image-size", "28"], "'cnn-small' cannot start from a"),
        (["--arch", "resnet18-gn", "--image-size", "32"], "does not exist or is not a directory"),
        (["--arch", "resnet18-gn", "--image-size", "4"], "options: image_size: "),
    ],
)
def test_import_refuses_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], needle: str
) -> None:
    args = ["models", "import", "--num-classes", "4", "--from", str(tmp_path / "none")]
    assert main([*args, "--out", str(tmp_path / "o.safetensors"), *options]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o.safetensors").exists()
