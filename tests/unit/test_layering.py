"""The layout's one rule: ``gptfl/`` imports no service, and no service imports another.

Every import statement is read from the source (the ones inside functions too), and so is
every ``importlib.import_module("...")`` with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("coordinator", "silo_agent", "synth_service")


def _imported(path: Path) -> set[str]:
    """Top-level package names that ``path`` imports, wherever the import is."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value.split(".")[0])
    return names


def _offences(package: str, forbidden: set[str]) -> list[str]:
    return sorted(
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (ROOT / package).rglob("*.py")
        if "proto" not in path.relative_to(ROOT).parts
        for name in _imported(path) & forbidden
    )


@pytest.mark.parametrize("package", ["gptfl", *SERVICES])
def test_a_package_imports_no_service_but_itself(package: str) -> None:
    assert _offences(package, set(SERVICES) - {package}) == []


def test_the_check_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    source = tmp_path / "lazy.py"
    source.write_text(
        "def f():\n    from synth_service.artifacts import regenerate\n"
        "    import importlib\n    importlib.import_module('coordinator.main')\n"
    )
    assert _imported(source) >= {"synth_service", "coordinator"}
