"""``gptfl models``: the architectures this installation resolves, and its broken plugins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptfl.cli.main import main
from gptfl.errors import EXIT_FAILURE, EXIT_OK
from gptfl.models import architecture
from gptfl.models.fingerprint import fingerprint
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
