"""The checked-in gRPC stubs match what `make protos` generates from proto/gptfl/v1."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[3]
CHECKED_IN = REPO_ROOT / "gptfl" / "proto" / "v1"


def _gen_protos() -> ModuleType:
    # scripts/ is not a package; load the script by path so the test and `make protos` run
    # exactly the same generate().
    path = REPO_ROOT / "scripts" / "gen_protos.py"
    spec = importlib.util.spec_from_file_location("_gen_protos_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _drift(generated: list[Path]) -> list[str]:
    """Names of stub files that differ from, or are missing in, the checked-in folder."""
    fresh = {p.name: p.read_text() for p in generated}
    current = {p.name: p.read_text() for p in CHECKED_IN.iterdir() if p.is_file()}
    return sorted(n for n in fresh.keys() | current.keys() if fresh.get(n) != current.get(n))


def test_checked_in_stubs_match_the_proto_files(tmp_path: Path) -> None:
    written = _gen_protos().generate(tmp_path)
    names = {p.name for p in written}
    assert {"fleet_pb2.py", "fleet_pb2_grpc.py", "admin_pb2.py", "common_pb2.pyi"} <= names
    stale = _drift(written)
    assert not stale, f"{stale} differ from proto/gptfl/v1: run `make protos`"


def test_an_edited_proto_counts_as_drift(tmp_path: Path) -> None:
    # The check above must be able to fail: generate from a copy of the protos with one field
    # added and it must report the stubs of that file.
    module = _gen_protos()
    protos = tmp_path / "proto"
    shutil.copytree(module.PROTO_ROOT, protos)
    common = protos / "gptfl" / "v1" / "common.proto"
    common.write_text(common.read_text() + "\nmessage DriftProbe { string note = 1; }\n")
    module.PROTO_ROOT = protos
    module.PROTO_DIR = protos / "gptfl" / "v1"
    stale = _drift(module.generate(tmp_path / "out"))
    assert "common_pb2.py" in stale
    assert "fleet_pb2.py" not in stale


def test_stubs_import_through_the_package_path() -> None:
    # generate() rewrites protoc's `gptfl.v1` imports; a stub left with them would not import.
    from gptfl.proto.v1 import admin_pb2, fleet_pb2, fleet_pb2_grpc

    assert fleet_pb2.DESCRIPTOR.package == "gptfl.v1"
    assert admin_pb2.DESCRIPTOR.package == "gptfl.v1"
    assert callable(fleet_pb2_grpc.add_FleetServicer_to_server)
