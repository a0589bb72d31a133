"""Progress of a training stage: log lines at the first step, at least every `every_s` seconds, and at the end."""

import logging

from rlhf import progress
from rlhf.progress import Progress, ProgressSettings


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_log_lines_come_at_the_first_step_every_interval_and_the_last(monkeypatch, caplog):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    caplog.set_level(logging.INFO, logger="rlhf.progress")
    p = Progress("sft", 100, ProgressSettings("log", every_s=10.0))
    for step in range(1, 101):
        clock.now += 1.5  # a step every 1.5 s: a line at steps 1, 8, 15, ... (every 7 steps = 10.5 s) and 100
        p.update(step, {"sft/loss": 2.0 - step / 100}, tokens=300)
    lines = [r.getMessage() for r in caplog.records if r.name == "rlhf.progress"]
    steps = [int(line.split()[2].split("/")[0]) for line in lines]
    assert steps[0] == 1 and steps[-1] == 100
    assert all(
        1.5 * (b - a) <= 10.5 for a, b in zip(steps, steps[1:])
    )  # never more than ~10 s of training without a line
    assert len(lines) < 20  # and not one per step
    assert "sft step 1/100 (1%)  loss 1.99  200 tok/s" in lines[0] and "eta 2:28" in lines[0]
    assert "sft step 100/100 (100%)" in lines[-1] and "eta 0:00" in lines[-1]


def test_a_resumed_stage_counts_from_its_checkpoint_and_off_means_silent(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="rlhf.progress")
    p = Progress("ppo", 60, ProgressSettings("log"), start=40)
    p.update(41, {"ppo/score": 0.5, "ppo/kl": 1.2})
    assert "ppo step 41/60 (68%)  score 0.5  kl 1.2" in caplog.records[-1].getMessage()
    caplog.clear()
    Progress("ppo", 60, ProgressSettings("off")).update(1, {"ppo/score": 0.5})
    assert not caplog.records
