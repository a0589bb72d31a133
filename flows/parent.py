"""The pipeline's parent MLflow run: opened, tagged, given its results (no Prefect here: the cached fast path
of the command line uses it too)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import LoggedModelOutput
from mlflow.tracking import MlflowClient

from flows.sweep import sweep_run
from rlhf.config import PipelineConfig
from rlhf.lineage import SPLIT_CONTEXTS, log_datasets
from rlhf.settings import flatten, to_dict
from rlhf.tracking import RunLogger, close_orphaned_runs, experiment_id

PROJECT_DIR = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def open_parent_run(
    cfg: PipelineConfig, client: MlflowClient, exp_id: str, name: str, flow_run_id: str | None = None
) -> RunLogger:
    """The pipeline's parent MLflow run: under the sweep's run when it is a sweep member; earlier runs whose
    process died (kill -9) are closed as KILLED, naming this run as the one that took over."""
    commit = git_commit()
    tags = {
        "pipeline": "rlhf",
        "algo": cfg.algo.algo,
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        "mlflow.source.name": "flows/pipeline.py",
        "mlflow.source.type": "JOB",
        **cfg.tags,
    }
    sweep_parent = None
    if cfg.sweep_id:
        tags["sweep_id"] = cfg.sweep_id
        sweep_parent = sweep_run(client, exp_id, cfg.sweep_id, Path(cfg.paths.root), name=cfg.sweep_id)
    if flow_run_id:  # MLflow run <-> Prefect flow run, both ways (the flow run's logs name the MLflow run)
        tags |= {"prefect.flow_run_id": flow_run_id, "prefect.flow_run_name": name}
    parent = RunLogger.create(client, exp_id, name, tags, sweep_parent)
    close_orphaned_runs(client, exp_id, parent.run_id)
    parent.log_params(flatten(to_dict(cfg)))
    return parent


def record_results(client: MlflowClient, parent: RunLogger, data: dict, policy: dict, metrics: dict) -> None:
    """The eval metrics, every data split as a dataset input (the Dataset column) and the tuned policy as the
    output model (the Models column), also when its stage came from the cache."""
    parent.log_metrics(metrics, step=0)
    log_datasets(client, parent.run_id, data["datasets"], SPLIT_CONTEXTS)
    if policy.get("model_id"):
        client.log_outputs(parent.run_id, [LoggedModelOutput(policy["model_id"], step=0)])


def stage_tags(name: str, key: str, cached: bool, record: dict) -> dict[str, str]:
    """The lineage tags of one stage on the parent run."""
    return {
        f"stage.{name}.cache_key": key,
        f"stage.{name}.cached": str(cached).lower(),
        f"stage.{name}.run_id": record["run_id"],
    }


@dataclass
class PipelineRun:
    """One pipeline run's parent MLflow run and what its stages and its result need. The Prefect flow and the
    command line's all-cached answer (:mod:`flows.cached`) both open and close it."""

    cfg: PipelineConfig
    uri: str  # the tracking URI
    client: MlflowClient
    exp_id: str
    keys: dict[str, str]  # every stage's cache key
    name: str
    parent: RunLogger

    @classmethod
    def open(cls, cfg: PipelineConfig, uri: str, keys: dict[str, str], flow_run_id: str | None = None) -> PipelineRun:
        from flows.report import run_name

        client = MlflowClient(uri)
        exp_id = experiment_id(client, cfg.tracking.experiment, Path(cfg.paths.root), uri)
        name = run_name(cfg, keys)
        return cls(cfg, uri, client, exp_id, keys, name, open_parent_run(cfg, client, exp_id, name, flow_run_id))

    def env(self) -> dict:
        """What every stage task is handed about where it runs and logs (plain data: it travels to work pools)."""
        return {
            "root": self.cfg.paths.root,
            "tracking_uri": self.uri,
            "experiment_id": self.exp_id,
            "parent_run_id": self.parent.run_id,
            "run_name": self.name,
            "runtime": to_dict(self.cfg.runtime),
            "tracking": to_dict(self.cfg.tracking),
        }

    def result(self, records: dict[str, dict], cached: dict[str, bool]) -> dict:
        """The eval metrics, datasets and tuned policy on the parent run, which closes; the pipeline's result."""
        algo, metrics = self.cfg.algo.algo, records["eval"]["metrics"]
        record_results(self.client, self.parent, records["data"], records[algo], metrics)
        self.parent.finish()
        return {
            "run_id": self.parent.run_id,
            "run_name": self.name,
            "experiment_id": self.exp_id,
            "tracking_uri": self.uri,
            "keys": self.keys,
            "cached": cached,
            "metrics": metrics,
            "policy_path": records[algo]["model_path"],
            "records": records,
        }
