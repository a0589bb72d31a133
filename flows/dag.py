"""The RLHF pipeline as one Prefect flow: data -> SFT -> reward -> policy -> eval, every stage a cached task.

``rlhf_pipeline`` is what the command line (:mod:`flows.pipeline`), the tests, the benchmarks and the
deployment ``rlhf-pipeline/nightly`` run.
"""

from __future__ import annotations

import tasks  # noqa: F401  (Prefect's defaults, set in tasks/__init__.py, before Prefect is imported)

# isort: split

from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger
from prefect.runtime import flow_run as prefect_run

from flows.parent import open_parent_run, record_results, stage_tags
from flows.report import mlflow_link, publish, run_name, ui_hint
from flows.stage import training_task
from rlhf.algorithms import registry, training_stages
from rlhf.config import PipelineConfig, reward_member, stage_kind
from rlhf.preemption import Preempted
from rlhf.preflight import preflight
from rlhf.settings import to_dict
from rlhf.tracking import RunLogger, experiment_id
from rlhf.validate import validate
from tasks.data import data_stage
from tasks.dispatch import check_stage_deployment, dispatch_stage, dispatched
from tasks.evaluate import eval_stage
from tasks.keys import pipeline_keys, short_key
from tasks.runner import stage_options


class Stages:
    """Calls stage tasks with their cache options and records, per stage, the key, whether it was
    Cached, and the MLflow run that produced its artifacts (lineage) as tags of the parent run.

    Placement (``dispatch``): a training stage runs here, tagged with the concurrency tag, or, with
    ``dispatch=pools``, as a flow run of the stage deployment; both sit behind the same cache key.
    """

    def __init__(self, cfg: PipelineConfig, keys: dict[str, str], env: dict, parent: RunLogger, logger) -> None:
        self.cfg, self.keys, self.env, self.parent, self.log = cfg, keys, env, parent, logger
        self.root = Path(cfg.paths.root)
        self.cached: dict[str, bool] = {}
        # Refreshing a stage re-runs everything downstream of it too (their inputs change).
        order = list(keys)
        first = min((order.index(s) for s in cfg.refresh if s in order), default=len(order))
        self.refreshed = set(order[first:])

    def _placed(self, name: str, task, inputs: dict):
        """The task to call for stage ``name`` (here, or its dispatch to the work pool), its inputs, and refresh."""
        refresh = name in self.refreshed
        options = {**stage_options(self.root, refresh), "task_run_name": f"{name}-{short_key(self.keys[name])}"}
        dispatch = self.cfg.dispatch
        if dispatched(dispatch, name):
            task = dispatch_stage.with_options(name=name, **options)
            inputs = {
                "stage": name,
                "inputs": inputs,
                "dispatch": to_dict(dispatch),
                "flow_run_name": f"{name}-{short_key(self.keys[name])} of {self.env['run_name']}",
            }
        else:
            task = task.with_options(
                **options, tags=[dispatch.concurrency_tag] if stage_kind(name) in training_stages() else []
            )
        self.log.info("stage %s: starting (key %s)", name, self.keys[name])
        return task, {"key": self.keys[name], "env": self.env, "fresh": refresh, **inputs}

    def _record(self, name: str, state) -> dict:
        """Bookkeeping of a finished stage: its tags on the parent run, a log line; its record (or its exception)."""
        self.cached[name] = state.name == "Cached"
        tags = {f"stage.{name}.cache_key": self.keys[name], f"stage.{name}.cached": str(self.cached[name]).lower()}
        if state.is_failed() or state.is_crashed():
            self.parent.set_tags({**tags, "failed_stage": name})
            self.log.error(
                "stage %s: %s. Finished stages stay cached; run the same command again to continue.", name, state.name
            )
        record = state.result()  # re-raises the stage's exception
        self.parent.set_tags(stage_tags(name, self.keys[name], self.cached[name], record))
        how = (
            f"Cached (made by MLflow run {record['run_id']})"
            if self.cached[name]
            else f"ran in {record['compute_s']:.1f} s (MLflow run {record['run_id']})"
        )
        self.log.info("stage %s: %s", name, how)
        return record

    def __call__(self, name: str, task, **inputs) -> dict:
        task, inputs = self._placed(name, task, inputs)
        return self._record(name, task(return_state=True, **inputs))

    def all(self, calls: list[tuple[str, object, dict]]) -> list[dict]:
        """Independent stages (a reward-model ensemble's members): on the work pool all at once, each its own
        flow run; in this process one after the other (torch's global RNG and threads are per process)."""
        if not all(dispatched(self.cfg.dispatch, name) for name, _, _ in calls):
            return [self(name, task, **inputs) for name, task, inputs in calls]
        futures = [
            (name, task.submit(**inputs))
            for name, task, inputs in ((name, *self._placed(name, task, inputs)) for name, task, inputs in calls)
        ]
        for _, future in futures:
            future.wait()
        return [self._record(name, future.state) for name, future in futures]


def name_flow_run(name: str) -> None:
    """The Prefect flow run carries the MLflow run's name (no random names, sweep members told apart)."""
    if prefect_run.id:
        from uuid import UUID

        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as prefect:
            prefect.update_flow_run(UUID(prefect_run.id), name=name)


@flow(name="rlhf-pipeline", log_prints=True)
def rlhf_pipeline(
    config: dict | None = None, overrides: list[str] | None = None, base_overrides: list[str] | None = None
) -> dict:
    """data -> SFT -> reward -> policy (DPO, PPO, ...) -> eval, every stage cached on its key; one parent MLflow run.

    ``config``: a composed config (the Hydra app, tests). Otherwise the config is composed from ``conf/``
    with ``base_overrides`` (a deployment's own, e.g. dispatch=pools) then ``overrides`` (a run's).
    """
    logger = get_run_logger()
    if config is None:
        from flows.compose import load_config

        config = load_config([*(base_overrides or []), *(overrides or [])])
    cfg = validate(config)
    uri = preflight(cfg)
    if cfg.dispatch.mode == "deployments":
        check_stage_deployment(cfg.dispatch)
    root = Path(cfg.paths.root)
    root.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri)
    exp_id = experiment_id(client, cfg.tracking.experiment, root, uri)
    keys = pipeline_keys(cfg)
    name = run_name(cfg, keys)
    name_flow_run(name)
    parent = open_parent_run(cfg, client, exp_id, name, prefect_run.id)
    logger.info("MLflow run %s: %s%s", name, mlflow_link(uri, exp_id, parent.run_id), ui_hint(uri))
    env = {
        "root": str(root),
        "tracking_uri": uri,
        "experiment_id": exp_id,
        "parent_run_id": parent.run_id,
        "run_name": name,
        "runtime": to_dict(cfg.runtime),
        "tracking": to_dict(cfg.tracking),
    }
    stage = Stages(cfg, keys, env, parent, logger)
    algo, model, has_gold = cfg.algo.algo, to_dict(cfg.model), cfg.data.source == "synthetic"
    try:
        data = stage("data", data_stage, data=to_dict(cfg.data))
        sft = stage("sft", training_task("sft"), model=model, sft_cfg=to_dict(cfg.sft), data=data)
        rewards = stage.all(
            [
                (
                    reward_member(i),
                    training_task("reward"),
                    dict(model=model, reward_cfg=to_dict(cfg.reward), data=data, sft=sft, member=i),
                )
                for i in range(cfg.reward.ensemble_size)
            ]
        )
        policy_inputs = (
            {"rewards": rewards, "has_gold": has_gold, "missing_eos_penalty": cfg.reward.missing_eos_penalty}
            if registry()[algo].needs_reward
            else {}
        )
        policy = stage(
            algo, training_task(algo), model=model, algo=to_dict(cfg.algo), data=data, sft=sft, **policy_inputs
        )
        evaluation = stage(
            "eval",
            eval_stage,
            model=model,
            eval_cfg=to_dict(cfg.eval),
            has_gold=has_gold,
            missing_eos_penalty=cfg.reward.missing_eos_penalty,
            data=data,
            sft=sft,
            rewards=rewards,
            policy=policy,
        )
    except Preempted as stopped:  # a stop signal: the stage checkpointed its step; the next run resumes there
        parent.set_tags({"rlhf.stopped": str(stopped)})
        parent.finish("KILLED")
        raise
    except BaseException:
        parent.finish("FAILED")
        raise
    metrics = evaluation["metrics"]
    record_results(client, parent, data, policy, metrics)
    publish(cfg, name, metrics, uri, exp_id, parent.run_id, stage.cached)
    if all(stage.cached.values()):
        logger.info("all stages cached: nothing trained")
    logger.info("%s: %s", name, ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    parent.finish()
    return {
        "run_id": parent.run_id,
        "run_name": name,
        "experiment_id": exp_id,
        "tracking_uri": uri,
        "keys": keys,
        "cached": stage.cached,
        "metrics": metrics,
        "policy_path": policy["model_path"],
        "records": {"data": data, "sft": sft, **{reward_member(i): r for i, r in enumerate(rewards)}, algo: policy},
    }
