"""The synth service's config file (synth.yaml); every key is in docs/synth-service.md."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pydantic

from gptfl.addresses import ListenAddress, OptionalListenAddress
from gptfl.config_loading import StrictModel, resolve_path
from gptfl.tls_config import TlsConfig, check_tls_or_insecure

ENV_PREFIX = "GPTFL_SYNTH"


class SynthConfig(StrictModel):
    """Listen addresses, identity, folders, device and limits of the synth service."""

    #: the mutual-TLS gRPC API (Generate, Pretrain, health)
    address: ListenAddress = "0.0.0.0:50061"
    #: a plaintext gRPC port with only the health service (kubelet probes); "" = none
    health_address: OptionalListenAddress = ""
    #: Prometheus /metrics as host:port; "" = none
    metrics_address: OptionalListenAddress = ""
    tls: TlsConfig | None = None
    #: plaintext without client certificates; callers name themselves (development only)
    insecure: bool = False
    #: one folder per generator; a request's ``generator`` names a folder here. ``digits``
    #: always names the generator bundled with the package.
    models_dir: Path = Path("models")
    #: artifacts (``datasets/<dataset_id>/``) and ``endpoints.json``
    data_dir: Path = Path("synth-data")
    #: "auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N"
    device: str = "auto"
    #: intra-op threads of torch on the CPU; 0 keeps torch's default
    torch_threads: int = pydantic.Field(0, ge=0)
    #: images per generator call, by backend (on a GPU, bigger batches are faster until
    #: memory runs out)
    class_conditional_batch_size: int = pydantic.Field(256, ge=1)
    text_to_image_batch_size: int = pydantic.Field(8, ge=1)
    #: the most images one Generate call may ask for
    max_images_per_request: int = pydantic.Field(1_000_000, ge=1)
    #: the largest target image side a request may ask for
    max_image_size: int = pydantic.Field(1024, ge=8)
    #: free disk kept beyond the artifact's estimated size before a Generate starts
    min_free_bytes: int = pydantic.Field(256 << 20, ge=0)
    #: how long a Generate or Pretrain waits while another one runs before it is refused
    #: with RESOURCE_EXHAUSTED (0: refuse at once)
    busy_wait_s: float = pydantic.Field(0.0, ge=0)
    max_workers: int = pydantic.Field(8, ge=2)
    #: on SIGTERM: time for running calls to finish before they are cancelled
    shutdown_grace_s: float = pydantic.Field(30.0, ge=0)
    log_format: Literal["text", "json"] = "text"

    @pydantic.model_validator(mode="after")
    def _tls_or_insecure(self) -> SynthConfig:
        check_tls_or_insecure(self.tls, self.insecure)
        return self

    def resolve_paths(self, base: Path) -> SynthConfig:
        """Relative paths are relative to the config file's folder."""

        return self.model_copy(
            update={
                "tls": self.tls.resolved(base) if self.tls is not None else None,
                "models_dir": resolve_path(self.models_dir, base),
                "data_dir": resolve_path(self.data_dir, base),
            }
        )
