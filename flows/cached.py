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
    from mlflow.tracking import MlflowClient

    from flows.parent import open_parent_run, record_results, stage_tags
    from flows.report import mlflow_link, run_name, ui_hint
    from rlhf.preflight import preflight
    from rlhf.tracking import experiment_id
    from tasks.keys import pipeline_keys

    uri = preflight(cfg)
    keys = pipeline_keys(cfg)
    records = cached_records(cfg, keys)
    if records is None:
        return None
    client = MlflowClient(uri)
    exp_id = experiment_id(client, cfg.tracking.experiment, Path(cfg.paths.root), uri)
    name = run_name(cfg, keys)
    parent = open_parent_run(cfg, client, exp_id, name)
    parent.set_tags(
        {k: v for stage, rec in records.items() for k, v in stage_tags(stage, keys[stage], True, rec).items()}
    )
    algo, metrics = cfg.algo.algo, records["eval"]["metrics"]
    record_results(client, parent, records["data"], records[algo], metrics)
    parent.set_tags({"cached_run": "true"})
    parent.finish()
    print(
        f"all stages cached: nothing to train. MLflow run {name}: "
        f"{mlflow_link(uri, exp_id, parent.run_id)}{ui_hint(uri)}",
        flush=True,
    )
    return {
        "run_id": parent.run_id,
        "run_name": name,
        "experiment_id": exp_id,
        "tracking_uri": uri,
        "keys": keys,
        "cached": {stage: True for stage in keys},
        "metrics": metrics,
        "policy_path": records[algo]["model_path"],
        "records": records,
    }
