"""The RLHF pipeline as one Prefect flow: data -> SFT -> reward -> policy -> eval, every stage a cached task.

``rlhf_pipeline`` is what the command line (:mod:`flows.pipeline`), the tests, the benchmarks and the
deployment ``rlhf-pipeline/nightly`` run.
"""

from __future__ import annotations

import tasks  # noqa: F401  (Prefect's defaults, set in tasks/__init__.py, before Prefect is imported)

# isort: split

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as prefect_run

from flows.parent import PipelineRun, stage_tags
from flows.report import mlflow_link, publish, ui_hint
from flows.stage import training_task
from rlhf.algorithms import registry, training_stages
from rlhf.config import PipelineConfig, reward_member, stage_kind
from rlhf.preemption import Preempted, pending
from rlhf.preflight import preflight
from rlhf.settings import to_dict
from rlhf.tracking import RunLogger
from rlhf.validate import validate
from tasks.data import data_stage
from tasks.dispatch import check_stage_deployment, dispatch_stage, dispatched
from tasks.evaluate import eval_stage
from tasks.keys import pipeline_keys, refreshed_stages, short_key
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
        self.refreshed = refreshed_stages(keys, cfg.refresh)

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
        record = self._record(name, task(return_state=True, **inputs))
        if stop := pending():  # a stop signal came as the stage finished its training: stop after it
            raise stop
        return record

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
    uri = preflight(cfg)  # before anything starts: paths, models, data files, the tracking server
    if cfg.dispatch.mode == "deployments":
        check_stage_deployment(cfg.dispatch)
    keys = pipeline_keys(cfg)
    run = PipelineRun.open(cfg, uri, keys, prefect_run.id)
    name_flow_run(run.name)
    logger.info("MLflow run %s: %s%s", run.name, mlflow_link(uri, run.exp_id, run.parent.run_id), ui_hint(uri))
    stage = Stages(cfg, keys, run.env(), run.parent, logger)
    try:
        records = run_stages(stage, cfg)
    except Preempted as stopped:  # a stop signal: the stage checkpointed its step; the next run resumes there
        run.parent.set_tags({"rlhf.stopped": str(stopped)})
        run.parent.finish("KILLED")
        raise
    except BaseException:
        run.parent.finish("FAILED")
        raise
    metrics = records["eval"]["metrics"]
    publish(cfg, run.name, metrics, uri, run.exp_id, run.parent.run_id, stage.cached)
    if all(stage.cached.values()):
        logger.info("all stages cached: nothing trained")
    logger.info("%s: %s", run.name, ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    return run.result(records, stage.cached)


def run_stages(stage: Stages, cfg: PipelineConfig) -> dict[str, dict]:
    """Every stage in order, each a cached task (or its dispatch to the work pool); their records by stage name."""
    algo, model, has_gold = cfg.algo.algo, to_dict(cfg.model), cfg.data.source == "synthetic"
    data = stage("data", data_stage, data=to_dict(cfg.data))
    sft = stage("sft", training_task("sft"), model=model, sft_cfg=to_dict(cfg.sft), data=data)
    members = [reward_member(i) for i in range(cfg.reward.ensemble_size)]
    reward_inputs = dict(model=model, reward_cfg=to_dict(cfg.reward), data=data, sft=sft)
    rewards = stage.all([(m, training_task("reward"), {**reward_inputs, "member": i}) for i, m in enumerate(members)])
    scoring = {"has_gold": has_gold, "missing_eos_penalty": cfg.reward.missing_eos_penalty}
    rollout = {"rollout": to_dict(cfg.rollout)}  # how the stages that sample do it (rollout.engine)
    policy_inputs = {"rewards": rewards, **scoring, **rollout} if registry()[algo].needs_reward else {}
    policy = stage(algo, training_task(algo), model=model, algo=to_dict(cfg.algo), data=data, sft=sft, **policy_inputs)
    evaluation = stage(
        "eval",
        eval_stage,
        model=model,
        eval_cfg=to_dict(cfg.eval),
        data=data,
        sft=sft,
        rewards=rewards,
        policy=policy,
        **scoring,
        **rollout,
    )
    return {"data": data, "sft": sft, **dict(zip(members, rewards)), algo: policy, "eval": evaluation}
