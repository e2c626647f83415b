"""A service checks its certificate files at start and names the key of the one that is wrong."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pytest

from gptfl.errors import PkiError
from gptfl.pki import init_pki, participant_files
from gptfl.tls_config import TlsConfig


@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two PKIs: ours, and another organisation's."""
    ours, theirs = tmp_path_factory.mktemp("ours"), tmp_path_factory.mktemp("theirs")
    init_pki(ours, coordinator_hosts=["localhost"], silos=["a", "b"], days=30)
    init_pki(theirs, coordinator_hosts=["localhost"], silos=["a"], days=30)
    return ours, theirs


def _silo(pki: Path, silo: str = "a") -> TlsConfig:
    files = participant_files(pki, "silo", silo)
    return TlsConfig(ca=files.ca, cert=files.cert, key=files.key)


def _problem(config: TlsConfig, **kwargs: object) -> str:
    with pytest.raises(PkiError) as info:
        config.check(role="silo", **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


def test_good_files_give_the_identity(pkis: tuple[Path, Path]) -> None:
    identity = _silo(pkis[0]).check(role="silo")
    assert (identity.common_name, identity.role) == ("a", "silo")


def test_a_missing_file_names_its_key(pkis: tuple[Path, Path], tmp_path: Path) -> None:
    config = _silo(pkis[0]).model_copy(update={"cert": tmp_path / "nope.pem"})
    assert _problem(config) == f"tls.cert: {tmp_path / 'nope.pem'}: no such file"


def test_garbage_is_not_a_certificate(pkis: tuple[Path, Path], tmp_path: Path) -> None:
    garbage = tmp_path / "cert.pem"
    garbage.write_text("hello")
    message = _problem(_silo(pkis[0]).model_copy(update={"cert": garbage}))
    assert message.startswith("tls.cert: ") and "not a PEM certificate" in message


def test_a_key_given_as_the_ca_is_refused(pkis: tuple[Path, Path]) -> None:
    config = _silo(pkis[0])
    message = _problem(config.model_copy(update={"ca": config.key}))
    assert message.startswith("tls.ca: ") and "not a PEM certificate" in message


def test_another_silos_key_is_refused(pkis: tuple[Path, Path]) -> None:
    config = _silo(pkis[0]).model_copy(update={"key": _silo(pkis[0], "b").key})
    assert _problem(config).startswith("tls.key: ")
    assert "is not the key of the certificate" in _problem(config)


def test_a_certificate_from_another_ca_is_refused(pkis: tuple[Path, Path]) -> None:
    config = _silo(pkis[0]).model_copy(update={"ca": _silo(pkis[1]).ca})
    assert "was not issued by the CA" in _problem(config)


def test_an_expired_certificate_is_refused(pkis: tuple[Path, Path]) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=31)
    message = _problem(_silo(pkis[0]), now=later)
    assert message.startswith("tls.cert: ") and "expired on" in message


def test_a_certificate_for_another_role_is_refused(pkis: tuple[Path, Path], tmp_path: Path) -> None:
    admin = participant_files(pkis[0], "admin")
    folder = tmp_path / "mixed-up"
    shutil.copytree(admin.cert.parent, folder)
    config = TlsConfig(
        ca=folder / admin.ca.name, cert=folder / admin.cert.name, key=folder / admin.key.name
    )
    message = _problem(config)
    assert message.startswith("tls.cert: ")
    assert "is for role 'admin'" in message and "needs a 'silo' certificate" in message
