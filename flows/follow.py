"""Machines 1 to N-1 of a stage that spans several (``runtime.num_machines > 1``, ``runtime.node_rank > 0``).

Every machine starts the same pipeline command with its own ``runtime.node_rank``. Machine 0 runs the pipeline
(Prefect, MLflow, the stages that are not training); each other machine computes the same stage keys, and for
each training stage in the pipeline's order that is not finished yet joins the launch machine 0 starts for it
(:func:`rlhf.launch.join_launch`, through the stage folder on the shared ``paths.root``), then returns when
the last one has ended.
"""

from __future__ import annotations

from rlhf.algorithms import training_stages
from rlhf.config import PipelineConfig, stage_kind


def follow(cfg: PipelineConfig) -> list[str]:
    """Join machine 0's launch of every unfinished training stage, in order; the stages joined."""
    from rlhf.launch import join_launch
    from tasks.keys import pipeline_keys
    from tasks.records import RECORD_FILE, stage_dir

    rt, joined = cfg.runtime, []
    for stage, key in pipeline_keys(cfg).items():
        folder = stage_dir(cfg.paths.root, stage, key)
        if stage_kind(stage) not in training_stages():
            continue
        if (folder / RECORD_FILE).exists() and stage not in cfg.refresh:
            continue  # finished before this machine came
        print(f"machine {rt.node_rank} of {rt.num_machines}: {stage} ({folder})", flush=True)
        join_launch(folder, rt)
        joined.append(stage)
    print(f"machine {rt.node_rank} of {rt.num_machines}: every training stage done", flush=True)
    return joined
