"""What a coordinator refuses at submit, and what ``gptfl admin submit`` makes of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from gptfl.cli.main import main
from gptfl.errors import EXIT_CONFIG
from tests.integration.conftest import StartCoordinator

SPEC = """\
name: checks
model: {arch: cnn-small, num_classes: 10, in_channels: 1, image_size: 8}
rounds: 1
"""


@pytest.mark.parametrize(
    ("spec", "detail"),
    [
        pytest.param(
            SPEC.replace("cnn-small", "no-such-net"), "unknown model architecture", id="arch"
        ),
        pytest.param(
            SPEC + "evaluation: {server: {kind: npz, path: /absent/test.npz}}\n",
            "/absent/test.npz",
            id="server-data",
        ),
    ],
)
def test_a_spec_only_the_coordinator_refuses_exits_with_the_config_code(
    start: StartCoordinator,
    pki_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    spec: str,
    detail: str,
) -> None:
    # Valid on the admin's machine, refused by the coordinator: a bad spec all the same,
    # so exit 3 like one refused locally (docs/job-spec.md, docs/cli.md).
    coordinator = start()
    path = tmp_path / "job.yaml"
    path.write_text(spec)
    address = f"127.0.0.1:{coordinator.admin.port}"
    certs = str(pki_dir / "admin")
    code = main(["admin", "--coordinator", address, "--certs", certs, "submit", str(path)])
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG, err
    assert err.startswith("gptfl admin: INVALID_ARGUMENT: ") and err.count("\n") == 1, err
    assert detail in err, err
    assert coordinator.jobs.current() is None  # nothing started


def test_a_quorum_the_allowed_silos_cannot_meet_is_refused(
    start: StartCoordinator, pki_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Otherwise the job waits wait_for_silos_s (600 s by default) and then fails.
    coordinator = start(allowed_silos=("silo-a", "silo-b"))
    path = tmp_path / "job.yaml"
    path.write_text(SPEC + "min_silos: 3\n")
    address = f"127.0.0.1:{coordinator.admin.port}"
    certs = str(pki_dir / "admin")
    code = main(["admin", "--coordinator", address, "--certs", certs, "submit", str(path)])
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG, err
    assert "min_silos is 3" in err and "silo-a, silo-b" in err, err
    assert coordinator.jobs.current() is None
