"""Machines 1 to N-1 of a stage that spans several (``runtime.num_machines > 1``, ``runtime.node_rank > 0``).

Every machine starts the same pipeline command with its own ``runtime.node_rank``. Machine 0 runs the pipeline
(Prefect, MLflow, the stages that are not training); each other machine computes the same stage keys, and for
each training stage in the pipeline's order that is not finished yet joins the launch machine 0 starts for it
(:func:`rlhf.launch.join_launch`, through the stage folder on the shared ``paths.root``), then returns when
the last one has ended.
"""

from __future__ import annotations

import signal

from rlhf.algorithms import training_stages
from rlhf.config import PipelineConfig, stage_kind


def _stop_through_machine_0(signum, _frame) -> None:
    print("stop asked: machine 0 stops every process after its step; again to kill this machine's", flush=True)
    signal.signal(signum, signal.SIG_DFL)


def follow(cfg: PipelineConfig) -> list[str]:
    """Join machine 0's launch of every unfinished training stage, in order; the stages joined."""
    from rlhf.launch import join_launch
    from tasks.keys import pipeline_keys, refreshed_stages
    from tasks.records import RECORD_FILE, stage_dir

    # a stop signal reaches machine 0 too, whose stop file stops every process after the same step and checkpoints
    # it; this machine's processes must live to write their shards (a second signal ends them)
    signal.signal(signal.SIGTERM, _stop_through_machine_0)
    rt, joined, keys = cfg.runtime, [], pipeline_keys(cfg)
    refreshed = refreshed_stages(keys, cfg.refresh)  # what machine 0 trains again although finished
    for stage, key in keys.items():
        folder = stage_dir(cfg.paths.root, stage, key)
        if stage_kind(stage) not in training_stages():
            continue
        if (folder / RECORD_FILE).exists() and stage not in refreshed:
            continue  # finished before this machine came
        print(f"machine {rt.node_rank} of {rt.num_machines}: {stage} ({folder})", flush=True)
        join_launch(folder, rt)
        joined.append(stage)
    print(f"machine {rt.node_rank} of {rt.num_machines}: every training stage done", flush=True)
    return joined
