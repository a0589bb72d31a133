"""Data-parallel stages: run a stage body under ``accelerate launch``, one process per device.

:func:`run_data_parallel` (the caller's side) pickles the stage's body, starts
``accelerate launch --multi_gpu --num_processes N -m rlhf.launch <spec>`` and waits; every launched
process (``python -m rlhf.launch``, :func:`main`) builds its :class:`StageContext` around accelerate's
:class:`~accelerate.Accelerator` and runs the body. The main process logs to the stage's MLflow run and
writes the checkpoints and the result; the caller keeps the run's start, artifacts and end. On CPU the
processes talk over gloo, on GPUs over NCCL: all of it is accelerate's and torch.distributed's.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cloudpickle
import torch
from torch.distributed.elastic.multiprocessing.errors import record

from .config import RuntimeConfig
from .preemption import Preempted, StopSignals, kill_tree

LAUNCH_DIR, RESULT_FILE, STOP_FILE = "launch", "result.json", "STOP"


class StageLaunchError(RuntimeError):
    """A data-parallel stage's processes failed; the message carries the tail of their log."""


class _NoSink:
    """The metric sink of every process but the main one: the main process logs the processes' means."""

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def flush(self) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(num_processes: int, spec: Path) -> list[str]:
    """``accelerate launch`` for one machine: torch.distributed's launcher, one process per device."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--main_process_port",
        str(_free_port()),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "rlhf.launch",
        str(spec),
    ]


def run_data_parallel(
    body: Callable,
    out_dir: Path,
    runtime: RuntimeConfig,
    seed: int,
    tracking_uri: str,
    run_id: str,
    signals: StopSignals | None = None,
) -> dict:
    """Run ``body(ctx)`` in ``runtime.num_processes`` processes; return the main process's result.

    The processes' output goes to ``<out_dir>/launch/log.txt``; a failure raises with its tail. ``signals``: the
    caller's stop signals; the first is passed on to the processes through a stop file (every process stops after
    the same step and checkpoints), a second kills them all with this process (none: nobody stops them).
    """
    signals = signals or StopSignals()
    folder = Path(out_dir) / LAUNCH_DIR
    folder.mkdir(parents=True, exist_ok=True)
    result, stop_file = folder / RESULT_FILE, folder / STOP_FILE
    result.unlink(missing_ok=True)
    stop_file.unlink(missing_ok=True)
    spec = folder / "spec.pkl"
    spec.write_bytes(
        cloudpickle.dumps(
            {
                "body": body,
                "out_dir": str(out_dir),
                "runtime": runtime,
                "seed": seed,
                "tracking_uri": tracking_uri,
                "run_id": run_id,
            }
        )
    )
    log = folder / "log.txt"
    project = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([project, os.environ.get("PYTHONPATH", "")]),
        # torch elastic kills its processes this long after its own stop: give them the step and the checkpoint
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(int(runtime.stop_grace_s)),
    }
    with log.open("w") as out:
        # a session of its own: the launcher never sees the stop signal; its processes read the stop file
        cmd = launch_command(runtime.num_processes, spec)
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        signals.on_first = lambda signum: stop_file.write_text(str(signum))
        signals.on_second = lambda _signum: kill_tree(proc.pid)
        if signals.signum is not None:  # asked before the processes started: they stop after their first step
            signals.on_first(signals.signum)
        rc = proc.wait()
    outcome = json.loads(result.read_text()) if result.exists() else None
    if outcome and "preempted" in outcome:  # the processes stopped on a signal, their last step checkpointed
        raise Preempted(**outcome["preempted"])
    if rc or outcome is None:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise StageLaunchError(
            f"the stage's {runtime.num_processes} processes failed (exit {rc}); the end of {log}:\n{tail}"
        )
    return outcome


@record  # a failing process's traceback reaches the launcher's summary, the end of the log
def main(spec_path: str) -> None:
    """One launched process: rank, device and gloo/NCCL group from accelerate; then the stage body."""
    from mlflow.tracking import MlflowClient

    from . import checkpoint, runtime
    from .context import StageContext
    from .progress import ProgressSettings
    from .sharding import Sharding
    from .tracking import RunLogger

    spec = cloudpickle.loads(Path(spec_path).read_bytes())
    rt: RuntimeConfig = spec["runtime"]
    wanted = runtime.setup(rt, spec["seed"], processes=rt.num_processes)
    accelerator = runtime.accelerator(wanted)
    runtime.seed_all(
        spec["seed"] + accelerator.process_index
    )  # each process its own random stream (resumed per process too)
    device = accelerator.device if wanted.type == "cuda" else torch.device("cpu")  # cuda:<local rank> on GPUs
    if wanted.type == "cuda":
        torch.cuda.set_device(device)
    main_process = accelerator.is_main_process
    sink = RunLogger(MlflowClient(spec["tracking_uri"]), spec["run_id"]) if main_process else _NoSink()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )  # progress lines into the launch log
    ctx = StageContext(
        Path(spec["out_dir"]),
        sink,
        device,
        accelerator=accelerator,
        progress_settings=ProgressSettings(rt.progress, rt.progress_every_s),
        compile=rt.compile,
        sharding=Sharding.of(rt),
    )
    try:
        # asked through the stop file; a signal that reaches this process directly asks the same, however often
        with StopSignals(once=True, stop_file=Path(spec_path).with_name(STOP_FILE)):
            result = spec["body"](ctx)
    except Preempted as stopped:
        result = {"preempted": {"stage": stopped.stage, "signum": stopped.signum, "at": stopped.at}}
    sink.flush()
    if main_process:
        checkpoint.atomic_write_json(Path(spec_path).with_name(RESULT_FILE), result)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
