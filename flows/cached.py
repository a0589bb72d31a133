"""A run whose every stage is already cached, answered without Prefect or a model load.

The command line computes the stage keys from the config (and the data's content), finds each stage's
persisted result (``paths.root/prefect-results/<key>``, what Prefect's cache would return, and the
stage's ``record.json``), and if all are there opens the parent MLflow run with the same lineage tags and
results a Prefect run would leave, says "all stages cached" with the MLflow link, and returns. Anything
missing (or ``refresh``, ``dispatch=pools``, a Prefect server in ``PREFECT_API_URL``: runs a team tracks
there) goes to the Prefect flow as usual.
"""

from __future__ import annotations

import os
from pathlib import Path

from rlhf.config import PipelineConfig


def cached_records(cfg: PipelineConfig, keys: dict[str, str]) -> dict[str, dict] | None:
    """Every stage's record, or None as soon as one stage has no persisted result."""
    from tasks.records import read_record

    root = Path(cfg.paths.root)
    records = {}
    for stage, key in keys.items():
        if not (root / "prefect-results" / key).is_file():
            return None
        try:
            records[stage] = read_record(root, stage, key)
        except (FileNotFoundError, ValueError):
            return None
    return records


def cached_run(cfg: PipelineConfig) -> dict | None:
    """The pipeline's result when every stage is cached (see the module docstring), else None."""
    if cfg.refresh or cfg.dispatch.mode != "local" or os.environ.get("PREFECT_API_URL"):
        return None
    from flows.parent import PipelineRun, stage_tags
    from flows.report import mlflow_link, ui_hint
    from rlhf.preflight import preflight
    from tasks.keys import pipeline_keys

    uri = preflight(cfg)
    keys = pipeline_keys(cfg)
    records = cached_records(cfg, keys)
    if records is None:
        return None
    run = PipelineRun.open(cfg, uri, keys)
    tags = {k: v for stage, rec in records.items() for k, v in stage_tags(stage, keys[stage], True, rec).items()}
    run.parent.set_tags({**tags, "cached_run": "true"})
    link = mlflow_link(uri, run.exp_id, run.parent.run_id)
    print(f"all stages cached: nothing to train. MLflow run {run.name}: {link}{ui_hint(uri)}", flush=True)
    return run.result(records, dict.fromkeys(keys, True))
