"""The job spec: everything an admin decides about one federated job.

It travels as the YAML the admin wrote (``gptfl admin submit job.yaml``) and is validated by
this one model on both sides, so the CLI and the coordinator can never disagree on it. Every
key is documented in docs/job-spec.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import pydantic

from gptfl.config_loading import UNKNOWN_NAME, StrictModel, parse_config, parse_yaml_text
from gptfl.data.sources import DataSource
from gptfl.errors import ConfigError
from gptfl.models.spec import ModelSpec
from gptfl.secagg.messages import SecAggSettings
from gptfl.synth_spec import (
    FIT_MODES,
    GeneratorSettings,
    PretrainSettings,
    SynthesisRequest,
)

StrategyName = Literal[
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
]
ADAPTIVE_STRATEGIES = ("fedadam", "fedyogi", "fedadagrad")
#: the strategies that keep every update of a round and reduce them robustly at its close
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum")
#: the adaptive strategies' server learning rate when a job spec leaves it out
ADAPTIVE_SERVER_LR = 0.01
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
#: the longest a job-spec duration may be (7 days): deadlines travel as int64 Unix
#: milliseconds and call timeouts as gRPC deadlines, and neither takes absurd values
MAX_DURATION_S = 7 * 24 * 3600.0
_SEED = pydantic.TypeAdapter(int)


class LocalTrainingSpec(StrictModel):
    """What each silo does with the global model in one round."""

    epochs: int = pydantic.Field(1, ge=1, le=1000)
    batch_size: int = pydantic.Field(32, ge=1, le=65536)
    learning_rate: float = pydantic.Field(0.05, gt=0, le=10)
    momentum: float = pydantic.Field(0.0, ge=0, lt=1)
    weight_decay: float = pydantic.Field(0.0, ge=0, le=1)


class FedAvgSpec(StrictModel):
    """``fedavg``: the next global model is the silo models' average weighted by their sample
    counts (McMahan et al. 2017). Takes no settings."""

    name: Literal["fedavg"] = "fedavg"


class FedProxSpec(StrictModel):
    """``fedprox``: FedAvg plus the proximal term ``mu/2 ||w - w_global||^2`` at the silos
    (Li et al. 2020)."""

    name: Literal["fedprox"] = "fedprox"
    proximal_mu: float = pydantic.Field(0.01, ge=0)


class FedAvgMSpec(StrictModel):
    """``fedavgm``: server momentum on the pseudo-gradient ``average - global``
    (Hsu et al. 2019)."""

    name: Literal["fedavgm"] = "fedavgm"
    server_learning_rate: float = pydantic.Field(1.0, gt=0)
    server_momentum: float = pydantic.Field(0.9, ge=0, lt=1)


class AdaptiveSpec(StrictModel):
    """``fedadam``, ``fedyogi``, ``fedadagrad``: an adaptive server optimizer on the
    pseudo-gradient (Reddi et al. 2021, "Adaptive Federated Optimization").

    An adaptive optimizer moves every coordinate by about ``server_learning_rate`` per round,
    so its default is :data:`ADAPTIVE_SERVER_LR`, not the 1.0 that suits ``fedavgm``
    (docs/job-spec.md, "The math").
    """

    name: Literal["fedadam", "fedyogi", "fedadagrad"]
    server_learning_rate: float = pydantic.Field(ADAPTIVE_SERVER_LR, gt=0)
    beta1: float = pydantic.Field(0.9, ge=0, lt=1)
    beta2: float = pydantic.Field(0.99, ge=0, lt=1)
    tau: float = pydantic.Field(1e-3, gt=0)


class FedMedianSpec(StrictModel):
    """``fedmedian``: the next global model is the coordinate-wise median of the silo models
    (Yin et al. 2018), whatever their sample counts. Keeps every update of a round."""

    name: Literal["fedmedian"] = "fedmedian"


class FedTrimmedAvgSpec(StrictModel):
    """``fedtrimmedavg``: per coordinate, the ``floor(beta * n)`` largest and as many smallest
    of the ``n`` silo values are dropped and the rest averaged with equal weight (Yin et al.
    2018). Keeps every update of a round."""

    name: Literal["fedtrimmedavg"] = "fedtrimmedavg"
    beta: float = pydantic.Field(0.2, ge=0, lt=0.5)


class KrumSpec(StrictModel):
    """``krum``: (multi-)Krum (Blanchard et al. 2017). Each update is scored by the summed
    squared distances to its ``n - num_byzantine - 2`` nearest other updates; the
    ``num_selected`` lowest-scored are averaged by sample count (1: Krum itself). Keeps every
    update of a round."""

    name: Literal["krum"] = "krum"
    num_byzantine: int = pydantic.Field(0, ge=0)
    num_selected: int = pydantic.Field(1, ge=1)


def _strategy_tag(value: Any) -> str | None:
    """Which member of :data:`StrategySpec` a value is (``fedavg`` when it names none)."""
    name = value.get("name", "fedavg") if isinstance(value, dict) else getattr(value, "name", None)
    return "adaptive" if name in ADAPTIVE_STRATEGIES else name


#: How the coordinator turns the silos' models into the next global model: a union keyed on
#: ``name``, so a setting the named strategy does not use is an error naming it (a
#: ``beta1`` beside ``name: fedavg`` would otherwise be ignored without a word).
StrategySpec = Annotated[
    Annotated[FedAvgSpec, pydantic.Tag("fedavg")]
    | Annotated[FedProxSpec, pydantic.Tag("fedprox")]
    | Annotated[FedAvgMSpec, pydantic.Tag("fedavgm")]
    | Annotated[AdaptiveSpec, pydantic.Tag("adaptive")]
    | Annotated[FedMedianSpec, pydantic.Tag("fedmedian")]
    | Annotated[FedTrimmedAvgSpec, pydantic.Tag("fedtrimmedavg")]
    | Annotated[KrumSpec, pydantic.Tag("krum")],
    pydantic.Discriminator(
        _strategy_tag,
        custom_error_type=UNKNOWN_NAME,
        custom_error_message="must be one of "
        + ", ".join(repr(name) for name in get_args(StrategyName)),
    ),
]
_STRATEGY_SPEC: pydantic.TypeAdapter[StrategySpec] = pydantic.TypeAdapter(StrategySpec)


def strategy_spec(**fields: Any) -> StrategySpec:
    """The strategy spec ``fields`` describe, as a job spec's ``strategy`` section would.

    Raises:
        pydantic.ValidationError: an unknown name, a setting the strategy does not take, or a
            value out of range.
    """
    return _STRATEGY_SPEC.validate_python(fields)


class RequireDpSpec(StrictModel):
    """Only updates trained with sample-level DP within this budget are accepted: a silo that
    reports no privacy spend, more than these, or an epsilon that went down (a reset ledger)
    has its updates refused."""

    max_epsilon: float = pydantic.Field(gt=0)
    max_delta: float = pydantic.Field(gt=0, lt=1)


class SiloLevelDpSpec(StrictModel):
    """Silo-level differential privacy (DP-FedAvg, McMahan et al. 2018): each silo's update
    (its model minus the global model) is clipped to ``clip_norm``, the clipped updates are
    averaged with equal weight over the round's selected silos, and Gaussian noise of
    standard deviation ``noise_multiplier * clip_norm / selected`` is added to the average.
    The guarantee covers all of one silo's data; the job's (epsilon, delta) is accounted
    with RDP over the rounds at the silo sampling rate. Give ``noise_multiplier``, or
    ``target_epsilon`` for the noise that meets it at the last round."""

    clip_norm: float = pydantic.Field(gt=0)
    noise_multiplier: float | None = pydantic.Field(None, gt=0)
    target_epsilon: float | None = pydantic.Field(None, gt=0)
    delta: float = pydantic.Field(1e-5, gt=0, lt=1)

    @pydantic.model_validator(mode="after")
    def _one_way_to_the_noise(self) -> SiloLevelDpSpec:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier and target_epsilon")
        return self


class UpdateBoundsSpec(StrictModel):
    """How far an update may lie from the global model it was trained from (the L2 norm of
    ``w_silo - w_global`` over the floating-point tensors), measured as it streams in.

    ``max_norm`` is a fixed bound; ``max_norm_vs_median`` bounds an update at that multiple
    of the median norm of the updates accepted in the latest earlier rounds (at least
    ``median_of`` norms, gathered from the most recent rounds back), so the bound of a round
    never depends on the order its own updates arrive in. With both, the lower bound holds;
    before ``median_of`` norms were seen, only ``max_norm`` (if given) does. An update above
    the bound is refused (``reject``) or scaled back onto it (``clip``:
    ``w_global + (w_silo - w_global) * bound / norm``).
    """

    max_norm: float | None = pydantic.Field(None, gt=0)
    max_norm_vs_median: float | None = pydantic.Field(None, ge=1)
    median_of: int = pydantic.Field(3, ge=1, le=10_000)
    action: Literal["reject", "clip"] = "reject"

    @pydantic.model_validator(mode="after")
    def _a_bound(self) -> UpdateBoundsSpec:
        if self.max_norm is None and self.max_norm_vs_median is None:
            raise ValueError("give max_norm, max_norm_vs_median or both")
        return self


class SecureAggregationSpec(StrictModel):
    """Secure aggregation (Bonawitz et al. 2017; docs/secure-aggregation.md): the coordinator
    learns only the sum of the silos' updates, even when silos drop out.

    Each silo clips its update (its model minus the global model) to ``clip_range`` per value,
    quantizes it into the ring of ``2^bits`` with room for ``max_silos`` summands, and masks
    it; ``threshold`` silos must remain at every stage and up to ``threshold - 1`` colluding
    silos learn nothing of another's update. With ``neighbours``, each silo masks with and
    shares with that many others only (SecAgg+'s sparse graph) instead of all.
    """

    enabled: bool = True
    threshold: int = pydantic.Field(ge=2)
    clip_range: float = pydantic.Field(gt=0)
    bits: int = pydantic.Field(32, ge=8, le=53)
    neighbours: int | None = pydantic.Field(None, ge=1)
    #: the most silos a round sums: a round selects no more, and the ring keeps headroom for
    #: this many
    max_silos: int = pydantic.Field(100, ge=2)
    #: how long each key stage (advertise, share, unmask) waits for the silos
    stage_deadline_s: float = pydantic.Field(60.0, gt=0, le=MAX_DURATION_S)

    @pydantic.model_validator(mode="after")
    def _fits_together(self) -> SecureAggregationSpec:
        try:
            self.settings()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    def settings(self) -> SecAggSettings:
        """What every task of the job's rounds carries."""
        return SecAggSettings(
            threshold=self.threshold,
            bits=self.bits,
            clip_range=self.clip_range,
            max_silos=self.max_silos,
            neighbours=self.neighbours,
        )


class EvaluationSpec(StrictModel):
    """Evaluation after each round."""

    #: a validation/test set the coordinator holds itself (server-side evaluation)
    server: DataSource | None = None
    #: ask the round's silos to evaluate the new global model on their held-out data
    federated: bool = True


class GenerationSpec(StrictModel):
    """How the synthetic images are drawn: the synthesis request without the labels, the
    count and the shape (those come from :class:`PretrainSpec` and the job's model).

    ``seed`` left out of a job spec is the job's ``seed`` (see :class:`JobSpec`).
    """

    resize_mode: str = "stretch"
    seed: int = 0
    prompts_per_label: int = pydantic.Field(16, ge=1)
    prompt_overrides: dict[str, list[str]] = pydantic.Field(default_factory=dict)
    guidance_min: float = pydantic.Field(1.0, ge=0.0)
    guidance_max: float = pydantic.Field(5.0, ge=0.0)
    guidance_step: float = pydantic.Field(0.5, ge=0.0)
    #: text-to-image only: a text-to-text model folder on the synth service that writes the
    #: first prompts of each label ("" = templates only)
    prompt_expander: str = ""

    @pydantic.field_validator("resize_mode")
    @classmethod
    def _check_resize_mode(cls, value: str) -> str:
        if value not in FIT_MODES:
            raise ValueError(f"must be one of {', '.join(FIT_MODES)}")
        return value

    @pydantic.model_validator(mode="after")
    def _guidance_range(self) -> GenerationSpec:
        if self.guidance_min > self.guidance_max:
            raise ValueError("guidance_min must be <= guidance_max")
        return self


class PretrainSpec(StrictModel):
    """The GPT-FL pretrain phase: before round 1 the coordinator asks the synth service to
    generate a synthetic dataset from the label names (Generate) and to train the job's model
    on it (Pretrain); the result is the initial global model. Documented key by key in
    docs/job-spec.md.
    """

    #: the synth service's address; by default the coordinator config's ``synth.address``
    synth: str | None = pydantic.Field(None, min_length=1)
    backend: Literal["class-conditional", "text-to-image"] = "class-conditional"
    #: a generator folder under the synth service's models directory
    generator: str = pydantic.Field(min_length=1, max_length=200)
    #: label names in label order: label ``i`` of the task is ``labels[i]``
    labels: list[str] = pydantic.Field(min_length=2)
    images_per_label: int = pydantic.Field(ge=1, le=1_000_000)
    generation: GenerationSpec = GenerationSpec()
    generator_settings: GeneratorSettings = GeneratorSettings()
    training: PretrainSettings = PretrainSettings()
    #: ``fail``: a failed pretrain phase fails the job; ``random``: the job starts from a
    #: seeded random initialisation instead, and says so in its status and report
    on_failure: Literal["fail", "random"] = "fail"
    #: how long to wait for the synth service to be serving (includes a GPU scale-up)
    ready_timeout_s: float = pydantic.Field(600.0, gt=0, le=MAX_DURATION_S)
    generate_timeout_s: float = pydantic.Field(6 * 3600.0, gt=0, le=MAX_DURATION_S)
    pretrain_timeout_s: float = pydantic.Field(6 * 3600.0, gt=0, le=MAX_DURATION_S)

    @pydantic.field_validator("generator")
    @classmethod
    def _check_generator(cls, value: str) -> str:
        if "/" in value or "\\" in value or value.startswith("."):
            raise ValueError("must be a folder name under the synth service's models_dir")
        return value

    @pydantic.field_validator("labels")
    @classmethod
    def _check_labels(cls, value: list[str]) -> list[str]:
        if any(not label.strip() for label in value):
            raise ValueError("label names must not be empty")
        if len(set(value)) != len(value):
            raise ValueError("label names must be distinct")
        return value

    @pydantic.model_validator(mode="after")
    def _overrides_name_labels(self) -> PretrainSpec:
        unknown = sorted(set(self.generation.prompt_overrides) - set(self.labels))
        if unknown:
            raise ValueError(
                f"generation.prompt_overrides names label(s) not in labels: {', '.join(unknown)}"
            )
        return self

    def synthesis_request(self, model: ModelSpec) -> SynthesisRequest:
        """The Generate request for ``model``'s input shape."""
        return SynthesisRequest(
            labels=list(self.labels),
            images_per_label=self.images_per_label,
            in_channels=model.in_channels,
            image_size=model.image_size,
            **self.generation.model_dump(),
        )


class JobSpec(StrictModel):
    """One federated job."""

    name: str = pydantic.Field(description="short slug: lowercase letters, digits, dashes")
    model: ModelSpec
    rounds: int = pydantic.Field(ge=1, le=100_000)
    seed: int = 0
    silos_per_round: float | Literal["all"] = "all"
    min_silos: int = pydantic.Field(1, ge=1)
    round_deadline_s: float = pydantic.Field(600.0, gt=0, le=MAX_DURATION_S)
    wait_for_silos_s: float = pydantic.Field(600.0, gt=0, le=MAX_DURATION_S)
    local: LocalTrainingSpec = LocalTrainingSpec()
    strategy: StrategySpec = FedAvgSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    #: start from these weights (a safetensors file on the coordinator) instead of random init
    initial_model: Path | None = None
    #: GPT-FL: start from a model pretrained on synthetic data made by the synth service
    pretrain: PretrainSpec | None = None
    #: accept only updates trained with sample-level DP within this budget (docs/privacy.md)
    require_dp: RequireDpSpec | None = None
    #: silo-level DP on the aggregate (DP-FedAvg), around whichever strategy (docs/privacy.md)
    silo_level_dp: SiloLevelDpSpec | None = None
    #: the coordinator learns only the sum of the updates (docs/secure-aggregation.md)
    secure_aggregation: SecureAggregationSpec | None = None

    #: the most any one silo's sample count may weigh in a round, as a fraction of the
    #: round's expected total weight (docs/job-spec.md, "Claims"); None: no cap
    max_weight_fraction: float | None = pydantic.Field(None, gt=0, le=1)
    #: bounds on each update's distance from the global model (reject or clip)
    update_bounds: UpdateBoundsSpec | None = None
    #: rounds whose new global model may be refused as non-finite before the job fails
    max_failed_rounds: int = pydantic.Field(0, ge=0, le=100_000)
    #: a task refused this many times for the same reason is closed, not reopened
    max_task_rejections: int = pydantic.Field(3, ge=1, le=1000)

    @pydantic.field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be 1-40 lowercase letters, digits or dashes")
        return value

    @pydantic.field_validator("silos_per_round")
    @classmethod
    def _check_fraction(cls, value: float | str) -> float | str:
        if isinstance(value, float) and not 0 < value <= 1:
            raise ValueError("must be 'all' or a fraction in (0, 1]")
        return value

    @pydantic.model_validator(mode="before")
    @classmethod
    def _pretrain_seeds_default_to_job_seed(cls, data: Any) -> Any:
        # Filled in here, not left to a default, so the spec the coordinator stores (and a
        # restarted coordinator reads back) names the seeds the phase actually used.
        if not isinstance(data, dict) or not isinstance(data.get("pretrain"), dict):
            return data
        # The seed as the field will read it (``5.0`` and ``'5'`` are 5), so the sections get
        # the job's value, not a default.
        raw = data.get("seed", 0)
        if isinstance(raw, bool):
            return data  # the seed's own validation refuses it
        try:
            seed = _SEED.validate_python(raw)
        except pydantic.ValidationError:
            return data  # likewise
        pretrain = dict(data["pretrain"])
        for section in ("generation", "training"):
            value = pretrain.get(section, {})
            if isinstance(value, dict) and "seed" not in value:
                pretrain[section] = {**value, "seed": seed}
        return {**data, "pretrain": pretrain}

    @pydantic.model_validator(mode="after")
    def _pretrain_fits_model(self) -> JobSpec:
        if self.pretrain is None:
            return self
        if self.initial_model is not None:
            raise ValueError("initial_model and pretrain exclude each other; set one of them")
        if len(self.pretrain.labels) != self.model.num_classes:
            raise ValueError(
                f"pretrain.labels has {len(self.pretrain.labels)} names but model.num_classes "
                f"is {self.model.num_classes}; name every class, in label order"
            )
        return self

    @pydantic.model_validator(mode="after")
    def _silo_level_dp_needs_a_mean(self) -> JobSpec:
        if self.silo_level_dp is not None and self.strategy.name in ROBUST_STRATEGIES:
            raise ValueError(
                f"silo_level_dp averages clipped updates itself, so it cannot run with the "
                f"robust strategy {self.strategy.name!r}; use fedavg or a server optimizer"
            )
        return self

    @pydantic.model_validator(mode="after")
    def _secure_aggregation_fits(self) -> JobSpec:
        secagg = self.secure_aggregation
        if secagg is None or not secagg.enabled:
            return self
        if self.strategy.name in ROBUST_STRATEGIES or self.update_bounds is not None:
            raise ValueError(
                "secure_aggregation hides each silo's update from the coordinator, so it "
                "cannot run with a robust strategy or update_bounds, which need every update "
                "in the clear; the silos' clip_range bounds each update instead"
            )
        if self.silo_level_dp is not None:
            raise ValueError(
                "silo_level_dp and secure_aggregation exclude each other: silo-level DP clips "
                "each silo's update at the coordinator, which secure aggregation keeps masked"
            )
        if self.min_silos > secagg.max_silos:
            raise ValueError(
                f"min_silos {self.min_silos} exceeds secure_aggregation.max_silos "
                f"{secagg.max_silos}: a round selects at most max_silos silos"
            )
        return self

    def secagg_enabled(self) -> SecureAggregationSpec | None:
        """The secure-aggregation section when it is on, else None."""
        secagg = self.secure_aggregation
        return secagg if secagg is not None and secagg.enabled else None

    def silo_fraction(self) -> float:
        return 1.0 if self.silos_per_round == "all" else float(self.silos_per_round)


def parse_job_spec(text: str, *, source: str = "job spec") -> JobSpec:
    """Parses and validates a job spec document (YAML or JSON)."""
    return parse_config(JobSpec, parse_yaml_text(text, source=source), source=source)


def load_job_spec(path: Path) -> JobSpec:
    return read_job_spec(path)[0]


def read_job_spec(path: Path) -> tuple[JobSpec, str]:
    """The validated spec in ``path`` and the text it was read from (read once)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read job spec: {exc.strerror or exc}") from None
    return parse_job_spec(text, source=path.name), text
