"""System metrics (CPU, memory, GPU where present) of a training stage's MLflow run.

MLflow's monitor samples every ``interval_s`` in a thread and logs the means under ``system/...`` (the
UI's System metrics charts). A stage shorter than one interval would log nothing: on finish, what was
sampled since the last publish is logged too.
"""

from __future__ import annotations

from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor


class StageSystemMetrics(SystemMetricsMonitor):
    def __init__(self, run_id: str, tracking_uri: str, interval_s: float) -> None:
        super().__init__(run_id, sampling_interval=interval_s, samples_before_logging=1, resume_logging=True, tracking_uri=tracking_uri)

    def __enter__(self) -> "StageSystemMetrics":
        self.collect_metrics()  # a first sample at once: every stage has at least one point
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._process is None:
            return
        self._shutdown_event.set()
        self._process.join()
        self._process = None
        pending = self.aggregate_metrics()
        if pending:
            self.publish_metrics(pending)
        self.mlflow_logger.flush()
