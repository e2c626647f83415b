"""What every chart test needs: the pinned helm binary (scripts/get_helm.sh fetches it once)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def helm() -> Path:
    out = subprocess.run(
        [str(ROOT / "scripts" / "get_helm.sh")], check=True, capture_output=True, text=True
    )
    path = Path(out.stdout.strip().splitlines()[-1])
    assert path.is_file()
    return path
