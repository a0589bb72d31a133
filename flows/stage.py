"""One training stage as its own flow, for the stage deployment on the GPU work pool.

The pipeline (on the CPU pool) sends a stage here with ``run_deployment`` only when its cache key missed;
the task run carries the concurrency tag, so a tag limit of 1 lets one stage train on a GPU at a time.
"""

from __future__ import annotations

import tasks  # noqa: F401  (Prefect's defaults, set in tasks/__init__.py, before Prefect is imported)

# isort: split

from prefect import flow

from rlhf.algorithms import training_stages
from rlhf.config import stage_kind
from tasks.policy import policy_stage
from tasks.reward import reward_stage
from tasks.sft import sft_stage


def training_task(stage: str):
    """The Prefect task that trains ``stage``: SFT, the reward model, or a policy algorithm (rlhf.algorithms)."""
    if stage not in training_stages():
        raise ValueError(f"stage={stage!r} is not a training stage. Fix: one of {list(training_stages())}.")
    return {"sft": sft_stage, "reward": reward_stage}.get(stage) or policy_stage.with_options(name=stage)


@flow(name="rlhf-stage", log_prints=True)
def rlhf_stage(
    stage: str, key: str, env: dict, inputs: dict, fresh: bool = False, concurrency_tag: str = "gpu"
) -> dict:
    """Train ``stage`` (sft, reward or a policy algorithm; a reward ensemble's member is reward with its
    ``member`` input) with the inputs the pipeline resolved; returns its record."""
    train = training_task(stage_kind(stage)).with_options(tags=[concurrency_tag], retries=0)
    return train(key=key, env=env, fresh=fresh, **inputs)
