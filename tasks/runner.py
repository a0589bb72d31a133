"""What every stage task does around the ML: its folder, its nested MLflow run, its checkpoint artifact.

``run_stage`` is the one place that turns ``rlhf.stages.<stage>.run`` into a tracked, cached step;
``stage_options`` is the one cache policy: the key computed in :mod:`tasks.keys`, results persisted
under ``paths.root``, and a file lock per key so concurrent runs never train the same stage twice.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

from mlflow.tracking import MlflowClient
from prefect.cache_policies import CacheKeyFnPolicy

from rlhf import checkpoint, runtime
from rlhf.config import RuntimeConfig, from_dict, training_stages
from rlhf.launch import run_data_parallel
from rlhf.stages.common import CKPT_DIR, FINAL_DIR, StageContext
from rlhf.tracking import RunLogger

from .locking import ProcessFileLockManager


def _key_from_parameters(_context, parameters: dict) -> str:
    return parameters["key"]


def _transient(_task, _task_run, state) -> bool:
    """Retry only I/O and connection errors (a tracking server hiccup), never config or math errors."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__name__ in {"MlflowException", "RestException"}


def stage_options(root: Path, refresh: bool, retries: int = 2) -> dict:
    """Task options for a cached stage (``task.with_options(**stage_options(...))``)."""
    policy = CacheKeyFnPolicy(cache_key_fn=_key_from_parameters).configure(
        isolation_level="SERIALIZABLE",
        lock_manager=ProcessFileLockManager(lock_files_directory=root / "locks"),
    )
    return dict(
        cache_policy=policy, persist_result=True, result_storage=root / "prefect-results", refresh_cache=refresh,
        retries=retries, retry_delay_seconds=5, retry_condition_fn=_transient,
    )


def stage_dir(root: str | Path, stage: str, key: str) -> Path:
    return Path(root) / "stages" / stage / key


RUN_ID_FILE = "mlflow_run_id"
RECORD_FILE = "record.json"


def write_record(out_dir: Path, record: dict) -> None:
    """The finished stage's record beside its outputs (written last, atomically): a stage that ran in
    another process (a work pool's flow run) hands its result back through it."""
    checkpoint.atomic_write_json(out_dir / RECORD_FILE, record)


def read_record(root: str | Path, stage: str, key: str) -> dict:
    path = stage_dir(root, stage, key) / RECORD_FILE
    if not path.exists():
        raise FileNotFoundError(f"stage {stage} finished without {path}. Fix: give the pipeline's and the stage's workers "
                                f"the same paths.root (a shared volume); it is {root} here.")
    return json.loads(path.read_text())


def _resumed_run(client: MlflowClient, out_dir: Path) -> RunLogger | None:
    """A stage that failed after a checkpoint continues in its own MLflow run, so its metrics continue at their steps."""
    if not (checkpoint.latest(out_dir / "ckpt") and (out_dir / RUN_ID_FILE).exists()):
        return None
    run_id = (out_dir / RUN_ID_FILE).read_text().strip()
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, "resumed", "true")
    return RunLogger(client, run_id)


def run_stage(stage: str, key: str, env: dict, fresh: bool, body: Callable[[StageContext], dict], seed: int = 0) -> dict:
    """Run ``body`` inside a nested MLflow run; return the stage's record (paths, run id, key, metrics).

    ``env``: root, tracking_uri, experiment_id, parent_run_id, runtime. ``fresh``: ignore checkpoints.
    With ``runtime.num_processes > 1`` a training stage's body runs under ``accelerate launch``.
    """
    client = MlflowClient(env["tracking_uri"])
    out_dir = stage_dir(env["root"], stage, key)
    run = _resumed_run(client, out_dir) if not fresh else None
    if run is None:
        run = RunLogger.create(client, env["experiment_id"], stage, {"stage": stage, "cache_key": key}, env["parent_run_id"])
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / RUN_ID_FILE).write_text(run.run_id)
    rt = from_dict(RuntimeConfig, env["runtime"])
    try:
        started = time.perf_counter()
        if rt.num_processes > 1 and stage in training_stages():
            run.set_tags({"num_processes": rt.num_processes})
            if fresh:
                shutil.rmtree(out_dir / CKPT_DIR, ignore_errors=True)
            result = run_data_parallel(body, out_dir, rt, seed, env["tracking_uri"], run.run_id)
        else:
            result = body(StageContext(out_dir, run, runtime.setup(rt, seed), fresh=fresh))
        compute_s = time.perf_counter() - started  # the stage's own work; the rest of this function is tracking
        run.log_metrics({f"{stage}/compute_s": compute_s}, step=0)
        run.flush()
        if (out_dir / FINAL_DIR / "config.json").exists():
            run.log_artifacts(out_dir / FINAL_DIR, "checkpoint")
        for ckpt in checkpoint.complete_checkpoints(out_dir / CKPT_DIR):
            run.log_artifacts(ckpt, f"checkpoints/{ckpt.name}")
        if (out_dir / "figures").exists():
            run.log_artifacts(out_dir / "figures", "figures")
    except BaseException:
        run.finish("FAILED")
        raise
    run.finish()
    record = {"stage": stage, "cache_key": key, "run_id": run.run_id, "out_dir": str(out_dir), "compute_s": compute_s, **result}
    write_record(out_dir, record)
    return record
