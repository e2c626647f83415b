"""``gptfl admin`` following a job: progress lines before round 1, one line per round."""

from __future__ import annotations

from dataclasses import dataclass, field

from gptfl.admin_client import RoundView, StatusView
from gptfl.cli.admin_cmd import follow
from gptfl.errors import EXIT_JOB_FAILED, EXIT_OK


def _status(phase: str, message: str, rounds: int = 0) -> StatusView:
    views = [RoundView(r, 2, 2, 0, 0.5, {"test_accuracy": 0.5}, {}) for r in range(1, rounds + 1)]
    return StatusView("job-1", phase, rounds, 2, message, 2, views, None)


@dataclass
class Script:
    """A fake admin client returning a scripted sequence of statuses."""

    statuses: list[StatusView]
    calls: int = 0
    lines: list[str] = field(default_factory=list)

    def status(self) -> StatusView:
        status = self.statuses[min(self.calls, len(self.statuses) - 1)]
        self.calls += 1
        return status


def test_progress_is_throttled_within_a_phase_and_the_last_line_shown() -> None:
    script = Script(
        [
            _status("pending", ""),
            _status("pretrain", "waiting for the synth service at s:1"),
            _status("pretrain", "generating synthetic images: 100/2000"),
            _status("pretrain", "generating synthetic images: 200/2000"),
            _status("pretrain", "pretrained on 2000 synthetic images: 86.9%"),
            _status("federating", "round 1: training on 2 silos"),
            _status("federating", "round 2: training on 2 silos", rounds=1),
            _status("finished", "finished 2 rounds", rounds=2),
        ]
    )
    code = follow(
        script,  # type: ignore[arg-type]
        interval_s=0,
        progress_interval_s=3600,
        out=script.lines.append,
    )
    assert code == EXIT_OK
    # Within a phase only the first line and (when the phase ends) its last line show.
    assert script.lines[:3] == [
        "  pretrain: waiting for the synth service at s:1",
        "  pretrain: pretrained on 2000 synthetic images: 86.9%",
        "  federating: round 1: training on 2 silos",
    ]
    assert script.lines[3].startswith("round   1/2: test acc  50.00%")
    assert script.lines[-1] == "job job-1 finished: finished 2 rounds"


def test_a_failed_job_exits_with_the_job_failed_code() -> None:
    script = Script([_status("failed", "pretrain phase failed: Generate at s:1: NOT_FOUND")])
    code = follow(script, interval_s=0, out=script.lines.append)  # type: ignore[arg-type]
    assert code == EXIT_JOB_FAILED
    assert script.lines == ["job job-1 failed: pretrain phase failed: Generate at s:1: NOT_FOUND"]
