"""Tests of gptfl.pki and ``gptfl pki``: layout, chains, SANs/EKUs, roles, and real mTLS."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gptfl import pki
from gptfl.cli.main import main
from gptfl.errors import ConfigError, PkiError

SILOS = ("hospital-a", "bank_b", "c.3")


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _ekus(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (
        set(san.get_values_for_type(x509.DNSName)),
        {str(ip) for ip in san.get_values_for_type(x509.IPAddress)},
    )


def _uris(cert: x509.Certificate) -> set[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.UniformResourceIdentifier))


def _role_and_name(folder: str) -> tuple[str, str]:
    """(role, name) of a client-only participant folder of the ``pki_dir`` fixture."""
    return ("admin", "alice") if folder == "admin" else ("silo", folder.split("/")[1])


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    pki.init_pki(
        out,
        coordinator_hosts=["coordinator.gptfl.svc", "10.1.2.3"],
        silos=SILOS,
        admin="alice",
        synth_hosts=["synth.gptfl.svc"],
    )
    return out


@pytest.fixture(scope="module")
def foreign_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("foreign")
    pki.init_pki(out, coordinator_hosts=["localhost"], silos=["hospital-a"])
    return out


# --------------------------------------------------------------------------- layout


def test_init_creates_layout_with_private_keys(pki_dir: Path) -> None:
    expected = ["ca/ca.pem", "ca/ca.key"]
    for folder in ["coordinator", "synth", "admin", *(f"silos/{s}" for s in SILOS)]:
        expected += [f"{folder}/ca.pem", f"{folder}/cert.pem", f"{folder}/key.pem"]
    for rel in expected:
        assert (pki_dir / rel).is_file(), rel
    keys = [pki_dir / "ca/ca.key", *pki_dir.glob("*/key.pem"), *pki_dir.glob("silos/*/key.pem")]
    assert len(keys) == 1 + 3 + len(SILOS)
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    # the CA key never travels with a participant folder
    assert [p for p in pki_dir.rglob("*.key") if p.parent.name != "ca"] == []
    assert not list(pki_dir.glob(".pki-staging-*"))


def test_participant_ca_copies_are_the_ca(pki_dir: Path) -> None:
    ca_pem = (pki_dir / "ca/ca.pem").read_bytes()
    for ca_copy in [*pki_dir.glob("*/ca.pem"), *pki_dir.glob("silos/*/ca.pem")]:
        assert ca_copy.read_bytes() == ca_pem, ca_copy


def test_participant_files_and_read(pki_dir: Path) -> None:
    files = pki.participant_files(pki_dir, "silo", "hospital-a")
    assert files == pki.TlsFiles(
        ca=pki_dir / "silos/hospital-a/ca.pem",
        cert=pki_dir / "silos/hospital-a/cert.pem",
        key=pki_dir / "silos/hospital-a/key.pem",
    )
    ca, cert, key = files.read()
    assert ca.startswith(b"-----BEGIN CERTIFICATE-----")
    assert pki.identity_from_pem(cert) == pki.Identity("hospital-a", "silo")
    assert key.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pki.participant_files(pki_dir, "coordinator").cert == pki_dir / "coordinator/cert.pem"
    with pytest.raises(ConfigError):
        pki.participant_files(pki_dir, "silo")
    with pytest.raises(ConfigError):
        pki.participant_files(pki_dir, "wizard")


def test_read_names_the_missing_file(tmp_path: Path) -> None:
    files = pki.participant_files(tmp_path, "silo", "nobody")
    with pytest.raises(PkiError, match="nobody/ca.pem"):
        files.read()


def test_key_matches_certificate(pki_dir: Path) -> None:
    ca, cert_pem, key_pem = pki.participant_files(pki_dir, "coordinator").read()
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)


# --------------------------------------------------------------------------- chains, SANs, EKUs


def test_all_certificates_are_issued_by_the_ca(pki_dir: Path) -> None:
    ca = _cert(pki_dir / "ca/ca.pem")
    ca.verify_directly_issued_by(ca)  # self-signed
    leaves = [*pki_dir.glob("*/cert.pem"), *pki_dir.glob("silos/*/cert.pem")]
    assert len(leaves) == 3 + len(SILOS)
    for leaf in leaves:
        _cert(leaf).verify_directly_issued_by(ca)
        pki.verify_issued_by(_cert(leaf), ca)


def test_chains_verify_with_the_x509_verification_api(pki_dir: Path) -> None:
    store = Store([_cert(pki_dir / "ca/ca.pem")])
    server = PolicyBuilder().store(store).build_server_verifier(x509.DNSName("localhost"))
    chain = server.verify(_cert(pki_dir / "coordinator/cert.pem"), [])
    assert chain[-1] == _cert(pki_dir / "ca/ca.pem")
    by_ip = x509.IPAddress(ipaddress.ip_address("10.1.2.3"))
    PolicyBuilder().store(store).build_server_verifier(by_ip).verify(
        _cert(pki_dir / "coordinator/cert.pem"), []
    )
    client = PolicyBuilder().store(store).build_client_verifier()
    for folder in ["admin", "coordinator", "synth", *(f"silos/{s}" for s in SILOS)]:
        client.verify(_cert(pki_dir / folder / "cert.pem"), [])
    # a silo certificate is no server certificate
    with pytest.raises(VerificationError):
        server.verify(_cert(pki_dir / "silos/hospital-a/cert.pem"), [])


def test_foreign_ca_certificate_does_not_verify(pki_dir: Path, foreign_dir: Path) -> None:
    ca = _cert(pki_dir / "ca/ca.pem")
    foreign_silo = _cert(foreign_dir / "silos/hospital-a/cert.pem")
    with pytest.raises((ValueError, InvalidSignature)):
        foreign_silo.verify_directly_issued_by(ca)
    with pytest.raises(PkiError, match="not from this CA"):
        pki.verify_issued_by(foreign_silo, ca)
    client = PolicyBuilder().store(Store([ca])).build_client_verifier()
    with pytest.raises(VerificationError):
        client.verify(foreign_silo, [])


def test_coordinator_and_synth_sans_and_ekus(pki_dir: Path) -> None:
    coordinator = _cert(pki_dir / "coordinator/cert.pem")
    dns, ips = _sans(coordinator)
    assert dns == {"coordinator.gptfl.svc", "localhost"}
    assert ips == {"10.1.2.3", "127.0.0.1"}
    assert _ekus(coordinator) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert _uris(coordinator) == {"spiffe://gptfl/coordinator/coordinator"}
    synth = _cert(pki_dir / "synth/cert.pem")
    assert _sans(synth) == ({"synth.gptfl.svc"}, set())
    assert _ekus(synth) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_default_synth_hosts_are_loopback(foreign_dir: Path) -> None:
    assert _sans(_cert(foreign_dir / "synth/cert.pem")) == ({"localhost"}, {"127.0.0.1"})


def test_silo_and_admin_are_client_only(pki_dir: Path) -> None:
    for folder in ["admin", *(f"silos/{s}" for s in SILOS)]:
        cert = _cert(pki_dir / folder / "cert.pem")
        assert _ekus(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}, folder
        # no host names: only the URI that mirrors the identity
        assert _sans(cert) == (set(), set())
        assert _uris(cert) == {pki.spiffe_id(*_role_and_name(folder))}
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert not bc.ca


def test_issue_certificate_rejects_bad_names_and_roles(pki_dir: Path) -> None:
    ca_cert, ca_key = pki.load_ca(pki_dir)
    with pytest.raises(ConfigError, match="unknown role"):
        pki.issue_certificate(ca_cert, ca_key, common_name="x", role="root")
    with pytest.raises(ConfigError, match="invalid silo name"):
        pki.issue_certificate(ca_cert, ca_key, common_name="x/../y", role="silo")


def test_ca_outlives_participant_certificates(pki_dir: Path) -> None:
    ca = _cert(pki_dir / "ca/ca.pem")
    silo = _cert(pki_dir / "silos/hospital-a/cert.pem")
    assert silo.not_valid_after_utc - silo.not_valid_before_utc <= dt.timedelta(days=366)
    assert ca.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=3000)


# --------------------------------------------------------------------------- identities


def test_identity_from_pem_reads_cn_and_role(pki_dir: Path) -> None:
    def ident(rel: str) -> pki.Identity:
        return pki.identity_from_pem((pki_dir / rel).read_bytes())

    assert ident("silos/bank_b/cert.pem") == pki.Identity(common_name="bank_b", role="silo")
    assert ident("admin/cert.pem") == pki.Identity("alice", "admin")
    assert ident("coordinator/cert.pem").role == "coordinator"
    assert ident("synth/cert.pem").role == "synth"
    # cached: the same object back for the same bytes
    assert ident("admin/cert.pem") is ident("admin/cert.pem")


@pytest.mark.parametrize("garbage", [b"", b"not a certificate", b"-----BEGIN CERTIFICATE-----\n"])
def test_identity_from_pem_rejects_garbage(garbage: bytes) -> None:
    with pytest.raises(PkiError):
        pki.identity_from_pem(garbage)


def test_identity_from_pem_rejects_a_certificate_without_role(pki_dir: Path) -> None:
    with pytest.raises(PkiError, match="no GPT-FL role"):
        pki.identity_from_pem((pki_dir / "ca/ca.pem").read_bytes())


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("good", ["a", "0", "hospital-a", "bank_b", "c.3", "a" * 63])
def test_validate_silo_id_accepts(good: str) -> None:
    assert pki.validate_silo_id(good) == good


@pytest.mark.parametrize("bad", ["", "A", "-a", ".a", "a b", "a/b", "../x", "é", "a" * 64])
def test_validate_silo_id_rejects(bad: str) -> None:
    with pytest.raises(ConfigError, match="invalid silo id"):
        pki.validate_silo_id(bad)


def test_init_rejects_bad_and_duplicate_silo_ids(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'Bad!'"):
        pki.init_pki(tmp_path / "p", coordinator_hosts=["h"], silos=["ok", "Bad!"])
    with pytest.raises(ConfigError, match="duplicate silo id 'a'"):
        pki.init_pki(tmp_path / "p", coordinator_hosts=["h"], silos=["a", "b", "a"])
    with pytest.raises(ConfigError, match="coordinator host"):
        pki.init_pki(tmp_path / "p", coordinator_hosts=["h:8443"], silos=["a"])
    with pytest.raises(TypeError, match="silos"):
        pki.init_pki(tmp_path / "p", coordinator_hosts=["h"], silos="a,b")
    with pytest.raises(TypeError, match="coordinator_hosts"):
        pki.init_pki(tmp_path / "p", coordinator_hosts="localhost", silos=["a"])
    assert not (tmp_path / "p").exists()  # nothing written before validation passed


def test_init_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    pki.init_pki(out, coordinator_hosts=["h"], silos=["a", "b"])
    first_ca = (out / "ca/ca.pem").read_bytes()
    with pytest.raises(PkiError, match="already holds a PKI"):
        pki.init_pki(out, coordinator_hosts=["h"], silos=["a"])
    assert (out / "ca/ca.pem").read_bytes() == first_ca
    pki.init_pki(out, coordinator_hosts=["h"], silos=["a", "c"], force=True)
    assert (out / "ca/ca.pem").read_bytes() != first_ca
    # no stale identity of the old CA is left behind
    assert sorted(p.name for p in (out / "silos").iterdir()) == ["a", "c"]
    _cert(out / "silos/a/cert.pem").verify_directly_issued_by(_cert(out / "ca/ca.pem"))


# --------------------------------------------------------------------------- add-silo


def test_add_silo_issues_a_verifiable_certificate(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    pki.init_pki(out, coordinator_hosts=["h"], silos=["a"])
    files = pki.add_silo(out, "late-joiner", days=30)
    assert files == pki.participant_files(out, "silo", "late-joiner")
    ca = _cert(out / "ca/ca.pem")
    cert = _cert(files.cert)
    cert.verify_directly_issued_by(ca)
    assert files.ca.read_bytes() == (out / "ca/ca.pem").read_bytes()
    assert pki.identity_from_pem(files.cert.read_bytes()) == pki.Identity("late-joiner", "silo")
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(days=31)

    with pytest.raises(PkiError, match="already exists"):
        pki.add_silo(out, "late-joiner")
    with pytest.raises(PkiError, match="already exists"):
        pki.add_silo(out, "a")
    reissued = pki.add_silo(out, "late-joiner", force=True)
    assert _cert(reissued.cert).serial_number != cert.serial_number
    with pytest.raises(ConfigError):
        pki.add_silo(out, "Nope")


def test_add_silo_without_ca_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="ca.pem"):
        pki.add_silo(tmp_path, "a")


def test_add_silo_rejects_a_ca_key_that_does_not_match(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    pki.init_pki(one, coordinator_hosts=["h"], silos=[])
    pki.init_pki(two, coordinator_hosts=["h"], silos=[])
    (one / "ca/ca.key").write_bytes((two / "ca/ca.key").read_bytes())
    with pytest.raises(PkiError, match="does not match"):
        pki.add_silo(one, "a")


# --------------------------------------------------------------------------- CLI


def test_cli_init_add_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pki"
    code = main(
        [
            "pki",
            "init",
            "--out",
            str(out),
            "--coordinator-host",
            "coord.example.org",
            "--coordinator-host",
            "192.0.2.7",
            "--silos",
            "a,b",
            "--silos",
            "c",
            "--synth-host",
            "synth.example.org",
            "--days",
            "30",
        ]  # fmt: skip
    )
    assert code == 0
    assert sorted(p.name for p in (out / "silos").iterdir()) == ["a", "b", "c"]
    dns, ips = _sans(_cert(out / "coordinator/cert.pem"))
    assert dns == {"coord.example.org", "localhost"}
    assert ips == {"192.0.2.7", "127.0.0.1"}
    assert _sans(_cert(out / "synth/cert.pem")) == ({"synth.example.org"}, set())

    assert main(["pki", "add-silo", "--pki", str(out), "--silo", "d"]) == 0
    _cert(out / "silos/d/cert.pem").verify_directly_issued_by(_cert(out / "ca/ca.pem"))

    capsys.readouterr()
    assert main(["pki", "show", str(out / "silos/d/cert.pem")]) == 0
    shown = capsys.readouterr().out
    assert "common name:" in shown and " d\n" in shown
    assert "role:" in shown and "silo" in shown
    assert "GPT-FL CA" in shown  # issuer
    assert pki.fingerprint(_cert(out / "silos/d/cert.pem")) in shown


def test_cli_refuses_existing_pki(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["pki", "init", "--out", str(tmp_path), "--coordinator-host", "h", "--silos", "a"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) != 0
    err = capsys.readouterr().err.strip()
    assert "already holds a PKI" in err and "--force" in err
    assert len(err.splitlines()) == 1
    assert main([*args, "--force"]) == 0


def test_cli_bad_silo_id_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pki"
    code = main(["pki", "init", "--out", str(out), "--coordinator-host", "h", "--silos", "a,B!"])
    assert code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'B!'" in err
    assert not out.exists()


def test_cli_pki_without_subcommand_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pki"]) == 2
    assert "init" in capsys.readouterr().err


def test_cli_show_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pki", "show", str(tmp_path / "nope.pem")]) != 0
    assert "nope.pem" in capsys.readouterr().err


# --------------------------------------------------------------------------- real mutual TLS


_WHOAMI = "/gptfl.test.Probe/WhoAmI"


def _whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
    auth = context.auth_context()
    common_name = auth["x509_common_name"][0].decode()
    identity = pki.identity_from_pem(auth["x509_pem_cert"][0])
    return f"{common_name}|{identity.common_name}|{identity.role}".encode()


@pytest.fixture(scope="module")
def mtls_port(pki_dir: Path) -> Iterator[int]:
    ca, cert, key = pki.participant_files(pki_dir, "coordinator").read()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    probe = grpc.method_handlers_generic_handler(
        "gptfl.test.Probe", {"WhoAmI": grpc.unary_unary_rpc_method_handler(_whoami)}
    )
    server.add_generic_rpc_handlers((probe,))
    credentials = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    assert port > 0
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


def _channel(port: int, files: pki.TlsFiles, *, host: str = "127.0.0.1") -> grpc.Channel:
    ca, cert, key = files.read()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    return grpc.secure_channel(f"{host}:{port}", credentials)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_mtls_silo_from_same_ca_is_accepted(pki_dir: Path, mtls_port: int, host: str) -> None:
    files = pki.participant_files(pki_dir, "silo", "hospital-a")
    with _channel(mtls_port, files, host=host) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        answer = channel.unary_unary(_WHOAMI)(b"", timeout=5)
    assert answer == b"hospital-a|hospital-a|silo"


def test_mtls_server_reads_admin_identity(pki_dir: Path, mtls_port: int) -> None:
    with _channel(mtls_port, pki.participant_files(pki_dir, "admin")) as channel:
        assert channel.unary_unary(_WHOAMI)(b"", timeout=5) == b"alice|alice|admin"


def test_mtls_client_from_foreign_ca_is_refused(
    pki_dir: Path, foreign_dir: Path, mtls_port: int
) -> None:
    foreign = pki.participant_files(foreign_dir, "silo", "hospital-a")
    # trust our CA (so the server side is fine) but present the foreign silo certificate
    mixed = pki.TlsFiles(ca=pki_dir / "ca/ca.pem", cert=foreign.cert, key=foreign.key)
    with _channel(mtls_port, mixed) as channel, pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_client_without_certificate_is_refused(pki_dir: Path, mtls_port: int) -> None:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(pki_dir / "ca/ca.pem").read_bytes()
    )
    channel = grpc.secure_channel(f"127.0.0.1:{mtls_port}", credentials)
    with channel, pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_client_refuses_server_from_foreign_ca(foreign_dir: Path, mtls_port: int) -> None:
    # the foreign silo trusts only its own CA, so our coordinator must not be accepted
    channel = _channel(mtls_port, pki.participant_files(foreign_dir, "silo", "hospital-a"))
    with channel, pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
