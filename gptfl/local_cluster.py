"""A whole federation on one machine: a dev PKI, the synth service (optional), a coordinator
and silo agents as separate processes on 127.0.0.1 over mutual TLS.

``make demo``, the integration tests and the benchmarks all start their federations through
this one class, so they exercise exactly what an operator runs (the real entry points and
config files), not an in-process imitation.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gptfl.admin_client import AdminClient
from gptfl.pki import init_pki, participant_files
from gptfl.service_process import ENDPOINTS_FILE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiloPlan:
    """One silo to start: its id, the ``data:`` section of its config, more config keys, and
    environment variables its process gets on top of the cluster's (e.g. a ``PYTHONPATH``
    with another installation of a model package)."""

    silo_id: str
    data: Mapping[str, Any]
    extra: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Endpoints:
    fleet_port: int
    admin_port: int
    metrics_port: int | None

    @property
    def fleet(self) -> str:
        return f"127.0.0.1:{self.fleet_port}"

    @property
    def admin(self) -> str:
        return f"127.0.0.1:{self.admin_port}"


class ClusterError(RuntimeError):
    """A process of the local federation failed to start or stop."""


class LocalCluster:
    """Starts and stops the processes of a local federation (see the module docstring)."""

    def __init__(
        self,
        work_dir: Path,
        *,
        silos: Sequence[SiloPlan],
        runs_dir: Path | None = None,
        coordinator_extra: Mapping[str, Any] | None = None,
        torch_threads: int = 1,
        metrics: bool = False,
        synth: bool = False,
        synth_extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Plans the federation; nothing starts before :meth:`provision` and the ``start_*``
        methods.

        Args:
            work_dir: holds the PKI, configs, logs, state and runs.
            silos: the silos to start.
            runs_dir: where the coordinator writes runs (``work_dir/runs`` by default).
            coordinator_extra: keys merged into coordinator.yaml.
            torch_threads: OMP/MKL threads per process.
            metrics: bind every process's metrics endpoint on a free port.
            synth: the federation uses a synth service: :meth:`start_coordinator` starts
                it first (:meth:`start_synth`) unless it already runs, and the coordinator
                config gets ``synth: {address: ...}``.
            synth_extra: keys merged into synth.yaml (e.g. ``device``, ``models_dir``).
        """
        self.work_dir = work_dir
        self.silos = list(silos)
        self.runs_dir = runs_dir or work_dir / "runs"
        self._coordinator_extra = dict(coordinator_extra or {})
        self._metrics = metrics
        self.synth = synth
        self._synth_extra = dict(synth_extra or {})
        self._env = {
            **os.environ,
            # Several trainers share the machine: one thread each avoids oversubscription.
            "OMP_NUM_THREADS": str(torch_threads),
            "MKL_NUM_THREADS": str(torch_threads),
            "PYTHONUNBUFFERED": "1",
        }
        self.pki_dir = work_dir / "pki"
        self.logs_dir = work_dir / "logs"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.endpoints: Endpoints | None = None
        self.silo_metrics_ports: dict[str, int] = {}
        self.synth_address: str | None = None
        self.synth_metrics_port: int | None = None

    # ---- set-up ----------------------------------------------------------------------------

    def provision(self) -> None:
        """Creates the dev PKI (CA, coordinator, admin and one identity per silo)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(exist_ok=True)
        if not (self.pki_dir / "ca" / "ca.pem").exists():
            init_pki(
                self.pki_dir,
                coordinator_hosts=["127.0.0.1", "localhost"],
                silos=[s.silo_id for s in self.silos],
            )

    def _tls(self, role: str, name: str | None = None) -> dict[str, str]:
        files = participant_files(self.pki_dir, role, name)
        return {"ca": str(files.ca), "cert": str(files.cert), "key": str(files.key)}

    def _spawn(
        self, name: str, module: str, config: Path, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log_file = open(self.logs_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives with the process
        process = subprocess.Popen(
            [sys.executable, "-m", module, "--config", str(config)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**self._env, **(env or {})},
            start_new_session=True,  # a Ctrl-C in the terminal reaches the demo, which stops us
        )
        log_file.close()
        self.processes[name] = process
        return process

    # ---- synth service ---------------------------------------------------------------------

    def synth_config(self) -> dict[str, Any]:
        """synth.yaml for the local synth service (CPU unless ``synth_extra`` says otherwise)."""
        config: dict[str, Any] = {
            "address": "127.0.0.1:0",
            "metrics_address": "127.0.0.1:0" if self._metrics else "",
            "tls": self._tls("synth"),
            "models_dir": str(self.work_dir / "synth-models"),
            "data_dir": str(self.work_dir / "synth-data"),
            "torch_threads": int(self._env["OMP_NUM_THREADS"]),
        }
        config.update(self._synth_extra)
        return config

    def start_synth(self, *, timeout_s: float = 120.0) -> str:
        """Starts the synth service on a free port; returns its address ``127.0.0.1:PORT``.

        Waits until the service has bound its ports (its ``endpoints.json``), records
        ``synth_address`` and ``synth_metrics_port``; a coordinator started afterwards gets
        ``synth: {address: ...}`` in its config.
        """
        config = self.synth_config()
        endpoints_file = Path(config["data_dir"]) / ENDPOINTS_FILE
        endpoints_file.unlink(missing_ok=True)
        Path(config["models_dir"]).mkdir(parents=True, exist_ok=True)
        path = self.work_dir / "synth.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        process = self._spawn("synth", "synth_service.main", path)
        data = self._wait_endpoints("synth", process, endpoints_file, timeout_s)
        self.synth_address = f"127.0.0.1:{data['port']}"
        port = data.get("metrics_port")
        self.synth_metrics_port = port if isinstance(port, int) else None
        self.synth = True
        return self.synth_address

    def _wait_endpoints(
        self,
        name: str,
        process: subprocess.Popen[bytes],
        endpoints_file: Path,
        timeout_s: float,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while not endpoints_file.exists():
            if process.poll() is not None:
                raise ClusterError(
                    f"{name} exited with code {process.returncode}; see "
                    f"{self.logs_dir / f'{name}.log'}"
                )
            if time.monotonic() > deadline:
                raise ClusterError(f"{name} did not start within {timeout_s:g}s")
            time.sleep(0.05)
        data: dict[str, Any] = json.loads(endpoints_file.read_text())
        return data

    # ---- coordinator -----------------------------------------------------------------------

    def start_coordinator(self, *, timeout_s: float = 120.0) -> Endpoints:
        """Starts the coordinator on free ports and waits until it has bound them.

        With ``synth=True`` the synth service is started first when it is not running yet.
        """
        if self.synth and self.synth_address is None:
            self.start_synth(timeout_s=timeout_s)
        state_dir = self.work_dir / "coordinator-state"
        endpoints_file = state_dir / ENDPOINTS_FILE
        endpoints_file.unlink(missing_ok=True)
        config = {
            "fleet_address": "127.0.0.1:0",
            "admin_address": "127.0.0.1:0",
            "metrics_address": "127.0.0.1:0" if self._metrics else "",
            "tls": self._tls("coordinator"),
            "state_dir": str(state_dir),
            "runs_dir": str(self.runs_dir),
            "heartbeat_interval_s": 2.0,
        }
        if self.synth_address is not None:
            config["synth"] = {"address": self.synth_address}
        config.update(self._coordinator_extra)
        path = self.work_dir / "coordinator.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        process = self._spawn("coordinator", "coordinator.main", path)
        data = self._wait_endpoints("coordinator", process, endpoints_file, timeout_s)
        self.endpoints = Endpoints(data["fleet_port"], data["admin_port"], data["metrics_port"])
        return self.endpoints

    def admin(self) -> AdminClient:
        assert self.endpoints is not None, "start the coordinator first"
        files = participant_files(self.pki_dir, "admin")
        return AdminClient(self.endpoints.admin, tls=files)

    # ---- silos -----------------------------------------------------------------------------

    def silo_config(self, plan: SiloPlan) -> dict[str, Any]:
        assert self.endpoints is not None, "start the coordinator first"
        config: dict[str, Any] = {
            "coordinator": self.endpoints.fleet,
            "tls": self._tls("silo", plan.silo_id),
            "state_dir": str(self.work_dir / "silos" / plan.silo_id),
            "data": dict(plan.data),
            "exit_after_job": True,
            "poll_wait_s": 10,
            "reconnect": {"initial_backoff_s": 0.2, "max_backoff_s": 2.0},
        }
        if self._metrics:
            config["metrics_address"] = "127.0.0.1:0"
        config.update(plan.extra)
        return config

    def start_silos(
        self, silo_ids: Sequence[str] | None = None, *, timeout_s: float = 120.0
    ) -> None:
        """Starts silo agents. With metrics on, waits until each has bound its metrics port
        and records it in ``silo_metrics_ports``."""
        wanted = set(silo_ids) if silo_ids is not None else {s.silo_id for s in self.silos}
        started: dict[str, Path] = {}
        for plan in self.silos:
            if plan.silo_id not in wanted:
                continue
            config = self.silo_config(plan)
            endpoints_file = Path(config["state_dir"]) / ENDPOINTS_FILE
            endpoints_file.unlink(missing_ok=True)
            path = self.work_dir / f"silo-{plan.silo_id}.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            self._spawn(plan.silo_id, "silo_agent.main", path, plan.env)
            started[plan.silo_id] = endpoints_file
        if self._metrics:
            self._wait_silo_endpoints(started, timeout_s)

    def _wait_silo_endpoints(self, files: Mapping[str, Path], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for silo_id, endpoints_file in files.items():
            data = self._wait_endpoints(
                silo_id,
                self.processes[silo_id],
                endpoints_file,
                max(0.0, deadline - time.monotonic()),
            )
            port = data.get("metrics_port")
            if isinstance(port, int):
                self.silo_metrics_ports[silo_id] = port

    # ---- tear-down -------------------------------------------------------------------------

    def wait_silos(self, timeout_s: float) -> dict[str, int | None]:
        """Waits for the silo processes to exit on their own (exit_after_job)."""
        deadline = time.monotonic() + timeout_s
        codes: dict[str, int | None] = {}
        for name, process in self.processes.items():
            if name in ("coordinator", "synth"):
                continue
            try:
                codes[name] = process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                codes[name] = None
        return codes

    def stop(self, *, timeout_s: float = 30.0) -> dict[str, int]:
        """SIGTERM every process (silos first, then the coordinator, then the synth service),
        then SIGKILL what is left after the timeout."""
        last = ("coordinator", "synth")
        order = [n for n in self.processes if n not in last] + [
            n for n in last if n in self.processes
        ]
        for name in order:
            process = self.processes[name]
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        codes: dict[str, int] = {}
        for name in order:
            process = self.processes[name]
            try:
                codes[name] = process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs; killing it", name, timeout_s)
                process.kill()
                codes[name] = process.wait()
        return codes

    def kill(self, name: str) -> None:
        """SIGKILL one process (chaos and resume tests)."""
        process = self.processes[name]
        process.kill()
        process.wait()

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.logs_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
