"""``gptfl federate``: reading the user's data and options; refusals before anything starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from gptfl.cli.federate_cmd import DataShape, data_shape, default_arch, parse_partition
from gptfl.cli.main import main
from gptfl.errors import EXIT_CONFIG, ConfigError


@pytest.mark.parametrize(
    ("text", "fields"),
    [
        ("iid", {"scheme": "iid"}),
        ("dirichlet", {"scheme": "dirichlet", "alpha": 0.5}),
        ("dirichlet:0.1", {"scheme": "dirichlet", "alpha": 0.1}),
        ("column:site", {"scheme": "column", "column": "site"}),
    ],
)
def test_partition_options(text: str, fields: dict[str, Any]) -> None:
    assert parse_partition(text) == fields


@pytest.mark.parametrize("text", ["dirichlet:0", "dirichlet:x", "column", "iid:3", "random"])
def test_bad_partition_options_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match=f"--partition: expected .* got '{text}'"):
        parse_partition(text)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [((5, 28, 28), (1, 28)), ((5, 3, 32, 32), (3, 32)), ((5, 224, 224, 3), (3, 224))],
)
def test_the_npz_shape_is_read_from_its_header(
    tmp_path: Path, shape: tuple[int, ...], expected: tuple[int, int]
) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros(shape, np.uint8), y=np.zeros(5, np.int64))
    assert data_shape(path) == DataShape(*expected)


@pytest.mark.parametrize(("mode", "channels"), [("L", 1), ("RGB", 3), ("P", 3)])
def test_an_image_folder_shape_is_its_first_image(tmp_path: Path, mode: str, channels: int) -> None:
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
        Image.new(mode, (40, 30)).save(tmp_path / name / "0.png")
    assert data_shape(tmp_path) == DataShape(channels, 40, ("a", "b"))


def test_default_architecture_by_size() -> None:
    assert [default_arch(s) for s in (8, 28, 32, 64, 224)] == [
        "cnn-small",
        "cnn-small",
        "resnet20",
        "resnet18-gn",
        "resnet18-gn",
    ]


def _folder(root: Path) -> Path:
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(root / name / "0.png")
    return root


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ([], "--generator: the labels are not digit names"),
        (["--labels", "cat,cow"], "--labels: cow is not a sub-folder of"),
        (["--labels", "cat"], "--labels: need at least 2 distinct names"),
        (["--generator", "."], "--generator: . is not a diffusers pipeline folder"),
        (["--partition", "column"], "--partition: expected"),
        (["--silos", "0"], "--silos and --rounds must be at least 1"),
    ],
)
def test_refusals_are_one_line_and_start_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], needle: str
) -> None:
    data = _folder(tmp_path / "images")
    runs = tmp_path / "runs"
    code = main(["federate", "--data", str(data), "--runs-dir", str(runs), *options])
    assert code == EXIT_CONFIG
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not runs.exists()  # no work folder, no process


def test_an_npz_needs_label_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((4, 8, 8), np.uint8), y=np.zeros(4, np.int64))
    assert main(["federate", "--data", str(path)]) == EXIT_CONFIG
    assert "--labels: name the classes of an .npz" in capsys.readouterr().err
    assert main(["federate", "--data", str(tmp_path / "none.npz")]) == EXIT_CONFIG
    assert "is neither an image folder nor an .npz file" in capsys.readouterr().err


def test_a_column_partition_is_checked_against_the_silos(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "d.npz"
    x, y = np.zeros((6, 8, 8), np.uint8), np.arange(6) % 2
    np.savez(path, x=x, y=y, site=np.array(["a", "b", "c", "a", "b", "c"]))
    args = ["federate", "--data", str(path), "--labels", "0,1", "--runs-dir", str(tmp_path / "r")]
    assert main([*args, "--partition", "column:site", "--silos", "2"]) == EXIT_CONFIG
    assert "column 'site' has 3 distinct values; one silo per value needs --silos 3" in (
        capsys.readouterr().err
    )
    assert main([*args, "--partition", "column:scanner", "--silos", "3"]) == EXIT_CONFIG
    assert "has no array 'scanner'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
