"""The silo agent's config file (silo.yaml); every key is in docs/silo-config.md."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pydantic

from gptfl.addresses import DialAddress, OptionalListenAddress
from gptfl.config_loading import StrictModel, resolve_path
from gptfl.data.dataset import ResizeMode
from gptfl.data.sources import DataSource, ImageFolderSource, NpzSource
from gptfl.tls_config import TlsConfig, check_tls_or_insecure

ENV_PREFIX = "GPTFL_SILO"


class DataConfig(StrictModel):
    """The silo's private data. It is read here and never leaves the silo."""

    train: DataSource
    #: a separate evaluation set; without it, ``eval_fraction`` of ``train`` is held out
    eval: DataSource | None = None
    eval_fraction: float = pydantic.Field(0.1, ge=0, lt=1)
    #: seed of the held-out split (fixed so the split stays the same across restarts)
    split_seed: int = 0
    resize_mode: ResizeMode = "stretch"


class ReconnectConfig(StrictModel):
    initial_backoff_s: float = pydantic.Field(0.5, gt=0)
    max_backoff_s: float = pydantic.Field(30.0, gt=0)


#: how Opacus computes per-sample gradients (docs/benchmarks.md compares them)
GradSampleMode = Literal["hooks", "ew", "functorch"]


class PrivacyConfig(StrictModel):
    """Sample-level differential privacy for this silo's training data (DP-SGD through
    Opacus, docs/privacy.md). The silo enforces the budget itself, across rounds, jobs and
    restarts, with a ledger in its ``state_dir``.

    Attributes:
        target_epsilon: the job budget: the silo's epsilon on its training data at the end of
            a job never exceeds it (rounds that would are refused).
        target_delta: the delta of every guarantee; must be below 1/n for n training examples.
        max_grad_norm: the per-sample gradient clipping bound.
        noise_multiplier: a fixed noise multiplier; by default the silo computes the one that
            makes every round of the job fit ``target_epsilon``.
        accountant: ``rdp`` or ``prv`` (Opacus's accountants).
        secure_rng: Opacus's secure mode (needs the ``torchcsprng`` package).
        lifetime_epsilon: a budget over all jobs on this data (the composition of every job
            the ledger holds); None: no lifetime limit (the spend is still kept).
        grad_sample_mode: how per-sample gradients are computed.
    """

    target_epsilon: float = pydantic.Field(gt=0)
    target_delta: float = pydantic.Field(gt=0, lt=1)
    max_grad_norm: float = pydantic.Field(gt=0)
    noise_multiplier: float | None = pydantic.Field(None, gt=0)
    accountant: Literal["rdp", "prv"] = "rdp"
    secure_rng: bool = False
    lifetime_epsilon: float | None = pydantic.Field(None, gt=0)
    grad_sample_mode: GradSampleMode = "hooks"

    @pydantic.model_validator(mode="after")
    def _lifetime_holds_a_job(self) -> PrivacyConfig:
        if self.lifetime_epsilon is not None and self.lifetime_epsilon < self.target_epsilon:
            raise ValueError(
                f"lifetime_epsilon {self.lifetime_epsilon:g} is below target_epsilon "
                f"{self.target_epsilon:g}: no job could spend its budget"
            )
        return self


class SiloConfig(StrictModel):
    coordinator: DialAddress
    #: TLS name to expect in the coordinator's certificate when it differs from the address
    server_name: str | None = None
    tls: TlsConfig | None = None
    insecure: bool = False
    #: only used in insecure mode, where no certificate names the silo
    silo_id: str | None = None
    state_dir: Path = Path("silo-state")
    data: DataConfig
    device: str = "auto"
    metrics_address: OptionalListenAddress = ""
    exit_after_job: bool = False
    #: long-poll length of PullTask
    poll_wait_s: float = pydantic.Field(20.0, gt=0, le=60)
    reconnect: ReconnectConfig = ReconnectConfig()
    log_format: Literal["text", "json"] = "text"
    #: DP-SGD on every training task, under a budget the silo enforces (None: plain SGD)
    privacy: PrivacyConfig | None = None

    @pydantic.model_validator(mode="after")
    def _tls_or_insecure(self) -> SiloConfig:
        check_tls_or_insecure(self.tls, self.insecure)
        if self.insecure and not self.silo_id:
            raise ValueError("insecure mode needs silo_id (no certificate names the silo)")
        return self

    def resolve_paths(self, base: Path) -> SiloConfig:
        """Relative paths are relative to the config file's folder."""

        def source(src: DataSource | None) -> DataSource | None:
            if isinstance(src, ImageFolderSource | NpzSource):
                return src.model_copy(update={"path": resolve_path(src.path, base)})
            return src

        data = self.data.model_copy(
            update={"train": source(self.data.train), "eval": source(self.data.eval)}
        )
        return self.model_copy(
            update={
                "tls": self.tls.resolved(base) if self.tls is not None else None,
                "state_dir": resolve_path(self.state_dir, base),
                "data": data,
            }
        )
