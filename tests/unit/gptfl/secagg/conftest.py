"""Fixtures of the secure-aggregation tests: one real PKI made by gptfl.pki for all of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from gptfl import pki
from tests.unit.gptfl.secagg.protocol_driver import SILOS, Cohort


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("secagg-pki")
    pki.init_pki(folder, coordinator_hosts=["localhost"], silos=SILOS)
    return folder


@pytest.fixture(scope="session")
def cohort(pki_dir: Path) -> Cohort:
    return Cohort.from_pki(pki_dir)
