"""One training stage as its own flow, for the stage deployment on the GPU work pool.

The pipeline (on the CPU pool) sends a stage here with ``run_deployment`` only when its cache key missed;
the task run carries the concurrency tag, so a tag limit of 1 lets one stage train on a GPU at a time.
"""

from __future__ import annotations

import tasks  # noqa: F401  (Prefect defaults first)

from prefect import flow

from tasks.dpo import dpo_stage
from tasks.ppo import ppo_stage
from tasks.reward import reward_stage
from tasks.sft import sft_stage

TRAINING_TASKS = {"sft": sft_stage, "reward": reward_stage, "dpo": dpo_stage, "ppo": ppo_stage}


@flow(name="rlhf-stage", log_prints=True)
def rlhf_stage(stage: str, key: str, env: dict, inputs: dict, fresh: bool = False, concurrency_tag: str = "gpu") -> dict:
    """Train ``stage`` (sft, reward, dpo or ppo) with the inputs the pipeline resolved; returns its record."""
    if stage not in TRAINING_TASKS:
        raise ValueError(f"stage={stage!r} is not a training stage. Fix: one of {sorted(TRAINING_TASKS)}.")
    train = TRAINING_TASKS[stage].with_options(tags=[concurrency_tag], retries=0)
    return train(key=key, env=env, fresh=fresh, **inputs)
