"""What every stage task does around the ML: its folder, its nested MLflow run, its lineage and outputs.

``run_stage`` is the one place that turns ``rlhf.stages.<stage>.run`` into a tracked, cached step (the
datasets and upstream models it reads, system metrics while it trains, its final model as an MLflow
model, figures, and checkpoints only when asked);
``stage_options`` is the one cache policy: the key computed in :mod:`tasks.keys`, results persisted
under ``paths.root``, and a file lock per key so concurrent runs never train the same stage twice.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import LoggedModelInput
from mlflow.tracking import MlflowClient
from prefect.cache_policies import CacheKeyFnPolicy

from rlhf import checkpoint, runtime
from rlhf.algorithms import training_stages
from rlhf.config import RuntimeConfig, TrackingConfig, stage_kind
from rlhf.context import CKPT_DIR, FINAL_DIR, StageContext
from rlhf.launch import run_data_parallel
from rlhf.lineage import log_datasets
from rlhf.model_logging import log_final_model
from rlhf.preemption import Preempted, StopSignals, stop_after
from rlhf.progress import ProgressSettings
from rlhf.settings import from_dict
from rlhf.sharding import Sharding
from rlhf.system_metrics import PeakMemory, StageSystemMetrics
from rlhf.tracking import RunLogger, process_tags

from .keys import short_key
from .locking import ProcessFileLockManager
from .records import RUN_ID_FILE, stage_dir, write_record


def _key_from_parameters(_context, parameters: dict) -> str:
    return parameters["key"]


def _transient(_task, _task_run, state) -> bool:
    """Retry only I/O and connection errors (a tracking server hiccup), never config or math errors."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__name__ in {
        "MlflowException",
        "RestException",
    }


def stage_options(root: Path, refresh: bool, retries: int = 2) -> dict:
    """Task options for a cached stage (``task.with_options(**stage_options(...))``)."""
    policy = CacheKeyFnPolicy(cache_key_fn=_key_from_parameters).configure(
        isolation_level="SERIALIZABLE",
        lock_manager=ProcessFileLockManager(lock_files_directory=root / "locks"),
    )
    return dict(
        cache_policy=policy,
        persist_result=True,
        result_storage=root / "prefect-results",
        refresh_cache=refresh,
        retries=retries,
        retry_delay_seconds=5,
        retry_condition_fn=_transient,
    )


@dataclass
class Lineage:
    """What a stage run reads and makes, for MLflow: the dataset splits it reads (with their context), the
    upstream stages whose models it starts from, and how to log its own final model."""

    datasets: dict | None  # the data stage's fingerprints (its record's "datasets"); None: the stage makes them (data)
    contexts: dict  # split -> training | evaluation
    parents: dict = field(default_factory=dict)  # role (sft, reward, policy) -> upstream record
    model_task: str | None = None  # GENERATION or SCORING: log the final model with that pipeline task
    registered_as: str | None = None  # the tracking field naming its registry entry (policy_model_name, ...)

    def parent_models(self) -> dict[str, str]:
        return {role: rec["model_uri"] for role, rec in self.parents.items() if rec and rec.get("model_uri")}


def _resumed_run(client: MlflowClient, out_dir: Path) -> RunLogger | None:
    """A stage that failed after a checkpoint continues in its own MLflow run, so its metrics continue at their
    steps."""
    if not (checkpoint.latest(out_dir / "ckpt") and (out_dir / RUN_ID_FILE).exists()):
        return None
    run_id = (out_dir / RUN_ID_FILE).read_text().strip()
    client.update_run(run_id, status="RUNNING")
    run = RunLogger(client, run_id)
    run.set_tags({"resumed": "true", **process_tags()})  # this process owns it now
    return run


def _track_inputs(client: MlflowClient, run: RunLogger, lineage: Lineage | None) -> None:
    if lineage is None or lineage.datasets is None:
        return
    log_datasets(client, run.run_id, lineage.datasets, lineage.contexts)
    models = [LoggedModelInput(uri.split("/", 1)[1]) for uri in lineage.parent_models().values()]
    if models:
        client.log_inputs(run.run_id, models=models)


def _track_outputs(
    client: MlflowClient,
    run: RunLogger,
    stage: str,
    key: str,
    env: dict,
    out_dir: Path,
    lineage: Lineage | None,
    result: dict,
) -> dict:
    """Upload what the stage made: the datasets it wrote, its final model as an MLflow model (registered
    where configured), its figures and, with tracking.log_checkpoints, its resumable checkpoints. Returns
    the model's ids."""
    tracking = from_dict(TrackingConfig, env["tracking"])
    logged: dict = {}
    if lineage and lineage.datasets is None and "datasets" in result:
        log_datasets(client, run.run_id, result["datasets"], lineage.contexts)
    if lineage and lineage.model_task and tracking.log_models and (out_dir / FINAL_DIR / "config.json").exists():
        registered = getattr(tracking, lineage.registered_as) if lineage.registered_as else None
        version_tags = {
            "pipeline_run_id": env["parent_run_id"],
            "pipeline_run_name": env.get("run_name", ""),
            "stage": stage,
            "cache_key": key,
            "stage_run_id": run.run_id,
            **{f"parent.{k}": v for k, v in lineage.parent_models().items()},
        }
        logged = log_final_model(
            client,
            env["experiment_id"],
            run.run_id,
            env["parent_run_id"],
            out_dir / FINAL_DIR,
            stage,
            lineage.model_task,
            registered,
            version_tags,
        )
    if tracking.log_checkpoints:
        for ckpt in checkpoint.complete_checkpoints(out_dir / CKPT_DIR):
            run.log_artifacts(ckpt, f"checkpoints/{ckpt.name}")
    if (out_dir / "figures").exists():
        run.log_artifacts(out_dir / "figures", "figures")
    return logged


def run_stage(
    stage: str,
    key: str,
    env: dict,
    fresh: bool,
    body: Callable[[StageContext], dict],
    seed: int = 0,
    lineage: Lineage | None = None,
) -> dict:
    """Run ``body`` inside a nested MLflow run; return the stage's record (paths, run id, key, metrics).

    ``env``: root, tracking_uri, experiment_id, parent_run_id, run_name, runtime, tracking. ``fresh``:
    ignore checkpoints. With ``runtime.num_processes > 1`` a training stage's body runs under
    ``accelerate launch``. Training stages record system metrics while they run, and stop on SIGTERM / SIGINT
    after their step, checkpointed (:mod:`rlhf.preemption`).
    """
    client = MlflowClient(env["tracking_uri"])
    out_dir = stage_dir(env["root"], stage, key)
    run = (None if fresh else _resumed_run(client, out_dir)) or _new_run(client, env, stage, key, out_dir)
    rt, tracking = from_dict(RuntimeConfig, env["runtime"]), from_dict(TrackingConfig, env["tracking"])
    training = stage_kind(stage) in training_stages()  # an ensemble's reward.2 trains as reward does
    monitor = (
        StageSystemMetrics(run.run_id, env["tracking_uri"], tracking.system_metrics_interval_s)
        if training and tracking.system_metrics
        else contextlib.nullcontext()
    )
    signals = StopSignals()
    try:
        _track_inputs(client, run, lineage)
        device = runtime.setup(rt, seed)
        started = time.perf_counter()
        with monitor, PeakMemory(device.type) as memory, signals if training else contextlib.nullcontext():
            result = _run_body(body, run, out_dir, rt, seed, env, device, fresh, training, signals)
        compute_s = time.perf_counter() - started  # the stage's own work; the rest of this function is tracking
        run.log_metrics({f"{stage}/compute_s": compute_s, f"{stage}/peak_memory_mb": memory.peak_mb}, step=0)
        run.flush()
        result = {**result, **_track_outputs(client, run, stage, key, env, out_dir, lineage, result)}
    except Preempted as stopped:
        run.set_tags({"rlhf.stopped": str(stopped)})
        run.finish("KILLED")
        raise
    except BaseException:
        run.finish("FAILED")
        raise
    run.finish()
    if signals.signum is not None:  # asked to stop once training had ended: the stage is done, the pipeline stops
        stop_after(stage, signals.signum)
    record = {
        "stage": stage,
        "cache_key": key,
        "run_id": run.run_id,
        "out_dir": str(out_dir),
        "compute_s": compute_s,
        "peak_memory_mb": memory.peak_mb,
        **result,
    }
    write_record(out_dir, record)
    return record


def _new_run(client: MlflowClient, env: dict, stage: str, key: str, out_dir: Path) -> RunLogger:
    """The stage's MLflow run, nested under the pipeline's, its id kept in the stage folder (a resume continues it)."""
    tags = {"stage": stage, "cache_key": key}
    run = RunLogger.create(client, env["experiment_id"], f"{stage}-{short_key(key)}", tags, env["parent_run_id"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RUN_ID_FILE).write_text(run.run_id)
    return run


def _run_body(
    body,
    run: RunLogger,
    out_dir: Path,
    rt: RuntimeConfig,
    seed: int,
    env: dict,
    device,
    fresh: bool,
    training: bool,
    signals: StopSignals,
) -> dict:
    """The stage's body here, or in ``runtime.num_processes`` processes under ``accelerate launch``."""
    if (rt.num_processes > 1 or rt.num_machines > 1) and training:
        run.set_tags({"num_processes": rt.num_processes * rt.num_machines, "strategy": rt.strategy})
        if fresh:
            shutil.rmtree(out_dir / CKPT_DIR, ignore_errors=True)
        return run_data_parallel(body, out_dir, rt, seed, env["tracking_uri"], run.run_id, signals)
    progress = ProgressSettings(rt.progress, rt.progress_every_s)
    sharding = Sharding.of(rt)  # one process: whole models; fsdp: sharded checkpoints (resumable on N processes)
    return body(
        StageContext(out_dir, run, device, fresh, compile=rt.compile, progress_settings=progress, sharding=sharding)
    )
