"""``gptfl admin``: following a job (progress lines before round 1, one line per round),
exit codes of refused calls, and one-line errors when the model cannot be written."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch

from gptfl.admin_client import PrivacyView, RoundView, StatusView
from gptfl.cli import admin_cmd
from gptfl.cli.admin_cmd import follow
from gptfl.cli.main import main
from gptfl.errors import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_JOB_FAILED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
)
from gptfl.weights_io import save_weights
from tests.rpc_fakes import FakeRpcError, RefusingClient


def _status(phase: str, message: str, rounds: int = 0) -> StatusView:
    views = [RoundView(r, 2, 2, 0, 0.5, {"test_accuracy": 0.5}, {}) for r in range(1, rounds + 1)]
    return StatusView("job-1", phase, rounds, 2, message, 2, views, None)


@dataclass
class Script:
    """A fake admin client returning a scripted sequence of statuses."""

    statuses: list[StatusView]
    calls: int = 0
    lines: list[str] = field(default_factory=list)

    def status(self) -> StatusView:
        status = self.statuses[min(self.calls, len(self.statuses) - 1)]
        self.calls += 1
        return status


def test_progress_is_throttled_within_a_phase_and_the_last_line_shown() -> None:
    script = Script(
        [
            _status("pending", ""),
            _status("pretrain", "waiting for the synth service at s:1"),
            _status("pretrain", "generating synthetic images: 100/2000"),
            _status("pretrain", "generating synthetic images: 200/2000"),
            _status("pretrain", "pretrained on 2000 synthetic images: 86.9%"),
            _status("federating", "round 1: training on 2 silos"),
            _status("federating", "round 2: training on 2 silos", rounds=1),
            _status("finished", "finished 2 rounds", rounds=2),
        ]
    )
    code = follow(
        script,  # type: ignore[arg-type]
        interval_s=0,
        progress_interval_s=3600,
        out=script.lines.append,
    )
    assert code == EXIT_OK
    # Within a phase only the first line and (when the phase ends) its last line show.
    assert script.lines[:3] == [
        "  pretrain: waiting for the synth service at s:1",
        "  pretrain: pretrained on 2000 synthetic images: 86.9%",
        "  federating: round 1: training on 2 silos",
    ]
    assert script.lines[3].startswith("round   1/2: test acc  50.00%")
    assert script.lines[-1] == "job job-1 finished: finished 2 rounds"


def test_each_round_shows_every_silos_reported_epsilon() -> None:
    spends = [
        PrivacyView("silo-2", 2.345, 1e-5, "rdp", ""),
        PrivacyView("silo-1", 1.2, 1e-5, "rdp", "reported epsilon fell from 2 to 1.2"),
        PrivacyView("silo-3", 0.0, 0.0, "", ""),
    ]
    finished = dataclasses.replace(
        _status("finished", "finished 1 rounds", rounds=1), privacy=spends
    )
    script = Script([finished])
    code = follow(script, interval_s=0, out=script.lines.append)  # type: ignore[arg-type]
    assert code == EXIT_OK
    assert script.lines[1] == (
        "           epsilon silo-1 1.2 (!), silo-2 2.345, silo-3 no DP (delta 1e-05)"
    )


def test_a_failed_job_exits_with_the_job_failed_code() -> None:
    script = Script([_status("failed", "pretrain phase failed: Generate at s:1: NOT_FOUND")])
    code = follow(script, interval_s=0, out=script.lines.append)  # type: ignore[arg-type]
    assert code == EXIT_JOB_FAILED
    assert script.lines == ["job job-1 failed: pretrain phase failed: Generate at s:1: NOT_FOUND"]


# ---- exit codes and one-line errors ---------------------------------------------------------


def _admin(monkeypatch: pytest.MonkeyPatch, error: grpc.RpcError, *argv: str) -> int:
    monkeypatch.setattr(admin_cmd, "AdminClient", lambda *_a, **_k: RefusingClient(error))
    return main(["admin", "--insecure", *argv])


def test_a_spec_the_coordinator_refuses_exits_with_the_config_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "name: j\nmodel: {arch: nope, num_classes: 10, in_channels: 1, image_size: 8}\nrounds: 1\n"
    )
    refused = FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "unknown model architecture 'nope'")
    assert _admin(monkeypatch, refused, "submit", str(spec)) == EXIT_CONFIG
    assert capsys.readouterr().err == (
        "gptfl admin: INVALID_ARGUMENT: unknown model architecture 'nope'\n"
    )


@pytest.mark.parametrize(
    ("code", "argv", "exit_code"),
    [
        (grpc.StatusCode.UNAVAILABLE, ("submit", "SPEC"), EXIT_UNAVAILABLE),
        (grpc.StatusCode.DEADLINE_EXCEEDED, ("stop",), EXIT_UNAVAILABLE),
        (grpc.StatusCode.FAILED_PRECONDITION, ("submit", "SPEC"), EXIT_FAILURE),
        (grpc.StatusCode.FAILED_PRECONDITION, ("stop",), EXIT_FAILURE),
        (grpc.StatusCode.PERMISSION_DENIED, ("stop",), EXIT_FAILURE),
    ],
)
def test_no_answer_exits_4_and_other_refusals_exit_1(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    code: grpc.StatusCode,
    argv: tuple[str, ...],
    exit_code: int,
) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "name: j\nmodel: {arch: cnn-small, num_classes: 10, in_channels: 1, image_size: 8}\n"
        "rounds: 1\n"
    )
    argv = tuple(str(spec) if a == "SPEC" else a for a in argv)
    assert _admin(monkeypatch, FakeRpcError(code, "no"), *argv) == exit_code


def test_an_unreachable_coordinator_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    down = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect")
    assert _admin(monkeypatch, down, "stop") == EXIT_UNAVAILABLE
    assert capsys.readouterr().err == (
        "gptfl admin: coordinator unreachable (failed to connect); "
        "check the address and certificates\n"
    )


class _Downloader:
    """Stands in for AdminClient.download_model_to: writes a real file, counts calls."""

    def __init__(self, error: OSError | None = None) -> None:
        self.calls = 0
        self._error = error

    def download_model_to(self, path: Path) -> int:
        self.calls += 1
        if self._error is not None:
            raise self._error
        save_weights(path, {"w": torch.zeros(3)})
        return 3


def _download(client: _Downloader, out: Path) -> int:
    return admin_cmd._download(client, argparse.Namespace(out=out))  # type: ignore[arg-type]


def test_download_model_writes_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "models" / "model.safetensors"
    assert _download(_Downloader(), out) == EXIT_OK
    assert out.is_file()
    assert capsys.readouterr().out == f"wrote {out} (3 parameters)\n"


def test_download_model_into_a_directory_fails_in_one_line_before_downloading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = _Downloader()
    assert _download(client, tmp_path) == EXIT_FAILURE
    assert client.calls == 0
    assert capsys.readouterr().err == f"gptfl admin: cannot write {tmp_path}: is a directory\n"


def test_download_model_under_a_file_fails_in_one_line_before_downloading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "plain").write_text("x")
    out = tmp_path / "plain" / "sub" / "model.safetensors"
    client = _Downloader()
    assert _download(client, out) == EXIT_FAILURE
    assert client.calls == 0
    assert capsys.readouterr().err == (
        f"gptfl admin: cannot write {out}: {tmp_path / 'plain'} is not a directory\n"
    )


def test_download_model_that_cannot_be_written_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    denied = PermissionError(13, "Permission denied")
    out = tmp_path / "model.safetensors"
    assert _download(_Downloader(denied), out) == EXIT_FAILURE
    assert capsys.readouterr().err == f"gptfl admin: cannot write {out}: Permission denied\n"
