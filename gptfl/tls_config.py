"""The ``tls:`` section shared by every service config."""

from __future__ import annotations

from pathlib import Path

from gptfl.config_loading import StrictModel, resolve_path
from gptfl.pki import CA_CERT_FILE, CERT_FILE, KEY_FILE, TlsFiles


class TlsConfig(StrictModel):
    """Paths to this participant's CA certificate, certificate and private key (PEM)."""

    ca: Path
    cert: Path
    key: Path

    def files(self) -> TlsFiles:
        return TlsFiles(ca=self.ca, cert=self.cert, key=self.key)

    def resolved(self, base: Path) -> TlsConfig:
        """The same section with relative paths made relative to ``base``."""
        return TlsConfig(
            ca=resolve_path(self.ca, base),
            cert=resolve_path(self.cert, base),
            key=resolve_path(self.key, base),
        )

    @classmethod
    def from_dir(cls, folder: Path) -> TlsConfig:
        """The layout ``gptfl pki init`` writes for each participant."""
        return cls(ca=folder / CA_CERT_FILE, cert=folder / CERT_FILE, key=folder / KEY_FILE)
