"""A silo agent with a ``privacy`` section: DP-SGD by default, its budget enforced before a
download, and every promise it cannot keep found at start (exit 3, one line naming the key).

The agents are real :class:`SiloAgent` objects driven by the in-process fake coordinator of
test_agent.py; the start checks run the real entry point, ``silo_agent.main.main``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gptfl.errors import EXIT_CONFIG
from gptfl.fleet_messages import Decline
from silo_agent.dp_trainer import DpSgdTrainer
from silo_agent.main import main
from silo_agent.privacy_ledger import LEDGER_FILE
from tests.unit.silo_agent.test_agent import (
    Agents,
    FakeFleet,
    _agent,
    _config,
    _offer,
    _task,
    _tasks,
    agents,  # noqa: F401 (the fixture)
)

PRIVACY = {"target_epsilon": 8.0, "target_delta": 1e-5, "max_grad_norm": 1.0}
#: the digits' train split less the 10% held out: what a silo of test_agent.py trains on
DIGITS_TRAIN = 1294  # 1797 less 20% test (359) less 10% held out (144)


@pytest.fixture(autouse=True)
def _quiet_opacus() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def test_a_dp_silo_trains_with_dp_sgd_and_refuses_past_its_budget(
    agents: Agents,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    """The job announces one round; a second training task would exceed the budget the
    noise was calibrated for: it is declined with kind privacy_budget and not trained."""
    first = dataclasses.replace(_task("t1"), rounds=1)
    second = dataclasses.replace(_task("t2", round_=2), rounds=1)
    fleet = FakeFleet(pulls=deque([_offer(first), _offer(second)]))
    agent = _agent(fleet, config=_config(state_dir=str(tmp_path), privacy=PRIVACY))
    assert isinstance(agent.trainer, DpSgdTrainer)
    assert agents.run(agent) == 0

    (upload,) = fleet.uploads
    assert upload.header.task_id == "t1"
    assert upload.header.privacy is not None
    assert 7.9 < upload.header.privacy.epsilon <= 8.0  # the whole job's budget, in one round
    assert upload.header.privacy.accountant == "rdp"
    (decline,) = fleet.declines
    assert decline == Decline(task_id="t2", reason=decline.reason, kind="privacy_budget")
    assert decline.reason.startswith("privacy budget: round 2 would bring this silo's epsilon")
    assert _tasks(agent, "train", "declined") == 1
    ledger = agent.trainer.ledger.job("job-1")
    assert ledger is not None and ledger.rounds == (1,)


def _start(tmp_path: Path, capsys: pytest.CaptureFixture[str], **extra: Any) -> tuple[int, str]:
    config = {
        "coordinator": "127.0.0.1:1",
        "insecure": True,
        "silo_id": "silo-a",
        "state_dir": str(tmp_path / "state"),
        "data": {"train": {"kind": "sklearn-digits"}, "eval_fraction": 0.1},
        **extra,
    }
    path = tmp_path / "silo.yaml"
    path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    code = main(["--config", str(path)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("privacy", "key", "says"),
    [
        ({**PRIVACY, "target_epsilon": -1}, "privacy.target_epsilon", "greater than 0"),
        ({**PRIVACY, "target_epsilon": float("inf")}, "privacy.target_epsilon", "finite"),
        ({**PRIVACY, "target_epsilon": float("nan")}, "privacy.target_epsilon", "finite"),
        (
            {k: v for k, v in PRIVACY.items() if k != "max_grad_norm"},
            "privacy.max_grad_norm",
            "required key is missing",
        ),
        (
            {**PRIVACY, "target_delta": 1 / DIGITS_TRAIN},
            "privacy.target_delta",
            f"is not below 1/n = {1 / DIGITS_TRAIN:.3g} for this silo's n = {DIGITS_TRAIN}",
        ),
        (
            {**PRIVACY, "target_epsilon": 0.5, "noise_multiplier": 0.3},
            "privacy.noise_multiplier",
            "contradicts target_epsilon 0.5: even one local epoch at batch size 1 spends",
        ),
        ({**PRIVACY, "secure_rng": True}, "privacy.secure_rng", "needs the torchcsprng"),
        ({**PRIVACY, "lifetime_epsilon": 4}, "privacy", "lifetime_epsilon 4 is below"),
        ({**PRIVACY, "accountant": "gdp"}, "privacy.accountant", "'rdp' or 'prv'"),
    ],
)
def test_a_privacy_section_the_silo_cannot_keep_fails_the_start(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    privacy: dict[str, Any],
    key: str,
    says: str,
) -> None:
    code, err = _start(tmp_path, capsys, privacy=privacy)
    assert code == EXIT_CONFIG, err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"gptfl-silo: silo.yaml: {key}: "), line
    assert says in line, line
    assert not (tmp_path / "state" / LEDGER_FILE).exists()


def test_a_damaged_ledger_fails_the_start_and_is_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = tmp_path / "state" / LEDGER_FILE
    ledger.parent.mkdir()
    ledger.write_text('{"format": 1, "ledger": {"jobs": []}, "sha256": "feed"}\n')
    code, err = _start(tmp_path, capsys, privacy=PRIVACY)
    assert code == EXIT_CONFIG, err
    (line,) = err.strip().splitlines()
    assert f"the privacy ledger {ledger} is damaged (checksum mismatch)" in line
    assert ledger.read_text() == '{"format": 1, "ledger": {"jobs": []}, "sha256": "feed"}\n'
