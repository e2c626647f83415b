"""Every connection between the silos and the coordinator drops once, mid-round; nobody notices.

The silo agents (real processes, mutual TLS) dial the coordinator through a loopback proxy
(:mod:`tests.integration.tcp_proxy`). One silo holds a little data and one a lot, so in round
1 the first has uploaded and waits in its PullTask long poll for the evaluation task while the
second still trains. Then the proxy drops every connection at once. gRPC retries the long poll
(and any heartbeat in flight) on a new connection, and the silo that trains uploads over one:
neither agent ends its session (it would log that the coordinator is unreachable and Register
again, which hands its tasks back), and every round completes with both silos' updates and
evaluations.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from gptfl.cli.demo_cmd import digits_job_spec
from gptfl.local_cluster import LocalCluster, SiloPlan
from gptfl.models import ModelSpec
from silo_agent.config import DataConfig
from silo_agent.local_data import LocalData
from tests.integration.conftest import wait_for_job_end
from tests.integration.tcp_proxy import DroppingProxy
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

ROUNDS = 2
FAST, SLOW = "silo-small", "silo-large"
#: what the agent logs once per session (each start and each reconnect)
SESSION_LINE = "registered with"
TRAINED_LINE = "round 1: trained on"


def _data(part: int | None) -> dict[str, object]:
    train: dict[str, object] = {"kind": "sklearn-digits", "split": "train"}
    if part is not None:  # an eighth of the train split (an even one: alpha is large)
        train["partition"] = {"index": part, "count": 8, "alpha": 1000.0, "seed": 0}
    return {"train": train, "eval_fraction": 0.1}


def _eval_examples(data: dict[str, object], model: ModelSpec) -> int:
    return len(LocalData(DataConfig.model_validate(data)).for_model(model).eval)


def test_a_dropped_connection_mid_round_costs_no_silo_its_task(tmp_path: Path) -> None:
    spec = digits_job_spec(name="drop", rounds=ROUNDS, silos=2, strategy="fedavg", seed=1)
    spec["local"]["epochs"] = 25  # the large silo trains for seconds, the small one briefly
    with DroppingProxy() as proxy:
        via_proxy = {"coordinator": proxy.address}
        plans = [SiloPlan(FAST, _data(0), via_proxy), SiloPlan(SLOW, _data(None), via_proxy)]
        cluster = LocalCluster(tmp_path / "work", silos=plans, runs_dir=tmp_path / "runs")
        try:
            cluster.provision()
            proxy.target = cluster.start_coordinator().fleet
            cluster.start_silos()
            with cluster.admin() as admin:
                admin.status(wait_for_ready=True)
                job_id = admin.submit(yaml.safe_dump(spec))
                wait_until(
                    lambda: TRAINED_LINE in cluster.log_tail(FAST, 400),
                    timeout_s=120,
                    what=f"{FAST} to finish training in round 1",
                    detail=lambda: cluster.log_tail("coordinator"),
                )
                # the premise of the test, not its result: the drop must come mid-round
                assert TRAINED_LINE not in cluster.log_tail(SLOW, 400), "the large silo was fast"
                dropped = proxy.drop_all()
                status = wait_for_job_end(
                    admin, timeout_s=240, detail=lambda: cluster.log_tail("coordinator")
                )
            assert status.phase == "finished", status.message
            exits = cluster.wait_silos(timeout_s=60)
        finally:
            cluster.stop()
        assert dropped >= 2, dropped  # each silo's connection was open when it dropped
        assert proxy.accepted_since_drop >= 2  # and each silo connected again

    assert exits == {FAST: 0, SLOW: 0}, exits
    for silo in (FAST, SLOW):
        log = cluster.log_tail(silo, 2000)
        assert log.count(SESSION_LINE) == 1, log  # one session: never registered again
        assert "unreachable" not in log, log
    assert "reconnected without its" not in cluster.log_tail("coordinator", 2000)

    summary = json.loads((tmp_path / "runs" / job_id / "summary.json").read_text())
    model = ModelSpec.model_validate(spec["model"])
    evaluations = sum(_eval_examples(p.data, model) for p in plans)  # type: ignore[arg-type]
    assert [r["round"] for r in summary["rounds"]] == list(range(1, ROUNDS + 1))
    for r in summary["rounds"]:
        assert r["updates_accepted"] == 2 and r["updates_rejected"] == 0, r
        assert r["federated_examples"] == evaluations, r  # both silos' evaluations arrived
