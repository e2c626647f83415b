"""What a silo may claim: registered counts pinned per job, the weight cap, evaluation checks."""

from __future__ import annotations

import pytest

from coordinator.claims import RoundClaims, check_evaluation_metrics, pin_counts
from coordinator.job_state import SiloSummary
from coordinator.silo_registry import SiloRecord
from gptfl.errors import ExcessClaimError, MetricRangeError, NonFiniteError, ValidationError
from gptfl.fleet_messages import EvaluationReport


def _record(silo: str, train: int, evaluation: int = 10) -> SiloRecord:
    return SiloRecord(silo, num_train_examples=train, num_eval_examples=evaluation)


def test_counts_are_pinned_at_the_first_selection_and_can_only_go_down() -> None:
    summaries: dict[str, SiloSummary] = {}
    assert pin_counts(summaries, [_record("a", 500, 50)]) == {"a": (500, 50)}
    assert summaries["a"].registered_examples == 500
    # a re-registration with a huge count does not raise the bound ...
    assert pin_counts(summaries, [_record("a", 10**12, 10**12)]) == {"a": (500, 50)}
    # ... a lower one lowers it, and the pin stays for later rounds
    assert pin_counts(summaries, [_record("a", 200, 5)]) == {"a": (200, 5)}
    assert pin_counts(summaries, [_record("a", 900, 90)]) == {"a": (500, 50)}
    assert summaries["a"].registered_examples == 500


def test_a_claim_beyond_the_registered_count_is_refused() -> None:
    claims = RoundClaims.of({"a": (500, 50), "b": (300, 30)})
    assert claims.update_weight("a", 500) == 500
    assert claims.update_weight("b", 1) == 1
    with pytest.raises(ExcessClaimError, match="1000000000000 exceeds the 500 training"):
        claims.update_weight("a", 10**12)
    with pytest.raises(ExcessClaimError, match="not selected"):
        claims.update_weight("c", 1)
    assert claims.max_total_weight == 800


def test_the_weight_cap_holds_a_silos_share_of_the_expected_total() -> None:
    # a silo that registered 10^12 weighs at most f / (1 - f) times the others' bounds
    claims = RoundClaims.of(
        {"big": (10**12, 1), "a": (500, 1), "b": (500, 1)}, max_weight_fraction=0.5
    )
    assert claims.update_weight("big", 10**12) == 1000
    assert claims.update_weight("a", 500) == 500  # far below its cap of ~10^12
    assert claims.max_total_weight == 2000
    third = RoundClaims.of({"a": (900, 1), "b": (100, 1), "c": (100, 1)}, max_weight_fraction=0.2)
    assert third.update_weight("a", 900) == 50  # 0.2 / 0.8 * 200
    assert third.update_weight("b", 100) == 100  # cap 0.25 * 1000 = 250


def test_a_lone_silo_keeps_a_positive_weight_under_any_cap() -> None:
    claims = RoundClaims.of({"a": (500, 1)}, max_weight_fraction=0.1)
    assert claims.update_weight("a", 500) == 1
    assert RoundClaims.of({"a": (7, 1)}, max_weight_fraction=1.0).update_weight("a", 7) == 7


def _report(n: int, loss: float, accuracy: float) -> EvaluationReport:
    return EvaluationReport("t", 1, n, {"loss": loss, "accuracy": accuracy})


@pytest.mark.parametrize(
    ("report", "error", "needle"),
    [
        (_report(10**12, 0.1, 1.0), ExcessClaimError, "exceeds the 50 evaluation examples"),
        (_report(10, -1e9, 1e9), MetricRangeError, "loss -1e+09 is negative"),
        (_report(10, 0.5, 1e9), MetricRangeError, "accuracy 1e+09 is not in [0, 1]"),
        (_report(10, 0.5, -0.01), MetricRangeError, "accuracy -0.01"),
        (_report(0, 0.5, 0.5), ValidationError, "no examples"),
        (_report(10, float("inf"), 0.5), NonFiniteError, "'loss' is inf"),
    ],
)
def test_implausible_evaluations_are_refused(
    report: EvaluationReport, error: type[Exception], needle: str
) -> None:
    claims = RoundClaims.of({"a": (500, 50)})
    with pytest.raises(error) as info:
        claims.check_evaluation("a", report)
    assert needle in str(info.value)


def test_plausible_evaluations_pass() -> None:
    claims = RoundClaims.of({"a": (500, 50)})
    for report in (_report(50, 0.0, 0.0), _report(1, 12.5, 1.0)):
        claims.check_evaluation("a", report)
    with pytest.raises(ValidationError, match="lacks a finite 'accuracy'"):
        check_evaluation_metrics({"loss": 1.0})
