"""``gptfl synth``: options that cannot make a valid request fail in one line, before any call."""

from __future__ import annotations

import pytest

from gptfl.cli.main import main
from gptfl.errors import EXIT_CONFIG

BASE = ["synth", "generate", "--synth", "127.0.0.1:1", "--insecure", "--labels", "0"]


@pytest.mark.parametrize(
    ("options", "key"),
    [
        (["--images-per-label", "0", "--image-size", "8"], "images_per_label"),
        (["--images-per-label", "2", "--image-size", "8", "--steps", "0"], "num_inference_steps"),
        (["--images-per-label", "2", "--image-size", "0"], "image_size"),
    ],
)
def test_bad_options_are_one_line_naming_the_field(
    capsys: pytest.CaptureFixture[str], options: list[str], key: str
) -> None:
    assert main([*BASE, *options]) == EXIT_CONFIG  # nothing listens on port 1: no call made
    lines = [line for line in capsys.readouterr().err.splitlines() if "WARNING" not in line]
    assert len(lines) == 1 and lines[0].startswith(f"gptfl: options: {key}: "), lines
