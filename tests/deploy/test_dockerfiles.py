"""Static checks of the Dockerfiles (no Docker engine runs on the development machines).

What is checked here: multi-stage builds whose install step is scripts/install.sh (the
script `make venv` runs, so `make test` exercises it), a pinned base, a non-root final stage
with no compilers or package installs, a build context that holds what the install needs, and
the console scripts the Helm charts start. What is not: that the images build and start;
deploy/README.md says how to check that where Docker runs.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [args for o, args in self.instructions if o == op]


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages of a Dockerfile (continuations joined)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else ""
            stages.append(Stage(base=parts[0], name=name))
        elif not stages:
            if op == "ARG" and "=" in rest:
                key, value = rest.split("=", 1)
                args[key.strip()] = value.strip()
        else:
            stages[-1].instructions.append((op, " ".join(rest.split())))
    return args, stages


def resolve(base: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_multi_stage_build_installs_with_the_makefile_script(name: str) -> None:
    args, stages = parse(DOCKER / name)
    assert len(stages) >= 2, "build and runtime stages"
    build, final = stages[0], stages[-1]
    installs = [r for r in build.all("RUN") if "scripts/install.sh" in r]
    assert len(installs) == 1 and "scripts/install.sh /opt/gptfl/venv runtime" in installs[0]
    assert "scripts/install.sh" in (ROOT / "Makefile").read_text()
    # every requirements file the script reads is in the build stage
    copied = " ".join(build.all("COPY"))
    assert "requirements/" in copied and "scripts/install.sh" in copied
    assert any(f"--from={build.name}" in c for c in final.all("COPY"))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_image_is_pinned(name: str) -> None:
    args, stages = parse(DOCKER / name)
    for stage in stages:
        image = resolve(stage.base, args)
        repo, _, tag = image.partition("@")[0].rpartition(":")
        assert repo and tag and tag != "latest", image
        # an exact patch release (x.y.z), and the same base for build and runtime
        assert re.match(r"\d+\.\d+\.\d+", tag), image
    assert len({resolve(s.base, args) for s in stages}) == 1


@pytest.mark.parametrize("name", DOCKERFILES)
def test_final_stage_is_non_root_without_build_tools(name: str) -> None:
    _, stages = parse(DOCKER / name)
    final = stages[-1]
    (user,) = final.all("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit() and int(gid) > 0
    for run in final.all("RUN"):
        assert not re.search(r"apt-get install|apk add|pip install|gcc|build-essential", run)
    # the charts run as this user
    for chart in ("coordinator", "silo-agent", "synth-service"):
        values = yaml.safe_load((ROOT / "deploy/helm" / chart / "values.yaml").read_text())
        assert values["podSecurityContext"]["runAsUser"] == int(uid)
        assert values["podSecurityContext"]["runAsGroup"] == int(gid)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_build_context_holds_what_the_install_needs(name: str) -> None:
    ignore = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore, "an allow-list: nothing else enters the context"
    _, stages = parse(DOCKER / name)
    for copy in stages[0].all("COPY"):
        for source in copy.split()[:-1]:
            if source.startswith("--"):
                continue
            source = source.rstrip("/").replace("README.m[d]", "README.md")
            assert source in allowed, f"{source} is copied but not in the build context"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in allowed, pattern


def test_images_carry_the_entry_points_the_charts_start() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"gptfl", "gptfl-coordinator", "gptfl-silo", "gptfl-synth"} <= set(scripts)
    for chart, template in (
        ("coordinator", "statefulset.yaml"),
        ("silo-agent", "deployment.yaml"),
        ("synth-service", "deployment.yaml"),
    ):
        text = (ROOT / "deploy/helm" / chart / "templates" / template).read_text()
        (args,) = re.findall(r'args: \["([\w-]+)"', text)
        assert args in scripts, (chart, args)
    _, stages = parse(DOCKER / "Dockerfile.cuda")
    assert stages[-1].all("CMD") == ['["gptfl-synth", "--config", "/etc/gptfl/synth.yaml"]']
