"""Broadcast a ~100 MB model to 4 silos and collect 4 updates, against a bare-grpcio floor.

Product path: the real coordinator (``start_coordinator``, in this process, mTLS on port 0,
an ``initial_model`` callable returning the big weights) runs a one-round job; 4 silo
processes use :class:`silo_agent.fleet_client.FleetClient` to register, pull the task,
download and verify the model and upload it back as their update. The figure is the time from
the first silo receiving its task to the last update acknowledged (the round's collection is
complete); the coordinator's own round time (adding aggregation, hashing the new global model
and writing the checkpoint) is reported beside it.

Floor: the same bytes (each silo downloads the payload and uploads it back, in 1 MiB messages)
through a bare grpcio unary-stream / stream-unary service with no protobuf, checksums or
verification, over mTLS with the same certificates, same processes, measured in the same run.

The coordinator's memory: this process's peak RSS over each job (``VmHWM``, reset at the job's
start) above its RSS at the first job's start ("idle": the model loaded and held, as in
bench/aggregate.py; here also the floor's copy of the payload).

    python -m bench.transfer [--runs 5] [--mb 100] [--silos 4] [--profile]
    python -m bench.transfer --mb 2250 --silos 1     # a model above the 2^31-byte line
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import logging
import os
import pstats
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from types import FrameType
from typing import Any

import blake3
import grpc
import torch
from zlib_ng.zlib_ng import crc32

from bench.aggregate import peak_and_reset, rss
from bench.machine import format_table, load_average, machine, median, stamp, write_result
from bench.payload import DEFAULT_MODEL_MB, big_weights, model_specs, nbytes
from coordinator.aggregation import ExactSum
from coordinator.config import CoordinatorConfig
from coordinator.server import Coordinator, start_coordinator
from gptfl import serde
from gptfl.memory import tune_allocator
from gptfl.pki import TlsFiles, init_pki, participant_files
from gptfl.proto.v1 import common_pb2
from gptfl.tls_config import TlsConfig
from gptfl.weights import (
    Chunk,
    Manifest,
    PayloadReceiver,
    WeightMap,
    build_manifest,
    iter_chunks,
    manifest_and_crcs,
    specs_of,
)
from silo_agent.fleet_client import FleetClient

log = logging.getLogger("bench.transfer")

FLOOR_SERVICE = "/gptfl.bench.Floor/"
SILOS = 4
RUNS = 5
#: the goal, as a multiple of the floor: 1.5x, and 2x for models above 2^31 bytes (issue 14)
GOAL = 1.5
LARGE_GOAL = 2.0
LARGE_BYTES = 1 << 31
#: the per-step table holds several copies of the model: skipped above this size
STEPS_MAX_BYTES = 1 << 30
JOB_SPEC = """\
name: bench-transfer
model: {arch: cnn-small, num_classes: 10, in_channels: 1, image_size: 8}
rounds: 1
min_silos: %d
round_deadline_s: 600
wait_for_silos_s: 60
evaluation: {federated: false}
"""


# ---------------------------------------------------------------------------------------------
# the silo side (a separate process per silo, driven over stdin/stdout with JSON lines)


def _channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


class _SiloProcess:
    """What one silo process does on each command."""

    def __init__(self, silo_id: str, pki_dir: Path, model_mb: float) -> None:
        self.files = participant_files(pki_dir, "silo", silo_id)
        self.specs = model_specs(model_mb)
        self.floor: grpc.Channel | None = None
        self.fleet: FleetClient | None = None

    def floor_connect(self, address: str) -> dict[str, Any]:
        self.floor = grpc.secure_channel(address, _channel_credentials(self.files))
        download: grpc.UnaryStreamMultiCallable[bytes, bytes] = self.floor.unary_stream(
            FLOOR_SERVICE + "Download"
        )
        list(download(b"ping", timeout=30))  # handshake now, not in the timed part
        return {}

    def floor_run(self) -> dict[str, Any]:
        assert self.floor is not None
        download: grpc.UnaryStreamMultiCallable[bytes, bytes] = self.floor.unary_stream(
            FLOOR_SERVICE + "Download"
        )
        upload: grpc.StreamUnaryMultiCallable[bytes, bytes] = self.floor.stream_unary(
            FLOOR_SERVICE + "Upload"
        )
        cpu = time.process_time()
        start = time.monotonic()
        chunks: list[bytes] = list(download(b"", timeout=600))
        downloaded = time.monotonic()
        upload(iter(chunks), timeout=600)
        end = time.monotonic()
        return {
            "start": start,
            "downloaded": downloaded,
            "end": end,
            "bytes": sum(len(c) for c in chunks),
            "cpu_s": time.process_time() - cpu,
        }

    def fleet_connect(self, address: str) -> dict[str, Any]:
        channel = grpc.secure_channel(address, _channel_credentials(self.files))
        self.fleet = FleetClient(channel)
        self.fleet.register(agent_version="bench", device="cpu", num_train=1, num_eval=0)
        return {}

    def fleet_run(self) -> dict[str, Any]:
        assert self.fleet is not None
        deadline = time.monotonic() + 300
        while True:
            pulled = self.fleet.pull_task(5.0)
            if pulled.task is not None:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("no task within 300 s")
            time.sleep(0.01)  # the previous job has ended: poll until the next one is up
        task = pulled.task
        cpu = time.process_time()
        start = time.monotonic()
        _emit({"ok": True, "event": "task", "at": start})
        weights = self.fleet.download_model(task, expected=self.specs)
        downloaded = time.monotonic()
        self.fleet.upload_update(
            task,
            weights,
            num_examples=1,
            metrics={"loss": 0.0, "accuracy": 0.0},
            train_seconds=0.0,
        )
        end = time.monotonic()
        return {
            "start": start,
            "downloaded": downloaded,
            "end": end,
            "bytes": nbytes(weights),
            "cpu_s": time.process_time() - cpu,
        }


def silo_main(silo_id: str, pki_dir: Path, model_mb: float) -> int:
    tune_allocator()  # as gptfl-silo does at start
    silo = _SiloProcess(silo_id, pki_dir, model_mb)
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        if op == "quit":
            break
        try:
            if op == "floor_connect":
                reply = silo.floor_connect(command["address"])
            elif op == "floor_run":
                reply = silo.floor_run()
            elif op == "fleet_connect":
                reply = silo.fleet_connect(command["address"])
            elif op == "fleet_run":
                reply = silo.fleet_run()
            else:
                raise ValueError(f"unknown op {op!r}")
            reply["ok"] = True
        except Exception as exc:  # reported to the driver, which fails the bench
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        _emit(reply)
    return 0


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class _Silos:
    """The driver's handle on the silo processes."""

    def __init__(self, pki_dir: Path, model_mb: float, count: int) -> None:
        self.ids = [f"silo-{i}" for i in range(count)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.processes = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.transfer",
                    "--role",
                    "silo",
                    "--silo-id",
                    silo_id,
                    "--pki",
                    str(pki_dir),
                    "--mb",
                    str(model_mb),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            for silo_id in self.ids
        ]

    def send(self, **command: Any) -> None:
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write(json.dumps(command) + "\n")
            process.stdin.flush()

    def replies(self) -> list[dict[str, Any]]:
        out = []
        for silo_id, process in zip(self.ids, self.processes, strict=True):
            assert process.stdout is not None
            line = process.stdout.readline()
            if not line:
                raise RuntimeError(f"{silo_id} exited (code {process.wait()})")
            reply: dict[str, Any] = json.loads(line)
            if not reply.get("ok"):
                raise RuntimeError(f"{silo_id}: {reply.get('error')}")
            out.append(reply)
        return out

    def call(self, **command: Any) -> list[dict[str, Any]]:
        self.send(**command)
        return self.replies()

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                assert process.stdin is not None
                try:
                    process.stdin.write(json.dumps({"op": "quit"}) + "\n")
                    process.stdin.close()
                except BrokenPipeError:
                    pass
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# ---------------------------------------------------------------------------------------------
# the floor: a bare grpcio service that moves raw bytes


def start_floor_server(files: TlsFiles, chunks: list[bytes]) -> tuple[grpc.Server, int]:
    """Download streams ``chunks``; Upload drains the client's stream. No protobuf at all."""

    def download(request: bytes, _context: grpc.ServicerContext) -> Iterator[bytes]:
        if request == b"ping":
            return iter(())
        return iter(chunks)

    def upload(requests: Iterator[bytes], _context: grpc.ServicerContext) -> bytes:
        total = 0
        for message in requests:
            total += len(message)
        return total.to_bytes(8, "big")

    handler = grpc.method_handlers_generic_handler(
        "gptfl.bench.Floor",
        {
            "Download": grpc.unary_stream_rpc_method_handler(download),
            "Upload": grpc.stream_unary_rpc_method_handler(upload),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="floor"))
    server.add_generic_rpc_handlers((handler,))
    ca, cert, key = files.read()
    credentials = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


# ---------------------------------------------------------------------------------------------
# profiling every coordinator thread (cProfile only sees the thread that enables it)


class ThreadProfiles:
    """Starts a cProfile profiler in each new thread whose name has one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        self._prefixes = prefixes
        self._profiles: list[cProfile.Profile] = []
        self._lock = threading.Lock()

    def install(self) -> None:
        threading.setprofile(self._hook)

    def _hook(self, _frame: FrameType, _event: str, _arg: Any) -> None:
        if not threading.current_thread().name.startswith(self._prefixes):
            sys.setprofile(None)
            return
        profile = cProfile.Profile()
        with self._lock:
            self._profiles.append(profile)
        profile.enable()  # replaces this hook for the rest of the thread's life

    def report(self, top: int = 25) -> str:
        threading.setprofile(None)
        with self._lock:
            profiles = list(self._profiles)
        if not profiles:
            return "(no profiled threads)"
        out = io.StringIO()
        stats = pstats.Stats(profiles[0], stream=out)
        for profile in profiles[1:]:
            stats.add(profile)
        stats.sort_stats("tottime").print_stats(top)
        return out.getvalue()


# ---------------------------------------------------------------------------------------------
# single-thread CPU cost of each per-byte step the product adds over the floor


def _best_of(runs: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _pb_round_trip(chunks: list[Chunk]) -> list[Chunk]:
    """The generated-class path the chunk codec replaced: build, serialize, parse, bytes out."""
    out = []
    for chunk in chunks:
        part = common_pb2.WeightStreamPart()
        serde.fill_chunk(part.chunk, chunk)
        parsed = common_pb2.WeightStreamPart.FromString(part.SerializeToString())
        out.append(serde.chunk_from_pb(parsed.chunk))
    return out


def step_costs(weights: WeightMap, manifest: Manifest, silos: int) -> list[dict[str, Any]]:
    """Seconds per model payload of each step, one thread, best of 3.

    Per silo and round, the coordinator sends one download (sender steps) and receives one
    upload (receiver steps); the silo does the opposite and also hashes its upload for the
    manifest. The coordinator computes a model version's chunk checksums once per round, not
    per silo. Rows in parentheses are not product steps: they split a step or compare.
    """
    _, crcs = manifest_and_crcs(weights)
    chunks = list(iter_chunks(weights, manifest, crcs=crcs))
    wire = [serde.serialize_part(p) for p in serde.weight_stream_to_wire(manifest, iter(chunks))]
    received = [serde.deserialize_weight_part(raw) for raw in wire[1:]]
    received_chunks = [serde.part_chunk(part) for part in received]
    expected = specs_of(weights)

    def receive(buffer: bytearray | None = None) -> PayloadReceiver:
        receiver = PayloadReceiver(manifest, expected=expected, buffer=buffer)
        for chunk in received_chunks:
            receiver.add(chunk)
        return receiver

    def digest_of_chunks(hasher: Callable[[], Any]) -> str:
        digest = hasher()
        for chunk in chunks:
            digest.update(chunk.data)
        hex_digest: str = digest.hexdigest()
        return hex_digest

    reused = bytearray(manifest.total_bytes)
    receiver = receive()
    tensors = receiver.finish()
    total = ExactSum(weights, max_total_weight=1 << 40)  # room for every timed add
    # (step, times per silo and round at the coordinator, at the silo), the fn
    rows: list[tuple[str, float, int, Callable[[], object]]] = [
        ("build_manifest: BLAKE3 of the payload", 0, 1, lambda: build_manifest(weights)),
        ("iter_chunks: cut + crc32 each chunk", 0, 1, lambda: list(iter_chunks(weights, manifest))),
        (
            "iter_chunks with the version's checksums: cut only",
            1,
            0,
            lambda: list(iter_chunks(weights, manifest, crcs=crcs)),
        ),
        (
            "chunk_wire: encode the chunk parts, one at a time as streamed",
            1,
            1,
            lambda: deque(serde.weight_stream_to_wire(manifest, iter(chunks)), maxlen=0),
        ),
        (
            "chunk_wire: decode the chunk parts",
            1,
            1,
            lambda: [serde.deserialize_weight_part(b) for b in wire[1:]],
        ),
        ("PayloadReceiver.add into a new buffer: crc32 + copy + BLAKE3", 0, 1, receive),
        (
            "PayloadReceiver.add into a reused buffer (coordinator)",
            1,
            0,
            lambda: receive(reused),
        ),
        ("PayloadReceiver.finish: finiteness", 1, 1, receiver.finish),
        ("ExactSum.check: the aggregation range", 1, 0, lambda: total.check(tensors)),
        ("ExactSum.add: int64 fixed-point fold", 1, 0, lambda: total.add(tensors, 1)),
        (
            "manifest_and_crcs of a model version: BLAKE3 + crc32s (once per round)",
            1 / silos,
            0,
            lambda: manifest_and_crcs(weights),
        ),
        (
            "(part of the above) crc32 of every chunk",
            0,
            0,
            lambda: [crc32(c.data) for c in chunks],
        ),
        (
            "(part of the above) BLAKE3 of the payload, one thread, 1 MiB at a time",
            0,
            0,
            lambda: digest_of_chunks(lambda: blake3.blake3(max_threads=1)),
        ),
        (
            "(replaced) sha256 of the payload, 1 MiB at a time",
            0,
            0,
            lambda: digest_of_chunks(hashlib.sha256),
        ),
        (
            "(replaced) protobuf classes: build + serialize + parse + bytes out",
            0,
            0,
            lambda: _pb_round_trip(chunks),
        ),
    ]
    return [
        {
            "step": step,
            "seconds": _best_of(3, fn),
            "coordinator_per_silo": at_coordinator,
            "silos_per_silo": at_silos,
        }
        for step, at_coordinator, at_silos, fn in rows
    ]


# ---------------------------------------------------------------------------------------------
# the driver


def _window(replies: list[dict[str, Any]]) -> dict[str, Any]:
    start = min(r["start"] for r in replies)
    return {
        "seconds": max(r["end"] for r in replies) - start,
        "downloads_done_s": max(r["downloaded"] for r in replies) - start,
        "silo_cpu_s": sum(r["cpu_s"] for r in replies),
        # each silo's (start, downloaded, end), seconds from the window's start
        "silo_timeline": [
            [round(r[key] - start, 4) for key in ("start", "downloaded", "end")] for r in replies
        ],
    }


def run_floor(silos: _Silos) -> dict[str, Any]:
    cpu = time.process_time()
    result = _window(silos.call(op="floor_run"))
    result["server_cpu_s"] = time.process_time() - cpu
    return result


def run_product(coordinator: Coordinator, silos: _Silos) -> dict[str, Any]:
    pid = os.getpid()
    peak_and_reset(pid)
    start_rss = rss(pid)
    silos.send(op="fleet_run")  # the silos poll until the job's task is published
    coordinator.jobs.submit(JOB_SPEC % len(silos.ids), submitted_by="bench")
    silos.replies()  # each silo says when it has its task (the first within ms of publication)
    cpu = time.process_time()
    replies = silos.replies()
    window_cpu = time.process_time() - cpu
    runner = coordinator.jobs.current()
    assert runner is not None
    runner.join(timeout=600)  # the job thread also exports the final model and report
    state = runner.state
    if state.phase.value != "finished" or not state.rounds:
        raise RuntimeError(f"job {runner.job_id} ended {state.phase.value}: {state.message}")
    result = _window(replies)
    # This process's CPU while the silos moved the bytes (the coordinator and nothing else).
    result["server_cpu_s"] = window_cpu
    result["round_seconds"] = state.rounds[0].seconds
    # This process's peak RSS over the whole job (transfers, round close, checkpoints, export).
    result["start_rss_bytes"] = start_rss
    result["peak_rss_bytes"] = peak_and_reset(pid)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=RUNS, help="timed runs of each (median kept)")
    parser.add_argument("--mb", type=float, default=DEFAULT_MODEL_MB, help="model size in MB")
    parser.add_argument("--silos", type=int, default=SILOS)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the coordinator's threads during the product runs (slows them down)",
    )
    parser.add_argument(
        "--no-steps",
        action="store_true",
        help="skip the per-step CPU table (it holds several copies of the model; always "
        f"skipped above {STEPS_MAX_BYTES >> 20} MiB)",
    )
    parser.add_argument("--out", type=Path, help="JSON result path (default bench/results/)")
    parser.add_argument(
        "--role", choices=["driver", "silo"], default="driver", help=argparse.SUPPRESS
    )
    parser.add_argument("--silo-id", help=argparse.SUPPRESS)
    parser.add_argument("--pki", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "silo":
        return silo_main(args.silo_id, args.pki, args.mb)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    machine_info = machine()
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="gptfl-bench-transfer-") as tmp:
        work = Path(tmp)
        pki_dir = work / "pki"
        silo_ids = [f"silo-{i}" for i in range(args.silos)]
        init_pki(pki_dir, coordinator_hosts=["127.0.0.1"], silos=silo_ids)
        weights: WeightMap = big_weights(args.mb)
        manifest = build_manifest(weights)
        floor_chunks = [bytes(chunk.data) for chunk in iter_chunks(weights, manifest)]
        profiles = ThreadProfiles(("fleet", "job-")) if args.profile else None
        if profiles is not None:
            profiles.install()
        coordinator_files = participant_files(pki_dir, "coordinator")
        config = CoordinatorConfig(
            fleet_address="127.0.0.1:0",
            admin_address="127.0.0.1:0",
            tls=TlsConfig(
                ca=coordinator_files.ca, cert=coordinator_files.cert, key=coordinator_files.key
            ),
            state_dir=work / "state",
        )
        coordinator = start_coordinator(
            config, initial_model=lambda _runner: (weights, {"kind": "bench-transfer"})
        )
        floor_server, floor_port = start_floor_server(coordinator_files, floor_chunks)
        silos = _Silos(pki_dir, args.mb, args.silos)
        floor_runs: list[dict[str, Any]] = []
        product_runs: list[dict[str, Any]] = []
        try:
            silos.call(op="floor_connect", address=f"127.0.0.1:{floor_port}")
            silos.call(op="fleet_connect", address=coordinator.fleet.address)
            for run in range(1, args.runs + 1):
                # Alternate, so a change in the machine's load hits both sides alike.
                floor_runs.append(run_floor(silos))
                product_runs.append(run_product(coordinator, silos))
                print(
                    f"run {run}: floor {floor_runs[-1]['seconds']:.2f}s, "
                    f"product {product_runs[-1]['seconds']:.2f}s "
                    f"(round {product_runs[-1]['round_seconds']:.2f}s), "
                    f"load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
        finally:
            silos.close()
            floor_server.stop(1).wait()
            coordinator.stop(grace_s=2)
        profile_text = profiles.report() if profiles is not None else None
        load_after = load_average()
        skip_steps = args.no_steps or manifest.total_bytes > STEPS_MAX_BYTES
        costs = [] if skip_steps else step_costs(weights, manifest, args.silos)

    payload_bytes = manifest.total_bytes
    moved = 2 * args.silos * payload_bytes
    floor_s = median(r["seconds"] for r in floor_runs)
    product_s = median(r["seconds"] for r in product_runs)
    round_s = median(r["round_seconds"] for r in product_runs)
    goal = LARGE_GOAL if payload_bytes >= LARGE_BYTES else GOAL
    idle_rss = product_runs[0]["start_rss_bytes"]
    above_idle = [(r["peak_rss_bytes"] - idle_rss) / payload_bytes for r in product_runs]
    rows = [
        ["floor (bare grpcio, mTLS)", floor_s, moved / floor_s / 1e6, 1.0, "-"],
        [
            "product: first task -> last update acked",
            product_s,
            moved / product_s / 1e6,
            product_s / floor_s,
            f"<= {goal:g}x: " + ("met" if product_s / floor_s <= goal else "NOT met"),
        ],
        [
            "product: coordinator round (+aggregate, checkpoint)",
            round_s,
            moved / round_s / 1e6,
            round_s / floor_s,
            "",
        ],
    ]
    print()
    print(
        f"{args.silos} silos x (download + upload) of a {payload_bytes / 1e6:.1f} MB model "
        f"= {moved / 1e6:.0f} MB moved; median of {args.runs} runs"
    )
    print(format_table(["path", "seconds", "MB/s", "x floor", "goal"], rows))
    print()
    cpu_rows = [
        [
            "floor",
            median(r["server_cpu_s"] for r in floor_runs),
            median(r["silo_cpu_s"] for r in floor_runs),
            median(r["downloads_done_s"] for r in floor_runs),
        ],
        [
            "product",
            median(r["server_cpu_s"] for r in product_runs),
            median(r["silo_cpu_s"] for r in product_runs),
            median(r["downloads_done_s"] for r in product_runs),
        ],
    ]
    print(
        format_table(["path", "server CPU s", "silos CPU s (sum)", "downloads done at s"], cpu_rows)
    )
    print(
        f"\ncoordinator peak RSS above idle (idle {idle_rss / 2**20:.0f} MiB, the model held): "
        f"median {median(above_idle):.2f}x, max {max(above_idle):.2f}x the model "
        f"(per run: {', '.join(f'{x:.2f}' for x in above_idle)})"
    )
    print(f"\nload average before {load_before}, after {load_after}")
    extra_coordinator = extra_silos = 0.0
    if costs:
        print(
            f"\nwhere the product's extra CPU goes: one thread, seconds per "
            f"{payload_bytes / 1e6:.0f} MB payload (torch threads {torch.get_num_threads()}), "
            "and how often each step runs per silo and round"
        )
        print(
            format_table(
                ["step", "seconds", "x coordinator", "x silo"],
                [
                    [c["step"], c["seconds"], c["coordinator_per_silo"], c["silos_per_silo"]]
                    for c in costs
                ],
            )
        )
        extra_coordinator = args.silos * sum(
            c["seconds"] * c["coordinator_per_silo"] for c in costs
        )
        extra_silos = args.silos * sum(c["seconds"] * c["silos_per_silo"] for c in costs)
        print(
            f"estimated CPU of these steps per round: coordinator {extra_coordinator:.2f}s, silos "
            f"together {extra_silos:.2f}s (the floor's whole CPU: server "
            f"{cpu_rows[0][1]:.2f}s, silos {cpu_rows[0][2]:.2f}s)"
        )
    result = {
        "bench": "transfer",
        "when": stamp(),
        "command": "python -m bench.transfer " + " ".join(argv or sys.argv[1:]),
        "machine": machine_info,
        "load_before": load_before,
        "load_after": load_after,
        "silos": args.silos,
        "model_bytes": payload_bytes,
        "bytes_moved": moved,
        "runs": args.runs,
        "profiled": args.profile,
        "floor_runs": floor_runs,
        "product_runs": product_runs,
        "median": {"floor_s": floor_s, "product_s": product_s, "round_s": round_s},
        "ratio": {"product_to_floor": product_s / floor_s, "round_to_floor": round_s / floor_s},
        "goal": {"max_ratio": goal, "met": product_s / floor_s <= goal},
        "peak_rss_above_idle_x_model": {"median": median(above_idle), "max": max(above_idle)},
        "step_costs": costs,
        "estimated_step_cpu_s": {"coordinator": extra_coordinator, "silos": extra_silos},
        "profile": profile_text,
    }
    path = write_result("transfer" + ("-profile" if args.profile else ""), result, args.out)
    print(f"result: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
