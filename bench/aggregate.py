"""Coordinator peak RSS while aggregating 100 MB updates from 2, 8 and 16 silos.

For each silo count a fresh coordinator runs in its own process (``start_coordinator`` with
an ``initial_model`` returning ~100 MB of float32 weights, mTLS on port 0), so its RSS is its
own. The silos are one client process with a thread and an mTLS channel per silo
(:class:`silo_agent.fleet_client.FleetClient`): each registers and pulls its round-1 task; once
all hold one, all upload the 100 MB update at once (no download: this bench is about
receiving and aggregating).

Memory is read from ``/proc/<pid>/status`` of the coordinator: the idle RSS after the initial
model is loaded (before any job), then the peak (``VmHWM``, reset through ``clear_refs`` at
each phase boundary) during three phases: job start (round-0 checkpoint, task publication),
the uploads (received, verified and folded into the running sum, at most
``max_concurrent_uploads`` at a time) and the round close (average, new global model,
checkpoint). A 5 ms ``VmRSS`` sampler cross-checks the peaks.

    python -m bench.aggregate [--silos 2,8,16] [--mb 100]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from bench.machine import format_table, load_average, machine, median, stamp, write_result
from bench.payload import DEFAULT_MODEL_MB, big_weights, nbytes
from coordinator.config import CoordinatorConfig
from coordinator.server import start_coordinator
from gptfl import rpc
from gptfl.admin_client import AdminClient
from gptfl.pki import init_pki, participant_files
from gptfl.service_process import ENDPOINTS_FILE, stop_on_signals, wait_for_stop
from gptfl.tls_config import TlsConfig
from gptfl.weights import WeightMap
from silo_agent.fleet_client import FleetClient

GOAL_MULTIPLE = 3.0
JOB_SPEC = """\
name: bench-aggregate
model: {arch: cnn-small, num_classes: 10, in_channels: 1, image_size: 8}
rounds: 2
min_silos: %d
round_deadline_s: 900
wait_for_silos_s: 120
evaluation: {federated: false}
"""


# ---------------------------------------------------------------------------------------------
# the coordinator process


def coordinator_main(
    pki_dir: Path, state_dir: Path, model_mb: float, uploads: int, server_options: list[str]
) -> int:
    logging.basicConfig(level=logging.WARNING)
    for option in server_options:
        # What-if experiments for a proposed product change (off by default): extra gRPC
        # server options appended to the ones every GPT-FL server gets.
        key, _, value = option.partition("=")
        rpc._SERVER_OPTIONS.append((key, int(value)))
    # "The initial model is loaded" before any job, and handed over to the job rather than
    # kept here: from round 2 on the coordinator holds only its own global model, as it would
    # with a model loaded from a file.
    loaded = [big_weights(model_mb)]
    files = participant_files(pki_dir, "coordinator")
    config = CoordinatorConfig(
        fleet_address="127.0.0.1:0",
        admin_address="127.0.0.1:0",
        tls=TlsConfig(ca=files.ca, cert=files.cert, key=files.key),
        state_dir=state_dir,
        max_concurrent_uploads=uploads,
        heartbeat_interval_s=30.0,  # long uploads queue behind the upload slots
    )
    coordinator = start_coordinator(
        config, initial_model=lambda _runner: (loaded.pop(), {"kind": "bench-aggregate"})
    )
    wait_for_stop(stop_on_signals())
    coordinator.stop(grace_s=1)
    return 0


# ---------------------------------------------------------------------------------------------
# the silos: one process, a thread and a channel per silo


def silos_main(pki_dir: Path, address: str, count: int, model_mb: float) -> int:
    logging.basicConfig(level=logging.WARNING)
    weights = big_weights(model_mb, seed=1)
    holding = threading.Barrier(count + 1)
    go = threading.Event()
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def silo(index: int) -> None:
        files = participant_files(pki_dir, "silo", f"silo-{index}")
        ca, cert, key = files.read()
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )
        with grpc.secure_channel(address, credentials) as channel:
            client = FleetClient(channel)
            client.register(agent_version="bench", device="cpu", num_train=1 + index, num_eval=0)
            deadline = time.monotonic() + 300
            while (task := client.pull_task(5.0).task) is None:
                if time.monotonic() > deadline:
                    raise TimeoutError("no task within 300 s")
                time.sleep(0.05)
            holding.wait()
            go.wait()
            start = time.monotonic()
            outcome = "ok"
            try:
                client.upload_update(
                    task,
                    weights,
                    num_examples=1 + index,
                    metrics={"loss": 0.0, "accuracy": 0.0},
                    train_seconds=0.0,
                )
            except grpc.RpcError as exc:
                outcome = f"{exc.code().name}: {exc.details()}"
            with lock:
                results.append(
                    {"silo": index, "start": start, "end": time.monotonic(), "outcome": outcome}
                )

    threads = [threading.Thread(target=silo, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    holding.wait(timeout=600)
    _emit({"event": "holding"})
    sys.stdin.readline()  # "go"
    go.set()
    for thread in threads:
        thread.join()
    _emit({"event": "done", "results": results})
    return 0


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# reading the coordinator's memory


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def rss(pid: int) -> int:
    return _status_kib(pid, "VmRSS") * 1024


def peak_and_reset(pid: int) -> int:
    """The peak RSS since the last reset (VmHWM), then resets it to the current RSS."""
    peak = _status_kib(pid, "VmHWM") * 1024
    with open(f"/proc/{pid}/clear_refs", "w") as handle:
        handle.write("5")
    return peak


class RssSampler:
    """Samples VmRSS every few milliseconds; :meth:`mark` closes a phase and keeps its max."""

    def __init__(self, pid: int, interval_s: float = 0.005) -> None:
        self._pid = pid
        self._interval = interval_s
        self._current = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.samples = 0

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                value = rss(self._pid)
            except (OSError, KeyError):
                return
            with self._lock:
                self._current = max(self._current, value)
                self.samples += 1

    def mark(self) -> int:
        with self._lock:
            peak, self._current = self._current, 0
        return peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------
# the driver


def _spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.aggregate", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def _read_event(process: subprocess.Popen[str], name: str) -> dict[str, Any]:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"the silo process exited (code {process.wait()}) before {name!r}")
    event: dict[str, Any] = json.loads(line)
    if event.get("event") != name:
        raise RuntimeError(f"expected {name!r} from the silo process, got {event}")
    return event


def _latest_checkpoint(state_dir: Path) -> str:
    for pointer in state_dir.glob("jobs/*/checkpoints/LATEST"):
        return pointer.read_text().strip()
    return ""


def measure(
    work: Path,
    pki_dir: Path,
    silos: int,
    model_mb: float,
    uploads: int,
    *,
    coordinator_env: dict[str, str],
    server_options: list[str],
) -> dict[str, Any]:
    """One coordinator process, one round with ``silos`` concurrent 100 MB uploads."""
    state_dir = work / f"state-{silos}"
    coordinator = _spawn(
        "--role",
        "coordinator",
        "--pki",
        str(pki_dir),
        "--state",
        str(state_dir),
        "--mb",
        str(model_mb),
        "--max-concurrent-uploads",
        str(uploads),
        *(f"--grpc-server-option={o}" for o in server_options),
        env=coordinator_env,
    )
    clients: subprocess.Popen[str] | None = None
    sampler = RssSampler(coordinator.pid)
    try:
        endpoints = state_dir / ENDPOINTS_FILE
        deadline = time.monotonic() + 120
        while not endpoints.exists():
            if coordinator.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the coordinator did not start")
            time.sleep(0.05)
        ports = json.loads(endpoints.read_text())
        time.sleep(1.0)  # settle: the idle process with its initial model loaded
        readings = []
        for _ in range(20):
            readings.append(rss(coordinator.pid))
            time.sleep(0.02)
        idle = int(median(readings))

        clients = _spawn(
            "--role",
            "silos",
            "--pki",
            str(pki_dir),
            "--address",
            f"127.0.0.1:{ports['fleet_port']}",
            "--silos",
            str(silos),
            "--mb",
            str(model_mb),
        )
        peak_and_reset(coordinator.pid)
        sampler.start()
        admin_files = participant_files(pki_dir, "admin")
        with AdminClient(f"127.0.0.1:{ports['admin_port']}", tls=admin_files) as admin:
            admin.submit(JOB_SPEC % silos)
        _read_event(clients, "holding")
        time.sleep(0.5)  # the round's tasks are out; nothing is moving
        start_peak, start_sampled = peak_and_reset(coordinator.pid), sampler.mark()
        holding_rss = rss(coordinator.pid)

        assert clients.stdin is not None
        started = time.monotonic()
        clients.stdin.write("go\n")
        clients.stdin.flush()
        done = _read_event(clients, "done")
        uploads_s = time.monotonic() - started
        upload_peak, upload_sampled = peak_and_reset(coordinator.pid), sampler.mark()
        failed = [r for r in done["results"] if r["outcome"] != "ok"]
        if failed:
            raise RuntimeError(f"{len(failed)} uploads failed, e.g. {failed[0]['outcome']}")

        deadline = time.monotonic() + 300
        while _latest_checkpoint(state_dir) != "round-0001":
            if time.monotonic() > deadline:
                raise RuntimeError("round 1 did not close")
            time.sleep(0.01)
        close_peak, close_sampled = peak_and_reset(coordinator.pid), sampler.mark()
    finally:
        sampler.stop()
        for process in (clients, coordinator):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in (clients, coordinator):
            if process is not None:
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    return {
        "silos": silos,
        "idle_rss": idle,
        "rss_with_tasks_out": holding_rss,
        "peak_job_start": start_peak,
        "peak_uploads": upload_peak,
        "peak_round_close": close_peak,
        "sampled_peak_job_start": start_sampled,
        "sampled_peak_uploads": upload_sampled,
        "sampled_peak_round_close": close_sampled,
        "uploads_seconds": uploads_s,
        "sampler_samples": sampler.samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--silos", default="2,8,16", help="silo counts, comma separated")
    parser.add_argument("--mb", type=float, default=DEFAULT_MODEL_MB, help="model size in MB")
    parser.add_argument("--runs", type=int, default=3, help="repeats per silo count (median)")
    parser.add_argument(
        "--max-concurrent-uploads", type=int, default=1, help="the coordinator setting (1)"
    )
    parser.add_argument(
        "--coordinator-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="what-if: environment for the coordinator process, e.g. MALLOC_ARENA_MAX=2",
    )
    parser.add_argument(
        "--grpc-server-option",
        action="append",
        default=[],
        metavar="KEY=INT",
        help="what-if: an extra gRPC server option for the coordinator (grpc.http2.bdp_probe=0)",
    )
    parser.add_argument("--out", type=Path, help="JSON result path (default bench/results/)")
    parser.add_argument(
        "--role",
        choices=["driver", "coordinator", "silos"],
        default="driver",
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--pki", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "coordinator":
        return coordinator_main(
            args.pki, args.state, args.mb, args.max_concurrent_uploads, args.grpc_server_option
        )
    if args.role == "silos":
        return silos_main(args.pki, args.address, int(args.silos), args.mb)

    counts = [int(c) for c in args.silos.split(",")]
    coordinator_env = dict(item.partition("=")[::2] for item in args.coordinator_env)
    model: WeightMap = big_weights(args.mb)
    model_bytes = nbytes(model)
    del model
    machine_info = machine()
    load_before = load_average()
    measurements: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gptfl-bench-aggregate-") as tmp:
        work = Path(tmp)
        pki_dir = work / "pki"
        init_pki(
            pki_dir,
            coordinator_hosts=["127.0.0.1"],
            silos=[f"silo-{i}" for i in range(max(counts))],
        )
        for run in range(args.runs):
            for count in counts:
                result = measure(
                    work / f"run-{run}",
                    pki_dir,
                    count,
                    args.mb,
                    args.max_concurrent_uploads,
                    coordinator_env=coordinator_env,
                    server_options=args.grpc_server_option,
                )
                measurements.append(result)
                above = max(result["peak_uploads"], result["peak_round_close"]) - result["idle_rss"]
                print(
                    f"{count:>2} silos: idle {result['idle_rss'] / 2**20:.0f} MiB, peak "
                    f"{above / model_bytes:.2f}x model above idle, uploads "
                    f"{result['uploads_seconds']:.1f}s, load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
    load_after = load_average()

    def above_idle(count: int, key: str) -> float:
        return median(m[key] - m["idle_rss"] for m in measurements if m["silos"] == count)

    rows = []
    summary: dict[str, dict[str, float]] = {}
    for count in counts:
        peaks = {
            key: above_idle(count, key)
            for key in ("peak_job_start", "peak_uploads", "peak_round_close", "rss_with_tasks_out")
        }
        aggregating = max(peaks["peak_uploads"], peaks["peak_round_close"])
        summary[str(count)] = {**peaks, "aggregating": aggregating}
        rows.append(
            [
                count,
                median(m["idle_rss"] for m in measurements if m["silos"] == count) / 2**20,
                peaks["rss_with_tasks_out"] / 2**20,
                peaks["peak_uploads"] / 2**20,
                peaks["peak_round_close"] / 2**20,
                aggregating / model_bytes,
                (peaks["peak_uploads"] - peaks["rss_with_tasks_out"]) / model_bytes,
                median(m["uploads_seconds"] for m in measurements if m["silos"] == count),
            ]
        )
    worst = max(s["aggregating"] for s in summary.values()) / model_bytes
    spread = (
        max(s["peak_uploads"] for s in summary.values())
        - min(s["peak_uploads"] for s in summary.values())
    ) / model_bytes
    if coordinator_env or args.grpc_server_option:
        print(f"\nWHAT-IF run: {coordinator_env} {args.grpc_server_option} (not the product)")
    print(
        f"\ncoordinator RSS in MiB above its idle RSS (round open: tasks out, running sum "
        f"allocated; peaks: VmHWM per phase) (model {model_bytes / 1e6:.1f} MB = "
        f"{model_bytes / 2**20:.1f} MiB; max_concurrent_uploads {args.max_concurrent_uploads}; "
        f"median of {args.runs})"
    )
    print(
        format_table(
            [
                "silos",
                "idle MiB",
                "round open",
                "uploads peak",
                "close peak",
                "peak / model",
                "uploads / model above round open",
                "uploads s",
            ],
            rows,
        )
    )
    independent = spread <= 0.5
    print(
        f"goal: independent of the silo count (upload-phase peaks differ by {spread:.2f}x model): "
        f"{'met' if independent else 'NOT met'}; <= {GOAL_MULTIPLE:g}x model: "
        f"{'met' if worst <= GOAL_MULTIPLE else 'NOT met'} (worst {worst:.2f}x)"
    )
    print(f"load average before {load_before}, after {load_after}")
    result_doc = {
        "bench": "aggregate",
        "when": stamp(),
        "command": "python -m bench.aggregate " + " ".join(argv or sys.argv[1:]),
        "machine": machine_info,
        "load_before": load_before,
        "load_after": load_after,
        "model_bytes": model_bytes,
        "max_concurrent_uploads": args.max_concurrent_uploads,
        "what_if": {
            "coordinator_env": coordinator_env,
            "grpc_server_options": args.grpc_server_option,
        },
        "runs": args.runs,
        "measurements": measurements,
        "above_idle_bytes": summary,
        "goal": {
            "max_multiple": GOAL_MULTIPLE,
            "worst_multiple": worst,
            "upload_peak_spread_multiple": spread,
            "met": worst <= GOAL_MULTIPLE and independent,
        },
    }
    print(f"result: {write_result('aggregate', result_doc, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
