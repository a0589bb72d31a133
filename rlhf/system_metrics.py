"""System metrics (CPU, memory, GPU where present) of a training stage's MLflow run, and its peak memory.

MLflow's monitor samples every ``interval_s`` in a thread and logs the means under ``system/...`` (the
UI's System metrics charts). A stage shorter than one interval would log nothing: on finish, what was
sampled since the last publish is logged too.
"""

from __future__ import annotations

import threading

import psutil
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor


class StageSystemMetrics(SystemMetricsMonitor):
    def __init__(self, run_id: str, tracking_uri: str, interval_s: float) -> None:
        super().__init__(
            run_id,
            sampling_interval=interval_s,
            samples_before_logging=1,
            resume_logging=True,
            tracking_uri=tracking_uri,
        )

    def __enter__(self) -> StageSystemMetrics:
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


class PeakMemory:
    """The peak memory of a stage, for a metric of its run: CUDA's max allocated bytes on a GPU (reset at
    the start), else the largest resident set of this process and its children (a data-parallel launch),
    sampled every ``interval_s`` in a thread."""

    def __init__(self, device_type: str, interval_s: float = 0.05) -> None:
        self.cuda = device_type == "cuda"
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _rss(self) -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:  # it ended between the listing and the read
                pass
        return total

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._rss())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True, name="PeakMemory")
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            import torch

            self.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self._rss())

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20
