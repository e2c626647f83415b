"""``gptfl admin ...``: submit and watch jobs on a coordinator with the admin certificate."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from gptfl.admin_client import AdminClient, PrivacyView, StatusView
from gptfl.cli.exit_codes import report_rpc_error
from gptfl.errors import EXIT_FAILURE, EXIT_JOB_FAILED, EXIT_OK
from gptfl.job_spec import read_job_spec
from gptfl.tls_config import TlsConfig

DEFAULT_ADDRESS = "127.0.0.1:50052"


def register(subparsers: Any) -> None:
    admin = subparsers.add_parser("admin", help="talk to a coordinator's admin API")
    admin.add_argument(
        "--coordinator", default=DEFAULT_ADDRESS, help=f"admin address (default {DEFAULT_ADDRESS})"
    )
    admin.add_argument(
        "--certs",
        type=Path,
        default=Path("pki/admin"),
        help="folder with ca.pem, cert.pem, key.pem of the admin identity (default pki/admin)",
    )
    admin.add_argument("--server-name", help="TLS name of the coordinator, if not its address")
    admin.add_argument("--insecure", action="store_true", help="plaintext (development only)")
    admin.set_defaults(handler=lambda _a: _help(admin))
    commands = admin.add_subparsers(dest="admin_command", metavar="ACTION")

    submit = commands.add_parser("submit", help="validate and submit a job spec")
    submit.add_argument("spec", type=Path, help="job.yaml")
    submit.add_argument("--wait", action="store_true", help="follow the job until it ends")
    submit.set_defaults(handler=_with_client(_submit))

    status = commands.add_parser("status", help="job, round, silos seen, last metrics")
    status.add_argument("--watch", action="store_true", help="follow the job until it ends")
    status.set_defaults(handler=_with_client(_status))

    silos = commands.add_parser("silos", help="the silos the coordinator has seen")
    silos.set_defaults(handler=_with_client(_silos))

    stop = commands.add_parser("stop", help="stop the running job")
    stop.add_argument("--reason", default="stopped by admin")
    stop.set_defaults(handler=_with_client(_stop))

    download = commands.add_parser("download-model", help="save the global model (safetensors)")
    download.add_argument("out", type=Path, help="where to write model.safetensors")
    download.set_defaults(handler=_with_client(_download))


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _with_client(
    action: Callable[[AdminClient, argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        tls = None if args.insecure else TlsConfig.from_dir(args.certs).files()
        try:
            with AdminClient(args.coordinator, tls=tls, server_name=args.server_name) as client:
                return action(client, args)
        except grpc.RpcError as exc:
            return report_rpc_error("gptfl admin", exc, peer="coordinator")

    return handler


def _submit(client: AdminClient, args: argparse.Namespace) -> int:
    # validated here first (errors name the key at once), and the same text is sent
    spec, text = read_job_spec(args.spec)
    job_id = client.submit(text)
    print(f"submitted job {job_id}: {spec.rounds} rounds of {spec.strategy.name}")
    return follow(client) if args.wait else EXIT_OK


def _status(client: AdminClient, args: argparse.Namespace) -> int:
    if args.watch:
        return follow(client)
    print_status(client.status())
    return EXIT_OK


def _silos(client: AdminClient, _args: argparse.Namespace) -> int:
    silos = client.silos()
    if not silos:
        print("no silo has connected yet")
        return EXIT_OK
    print(
        f"{'silo':<20} {'connected':<9} {'state':<12} {'rounds':>6} {'examples':>8} "
        f"{'last seen':>10}"
    )
    now = time.time()
    for s in silos:
        ago = f"{now - s.last_seen_unix:.0f}s ago"
        print(
            f"{s.silo_id:<20} {'yes' if s.connected else 'no':<9} {s.state:<12} "
            f"{s.rounds_participated:>6} {s.num_train_examples:>8} {ago:>10}"
        )
    return EXIT_OK


def _stop(client: AdminClient, args: argparse.Namespace) -> int:
    print(f"job is now {client.stop(args.reason)}")
    return EXIT_OK


def _download(client: AdminClient, args: argparse.Namespace) -> int:
    out: Path = args.out
    # Checked before the download, so a mistyped OUT costs no transfer.
    problem = _unwritable_reason(out)
    if problem is None:
        try:
            params = client.download_model_to(out)
        except OSError as exc:
            problem = exc.strerror or str(exc)
        else:
            print(f"wrote {out} ({params} parameters)")
            return EXIT_OK
    print(f"gptfl admin: cannot write {out}: {problem}", file=sys.stderr)
    return EXIT_FAILURE


def _unwritable_reason(out: Path) -> str | None:
    """Why a file cannot be written at ``out`` (a folder there or above), or None."""
    if out.is_dir():
        return "is a directory"
    for parent in out.parents:
        if parent.exists():
            return None if parent.is_dir() else f"{parent} is not a directory"
    return None


def _pct(metrics: dict[str, float], key: str) -> str:
    return f"{100 * metrics[key]:6.2f}%" if key in metrics else "      -"


def print_status(status: StatusView) -> None:
    if not status.job_id:
        print(f"no job; {status.silos_connected} silos connected")
        return
    print(
        f"job {status.job_id}: {status.phase}, round {status.round}/{status.total_rounds}, "
        f"{status.silos_connected} silos connected"
    )
    if status.message:
        print(f"  {status.message}")
    if status.rounds:
        last = status.rounds[-1]
        print(
            f"  last round {last.round}: "
            f"test accuracy {_pct(last.server, 'test_accuracy').strip()}, "
            f"federated accuracy {_pct(last.federated, 'accuracy').strip()}, "
            f"{last.updates_accepted}/{last.silos_selected} updates, {last.seconds:.2f}s"
        )
    if status.stage:
        dropped = ", ".join(status.stage_dropped) or "none"
        print(
            f"  stage: {status.stage}; silos: {', '.join(status.stage_silos) or 'none'}; "
            f"dropped: {dropped}"
        )
    if status.silo_level_privacy is not None:
        epsilon, delta = status.silo_level_privacy
        print(f"  silo-level DP: epsilon {epsilon:.3g} at delta {delta:g} so far")
    for p in status.privacy:
        spend = (
            f"epsilon {p.epsilon:.3g} (delta {p.delta:g}, {p.accountant})" if p.accountant else ""
        )
        print(f"  {p.silo_id} privacy: {spend}{'; FLAGGED: ' + p.flag if p.flag else ''}")
    for d in status.declines:
        tasks = f", {d.count} tasks declined" if d.count > 1 else ""
        print(
            f"  {d.silo_id} declined round {d.last_round} ({d.last_kind}{tasks}): {d.last_reason}"
        )


def follow(
    client: AdminClient,
    *,
    interval_s: float = 0.5,
    progress_interval_s: float = 5.0,
    out: Callable[[str], None] = print,
) -> int:
    """Prints a line per finished round until the job ends; returns an exit code.

    Before round 1 (the pretrain phase, waiting for silos) the status line is printed when
    it changes, at most every ``progress_interval_s`` within a phase; the last line of a
    phase is always printed. When silos report a DP spend, each round's line is followed by
    one with every silo's cumulative epsilon as the status shows it then (a silo's update of
    the next round may already be in; ``summary.json`` keeps each round's own).

    Args:
        client: the admin client.
        interval_s: the pause between two status calls.
        progress_interval_s: the least time between two progress lines of a phase.
        out: where lines go.
    """
    printed = 0
    progress = _ProgressLines(out, progress_interval_s)
    while True:
        status = client.status()
        for r in status.rounds[printed:]:
            out(
                f"round {r.round:>3}/{status.total_rounds}: "
                f"test acc {_pct(r.server, 'test_accuracy')}"
                f"  loss {r.server.get('test_loss', float('nan')):.4f}  federated acc "
                f"{_pct(r.federated, 'accuracy')}  updates {r.updates_accepted}/{r.silos_selected}"
                f"  {r.seconds:5.2f}s"
            )
            if status.privacy:
                out(f"{'':>11}{epsilon_line(status.privacy)}")
        printed = len(status.rounds)
        if not status.rounds and not status.ended:
            progress.update(status.phase, status.message)
        else:
            progress.flush()
        if status.ended:
            out(f"job {status.job_id} {status.phase}: {status.message}")
            return EXIT_OK if status.phase == "finished" else EXIT_JOB_FAILED
        time.sleep(interval_s)


def epsilon_line(privacy: Sequence[PrivacyView]) -> str:
    """``epsilon silo-1 1.234, silo-2 1.31 (delta 1e-05)``: each silo's reported DP spend."""
    spends = sorted(privacy, key=lambda p: p.silo_id)
    deltas = sorted({p.delta for p in spends if p.accountant})
    cells = ", ".join(
        f"{p.silo_id} {f'{p.epsilon:.4g}' if p.accountant else 'no DP'}{' (!)' if p.flag else ''}"
        for p in spends
    )
    return f"epsilon {cells} (delta {', '.join(f'{d:g}' for d in deltas) or '-'})"


class _ProgressLines:
    """Status lines of the phases before round 1, throttled within a phase."""

    def __init__(self, out: Callable[[str], None], interval_s: float) -> None:
        self._out = out
        self._interval_s = interval_s
        self._phase = ""
        self._shown = ""
        self._pending: str | None = None
        self._last_print = -float("inf")

    def update(self, phase: str, message: str) -> None:
        if not message:
            return
        line = f"  {phase}: {message}"
        if line == self._shown or line == self._pending:
            return
        now = time.monotonic()
        if phase != self._phase:
            self.flush()
        elif now - self._last_print < self._interval_s:
            self._pending = line
            return
        self._phase = phase
        self._emit(line, now)

    def flush(self) -> None:
        if self._pending is not None:
            self._emit(self._pending, time.monotonic())

    def _emit(self, line: str, now: float) -> None:
        self._out(line)
        self._shown = line
        self._pending = None
        self._last_print = now
