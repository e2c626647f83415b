"""The ``tls:`` section shared by every service config."""

from __future__ import annotations

from pathlib import Path

from gptfl.config_loading import StrictModel
from gptfl.pki import TlsFiles


class TlsConfig(StrictModel):
    """Paths to this participant's CA certificate, certificate and private key (PEM)."""

    ca: Path
    cert: Path
    key: Path

    def files(self, base: Path | None = None) -> TlsFiles:
        def at(path: Path) -> Path:
            return path if base is None or path.is_absolute() else base / path

        return TlsFiles(ca=at(self.ca), cert=at(self.cert), key=at(self.key))

    @classmethod
    def from_dir(cls, folder: Path) -> TlsConfig:
        """The layout ``gptfl pki init`` writes for each participant."""
        return cls(ca=folder / "ca.pem", cert=folder / "cert.pem", key=folder / "key.pem")
