"""Round time with and without secure aggregation, in the same run.

A real coordinator (mTLS on 127.0.0.1) and N real silo agents (real fleet clients over their
own mTLS channels, the default SGD trainer) run in this one process, the agents in threads,
on the digits split over the silos. The model is an MLP registered by this bench (the zoo
has no model of this size): ``bench-mlp-1m`` (1.06 M parameters, 4.2 MB) or
``bench-mlp-100mb`` (25.4 M parameters, 101 MB). For each silo count, a plain FedAvg job and
a secure-aggregation job of ``--rounds`` rounds run one after the other on a fresh
coordinator and fresh agents; a round's time is the coordinator's round wall time from the
job's status (task dispatch, downloads, training, masking, the key stages, uploads,
unmasking, aggregation; evaluation is off). Round 1 carries the warm-up and is left out of
the medians.

With ``--repeats R`` the pair of jobs runs R times, alternating, and the medians are over
all their rounds after the first: the machine is shared, and alternating spreads its load
over both settings alike.

``--costs`` measures instead the protocol's own CPU time (``time.process_time``, which the
machine's other load hardly changes), piece by piece, for one round of the pure protocol
(gptfl.secagg's silo and server sessions, no network) over a model-sized vector: what each
silo spends per stage and what the coordinator spends to unmask.

    python -m bench.secagg [--silos 5 10] [--rounds 4] [--repeats 1] [--model 1m|100mb]
    python -m bench.secagg --costs [--silos 5 10] [--model 1m|100mb]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from bench.machine import format_table, load_average, machine, stamp, write_result
from coordinator.config import CoordinatorConfig
from coordinator.server import start_coordinator
from gptfl.admin_client import AdminClient
from gptfl.cli.demo_cmd import digits_job_spec, digits_silos
from gptfl.models.registry import build_model, register
from gptfl.models.spec import ModelSpec
from gptfl.pki import init_pki, participant_files
from gptfl.rpc import open_channel
from gptfl.secagg.authentication import PeerVerifier, SiloCredentials
from gptfl.secagg.messages import RoundContext, SecAggSettings
from gptfl.secagg.server_session import ServerSession
from gptfl.secagg.silo_session import SiloSession
from gptfl.tls_config import TlsConfig
from silo_agent.agent import SiloAgent
from silo_agent.config import SiloConfig
from silo_agent.fleet_client import FleetApi, FleetClient

GOAL_RATIO = 1.3
#: hidden widths: 64 -> h1 -> h2 -> 10
MODELS = {"1m": ("bench-mlp-1m", 1024, 960), "100mb": ("bench-mlp-100mb", 5000, 5000)}


def _register_models() -> None:
    for arch, first, second in MODELS.values():

        def build(spec: ModelSpec, first: int = first, second: int = second) -> torch.nn.Module:
            inputs = spec.in_channels * spec.image_size * spec.image_size
            return torch.nn.Sequential(
                torch.nn.Flatten(),
                torch.nn.Linear(inputs, first),
                torch.nn.ReLU(),
                torch.nn.Linear(first, second),
                torch.nn.ReLU(),
                torch.nn.Linear(second, spec.num_classes),
            )

        register(arch)(build)


def _spec(arch: str, silos: int, rounds: int, secagg: bool) -> dict[str, Any]:
    spec = digits_job_spec(
        name="bench-secagg", rounds=rounds, silos=silos, strategy="fedavg", seed=0
    )
    spec["model"]["arch"] = arch
    spec["evaluation"] = {"federated": False}
    spec["round_deadline_s"] = 1800
    if secagg:
        spec["secure_aggregation"] = {
            "threshold": max(2, silos // 2 + 1),
            "clip_range": 4.0,
            "bits": 32,
            "max_silos": 16,
        }
    return spec


def run_job(work: Path, pki_dir: Path, spec: dict[str, Any], silos: int) -> list[float]:
    """Starts a coordinator and ``silos`` agents, runs ``spec``; the rounds' seconds."""
    files = participant_files(pki_dir, "coordinator")
    coordinator = start_coordinator(
        CoordinatorConfig(
            fleet_address="127.0.0.1:0",
            admin_address="127.0.0.1:0",
            tls=TlsConfig(ca=files.ca, cert=files.cert, key=files.key),
            state_dir=work / "state",
            heartbeat_interval_s=1.0,
        )
    )
    address = f"127.0.0.1:{coordinator.fleet.port}"
    stop = threading.Event()
    threads = []
    for plan in digits_silos(count=silos, alpha=1.0, seed=0):
        silo_files = participant_files(pki_dir, "silo", plan.silo_id)

        @contextlib.contextmanager
        def connect(silo_files: Any = silo_files) -> Iterator[FleetApi]:
            channel = open_channel(address, tls=silo_files)
            try:
                yield FleetClient(channel)
            finally:
                channel.close()

        config = SiloConfig(
            coordinator=address,
            tls=TlsConfig(ca=silo_files.ca, cert=silo_files.cert, key=silo_files.key),
            state_dir=work / plan.silo_id,
            data=plan.data,
            device="cpu",
            poll_wait_s=1.0,
        )
        agent = SiloAgent(config, connect=connect)
        threads.append(threading.Thread(target=agent.run, args=(stop,), daemon=True))
        threads[-1].start()
    try:
        with AdminClient(
            f"127.0.0.1:{coordinator.admin.port}", tls=participant_files(pki_dir, "admin")
        ) as admin:
            admin.status(wait_for_ready=True)
            admin.submit(yaml.safe_dump(spec))
            while not (status := admin.status()).ended:
                time.sleep(0.2)
            if status.phase != "finished":
                raise RuntimeError(f"the job ended {status.phase}: {status.message}")
            return [r.seconds for r in status.rounds]
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        coordinator.stop(grace_s=1)


def protocol_costs(pki_dir: Path, silos: int, length: int) -> dict[str, float]:
    """CPU seconds of one round of the pure protocol: per silo (mean) and at the coordinator."""
    settings = SecAggSettings(threshold=max(2, silos // 2 + 1), bits=32, clip_range=4.0,
                              max_silos=16)  # fmt: skip
    ca = PeerVerifier.from_ca_file(pki_dir / "ca" / "ca.pem")
    ids = [p.silo_id for p in digits_silos(count=silos, alpha=1.0, seed=0)]
    context = RoundContext("bench", 1)
    sessions = {
        silo: SiloSession(
            credentials=SiloCredentials.from_files(participant_files(pki_dir, "silo", silo)),
            verifier=ca,
            context=context,
            settings=settings.protocol(),
            ring=settings.ring(),
            num_examples=100,
        )
        for silo in ids
    }
    server = ServerSession(
        context=context,
        settings=settings.protocol(),
        ring=settings.ring(),
        length=length,
        silos=ids,
        verifier=ca,
    )
    update = np.random.default_rng(0).normal(0, 0.01, length)
    spent = dict.fromkeys(
        ["silo: advertise", "silo: share", "silo: quantize", "silo: mask", "silo: unmask"], 0.0
    )
    coordinator = 0.0

    def timed(key: str, call: Any) -> Any:
        started = time.process_time()
        result = call()
        spent[key] += time.process_time() - started
        return result

    for silo, session in sessions.items():
        advertisement = timed("silo: advertise", session.advertise)
        started = time.process_time()
        server.receive_advertisement(silo, advertisement)
        coordinator += time.process_time() - started
    keys = server.close_advertising()
    for silo, session in sessions.items():
        server.receive_shares(silo, timed("silo: share", lambda s=session: s.share_keys(keys)))
    server.close_sharing()
    for silo, session in sessions.items():
        quantized = timed("silo: quantize", lambda: settings.quantizer().quantize(update))
        envelopes = server.envelopes_for(silo)
        masked = timed("silo: mask", lambda s=session, e=envelopes, q=quantized: s.mask(e, q))
        started = time.process_time()
        server.receive_masked(silo, masked)
        coordinator += time.process_time() - started
    request = server.close_masking()
    for silo, session in sessions.items():
        server.receive_unmask(silo, timed("silo: unmask", lambda s=session: s.unmask(request)))
    started = time.process_time()
    server.finish()
    coordinator += time.process_time() - started
    costs = {key: value / silos for key, value in spent.items()}
    costs["coordinator: verify keys, sum, unmask"] = coordinator
    return costs


def _costs(args: argparse.Namespace, arch: str) -> None:
    length = sum(p.numel() for p in build_model(_model_spec(arch)).parameters())
    with tempfile.TemporaryDirectory(prefix="bench-secagg-") as tmp:
        pki_dir = Path(tmp) / "pki"
        ids = [p.silo_id for p in digits_silos(count=max(args.silos), alpha=1.0, seed=0)]
        init_pki(pki_dir, coordinator_hosts=["127.0.0.1"], silos=ids)
        table = {silos: protocol_costs(pki_dir, silos, length) for silos in args.silos}
    keys = list(next(iter(table.values())))
    print(f"model {arch} ({length:,} values); CPU seconds, one round, complete graph")
    print(
        format_table(
            ["", *(f"{silos} silos" for silos in args.silos)],
            [[key, *(f"{table[s][key]:.4f}" for s in args.silos)] for key in keys],
        )
    )
    write_result(
        "secagg-costs",
        {"stamp": stamp(), "machine": machine(), "model": arch, "length": length, "costs": table},
        args.out,
    )


def _model_spec(arch: str) -> ModelSpec:
    return ModelSpec(arch=arch, num_classes=10, in_channels=1, image_size=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--silos", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--model", choices=sorted(MODELS), default="1m")
    parser.add_argument("--costs", action="store_true", help="the protocol's CPU time only")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    _register_models()
    arch = MODELS[args.model][0]
    if args.costs:
        _costs(args, arch)
        return
    before = load_average()
    runs: list[dict[str, Any]] = []
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-secagg-") as tmp:
        pki_dir = Path(tmp) / "pki"
        largest = max(args.silos)
        silo_ids = [p.silo_id for p in digits_silos(count=largest, alpha=1.0, seed=0)]
        init_pki(pki_dir, coordinator_hosts=["127.0.0.1"], silos=silo_ids)
        for silos in args.silos:
            later: dict[bool, list[float]] = {False: [], True: []}
            for repeat in range(args.repeats):
                for secagg in (False, True):
                    name = f"{silos}-{'secagg' if secagg else 'plain'}-{repeat}"
                    spec = _spec(arch, silos, args.rounds, secagg)
                    seconds = run_job(Path(tmp) / name, pki_dir, spec, silos)
                    later[secagg] += seconds[1:] or seconds
                    runs.append({"silos": silos, "secagg": secagg, "round_seconds": seconds})
                    print(f"{name}: rounds {', '.join(f'{s:.2f}' for s in seconds)} s", flush=True)
            medians = {secagg: statistics.median(values) for secagg, values in later.items()}
            ratio = medians[True] / medians[False]
            rows.append(
                [
                    str(silos),
                    f"{medians[False]:.2f}",
                    f"{medians[True]:.2f}",
                    f"{ratio:.2f}x",
                    "yes" if ratio <= GOAL_RATIO else "no",
                ]
            )
    print()
    print(f"model {arch}; median round time of rounds 2-{args.rounds} over {args.repeats} run(s)")
    print(format_table(["silos", "plain s", "secagg s", "ratio", f"<= {GOAL_RATIO}x"], rows))
    write_result(
        "secagg",
        {
            "stamp": stamp(),
            "machine": machine(),
            "load_before": before,
            "load_after": load_average(),
            "model": arch,
            "rounds": args.rounds,
            "runs": runs,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
