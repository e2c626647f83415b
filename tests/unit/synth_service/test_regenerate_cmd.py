"""``gptfl-synth regenerate``: the synth service's program reproduces datasets, in one-line errors.

The bit-exact reproduction and the mismatch are tested end to end in
tests/integration/test_synth_service.py; here, what the command line does with bad input.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gptfl.errors import EXIT_FAILURE
from synth_service.main import main

DIGITS = Path(__file__).resolve().parents[3] / "synth_service" / "assets" / "digits-generator"


def _err_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_a_manifest_that_cannot_be_read_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere" / "manifest.json"
    code = main(["regenerate", "--manifest", str(missing), "--generator", str(DIGITS)])
    assert code == EXIT_FAILURE
    (line,) = _err_lines(capsys)
    assert line.startswith(f"gptfl-synth regenerate: cannot read manifest {missing}: "), line


def test_a_manifest_that_is_no_manifest_names_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "manifest.json").write_text('{"format": 1}')
    code = main(["regenerate", "--manifest", str(tmp_path), "--generator", str(DIGITS)])
    assert code == EXIT_FAILURE
    (line,) = _err_lines(capsys)
    prefix = f"gptfl-synth regenerate: {tmp_path / 'manifest.json'}: backend: required key"
    assert line.startswith(prefix), line


def test_without_regenerate_it_is_the_service_and_needs_its_config(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as usage:
        main([])
    assert usage.value.code == 2
    assert "--config" in capsys.readouterr().err
