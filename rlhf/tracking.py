"""MLflow logging through ``MlflowClient`` with explicit run ids (no thread-local active runs).

Default store: SQLite at ``<paths.root>/mlflow.db`` with artifacts in ``<paths.root>/mlartifacts``;
``tracking.uri`` or the standard ``MLFLOW_TRACKING_URI`` point it at a server instead.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from .config import TrackingConfig

PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
# MLflow's UI opens an experiment without this tag in GenAI mode (traces); with it, on the runs table.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
# Which process owns a RUNNING run: a later run on this host closes the runs whose process is gone.
HOST_TAG, PID_TAG, PROCESS_START_TAG, TAKEN_OVER_TAG = (
    "rlhf.host",
    "rlhf.pid",
    "rlhf.process_start",
    "rlhf.taken_over_by",
)


class TrackingUnavailableError(ConnectionError):
    """The tracking server cannot be reached; the message names the URI, the key and the fix."""


def resolve_uri(cfg: TrackingConfig, root: Path) -> str:
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def check_reachable(uri: str, timeout_s: float) -> None:
    """Fail fast if an HTTP tracking server does not answer its health check."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=min(5.0, timeout_s)) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError) as e:
            last = e
        time.sleep(0.5)
    raise TrackingUnavailableError(
        f"MLflow tracking server {uri} did not answer {url} within {timeout_s:.0f}s ({last}). Fix: start it "
        f"(mlflow server ...), correct tracking.uri / MLFLOW_TRACKING_URI, or unset both to log to the local SQLite "
        f"store."
    )


def experiment_id(client: MlflowClient, name: str, root: Path, uri: str) -> str:
    """Get or create the experiment as a model-training experiment, so the UI opens on its runs table
    (local stores keep artifacts under ``<root>/mlartifacts``). An existing experiment without a kind is adopted."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = (Path(root).resolve() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
        try:
            return client.create_experiment(
                name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING}
            )
        except Exception:  # created by a concurrent process in between
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return exp.experiment_id


def process_tags() -> dict[str, str]:
    """This process, as tags of the runs it owns (see :func:`close_orphaned_runs`)."""
    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(os.getpid()),
        PROCESS_START_TAG: f"{psutil.Process().create_time():.2f}",
    }


def _process_alive(pid: str, started: str) -> bool:
    try:
        return f"{psutil.Process(int(pid)).create_time():.2f}" == started  # the same process, not a reused PID
    except (psutil.NoSuchProcess, ValueError):
        return False


def close_orphaned_runs(client: MlflowClient, experiment: str, taken_over_by: str) -> list[str]:
    """Mark KILLED every RUNNING run of ``experiment`` owned by a process of this host that no longer exists
    (``kill -9``, OOM, a lost session), tagged with the run that found it. Returns their ids."""
    query = f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{socket.gethostname()}'"
    closed = []
    for run in client.search_runs([experiment], query, max_results=1000):
        tags = run.data.tags
        if run.info.run_id == taken_over_by or _process_alive(tags.get(PID_TAG, ""), tags.get(PROCESS_START_TAG, "")):
            continue
        client.set_tag(run.info.run_id, TAKEN_OVER_TAG, taken_over_by)
        client.set_terminated(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
    return closed


class RunLogger:
    """Logs to one MLflow run. Metrics are buffered and sent with ``log_batch`` (cheap per point) every
    ``flush_every`` points or ``flush_seconds``, whichever comes first, so a killed process loses at most
    the last few seconds of metrics (and none before its last checkpoint: the trainer flushes there)."""

    def __init__(self, client: MlflowClient, run_id: str, flush_every: int = 200, flush_seconds: float = 5.0) -> None:
        self.client, self.run_id, self.flush_every, self.flush_seconds = client, run_id, flush_every, flush_seconds
        self._buffer: list[Metric] = []
        self._last_flush = time.monotonic()

    @classmethod
    def create(
        cls, client: MlflowClient, experiment: str, name: str, tags: dict[str, str], parent_run_id: str | None = None
    ) -> RunLogger:
        all_tags = {RUN_NAME_TAG: name, **process_tags(), **tags}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        run = client.create_run(experiment, tags=all_tags, run_name=name)
        return cls(client, run.info.run_id)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), ts, int(step)) for k, v in metrics.items())
        if len(self._buffer) >= self.flush_every or time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k[:250], str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, local_dir: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_table(self, data: dict[str, list], artifact_file: str) -> None:
        self.client.log_table(self.run_id, data=data, artifact_file=artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status)
