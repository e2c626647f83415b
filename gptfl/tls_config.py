"""The ``tls:`` section shared by every service config."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from gptfl.config_loading import StrictModel, resolve_path
from gptfl.errors import PkiError
from gptfl.pki import (
    CA_CERT_FILE,
    CERT_FILE,
    KEY_FILE,
    Identity,
    TlsFiles,
    identity_of,
    key_matches,
    load_certificate,
    load_private_key,
    verify_issued_by,
)

T = TypeVar("T")


class TlsConfig(StrictModel):
    """Paths to this participant's CA certificate, certificate and private key (PEM)."""

    ca: Path
    cert: Path
    key: Path

    def files(self) -> TlsFiles:
        return TlsFiles(ca=self.ca, cert=self.cert, key=self.key)

    def check(self, *, role: str, now: dt.datetime | None = None) -> Identity:
        """Proves at start what the TLS handshake would otherwise find out later, and only
        as a retried connection error: that the three files are PEM, that the key belongs to
        the certificate, that the certificate comes from this CA, is valid now and is for
        ``role``.

        Returns:
            The identity the certificate carries (its CN names this participant).

        Raises:
            PkiError: one line naming the key (``tls.ca``, ``tls.cert`` or ``tls.key``).
        """

        def named(key: str, load: Callable[[Path], T], path: Path) -> T:
            try:
                return load(path)
            except PkiError as exc:
                raise PkiError(f"tls.{key}: {exc}") from None

        ca = named("ca", load_certificate, self.ca)
        cert = named("cert", load_certificate, self.cert)
        key = named("key", load_private_key, self.key)
        if not key_matches(key, cert):
            raise PkiError(f"tls.key: {self.key} is not the key of the certificate {self.cert}")
        try:
            verify_issued_by(cert, ca)
        except PkiError:
            raise PkiError(f"tls.cert: {self.cert} was not issued by the CA in {self.ca}") from None
        moment = now or dt.datetime.now(dt.UTC)
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        if moment < start:
            raise PkiError(f"tls.cert: {self.cert} is not valid before {start:%Y-%m-%d %H:%M} UTC")
        if moment > end:
            raise PkiError(f"tls.cert: {self.cert} expired on {end:%Y-%m-%d %H:%M} UTC")
        identity = named("cert", lambda _path: identity_of(cert), self.cert)
        if identity.role != role:
            raise PkiError(
                f"tls.cert: {self.cert} is for role {identity.role!r} "
                f"({identity.common_name!r}); this service needs a {role!r} certificate"
            )
        return identity

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


def check_tls_or_insecure(tls: TlsConfig | None, insecure: bool) -> None:
    """Every service config has exactly one of a ``tls`` section and ``insecure: true``.

    Raises:
        ValueError: neither, or both (a plaintext service that seems to have certificates).
    """
    if tls is None and not insecure:
        raise ValueError("tls is required unless insecure: true is set explicitly")
    if tls is not None and insecure:
        raise ValueError(
            "insecure: true and a tls section contradict each other; remove one "
            "(--insecure on the command line drops the tls section)"
        )
