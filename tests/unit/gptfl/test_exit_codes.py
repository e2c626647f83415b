"""One gRPC-status-to-exit-code table for every command line, and docs/cli.md shows it."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest

from gptfl.cli import admin_cmd, synth_cmd
from gptfl.cli.exit_codes import RPC_EXIT_CODES, rpc_exit_code, run_command
from gptfl.cli.main import main
from gptfl.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_UNAVAILABLE
from tests.rpc_fakes import FakeRpcError, RefusingClient

ROOT = Path(__file__).resolve().parents[3]
FAILED = [code for code in grpc.StatusCode if code is not grpc.StatusCode.OK]


def _refused(monkeypatch: pytest.MonkeyPatch, code: grpc.StatusCode, argv: list[str]) -> int:
    error = FakeRpcError(code, "no")
    monkeypatch.setattr(admin_cmd, "AdminClient", lambda *_a, **_k: RefusingClient(error))
    monkeypatch.setattr(synth_cmd, "SynthClient", lambda *_a, **_k: RefusingClient(error))
    return main(argv)


@pytest.mark.parametrize("code", FAILED, ids=lambda c: c.name)
def test_every_command_exits_alike_for_a_status(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], code: grpc.StatusCode
) -> None:
    admin = _refused(monkeypatch, code, ["admin", "--insecure", "silos"])
    synth = _refused(
        monkeypatch,
        code,
        ["synth", "generate", "--insecure", "--labels", "0", "--images-per-label", "1"]
        + ["--image-size", "8"],
    )
    assert admin == synth == rpc_exit_code(code)
    lines = [line for line in capsys.readouterr().err.splitlines() if "WARNING" not in line]
    assert [line.split(":")[0] for line in lines] == ["gptfl admin", "gptfl synth"], lines


def test_what_was_sent_is_3_no_answer_is_4_a_refusal_is_1() -> None:
    assert rpc_exit_code(grpc.StatusCode.INVALID_ARGUMENT) == EXIT_CONFIG
    assert rpc_exit_code(grpc.StatusCode.UNAVAILABLE) == EXIT_UNAVAILABLE
    assert rpc_exit_code(grpc.StatusCode.DEADLINE_EXCEEDED) == EXIT_UNAVAILABLE
    assert rpc_exit_code(grpc.StatusCode.FAILED_PRECONDITION) == EXIT_FAILURE
    assert rpc_exit_code(grpc.StatusCode.PERMISSION_DENIED) == EXIT_FAILURE


def test_docs_cli_md_shows_the_table() -> None:
    text = (ROOT / "docs" / "cli.md").read_text()
    table = text.split("| gRPC status | exit code |", 1)[1].split("\n\n", 1)[0]
    listed: dict[str, int] = {}
    other: int | None = None
    for row in table.strip().splitlines()[1:]:
        status, code = (cell.strip() for cell in row.strip("|").rsplit("|", 1))
        if status.startswith("any other"):
            other = int(code)
        else:
            listed[status.strip("`")] = int(code)
    assert listed == {code.name: exit_code for code, exit_code in RPC_EXIT_CODES.items()}
    assert other == EXIT_FAILURE
    assert re.search(r"`RPC_EXIT_CODES` in `gptfl/cli/exit_codes.py`", text)


def test_a_failed_call_without_a_handler_of_its_own_is_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def command() -> int:
        raise FakeRpcError(grpc.StatusCode.PERMISSION_DENIED, "not an admin")

    assert run_command("gptfl", command) == EXIT_FAILURE
    assert capsys.readouterr().err == "gptfl: PERMISSION_DENIED: not an admin\n"
