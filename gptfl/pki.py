"""Provisioning and reading the mutual-TLS identities of a GPT-FL deployment.

One private CA signs a certificate for every participant. The participant's role is the
subject's OU (``coordinator``, ``silo``, ``admin``, ``synth``) and its name is the CN (for a
silo, the silo id), so a server learns who is calling from the verified client certificate
alone (:func:`identity_from_pem`), and nothing a peer *says* about itself is trusted.

Layout of a PKI directory (see ``docs/pki.md``)::

    DIR/ca/ca.pem, DIR/ca/ca.key            the CA; ca.key never leaves this folder
    DIR/coordinator/{ca.pem,cert.pem,key.pem}
    DIR/synth/{ca.pem,cert.pem,key.pem}
    DIR/admin/{ca.pem,cert.pem,key.pem}
    DIR/silos/<id>/{ca.pem,cert.pem,key.pem}

Each participant folder is self-contained: it is exactly what the admin hands over.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gptfl import atomic_io
from gptfl.errors import ConfigError, PkiError

logger = logging.getLogger(__name__)

#: the roles a certificate can carry (in the subject's OU)
ROLES = ("coordinator", "silo", "admin", "synth")

#: what a silo id (and an admin name) may look like: it ends up in paths, metric labels and
#: certificate subjects, so it is kept to a small, unambiguous alphabet
SILO_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")

DEFAULT_SYNTH_HOSTS = ("localhost", "127.0.0.1")
# Always on the coordinator certificate so the embedded (one machine) mode works unchanged.
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1")
# The CA must outlive every certificate it signs, including silos onboarded later.
_MIN_CA_DAYS = 3650
# Certificates start a little in the past to tolerate clock skew between machines.
_BACKDATE = dt.timedelta(minutes=5)
_ORGANIZATION = "GPT-FL"
_TRUST_DOMAIN = "gptfl"
_HOSTNAME_PATTERN = re.compile(
    r"^(\*\.)?[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)

CA_DIR = "ca"
SILOS_DIR = "silos"
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
# Top-level entries of a PKI directory; --force replaces exactly these and nothing else.
_LAYOUT_ENTRIES = (CA_DIR, "coordinator", "synth", "admin", SILOS_DIR)


@dataclass(frozen=True)
class Identity:
    """Who a certificate says its holder is.

    Attributes:
        common_name: the subject CN (a silo's id, the admin's name, ...).
        role: the subject OU, one of :data:`ROLES`.
    """

    common_name: str
    role: str


@dataclass(frozen=True)
class TlsFiles:
    """The three PEM files a participant needs for mutual TLS.

    Attributes:
        ca: the CA certificate that peers' certificates must chain to.
        cert: this participant's certificate.
        key: this participant's private key (mode 0600).
    """

    ca: Path
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        """Read the files, e.g. for ``grpc.ssl_channel_credentials``.

        Returns:
            ``(ca, cert, key)`` as PEM bytes.

        Raises:
            PkiError: a file is missing or unreadable (the message names it).
        """
        return _read_file(self.ca), _read_file(self.cert), _read_file(self.key)


# --------------------------------------------------------------------------- validation


def validate_silo_id(silo_id: str) -> str:
    """Check that a silo id is well formed.

    Args:
        silo_id: the candidate id, e.g. ``"hospital-a"``.

    Returns:
        The id unchanged.

    Raises:
        ConfigError: the id does not match ``^[a-z0-9][a-z0-9._-]{0,62}$``.
    """
    return _validate_name(silo_id, "silo id")


def _validate_name(name: str, what: str) -> str:
    if not SILO_ID_PATTERN.fullmatch(name):
        raise ConfigError(
            f"invalid {what} {name!r}: use 1-63 characters of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit"
        )
    return name


def _validate_days(days: int) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ConfigError(f"invalid validity {days!r}: days must be a positive integer")
    return days


def _parse_hosts(
    hosts: Iterable[str], what: str
) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """Split host names into DNS names and IP addresses, de-duplicated, order kept."""
    dns_names: list[str] = []
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for raw in hosts:
        host = raw.strip()
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            name = host.lower().rstrip(".")
            if not _HOSTNAME_PATTERN.fullmatch(name) or len(name) > 253:
                raise ConfigError(
                    f"invalid {what} {raw!r}: give a DNS name or an IP address, without a port"
                ) from None
            if name not in dns_names:
                dns_names.append(name)
        else:
            if ip not in ips:
                ips.append(ip)
    if not dns_names and not ips:
        raise ConfigError(f"no {what} given")
    return dns_names, ips


# --------------------------------------------------------------------------- issuing


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: fast to generate, small handshakes, and supported by every gRPC TLS stack.
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str, role: str | None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION)]
    if role is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def create_ca(
    *, common_name: str | None = None, days: int = _MIN_CA_DAYS
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Create a self-signed CA that may sign end-entity certificates only.

    Args:
        common_name: the CA's CN; by default ``"GPT-FL CA <random id>"`` so that two PKIs are
            told apart at a glance.
        days: validity in days.

    Returns:
        The CA certificate and its private key.
    """
    _validate_days(days)
    key = _new_key()
    name = _name(common_name or f"GPT-FL CA {secrets.token_hex(4)}", None)
    now = _utcnow()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        # path_length=0: the CA signs participants, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def spiffe_id(role: str, name: str) -> str:
    """The URI SAN written into a participant's certificate, e.g. ``spiffe://gptfl/silo/a``."""
    return f"spiffe://{_TRUST_DOMAIN}/{role}/{name}"


def _authority_key_identifier(
    ca_cert: x509.Certificate, ca_key: CertificateIssuerPrivateKeyTypes
) -> x509.AuthorityKeyIdentifier:
    # Chain builders match the AKI against the CA's SKI, so copy it when the CA has one.
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def issue_certificate(
    ca_cert: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    *,
    common_name: str,
    role: str,
    hosts: Sequence[str] = (),
    days: int = 365,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Issue an end-entity certificate for one participant.

    Args:
        ca_cert: the issuing CA certificate.
        ca_key: the CA's private key.
        common_name: the subject CN (silo id, admin name, ...); same alphabet as silo ids.
        role: one of :data:`ROLES`; written into the subject's OU.
        hosts: DNS names / IP addresses the participant serves on. Given hosts make this a
            server certificate (SANs and the serverAuth EKU); every certificate may act as a
            TLS client.
        days: validity in days; cut to the CA's own expiry if it would outlive it.

    Returns:
        The certificate and its new private key.

    Raises:
        ConfigError: an unknown role, a bad host or a bad validity.
    """
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    _validate_name(common_name, f"{role} name")
    _validate_days(days)
    key = _new_key()
    now = _utcnow()
    not_after = now + dt.timedelta(days=days)
    if not_after > ca_cert.not_valid_after_utc:
        logger.warning(
            "certificate for %s %s cut to the CA's expiry %s",
            role,
            common_name,
            ca_cert.not_valid_after_utc.isoformat(),
        )
        not_after = ca_cert.not_valid_after_utc
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, role))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                # ECDHE key exchange with an EC key needs only signatures.
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_identifier(ca_cert, ca_key), critical=False)
    )
    # Every certificate names its holder in a URI SAN too: RFC 5280 verifiers that insist on a
    # SAN (cryptography's ClientVerifier, service meshes) then accept client certificates.
    # Identity is still read from CN and OU (identity_from_pem); this URI only mirrors them.
    general_names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(spiffe_id(role, common_name))
    ]
    if hosts:
        dns_names, ips = _parse_hosts(hosts, f"{role} host")
        general_names += [x509.DNSName(n) for n in dns_names]
        general_names += [x509.IPAddress(ip) for ip in ips]
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    builder = builder.add_extension(x509.SubjectAlternativeName(general_names), critical=False)
    builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


# --------------------------------------------------------------------------- files


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{path}: no such file") from None
    except OSError as exc:
        raise PkiError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    # Unencrypted PKCS#8: what gRPC and Kubernetes TLS secrets take; the file mode protects it.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_file(path: Path, data: bytes, *, mode: int) -> None:
    """Write atomically: a reader never sees half a key or a key with loose permissions."""
    with atomic_io.atomic_path(path) as tmp:
        os.chmod(tmp, mode)  # before the first byte is written
        tmp.write_bytes(data)


def _write_participant(
    folder: Path, ca_cert: x509.Certificate, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> TlsFiles:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    files = TlsFiles(ca=folder / CA_CERT_FILE, cert=folder / CERT_FILE, key=folder / KEY_FILE)
    _write_file(files.ca, _cert_pem(ca_cert), mode=0o644)
    _write_file(files.cert, _cert_pem(cert), mode=0o644)
    _write_file(files.key, _key_pem(key), mode=0o600)
    return files


def participant_files(pki_dir: Path, role: str, name: str | None = None) -> TlsFiles:
    """Where a participant's TLS files are in a PKI directory.

    The paths are not checked here; :meth:`TlsFiles.read` reports missing files.

    Args:
        pki_dir: the PKI directory made by :func:`init_pki`.
        role: one of :data:`ROLES`.
        name: the silo id (needed for, and only for, role ``"silo"``).

    Returns:
        The participant's ``ca.pem``, ``cert.pem`` and ``key.pem`` paths.

    Raises:
        ConfigError: an unknown role, a silo without a valid id, or a name for another role.
    """
    pki_dir = Path(pki_dir)
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    if role == "silo":
        if name is None:
            raise ConfigError("a silo's TLS files need the silo id")
        folder = pki_dir / SILOS_DIR / validate_silo_id(name)
    else:
        # There is one coordinator, synth service and admin per PKI; their folder is fixed.
        folder = pki_dir / role
    return TlsFiles(ca=folder / CA_CERT_FILE, cert=folder / CERT_FILE, key=folder / KEY_FILE)


def load_certificate(path: Path) -> x509.Certificate:
    """Read a PEM certificate file.

    Raises:
        PkiError: the file is missing, unreadable, or not a PEM certificate.
    """
    data = _read_file(Path(path))
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise PkiError(f"{path}: not a PEM certificate") from None


def load_ca(pki_dir: Path) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
    """Load the CA certificate and key of a PKI directory, checking that they belong together.

    Raises:
        PkiError: the files are missing, unreadable, malformed or do not match.
    """
    ca_dir = Path(pki_dir) / CA_DIR
    cert = load_certificate(ca_dir / CA_CERT_FILE)
    key_path = ca_dir / CA_KEY_FILE
    key = load_private_key(key_path)
    if not key_matches(key, cert):
        raise PkiError(f"{key_path}: does not match {ca_dir / CA_CERT_FILE}")
    return cert, key


def load_private_key(path: Path) -> CertificateIssuerPrivateKeyTypes:
    """Read an unencrypted PEM private key (EC or RSA).

    Raises:
        PkiError: the file is missing, unreadable, encrypted, or not such a key.
    """
    try:
        key = serialization.load_pem_private_key(_read_file(Path(path)), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise PkiError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PkiError(f"{path}: unsupported key type {type(key).__name__}")
    return key


def key_matches(key: CertificateIssuerPrivateKeyTypes, cert: x509.Certificate) -> bool:
    """Whether ``key`` is the private half of ``cert``'s public key."""
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)


# --------------------------------------------------------------------------- provisioning


def init_pki(
    out_dir: Path,
    *,
    coordinator_hosts: Sequence[str],
    silos: Sequence[str],
    admin: str = "admin",
    synth_hosts: Sequence[str] = DEFAULT_SYNTH_HOSTS,
    days: int = 365,
    force: bool = False,
) -> None:
    """Create a CA and the identities of every participant in ``out_dir``.

    Everything is generated into a staging folder inside ``out_dir`` and moved into place at
    the end, so a failure leaves no half-made PKI behind.

    Args:
        out_dir: the PKI directory (created if missing).
        coordinator_hosts: names/IPs the coordinator is reached at; ``localhost`` and
            ``127.0.0.1`` are always added for the embedded mode.
        silos: silo ids, one client certificate each.
        admin: the admin's name (CN of the admin certificate).
        synth_hosts: names/IPs the synth service is reached at.
        days: validity of the participant certificates; the CA gets at least ten years.
        force: replace an existing PKI in ``out_dir`` (its CA is lost: every participant must
            receive its new folder).

    Raises:
        ConfigError: a bad silo id (named in the message), duplicate ids, a bad host or name.
        PkiError: ``out_dir`` already holds a PKI and ``force`` is false.
    """
    out_dir = Path(out_dir)
    for argument, value in [
        ("silos", silos),
        ("coordinator_hosts", coordinator_hosts),
        ("synth_hosts", synth_hosts),
    ]:
        # A lone string would be iterated character by character, each a "valid" name.
        if isinstance(value, str | bytes):
            raise TypeError(f"{argument} must be a sequence of strings, not one string")
    silo_ids = [validate_silo_id(s) for s in silos]
    seen: set[str] = set()
    for silo_id in silo_ids:
        if silo_id in seen:
            raise ConfigError(f"duplicate silo id {silo_id!r}")
        seen.add(silo_id)
    _validate_name(admin, "admin name")
    _validate_days(days)
    coordinator_hosts = [*coordinator_hosts, *_LOOPBACK_HOSTS]
    # Parse now so a bad host fails before any key is made.
    _parse_hosts(coordinator_hosts, "coordinator host")
    _parse_hosts(synth_hosts, "synth host")

    existing = [e for e in _LAYOUT_ENTRIES if (out_dir / e).exists()]
    if existing and not force:
        raise PkiError(
            f"{out_dir} already holds a PKI ({', '.join(existing)}); use --force to replace it"
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".pki-staging-"))
    try:
        ca_cert, ca_key = create_ca(days=max(days, _MIN_CA_DAYS))
        ca_dir = staging / CA_DIR
        ca_dir.mkdir(mode=0o700)
        _write_file(ca_dir / CA_CERT_FILE, _cert_pem(ca_cert), mode=0o644)
        _write_file(ca_dir / CA_KEY_FILE, _key_pem(ca_key), mode=0o600)

        issue = functools.partial(issue_certificate, ca_cert, ca_key, days=days)
        cert, key = issue(common_name="coordinator", role="coordinator", hosts=coordinator_hosts)
        _write_participant(staging / "coordinator", ca_cert, cert, key)
        cert, key = issue(common_name="synth", role="synth", hosts=synth_hosts)
        _write_participant(staging / "synth", ca_cert, cert, key)
        cert, key = issue(common_name=admin, role="admin")
        _write_participant(staging / "admin", ca_cert, cert, key)
        (staging / SILOS_DIR).mkdir(mode=0o755)
        for silo_id in silo_ids:
            cert, key = issue(common_name=silo_id, role="silo")
            _write_participant(staging / SILOS_DIR / silo_id, ca_cert, cert, key)

        for entry in _LAYOUT_ENTRIES:
            target = out_dir / entry
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(staging / entry, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "PKI created in %s: coordinator, synth, admin %s, %d silo(s)", out_dir, admin, len(silos)
    )


def add_silo(pki_dir: Path, silo_id: str, *, days: int = 365, force: bool = False) -> TlsFiles:
    """Issue one more silo identity from an existing CA (onboarding a silo later).

    Args:
        pki_dir: the PKI directory made by :func:`init_pki`.
        silo_id: the new silo's id.
        days: validity in days.
        force: replace the silo's existing identity (the old certificate stays valid until it
            expires; there is no revocation list).

    Returns:
        The silo's TLS files (its folder is what the silo receives).

    Raises:
        ConfigError: a bad silo id or validity.
        PkiError: no usable CA in ``pki_dir``, or the silo exists and ``force`` is false.
    """
    pki_dir = Path(pki_dir)
    validate_silo_id(silo_id)
    _validate_days(days)
    folder = pki_dir / SILOS_DIR / silo_id
    if folder.exists() and not force:
        raise PkiError(f"silo {silo_id!r} already exists in {pki_dir}; use --force to reissue")
    ca_cert, ca_key = load_ca(pki_dir)
    cert, key = issue_certificate(ca_cert, ca_key, common_name=silo_id, role="silo", days=days)
    files = _write_participant(folder, ca_cert, cert, key)
    logger.info("silo %s issued in %s", silo_id, folder)
    return files


# --------------------------------------------------------------------------- reading


def _role_of(cert: x509.Certificate) -> str | None:
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(units) != 1:
        return None
    value = units[0].value
    return value if isinstance(value, str) else None


def _common_name_of(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        return None
    value = names[0].value
    return value if isinstance(value, str) else None


# Servers call this on every RPC with the same few certificates; parsing is the costly part.
@functools.lru_cache(maxsize=1024)
def identity_from_pem(cert_pem: bytes) -> Identity:
    """The identity a PEM certificate carries: CN and OU role.

    The certificate is *not* verified here: call this only on a certificate the TLS layer
    has already verified against the CA (a gRPC peer's ``x509_pem_cert``).

    Args:
        cert_pem: one PEM-encoded certificate.

    Returns:
        The holder's identity.

    Raises:
        PkiError: not a PEM certificate, no single CN, or no known role in the OU.
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except (ValueError, TypeError):
        raise PkiError("not a PEM certificate") from None
    return identity_of(cert)


def identity_of(cert: x509.Certificate) -> Identity:
    """The identity a parsed certificate carries (see :func:`identity_from_pem`).

    Raises:
        PkiError: no single CN, or no known role in the OU.
    """
    common_name = _common_name_of(cert)
    if not common_name:
        raise PkiError("certificate has no single common name")
    role = _role_of(cert)
    if role not in ROLES:
        raise PkiError(f"certificate of {common_name!r} has no GPT-FL role (OU={role!r})")
    return Identity(common_name=common_name, role=role)


def fingerprint(cert: x509.Certificate) -> str:
    """The SHA-256 fingerprint as colon-separated upper-case hex (as ``openssl`` prints it)."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def describe_certificate(cert: x509.Certificate) -> list[tuple[str, str]]:
    """Human-readable fields of a certificate, for ``gptfl pki show``."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        san_text = ", ".join(
            [f"DNS:{n}" for n in sans.get_values_for_type(x509.DNSName)]
            + [f"IP:{ip}" for ip in sans.get_values_for_type(x509.IPAddress)]
            + [f"URI:{u}" for u in sans.get_values_for_type(x509.UniformResourceIdentifier)]
        )
    except x509.ExtensionNotFound:
        san_text = "-"
    try:
        ekus = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        eku_text = ", ".join(getattr(oid, "_name", oid.dotted_string) for oid in ekus)
    except x509.ExtensionNotFound:
        eku_text = "-"
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return [
        ("common name", _common_name_of(cert) or "-"),
        ("role", "ca" if is_ca else (_role_of(cert) or "-")),
        ("subject", cert.subject.rfc4514_string()),
        ("issuer", cert.issuer.rfc4514_string()),
        ("serial", format(cert.serial_number, "x")),
        ("not before", cert.not_valid_before_utc.isoformat()),
        ("not after", cert.not_valid_after_utc.isoformat()),
        ("SANs", san_text or "-"),
        ("extended key usage", eku_text or "-"),
        ("sha256 fingerprint", fingerprint(cert)),
    ]


def verify_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> None:
    """Check that ``cert`` was signed by ``ca_cert`` (signature and issuer name only).

    Raises:
        PkiError: it was not.
    """
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise PkiError(f"certificate {cert.subject.rfc4514_string()} is not from this CA") from None
