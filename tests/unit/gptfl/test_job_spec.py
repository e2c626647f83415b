"""The job spec: defaults, validation and one-line errors naming the key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest

from gptfl.config_loading import parse_config
from gptfl.data.sources import SklearnDigitsSource
from gptfl.errors import ConfigError
from gptfl.job_spec import JobSpec, StrategyName, load_job_spec, parse_job_spec, strategy_spec

MINIMAL = """\
name: digits-1
model: {arch: cnn-small, num_classes: 10, in_channels: 1, image_size: 8}
rounds: 3
"""


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_job_spec(text, source="job.yaml")
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_defaults() -> None:
    spec = parse_job_spec(MINIMAL)
    assert spec.name == "digits-1"
    assert spec.model.arch == "cnn-small"
    assert spec.rounds == 3
    assert spec.silos_per_round == "all"
    assert spec.silo_fraction() == 1.0
    assert spec.min_silos == 1
    assert spec.seed == 0
    assert spec.round_deadline_s == 600.0
    assert spec.strategy.name == "fedavg"
    assert spec.local.epochs == 1 and spec.local.batch_size == 32
    assert spec.evaluation.federated is True
    assert spec.evaluation.server is None
    assert spec.initial_model is None


@pytest.mark.parametrize("name", ["a", "job-1", "0abc", "x" * 40])
def test_good_names(name: str) -> None:
    assert parse_job_spec(MINIMAL.replace("digits-1", name)).name == name


@pytest.mark.parametrize("name", ["'My Job'", "-lead", "x" * 41, "''", "job_1", "Job"])
def test_names_must_be_slugs(name: str) -> None:
    message = _error(MINIMAL.replace("digits-1", name))
    assert message.startswith("job.yaml: name: "), message
    assert "lowercase letters, digits or dashes" in message


@pytest.mark.parametrize(("value", "fraction"), [("all", 1.0), ("0.25", 0.25), ("1", 1.0)])
def test_silos_per_round_all_or_fraction(value: str, fraction: float) -> None:
    spec = parse_job_spec(MINIMAL + f"silos_per_round: {value}\n")
    assert spec.silo_fraction() == fraction


@pytest.mark.parametrize("value", ["0", "0.0", "1.5", "-0.5", "half", "some"])
def test_silos_per_round_outside_the_range_is_refused(value: str) -> None:
    message = _error(MINIMAL + f"silos_per_round: {value}\n")
    # the key, not pydantic's union member label ("silos_per_round.float")
    assert message.startswith("job.yaml: silos_per_round: "), message


@pytest.mark.parametrize("name", get_args(StrategyName))
def test_every_strategy_name_is_accepted(name: str) -> None:
    assert parse_job_spec(MINIMAL + f"strategy: {{name: {name}}}\n").strategy.name == name


def test_unknown_strategy_is_refused() -> None:
    message = _error(MINIMAL + "strategy: {name: fedsgd}\n")
    assert message.startswith("job.yaml: strategy.name: "), message
    assert "'fedadam'" in message and "(got 'fedsgd')" in message


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("rounds_total: 4\n", "rounds_total: unknown key"),
        ("local: {epocs: 2}\n", "local.epocs: unknown key"),
        ("strategy: {name: fedadam, bta1: 0.9}\n", "strategy.bta1: unknown key for 'fedadam'"),
        (
            "evaluation: {server: {kind: sklearn-digits, split: test, shuffle: true}}\n",
            "evaluation.server.shuffle: unknown key for 'sklearn-digits'",
        ),
    ],
)
def test_unknown_keys_are_named(extra: str, key: str) -> None:
    assert _error(MINIMAL + extra) == f"job.yaml: {key}"


@pytest.mark.parametrize(
    ("strategy", "key"),
    [
        ("{name: fedavg, beta1: 0.1}", "beta1"),
        ("{beta1: 0.1}", "beta1"),  # no name is fedavg
        ("{name: fedavg, proximal_mu: 0.1}", "proximal_mu"),
        ("{name: fedprox, server_momentum: 0.5}", "server_momentum"),
        ("{name: fedavgm, tau: 0.5}", "tau"),
        ("{name: fedyogi, server_momentum: 0.5}", "server_momentum"),
        ("{name: fedmedian, beta: 0.1}", "beta"),
        ("{name: fedtrimmedavg, num_byzantine: 1}", "num_byzantine"),
        ("{name: krum, beta: 0.1}", "beta"),
    ],
)
def test_a_setting_the_named_strategy_does_not_use_is_refused(strategy: str, key: str) -> None:
    """The strategy section is a union keyed on name: a setting of another strategy is not
    silently ignored."""
    name = "fedavg" if "name" not in strategy else strategy.split("name: ")[1].split(",")[0]
    message = _error(MINIMAL + f"strategy: {strategy}\n")
    assert message == f"job.yaml: strategy.{key}: unknown key for {name!r}"


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("min_silos: 0\n", "min_silos"),
        ("round_deadline_s: 0\n", "round_deadline_s"),
        ("local: {batch_size: -3}\n", "local.batch_size"),
        ("local: {learning_rate: 0}\n", "local.learning_rate"),
        ("strategy: {name: fedadam, beta2: 1.0}\n", "strategy.beta2"),
        ("strategy: {name: fedyogi, tau: 0}\n", "strategy.tau"),
        ("evaluation: {federated: maybe}\n", "evaluation.federated"),
    ],
)
def test_bad_values_are_named(extra: str, key: str) -> None:
    message = _error(MINIMAL + extra)
    assert message.startswith(f"job.yaml: {key}: "), message
    assert "(got " in message


@pytest.mark.parametrize(("drop", "key"), [("rounds: 3\n", "rounds"), ("name: digits-1\n", "name")])
def test_missing_required_keys_are_named(drop: str, key: str) -> None:
    assert _error(MINIMAL.replace(drop, "")) == f"job.yaml: {key}: required key is missing"


def test_rounds_must_be_positive() -> None:
    assert _error(MINIMAL.replace("rounds: 3", "rounds: 0")).startswith("job.yaml: rounds: ")


def test_invalid_yaml_is_one_line() -> None:
    assert "invalid YAML" in _error(MINIMAL + "local: {epochs: [1\n")


def test_json_documents_are_accepted_and_the_dump_round_trips() -> None:
    spec = parse_job_spec(
        MINIMAL + "strategy: {name: fedyogi, tau: 0.01}\nsilos_per_round: 0.5\n"
        "evaluation: {server: {kind: sklearn-digits, split: test}}\n"
    )
    assert isinstance(spec.evaluation.server, SklearnDigitsSource)
    # the coordinator keeps the spec as JSON (job state, checkpoints); it must parse back equal
    dumped = json.dumps(spec.model_dump(mode="json"))
    assert parse_job_spec(dumped) == spec
    assert parse_config(JobSpec, json.loads(dumped), source="state") == spec


def test_load_job_spec_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(MINIMAL + "min_silos: 2\n")
    assert load_job_spec(path).min_silos == 2
    with pytest.raises(ConfigError, match="cannot read job spec"):
        load_job_spec(tmp_path / "absent.yaml")
    path.write_text(MINIMAL + "colour: red\n")
    with pytest.raises(ConfigError, match=r"^job.yaml: colour: unknown key$"):
        load_job_spec(path)


# ---- the pretrain section -------------------------------------------------------------------

PRETRAIN = (
    MINIMAL
    + """\
seed: 7
pretrain:
  generator: digits
  labels: ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
  images_per_label: 200
"""
)


def test_pretrain_defaults_and_the_requests_it_makes() -> None:
    spec = parse_job_spec(PRETRAIN)
    pretrain = spec.pretrain
    assert pretrain is not None
    assert pretrain.synth is None  # the coordinator config's synth address
    assert pretrain.backend == "class-conditional"
    assert pretrain.on_failure == "fail"
    assert pretrain.training.epochs == 10 and pretrain.training.optimizer == "sgd"
    assert pretrain.generator_settings.num_inference_steps is None
    # Seeds left out are the job's seed, and the stored spec says so explicitly.
    assert pretrain.generation.seed == 7 and pretrain.training.seed == 7
    assert spec.model_dump(mode="json")["pretrain"]["training"]["seed"] == 7
    request = pretrain.synthesis_request(spec.model)
    assert request.labels == [str(d) for d in range(10)]
    assert (request.images_per_label, request.in_channels, request.image_size) == (200, 1, 8)
    assert request.seed == 7 and request.resize_mode == "stretch"


def test_the_prompt_expander_reaches_the_synthesis_request() -> None:
    spec = parse_job_spec(
        PRETRAIN.replace("generator: digits", "generator: sd-2-1\n  backend: text-to-image")
        + "  generation: {prompt_expander: t5-commongen}\n"
    )
    assert spec.pretrain is not None
    assert spec.pretrain.synthesis_request(spec.model).prompt_expander == "t5-commongen"
    plain = parse_job_spec(PRETRAIN).pretrain
    assert plain is not None and plain.synthesis_request(spec.model).prompt_expander == ""


def test_pretrain_round_trips_through_the_stored_spec() -> None:
    spec = parse_job_spec(
        PRETRAIN + "  generation: {resize_mode: ink-box, seed: 3, guidance_max: 1.0}\n"
        "  training: {epochs: 30, seed: 4}\n  on_failure: random\n"
    )
    again = JobSpec.model_validate(json.loads(json.dumps(spec.model_dump(mode="json"))))
    assert again == spec
    assert again.pretrain is not None
    assert again.pretrain.generation.seed == 3 and again.pretrain.training.seed == 4
    assert again.pretrain.on_failure == "random"


@pytest.mark.parametrize(
    ("extra", "key", "detail"),
    [
        ("  epochs: 3\n", "pretrain.epochs", "unknown key"),
        ("  training: {epochz: 3}\n", "pretrain.training.epochz", "unknown key"),
        ("  generation: {resize_mode: squash}\n", "pretrain.generation.resize_mode", "ink-box"),
        (
            "  generation: {guidance_min: 3, guidance_max: 1}\n",
            "pretrain.generation",
            "guidance_min must be <= guidance_max",
        ),
        ("  training: {optimizer: lbfgs}\n", "pretrain.training.optimizer", "sgd"),
        ("  training: {learning_rate: 0}\n", "pretrain.training.learning_rate", "greater than"),
        ("  backend: gan\n", "pretrain.backend", "class-conditional"),
        ("  on_failure: retry\n", "pretrain.on_failure", "'fail' or 'random'"),
        ("  generator: ../etc\n", "pretrain.generator", "folder name"),
        ("  generator_settings: {num_inference_steps: 0}\n", "pretrain", "greater than"),
        ("  pretrain_timeout_s: -1\n", "pretrain.pretrain_timeout_s", "greater than"),
        (
            "  generation: {prompt_overrides: {ten: [a drawing of ten]}}\n",
            "pretrain",
            "prompt_overrides names label(s) not in labels: ten",
        ),
    ],
)
def test_bad_pretrain_values_name_the_key(extra: str, key: str, detail: str) -> None:
    message = _error(PRETRAIN + extra)
    assert message.startswith(f"job.yaml: {key}"), message
    assert detail in message, message


def test_pretrain_needs_labels_and_a_count() -> None:
    message = _error(MINIMAL + "pretrain: {generator: digits, images_per_label: 5}\n")
    assert message.startswith("job.yaml: pretrain.labels: required key is missing"), message
    message = _error(MINIMAL + "pretrain: {generator: digits, labels: [a, b]}\n")
    assert "pretrain.images_per_label: required key is missing" in message, message


def test_pretrain_labels_must_name_every_class_once() -> None:
    message = _error(PRETRAIN.replace('"8", "9"', '"8"'))
    assert "pretrain.labels has 9 names but model.num_classes is 10" in message, message
    message = _error(PRETRAIN.replace('"8", "9"', '"8", "8"'))
    assert message.startswith("job.yaml: pretrain.labels: "), message
    assert "distinct" in message


def test_pretrain_and_initial_model_exclude_each_other() -> None:
    message = _error(PRETRAIN + "initial_model: start.safetensors\n")
    assert "initial_model and pretrain exclude each other" in message, message


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ({"name": "fedadam"}, 0.01),
        ({"name": "fedyogi"}, 0.01),
        ({"name": "fedadagrad"}, 0.01),
        ({"name": "fedavgm"}, 1.0),
        ({"name": "fedadam", "server_learning_rate": 0.3}, 0.3),
    ],
)
def test_server_learning_rate_defaults_by_strategy(
    strategy: dict[str, object], expected: float
) -> None:
    assert strategy_spec(**strategy).server_learning_rate == expected


# ---- numbers: finite, bounded, never booleans ------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        "round_deadline_s: .inf\n",
        "wait_for_silos_s: .nan\n",
        "local: {learning_rate: .nan}\n",
        "strategy: {name: fedprox, proximal_mu: .inf}\n",
        "strategy: {name: fedadam, server_learning_rate: .inf}\n",
        "strategy: {name: fedadam, tau: .inf}\n",
        "silos_per_round: .nan\n",
        "evaluation: {server: {kind: sklearn-digits, test_fraction: .nan}}\n",
    ],
)
def test_non_finite_numbers_are_refused(extra: str) -> None:
    # ``round_deadline_s: .inf`` used to pass and then crash every silo's PullTask (the
    # deadline becomes int64 milliseconds), so the job hung in round 1.
    key = extra.split(":")[0]
    message = _error(MINIMAL + extra)
    assert message.startswith(f"job.yaml: {key}"), message
    assert "finite number" in message, message


@pytest.mark.parametrize(
    "extra",
    [
        "  generate_timeout_s: .inf\n",
        "  training: {learning_rate: .inf}\n",
        "  generation: {guidance_max: .inf}\n",
    ],
)
def test_non_finite_pretrain_numbers_are_refused(extra: str) -> None:
    message = _error(PRETRAIN + extra)
    assert message.startswith("job.yaml: pretrain."), message
    assert "finite number" in message, message


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        (MINIMAL + "round_deadline_s: 604801\n", "round_deadline_s"),
        (MINIMAL + "wait_for_silos_s: 1.0e+300\n", "wait_for_silos_s"),
        (PRETRAIN + "  ready_timeout_s: 604801\n", "pretrain.ready_timeout_s"),
        (PRETRAIN + "  generate_timeout_s: 604801\n", "pretrain.generate_timeout_s"),
        (PRETRAIN + "  pretrain_timeout_s: 604801\n", "pretrain.pretrain_timeout_s"),
    ],
)
def test_durations_are_at_most_seven_days(spec: str, key: str) -> None:
    message = _error(spec)
    assert message.startswith(f"job.yaml: {key}: "), message
    assert "less than or equal to 604800" in message, message


def test_a_seven_day_deadline_is_accepted() -> None:
    spec = parse_job_spec(MINIMAL + "round_deadline_s: 604800\nwait_for_silos_s: 604800\n")
    assert spec.round_deadline_s == spec.wait_for_silos_s == 7 * 24 * 3600


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("silos_per_round: true\n", "silos_per_round"),
        ("local: {epochs: true}\n", "local.epochs"),
        ("local: {learning_rate: true}\n", "local.learning_rate"),
        ("seed: false\n", "seed"),
        ("min_silos: true\n", "min_silos"),
        ("strategy: {name: fedadam, tau: true}\n", "strategy.tau"),
        (
            "evaluation: {server: {kind: sklearn-digits, partition: {index: 0, count: true}}}\n",
            "evaluation.server.partition.count",
        ),
    ],
)
def test_booleans_are_not_numbers(extra: str, key: str) -> None:
    # pydantic would read true as 1: ``silos_per_round: true`` became 1.0 and
    # ``epochs: true`` one epoch.
    message = _error(MINIMAL + extra)
    assert message.startswith(f"job.yaml: {key}: "), message
    assert "not true or false" in message, message


def test_a_boolean_model_size_is_refused() -> None:
    message = _error(MINIMAL.replace("in_channels: 1", "in_channels: true"))
    assert message.startswith("job.yaml: model.in_channels: "), message


def test_booleans_are_still_booleans() -> None:
    spec = parse_job_spec(
        PRETRAIN.replace("generator: digits", "generator: sd\n  backend: text-to-image")
        + "  generator_settings: {enable_safety_checker: true}\n"
        + "evaluation: {federated: false}\n"
    )
    assert spec.evaluation.federated is False
    assert spec.pretrain is not None and spec.pretrain.generator_settings.enable_safety_checker


@pytest.mark.parametrize("seed", ["7.0", "'7'"])
def test_pretrain_seeds_are_the_job_seed_as_validated(seed: str) -> None:
    # The job seed reads 7 from these; the pretrain seeds used to be copied before that and
    # fell back to 0.
    spec = parse_job_spec(PRETRAIN.replace("seed: 7", f"seed: {seed}"))
    assert spec.seed == 7
    assert spec.pretrain is not None
    assert spec.pretrain.generation.seed == 7 and spec.pretrain.training.seed == 7


def test_a_model_validator_of_a_data_source_names_the_source_key() -> None:
    # not "evaluation.server.sklearn-digits": that is pydantic's union label, not a key
    message = _error(
        MINIMAL + "evaluation: {server: {kind: sklearn-digits, split: test, "
        "partition: {index: 0, count: 2, alpha: 0.5}}}\n"
    )
    assert message == (
        "job.yaml: evaluation.server: partition applies to the train split only (or to all "
        "examples); set split: train"
    )


@pytest.mark.parametrize("generator", ["'a\\b'", "x" * 201])
def test_generator_names_have_no_backslash_and_at_most_200_characters(generator: str) -> None:
    message = _error(PRETRAIN.replace("generator: digits", f"generator: {generator}"))
    assert message.startswith("job.yaml: pretrain.generator: "), message


# ---- privacy options -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        (
            "silo_level_dp: {clip_norm: 1.0}\n",
            "silo_level_dp: give exactly one of noise_multiplier and target_epsilon",
        ),
        (
            "silo_level_dp: {clip_norm: 1.0, noise_multiplier: 1.0, target_epsilon: 8}\n",
            "silo_level_dp: give exactly one of noise_multiplier and target_epsilon",
        ),
        ("silo_level_dp: {clip_norm: 0, noise_multiplier: 1.0}\n", "silo_level_dp.clip_norm"),
        (
            "silo_level_dp: {clip_norm: 1, noise_multiplier: 1.0, delta: 1}\n",
            "silo_level_dp.delta",
        ),
        ("require_dp: {max_epsilon: 8}\n", "require_dp.max_delta: required key is missing"),
        ("require_dp: {max_epsilon: -1, max_delta: 1e-5}\n", "require_dp.max_epsilon"),
    ],
)
def test_privacy_options_are_validated(section: str, expected: str) -> None:
    assert _error(MINIMAL + section).startswith(f"job.yaml: {expected}")


def test_privacy_options_parse() -> None:
    spec = parse_job_spec(
        MINIMAL
        + "require_dp: {max_epsilon: 8, max_delta: 1.0e-5}\n"
        + "silo_level_dp: {clip_norm: 0.5, target_epsilon: 4}\n"
    )
    assert spec.require_dp is not None and spec.require_dp.max_epsilon == 8
    assert spec.silo_level_dp is not None and spec.silo_level_dp.delta == 1e-5


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("max_weight_fraction: 0\n", "max_weight_fraction: Input should be greater than 0"),
        ("max_weight_fraction: 1.5\n", "max_weight_fraction: Input should be less than or equal"),
        ("update_bounds: {action: clip}\n", "update_bounds: give max_norm, max_norm_vs_median"),
        ("update_bounds: {max_norm: -1}\n", "update_bounds.max_norm: Input should be greater"),
        ("update_bounds: {max_norm: 1, action: drop}\n", "update_bounds.action: Input should be"),
        ("update_bounds: {max_norm_vs_median: 0.5}\n", "update_bounds.max_norm_vs_median"),
        ("max_failed_rounds: -1\n", "max_failed_rounds"),
        ("max_task_rejections: 0\n", "max_task_rejections"),
        ("strategy: {name: fedtrimmedavg, beta: 0.5}\n", "strategy.beta: Input should be less"),
        ("strategy: {name: krum, num_selected: 0}\n", "strategy.num_selected"),
        (
            "strategy: {name: fedmedian}\nsilo_level_dp: {clip_norm: 1, noise_multiplier: 1}\n",
            "<root>: silo_level_dp averages clipped updates itself, so it cannot run with the "
            "robust "
            "strategy 'fedmedian'",
        ),
    ],
)
def test_hostile_silo_options_are_validated(section: str, expected: str) -> None:
    assert _error(MINIMAL + section).startswith(f"job.yaml: {expected}")


def test_hostile_silo_options_parse_with_their_defaults() -> None:
    spec = parse_job_spec(MINIMAL)
    assert (spec.max_weight_fraction, spec.update_bounds) == (None, None)
    assert (spec.max_failed_rounds, spec.max_task_rejections) == (0, 3)
    spec = parse_job_spec(
        MINIMAL
        + "max_weight_fraction: 0.3\n"
        + "update_bounds: {max_norm_vs_median: 4}\n"
        + "strategy: {name: krum, num_byzantine: 2, num_selected: 3}\n"
    )
    assert spec.update_bounds is not None
    assert (spec.update_bounds.action, spec.update_bounds.median_of) == ("reject", 3)
    assert spec.strategy == strategy_spec(name="krum", num_byzantine=2, num_selected=3)
    assert parse_job_spec(MINIMAL + "strategy: {name: fedtrimmedavg}\n").strategy == (
        strategy_spec(name="fedtrimmedavg", beta=0.2)
    )


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        (
            "secure_aggregation: {threshold: 3, clip_range: 1, bits: 14, max_silos: 100}",
            "job.yaml: secure_aggregation: secure aggregation bits 14 leave 163 levels per silo "
            "for 100 silos (fewer would wrap the ring's sum); need bits >= 15 or fewer silos",
        ),
        (
            "secure_aggregation: {threshold: 4, clip_range: 1, neighbours: 2}",
            "need neighbours >= 3",
        ),
        ("secure_aggregation: {threshold: 5, clip_range: 1, max_silos: 4}", "below the threshold"),
        ("secure_aggregation: {threshold: 1, clip_range: 1}", "secure_aggregation.threshold"),
        ("secure_aggregation: {threshold: 2, clip_range: 0}", "secure_aggregation.clip_range"),
        ("secure_aggregation: {threshold: 2, clip_range: 1, bits: 54}", "secure_aggregation.bits"),
        ("secure_aggregation: {clip_range: 1}", "secure_aggregation.threshold"),
        (
            "min_silos: 5\nsecure_aggregation: {threshold: 2, clip_range: 1, max_silos: 4}",
            "min_silos 5 exceeds secure_aggregation.max_silos 4",
        ),
        (
            "secure_aggregation: {threshold: 2, clip_range: 1}\n"
            "silo_level_dp: {clip_norm: 1, noise_multiplier: 1}",
            "silo_level_dp and secure_aggregation exclude each other",
        ),
    ],
)
def test_secure_aggregation_that_could_not_work_is_refused(section: str, expected: str) -> None:
    assert expected in _error(MINIMAL + section + "\n")


def test_secure_aggregation_parses_with_its_defaults() -> None:
    spec = parse_job_spec(MINIMAL + "secure_aggregation: {threshold: 3, clip_range: 0.5}\n")
    secagg = spec.secagg_enabled()
    assert secagg is not None
    assert (secagg.bits, secagg.max_silos, secagg.neighbours) == (32, 100, None)
    assert secagg.settings().quantizer().levels == (2**32 - 1) // 100
    off = parse_job_spec(
        MINIMAL + "secure_aggregation: {enabled: false, threshold: 3, clip_range: 1}\n"
    )
    assert off.secagg_enabled() is None
