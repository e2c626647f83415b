"""Silos vouch for their own secure-aggregation keys with their mutual-TLS identities.

The coordinator relays the keys, so it could swap in keys of its own and read every share
(a man in the middle). It cannot sign for a silo, though: each silo signs its advertised
keys with its TLS certificate's private key, and every peer checks the signature against
the certificate that comes with the keys, after checking that the certificate chains to the
CA the silos were provisioned with, is valid now, has the silo role and names the silo as
its CN. The coordinator signs nothing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from gptfl import pki
from gptfl.errors import PeerKeyError, PkiError
from gptfl.secagg.encoding import frame
from gptfl.secagg.messages import KeyAdvertisement, RoundContext

_SIGNED_LABEL = b"gptfl-secagg-keys-v1"
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class SiloCredentials:
    """A silo's TLS identity, used to sign its keys.

    Attributes:
        silo_id: the silo (the certificate's CN).
        certificate_pem: the silo's certificate, sent with its keys.
        private_key: the certificate's key.
    """

    silo_id: str
    certificate_pem: bytes
    private_key: SigningKey

    @classmethod
    def from_files(cls, files: pki.TlsFiles) -> SiloCredentials:
        """The credentials in a silo's TLS files.

        Raises:
            PkiError: a file is missing or malformed, the key is not the certificate's, or
                the certificate is not a silo's.
        """
        certificate = pki.load_certificate(files.cert)
        key = pki.load_private_key(files.key)
        if not pki.key_matches(key, certificate):
            raise PkiError(f"{files.key}: does not match {files.cert}")
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise PkiError(f"{files.key}: a key that cannot sign (EC or RSA expected)")
        identity = pki.identity_of(certificate)
        if identity.role != "silo":
            raise PkiError(f"{files.cert}: the certificate of role {identity.role}, not a silo")
        return cls(identity.common_name, files.cert.read_bytes(), key)


def signed_payload(context: RoundContext, advertisement: KeyAdvertisement) -> bytes:
    """What a silo signs: the round's context and every field it advertises."""
    return frame(
        _SIGNED_LABEL,
        context.encode(),
        advertisement.silo_id,
        advertisement.cipher_public,
        advertisement.mask_public,
        advertisement.num_examples,
    )


def sign_advertisement(
    credentials: SiloCredentials,
    context: RoundContext,
    *,
    cipher_public: bytes,
    mask_public: bytes,
    num_examples: int,
) -> KeyAdvertisement:
    """The silo's signed advertisement of its two public keys for the round."""
    unsigned = KeyAdvertisement(
        round=context.round,
        silo_id=credentials.silo_id,
        cipher_public=cipher_public,
        mask_public=mask_public,
        num_examples=num_examples,
        certificate_pem=credentials.certificate_pem,
        signature=b"",
    )
    payload = signed_payload(context, unsigned)
    key = credentials.private_key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        signature = key.sign(payload, ec.ECDSA(hashes.SHA256()))
    else:
        signature = key.sign(payload, _PSS, hashes.SHA256())
    return dataclasses.replace(unsigned, signature=signature)


class PeerVerifier:
    """Checks advertisements against the CA (silos and the coordinator both use it)."""

    def __init__(self, ca_certificate: x509.Certificate) -> None:
        self._ca = ca_certificate

    @classmethod
    def from_ca_file(cls, path: Path) -> PeerVerifier:
        """Raises PkiError when the file is missing or not a PEM certificate."""
        return cls(pki.load_certificate(path))

    def verify(self, advertisement: KeyAdvertisement, context: RoundContext) -> None:
        """Checks that ``advertisement`` was signed for this round by the silo it names.

        Raises:
            PeerKeyError: the certificate is not a PEM certificate, not from the CA, not
                valid now, not a silo's, or names another silo; or the signature does not
                verify (the message says which).
        """
        silo = advertisement.silo_id
        try:
            certificate = x509.load_pem_x509_certificate(advertisement.certificate_pem)
        except ValueError:
            raise PeerKeyError(f"the certificate advertised for {silo} is not PEM") from None
        try:
            pki.verify_issued_by(certificate, self._ca)
            identity = pki.identity_of(certificate)
        except PkiError as exc:
            raise PeerKeyError(f"the certificate advertised for {silo}: {exc}") from None
        now = dt.datetime.now(dt.UTC)
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            raise PeerKeyError(f"the certificate advertised for {silo} is not valid now")
        if identity.role != "silo" or identity.common_name != silo:
            raise PeerKeyError(
                f"keys advertised for {silo} come with the certificate of "
                f"{identity.role} {identity.common_name}"
            )
        payload = signed_payload(context, advertisement)
        public = certificate.public_key()
        try:
            if isinstance(public, ec.EllipticCurvePublicKey):
                public.verify(advertisement.signature, payload, ec.ECDSA(hashes.SHA256()))
            elif isinstance(public, rsa.RSAPublicKey):
                public.verify(advertisement.signature, payload, _PSS, hashes.SHA256())
            else:
                raise PeerKeyError(f"the certificate of {silo} has a key that cannot sign keys")
        except InvalidSignature:
            raise PeerKeyError(
                f"the keys advertised for {silo} are not signed by its certificate for this round"
            ) from None
