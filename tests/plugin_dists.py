"""Installed-looking distributions for entry-point tests, written into a temporary folder.

A folder on ``sys.path`` holding ``NAME-VERSION.dist-info/{METADATA,entry_points.txt}`` and a
module is, to :mod:`importlib.metadata`, an installed package: exactly what ``pip install
--target`` leaves behind, without a build.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from gptfl.models.registry import ENTRY_POINT_GROUP, reload_plugins


def write_dist(
    root: Path,
    *,
    dist: str,
    version: str,
    modules: Mapping[str, str],
    entry_points: Mapping[str, str],
) -> Path:
    """Writes a distribution ``dist`` ``version`` with ``modules`` (name -> source) and
    ``gptfl.models`` ``entry_points`` (name -> ``module:attribute``) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for name, source in modules.items():
        (root / f"{name}.py").write_text(source, encoding="utf-8")
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8"
    )
    lines = [f"[{ENTRY_POINT_GROUP}]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


class PluginPath:
    """Puts folders on ``sys.path`` and makes the registry scan them again."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._monkeypatch = monkeypatch
        self.modules: set[str] = set()

    def add(self, root: Path, *, modules: tuple[str, ...] = ()) -> None:
        self._monkeypatch.syspath_prepend(str(root))
        self.modules.update(modules)
        reload_plugins()

    def install(
        self,
        root: Path,
        *,
        dist: str,
        module: str,
        source: str,
        entry_points: Mapping[str, str],
        version: str = "1.0",
    ) -> Path:
        """:func:`write_dist` with one module, then :meth:`add`; returns ``root``."""
        write_dist(
            root, dist=dist, version=version, modules={module: source}, entry_points=entry_points
        )
        self.add(root, modules=(module,))
        return root

    def remove(self, root: Path) -> None:
        """Takes ``root`` off ``sys.path`` again (another installation from now on)."""
        sys.path.remove(str(root))
        self.forget_modules()
        reload_plugins()

    def forget_modules(self) -> None:
        for name in self.modules:
            sys.modules.pop(name, None)


@pytest.fixture
def plugin_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[PluginPath]:
    """A :class:`PluginPath`; afterwards the plugins' modules are forgotten and the registry
    rescans (the added folders leave ``sys.path`` with the monkeypatch)."""
    paths = PluginPath(monkeypatch)
    yield paths
    paths.forget_modules()
    reload_plugins()
