"""What the coordinator does with the privacy spend silos report: check, record, flag.

Each DP-SGD silo reports its cumulative (epsilon, delta) on its own data with every update
(:class:`gptfl.fleet_messages.PrivacySpend`). The coordinator cannot verify it, but it can
hold silos to the job's ``require_dp`` budget and notice a ledger that went backwards (a
silo that deleted its accountant's state would report a smaller epsilon than before).
"""

from __future__ import annotations

import logging

from coordinator.job_state import SiloSummary
from gptfl.errors import PrivacyPolicyError
from gptfl.fleet_messages import PrivacySpend
from gptfl.job_spec import RequireDpSpec

log = logging.getLogger(__name__)

#: slack for an epsilon that is reported again unchanged (accountants are deterministic)
_EPSILON_SLACK = 1e-9


def ledger_flag(previous: SiloSummary | None, spend: PrivacySpend | None, round_: int) -> str:
    """Why ``spend`` contradicts what the silo reported before ("" when it does not)."""
    if previous is None or previous.privacy_epsilon is None:
        return ""
    if spend is None:
        return (
            f"reported no privacy spend at round {round_} after epsilon "
            f"{previous.privacy_epsilon:.4g}"
        )
    if spend.epsilon < previous.privacy_epsilon - _EPSILON_SLACK:
        return (
            f"reported epsilon fell from {previous.privacy_epsilon:.4g} to {spend.epsilon:.4g} "
            f"at round {round_} (a reset privacy ledger?)"
        )
    return ""


def check_requirement(
    requirement: RequireDpSpec | None, spend: PrivacySpend | None, flag: str
) -> None:
    """Raises PrivacyPolicyError when the job requires DP and the update does not meet it."""
    if requirement is None:
        return
    if spend is None:
        raise PrivacyPolicyError(
            "this job requires differential privacy (require_dp); the update reports none"
        )
    if flag:
        raise PrivacyPolicyError(f"this job requires differential privacy and the silo {flag}")
    if spend.epsilon > requirement.max_epsilon or spend.delta > requirement.max_delta:
        raise PrivacyPolicyError(
            f"the update reports epsilon {spend.epsilon:.4g}, delta {spend.delta:.3g}; "
            f"require_dp allows at most epsilon {requirement.max_epsilon:g}, "
            f"delta {requirement.max_delta:g}"
        )


def record_spend(summary: SiloSummary, spend: PrivacySpend | None) -> None:
    """Keeps the spend of an accepted update in the silo's summary."""
    if spend is None:
        return
    summary.privacy_epsilon = spend.epsilon
    summary.privacy_delta = spend.delta
    summary.privacy_accountant = spend.accountant
