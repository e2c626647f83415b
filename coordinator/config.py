"""The coordinator's config file (coordinator.yaml); every key is in docs/coordinator-config.md."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pydantic

from gptfl.addresses import DialAddress, ListenAddress, OptionalListenAddress
from gptfl.config_loading import StrictModel, resolve_path
from gptfl.tls_config import TlsConfig, check_tls_or_insecure

ENV_PREFIX = "GPTFL_COORDINATOR"


class SynthClientConfig(StrictModel):
    """Where the synth service is (used by jobs with a ``pretrain`` section)."""

    address: DialAddress
    server_name: str | None = None


class KubernetesConfig(StrictModel):
    """Scaling the GPU synth Deployment up only for the pretrain phase (in-cluster only)."""

    scale_synth: bool = False
    namespace: str = ""
    deployment: str = ""
    ready_timeout_s: float = pydantic.Field(600.0, gt=0)


class CoordinatorConfig(StrictModel):
    fleet_address: ListenAddress = "0.0.0.0:50051"
    admin_address: ListenAddress = "0.0.0.0:50052"
    health_address: OptionalListenAddress = ""
    metrics_address: OptionalListenAddress = ""
    tls: TlsConfig | None = None
    insecure: bool = False
    state_dir: Path = Path("coordinator-state")
    runs_dir: Path | None = None
    admin_identities: tuple[str, ...] = ("admin",)
    allowed_silos: tuple[str, ...] = ()
    heartbeat_interval_s: float = pydantic.Field(5.0, gt=0)
    #: a silo not heard from for this many heartbeat intervals counts as disconnected
    heartbeat_misses: int = pydantic.Field(3, ge=1)
    max_workers: int = pydantic.Field(64, ge=4)
    #: updates received at once; each costs one model copy while it is assembled, so memory
    #: is about (1 + this) model sizes above idle. Raise it for slow links and spare memory.
    max_concurrent_uploads: int = pydantic.Field(1, ge=1)
    #: an upload that holds a slot but sends nothing for this long is ended, so a silo whose
    #: link stalls cannot keep the others waiting until the round's deadline
    upload_stall_timeout_s: float = pydantic.Field(60.0, gt=0)
    checkpoints_to_keep: int = pydantic.Field(3, ge=1)
    shutdown_grace_s: float = pydantic.Field(10.0, ge=0)
    log_format: Literal["text", "json"] = "text"
    synth: SynthClientConfig | None = None
    kubernetes: KubernetesConfig = KubernetesConfig()

    @pydantic.model_validator(mode="after")
    def _tls_or_insecure(self) -> CoordinatorConfig:
        check_tls_or_insecure(self.tls, self.insecure)
        return self

    @property
    def effective_runs_dir(self) -> Path:
        return self.runs_dir if self.runs_dir is not None else self.state_dir / "runs"

    def resolve_paths(self, base: Path) -> CoordinatorConfig:
        """Relative paths are relative to the config file's folder."""

        return self.model_copy(
            update={
                "tls": self.tls.resolved(base) if self.tls is not None else None,
                "state_dir": resolve_path(self.state_dir, base),
                "runs_dir": resolve_path(self.runs_dir, base) if self.runs_dir else None,
            }
        )
