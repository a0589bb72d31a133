"""The RLHF pipeline as one Prefect flow: data -> SFT -> reward -> DPO | PPO -> eval.

Entry points:
    python -m flows.pipeline [hydra overrides]      (also the console script ``rlhf-pipeline``)
    rlhf_pipeline(load_config([...overrides]))     (tests, benchmarks)
    deployment rlhf-pipeline/nightly                (flows/deploy.py; parameter ``overrides``)
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import tasks  # noqa: F401  (Prefect defaults first)

import hydra
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run as prefect_run

from flows import schema
from flows.stage import training_task
from rlhf.algorithms import registry
from rlhf.config import ConfigError, PipelineConfig, flatten, to_dict, training_stages, validate
from rlhf.preflight import preflight
from rlhf.tracking import RunLogger, experiment_id
from tasks.data import data_stage
from tasks.dispatch import check_stage_deployment, dispatch_stage
from tasks.evaluate import eval_stage
from tasks.keys import pipeline_keys
from tasks.runner import stage_options

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
PROJECT_DIR = CONF_DIR.parent
log = logging.getLogger(__name__)
schema.register(CONF_DIR)


def load_config(overrides: list[str] | None = None) -> dict:
    """Compose ``conf/`` with Hydra overrides into a plain dict with an absolute ``paths.root``."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides or []))
    except HydraException as e:  # a wrong type or an unknown key, found against the schema while composing
        cause = f": {e.__cause__}" if e.__cause__ else ""
        raise ConfigError(f"{e}{cause}. Fix: check the key and its type (`python -m flows.pipeline --help` lists every field).") from e
    return to_container(cfg)


def to_container(cfg: DictConfig) -> dict:
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    container["paths"]["root"] = str(Path(container["paths"]["root"]).expanduser().resolve())
    return container


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Stages:
    """Calls stage tasks with their cache options and records, per stage, the key, whether it was
    Cached, and the MLflow run that produced its artifacts (lineage) as tags of the parent run.

    Placement (``dispatch``): a training stage runs here, tagged with the concurrency tag, or, with
    ``dispatch=pools``, as a flow run of the stage deployment; both sit behind the same cache key.
    """

    def __init__(self, cfg: PipelineConfig, keys: dict[str, str], env: dict, parent: RunLogger) -> None:
        self.cfg, self.keys, self.env, self.parent = cfg, keys, env, parent
        self.root = Path(cfg.paths.root)
        # Refreshing a stage re-runs everything downstream of it too (their inputs change).
        order = list(keys)
        first = min((order.index(s) for s in cfg.refresh if s in order), default=len(order))
        self.refreshed = set(order[first:])

    def __call__(self, name: str, task, **inputs) -> dict:
        refresh = name in self.refreshed
        options = stage_options(self.root, refresh)
        dispatch = self.cfg.dispatch
        if dispatch.dispatched(name):
            task = dispatch_stage.with_options(name=name, **options)
            inputs = {"stage": name, "inputs": inputs, "dispatch": to_dict(dispatch)}
        else:
            task = task.with_options(**options, tags=[dispatch.concurrency_tag] if name in training_stages() else [])
        state = task(key=self.keys[name], env=self.env, fresh=refresh, return_state=True, **inputs)
        tags = {f"stage.{name}.cache_key": self.keys[name], f"stage.{name}.cached": str(state.name == "Cached").lower()}
        if state.is_failed() or state.is_crashed():
            self.parent.set_tags({**tags, "failed_stage": name})
        record = state.result()  # re-raises the stage's exception
        self.parent.set_tags({**tags, f"stage.{name}.run_id": record["run_id"]})
        log.info("stage %s: %s (run %s)", name, state.name, record["run_id"])
        return record


def summary_markdown(cfg: PipelineConfig, metrics: dict, tracking_uri: str, exp_id: str, run_id: str, cached: dict) -> str:
    if tracking_uri.startswith("http"):
        link = f"{tracking_uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"
    else:
        link = f"`mlflow ui --backend-store-uri {tracking_uri}` then http://127.0.0.1:5000/#/experiments/{exp_id}/runs/{run_id}"
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()))
    stages = ", ".join(f"{k}: {'Cached' if v else 'ran'}" for k, v in cached.items())
    return (
        f"# RLHF pipeline ({cfg.algo.algo}, beta={cfg.algo.beta})\n\nMLflow run: {link}\n\nStages: {stages}\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n"
    )


@flow(name="rlhf-pipeline", log_prints=True)
def rlhf_pipeline(config: dict | None = None, overrides: list[str] | None = None, base_overrides: list[str] | None = None) -> dict:
    """data -> SFT -> reward -> DPO | PPO -> eval, every stage cached on its key; one parent MLflow run.

    ``config``: a composed config (the Hydra app, tests). Otherwise the config is composed from ``conf/``
    with ``base_overrides`` (a deployment's own, e.g. dispatch=pools) then ``overrides`` (a run's).
    """
    if config is None:
        config = load_config([*(base_overrides or []), *(overrides or [])])
    cfg = validate(config)
    uri = preflight(cfg)
    if cfg.dispatch.mode == "deployments":
        check_stage_deployment(cfg.dispatch)
    root = Path(cfg.paths.root)
    root.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri)
    exp_id = experiment_id(client, cfg.tracking.experiment, root, uri)
    algo = cfg.algo.algo
    parent_tags = {"pipeline": "rlhf", "algo": algo, "git_commit": git_commit(), "mlflow.source.git.commit": git_commit(), **cfg.tags}
    if cfg.sweep_id:
        parent_tags["sweep_id"] = cfg.sweep_id
    if prefect_run.id:  # MLflow run <-> Prefect flow run, both ways (the flow run's logs name the MLflow run)
        parent_tags |= {"prefect.flow_run_id": prefect_run.id, "prefect.flow_run_name": prefect_run.name}
    parent = RunLogger.create(client, exp_id, f"{algo}-beta{cfg.algo.beta:g}", parent_tags)
    parent.log_params(flatten(to_dict(cfg)))
    env = {"root": str(root), "tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": parent.run_id, "runtime": to_dict(cfg.runtime)}
    keys = pipeline_keys(cfg)
    stage = Stages(cfg, keys, env, parent)
    model, has_gold = to_dict(cfg.model), cfg.data.source == "synthetic"
    try:
        data = stage("data", data_stage, data=to_dict(cfg.data))
        sft = stage("sft", training_task("sft"), model=model, sft_cfg=to_dict(cfg.sft), data=data)
        reward = stage("reward", training_task("reward"), model=model, reward_cfg=to_dict(cfg.reward), data=data, sft=sft)
        policy_inputs = {"reward": reward, "has_gold": has_gold} if registry()[algo].needs_reward else {}
        policy = stage(algo, training_task(algo), model=model, algo=to_dict(cfg.algo), data=data, sft=sft, **policy_inputs)
        evaluation = stage("eval", eval_stage, model=model, eval_cfg=to_dict(cfg.eval), has_gold=has_gold,
                           data=data, sft=sft, reward=reward, policy=policy)
    except BaseException:
        parent.finish("FAILED")
        raise
    metrics = evaluation["metrics"]
    parent.log_metrics(metrics, step=0)
    runs = client.get_run(parent.run_id).data.tags
    cached = {name: runs.get(f"stage.{name}.cached") == "true" for name in keys}
    create_markdown_artifact(key="rlhf-summary", markdown=summary_markdown(cfg, metrics, uri, exp_id, parent.run_id, cached),
                             description="Held-out evaluation of this pipeline run")
    parent.finish()
    return {"run_id": parent.run_id, "experiment_id": exp_id, "tracking_uri": uri, "keys": keys, "cached": cached,
            "metrics": metrics, "policy_path": policy["model_path"]}


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Hydra app: compose, validate (fails before any training), run the flow; returns the objective."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from flows.sweep import sweep_id_for

    logging.getLogger("httpx").setLevel(logging.WARNING)
    container = to_container(cfg)
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN and not container.get("sweep_id"):
        container["sweep_id"] = sweep_id_for(hydra_cfg.sweep.dir)
    validate(container)
    result = rlhf_pipeline(container)
    m = result["metrics"]
    print("\n".join(f"{k:28s} {v:.4f}" for k, v in sorted(m.items())))
    if container["objective"] not in m:
        raise ConfigError(f"objective={container['objective']} is not an eval metric of this run ({sorted(m)}). "
                          f"Fix: pass objective=eval/proxy_reward (data without a gold reward).")
    return float(m[container["objective"]])


if __name__ == "__main__":
    main()
