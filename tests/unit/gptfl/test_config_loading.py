"""Config files: YAML + env overrides -> typed config, one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.config import ENV_PREFIX as COORDINATOR_ENV
from coordinator.config import CoordinatorConfig
from gptfl.config_loading import apply_env_overrides, load_config
from gptfl.data.sources import ImageFolderSource, NpzSource, SklearnDigitsSource
from gptfl.errors import ConfigError
from silo_agent.config import ENV_PREFIX as SILO_ENV
from silo_agent.config import SiloConfig

SILO_YAML = """\
coordinator: coord.example:50051
tls:
  ca: pki/ca.pem
  cert: pki/cert.pem
  key: /abs/key.pem
state_dir: state
data:
  train:
    kind: npz
    path: data/train.npz
  eval:
    kind: imagefolder
    path: data/eval
reconnect:
  initial_backoff_s: 0.5
"""

COORDINATOR_YAML = """\
tls:
  ca: pki/ca.pem
  cert: pki/cert.pem
  key: pki/key.pem
state_dir: state
"""


def _write(folder: Path, text: str, name: str = "config.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def _error(model: type, path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(model, path)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path.name}:"), message
    return message


# ---- errors name the key --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(SILO_YAML + "colour: red\n", "config.yaml: colour: unknown key", id="top"),
        pytest.param(
            SILO_YAML + "  max_backoff_z: 3\n",
            "config.yaml: reconnect.max_backoff_z: unknown key",
            id="nested",
        ),
        pytest.param(
            SILO_YAML.replace("  ca: pki/ca.pem\n", "  ca: pki/ca.pem\n  pem: x\n"),
            "config.yaml: tls.pem: unknown key",
            id="tls",
        ),
        pytest.param(
            SILO_YAML.replace("    path: data/train.npz\n", "    path: a.npz\n    mmap: true\n"),
            "config.yaml: data.train.mmap: unknown key for 'npz'",
            id="in-a-data-source",
        ),
    ],
)
def test_unknown_keys_are_named(tmp_path: Path, text: str, expected: str) -> None:
    assert _error(SiloConfig, _write(tmp_path, text)) == expected


@pytest.mark.parametrize(
    ("text", "key", "detail"),
    [
        pytest.param(SILO_YAML + "poll_wait_s: -3\n", "poll_wait_s", "greater than 0", id="neg"),
        pytest.param(
            SILO_YAML + "poll_wait_s: 61\n", "poll_wait_s", "less than or equal", id="big"
        ),
        pytest.param(
            SILO_YAML + "log_format: xml\n", "log_format", "'text' or 'json'", id="literal"
        ),
        pytest.param(
            SILO_YAML.replace("initial_backoff_s: 0.5", "initial_backoff_s: soon"),
            "reconnect.initial_backoff_s",
            "valid number",
            id="nested-type",
        ),
        pytest.param(
            SILO_YAML.replace("kind: npz", "kind: parquet"), "data.train", "'npz'", id="kind"
        ),
    ],
)
def test_bad_values_are_named(tmp_path: Path, text: str, key: str, detail: str) -> None:
    message = _error(SiloConfig, _write(tmp_path, text))
    assert message.startswith(f"config.yaml: {key}: "), message
    assert detail in message


def test_union_member_labels_do_not_leak_into_the_key(tmp_path: Path) -> None:
    # pydantic puts the discriminator value ("npz") into the error location; a user would look
    # for a key of that name, so the message must show only the keys of the file.
    text = SILO_YAML.replace("    path: data/train.npz\n", "")
    message = _error(SiloConfig, _write(tmp_path, text))
    assert message == "config.yaml: data.train.path: required key is missing"


def test_a_union_members_own_rule_is_named_by_the_source_key(tmp_path: Path) -> None:
    # The label ("sklearn-digits") is the last part of pydantic's location here; it must not
    # be taken for a missing key and shown.
    text = SILO_YAML.replace(
        "    kind: npz\n    path: data/train.npz\n",
        "    kind: sklearn-digits\n    split: test\n"
        "    partition: {index: 0, count: 2, alpha: 0.5}\n",
    )
    message = _error(SiloConfig, _write(tmp_path, text))
    assert message == (
        "config.yaml: data.train: partition applies to the train split only (or to all "
        "examples); set split: train"
    )


@pytest.mark.parametrize(
    ("text", "key", "detail"),
    [
        pytest.param(SILO_YAML + "poll_wait_s: .inf\n", "poll_wait_s", "finite number", id="inf"),
        pytest.param(
            SILO_YAML.replace("initial_backoff_s: 0.5", "initial_backoff_s: .nan"),
            "reconnect.initial_backoff_s",
            "finite number",
            id="nan",
        ),
        pytest.param(
            SILO_YAML + "poll_wait_s: true\n",
            "poll_wait_s",
            "Input should be a number, not true or false (got True)",
            id="bool",
        ),
    ],
)
def test_numbers_are_finite_and_never_booleans(
    tmp_path: Path, text: str, key: str, detail: str
) -> None:
    message = _error(SiloConfig, _write(tmp_path, text))
    assert message.startswith(f"config.yaml: {key}: "), message
    assert detail in message, message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        pytest.param(SILO_YAML.replace("coordinator: coord.example:50051\n", ""), "coordinator"),
        pytest.param(SILO_YAML.replace("  cert: pki/cert.pem\n", ""), "tls.cert"),
    ],
)
def test_missing_required_keys_are_named(tmp_path: Path, text: str, key: str) -> None:
    message = _error(SiloConfig, _write(tmp_path, text))
    assert message == f"config.yaml: {key}: required key is missing"


def test_several_problems_report_the_first_and_a_count(tmp_path: Path) -> None:
    text = SILO_YAML + "colour: red\nflavour: mint\n"
    assert _error(SiloConfig, _write(tmp_path, text)).endswith("unknown key (+1 more problem)")


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "coordinator: x\ndata: [unclosed\n")
    message = _error(SiloConfig, path)
    assert "invalid YAML" in message
    assert "line 3" in message


def test_non_mapping_document_is_refused(tmp_path: Path) -> None:
    assert "expected a mapping" in _error(SiloConfig, _write(tmp_path, "- a\n- b\n"))


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(SiloConfig, tmp_path / "absent.yaml")


# ---- tls ----------------------------------------------------------------------------------


def test_coordinator_requires_tls_unless_insecure(tmp_path: Path) -> None:
    message = _error(CoordinatorConfig, _write(tmp_path, "state_dir: s\n"))
    assert "tls is required unless insecure: true" in message
    config = load_config(CoordinatorConfig, _write(tmp_path, "insecure: true\n"))
    assert config.insecure and config.tls is None


def test_silo_requires_tls_unless_insecure_and_then_a_silo_id(tmp_path: Path) -> None:
    no_tls = "\n".join(
        line
        for line in SILO_YAML.splitlines()
        if not line.startswith(("tls:", "  ca", "  ce", "  ke"))
    )
    assert "tls is required" in _error(SiloConfig, _write(tmp_path, no_tls + "\n"))
    insecure = no_tls + "\ninsecure: true\n"
    assert "needs silo_id" in _error(SiloConfig, _write(tmp_path, insecure))
    config = load_config(SiloConfig, _write(tmp_path, insecure + "silo_id: clinic-a\n"))
    assert config.silo_id == "clinic-a"


# ---- environment overrides --------------------------------------------------------------------


def test_env_overrides_nested_keys_with_yaml_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, SILO_YAML)
    monkeypatch.setenv(f"{SILO_ENV}__RECONNECT__MAX_BACKOFF_S", "7.5")
    monkeypatch.setenv(f"{SILO_ENV}__EXIT_AFTER_JOB", "true")
    monkeypatch.setenv(f"{SILO_ENV}__COORDINATOR", "other:1")
    monkeypatch.setenv("GPTFL_OTHER__POLL_WAIT_S", "-1")  # another prefix: ignored
    config = load_config(SiloConfig, path, env_prefix=SILO_ENV)
    assert config.reconnect.max_backoff_s == 7.5
    assert config.reconnect.initial_backoff_s == 0.5  # siblings in the file are kept
    assert config.exit_after_job is True
    assert config.coordinator == "other:1"


def test_env_override_can_create_a_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, COORDINATOR_YAML)
    monkeypatch.setenv(f"{COORDINATOR_ENV}__KUBERNETES__NAMESPACE", "fl")
    config = load_config(CoordinatorConfig, path, env_prefix=COORDINATOR_ENV)
    assert config.kubernetes.namespace == "fl"


def test_env_overrides_are_validated_like_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, SILO_YAML)
    monkeypatch.setenv(f"{SILO_ENV}__RECONNECT__JITTER", "1")
    with pytest.raises(ConfigError, match=r"^config.yaml: reconnect.jitter: unknown key$"):
        load_config(SiloConfig, path, env_prefix=SILO_ENV)
    monkeypatch.delenv(f"{SILO_ENV}__RECONNECT__JITTER")
    monkeypatch.setenv(f"{SILO_ENV}__POLL_WAIT_S", "[1")
    with pytest.raises(ConfigError, match=rf"\${SILO_ENV}__POLL_WAIT_S.*invalid YAML"):
        load_config(SiloConfig, path, env_prefix=SILO_ENV)


def test_env_overrides_are_off_without_a_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(f"{SILO_ENV}__COORDINATOR", "other:1")
    assert load_config(SiloConfig, _write(tmp_path, SILO_YAML)).coordinator == "coord.example:50051"


def test_apply_env_overrides_leaves_its_input_alone() -> None:
    data = {"a": {"b": 1, "c": 2}}
    result = apply_env_overrides(data, prefix="P", environ={"P__A__B": "3", "P__D": "x: 1"})
    assert result == {"a": {"b": 3, "c": 2}, "d": {"x": 1}}
    assert data == {"a": {"b": 1, "c": 2}}


# ---- relative paths ---------------------------------------------------------------------------


def test_silo_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc" / "silo"
    path = _write(folder, SILO_YAML)
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    config = load_config(SiloConfig, path)
    assert config.tls is not None
    assert config.tls.ca == folder / "pki/ca.pem"
    assert config.tls.cert == folder / "pki/cert.pem"
    assert config.tls.key == Path("/abs/key.pem")
    assert config.state_dir == folder / "state"
    assert isinstance(config.data.train, NpzSource)
    assert config.data.train.path == folder / "data/train.npz"
    assert isinstance(config.data.eval, ImageFolderSource)
    assert config.data.eval.path == folder / "data/eval"


def test_silo_builtin_source_has_no_path_to_resolve(tmp_path: Path) -> None:
    text = SILO_YAML.replace(
        "    kind: npz\n    path: data/train.npz\n", "    kind: sklearn-digits\n"
    )
    config = load_config(SiloConfig, _write(tmp_path, text))
    assert isinstance(config.data.train, SklearnDigitsSource)


def test_coordinator_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    folder = tmp_path / "coord"
    config = load_config(CoordinatorConfig, _write(folder, COORDINATOR_YAML))
    assert config.tls is not None
    assert config.tls.files().ca == folder / "pki/ca.pem"
    assert config.tls.key == folder / "pki/key.pem"
    assert config.state_dir == folder / "state"
    assert config.runs_dir is None
    assert config.effective_runs_dir == folder / "state" / "runs"
    explicit = load_config(
        CoordinatorConfig, _write(folder, COORDINATOR_YAML + "runs_dir: ../runs\n")
    )
    assert explicit.effective_runs_dir == folder / "../runs"
    absolute = load_config(
        CoordinatorConfig, _write(folder, COORDINATOR_YAML + f"runs_dir: {tmp_path}/r\n")
    )
    assert absolute.effective_runs_dir == tmp_path / "r"


def test_configs_are_immutable(tmp_path: Path) -> None:
    config = load_config(CoordinatorConfig, _write(tmp_path, COORDINATOR_YAML))
    with pytest.raises(Exception, match="frozen"):
        config.state_dir = Path("/elsewhere")  # type: ignore[misc]


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        # no port: gRPC would dial 443 for ever
        pytest.param(
            "coordinator: coord.example:50051", "coordinator: coord.example", "coordinator"
        ),
        pytest.param(
            "coordinator: coord.example:50051", "coordinator: coord.example:x", "coordinator"
        ),
        pytest.param("coordinator: coord.example:50051", "coordinator: ':50051'", "coordinator"),
        pytest.param("coordinator: coord.example:50051", "coordinator: h:0", "coordinator"),
        pytest.param("state_dir: state", "metrics_address: bogus", "metrics_address"),
        pytest.param("state_dir: state", "metrics_address: '127.0.0.1:99999'", "metrics_address"),
    ],
)
def test_bad_addresses_are_named(tmp_path: Path, old: str, new: str, key: str) -> None:
    assert old in SILO_YAML
    message = _error(SiloConfig, _write(tmp_path, SILO_YAML.replace(old, new)))
    assert message.startswith(f"config.yaml: {key}: expected host:port"), message


@pytest.mark.parametrize("address", ["", ":9100", "0.0.0.0:0", "[::]:9100", "127.0.0.1:65535"])
def test_good_listen_addresses_pass(tmp_path: Path, address: str) -> None:
    text = SILO_YAML + f"metrics_address: '{address}'\n"
    config = load_config(SiloConfig, _write(tmp_path, text), env_prefix="GPTFL_TEST")
    assert config.metrics_address == address
