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
import time
from collections.abc import Callable
from pathlib import Path

import cloudpickle
import torch
from torch.distributed.elastic.multiprocessing.errors import record

from . import checkpoint
from .config import RuntimeConfig
from .preemption import Preempted, StopSignals, die_with_parent, kill_tree

LAUNCH_DIR, RESULT_FILE, STOP_FILE, SPEC_FILE = "launch", "result.json", "STOP", "spec.pkl"
RDZV_WAIT_S = 1800  # seconds a machine waits in the rendezvous for the others (machine 0 may be finishing a stage)
RUNNING_POLL_S = 10.0  # how often a joining machine asks whether machine 0's run is still on, while it waits
LAUNCH_ID_ENV = "RLHF_LAUNCH_ID"  # set on machine 0 (a stage pod: its flow run's id), written into the spec


class StageLaunchError(RuntimeError):
    """A data-parallel stage's processes failed; the message carries the tail of their log."""


def _main_sink(spec: dict):
    """The main process's metric sink: the stage's MLflow run (MLflow is imported here, by it alone: seconds saved
    at every other process's start)."""
    from mlflow.tracking import MlflowClient

    from .tracking import RunLogger

    return RunLogger(MlflowClient(spec["tracking_uri"]), spec["run_id"])


class _NoSink:
    """The metric sink of every process but the main one: the main process logs the processes' means."""

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def flush(self) -> None:
        pass


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch_env(runtime: RuntimeConfig) -> dict:
    """The launched processes' environment: this one, with the project importable."""
    project = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([project, os.environ.get("PYTHONPATH", "")])}
    if runtime.strategy == "fsdp":
        # glibc serves large blocks from its heap and keeps them when freed; FSDP frees and allocates whole blocks'
        # weights every step, so a CPU process's memory grew to the heap's high-water mark (above DDP's) instead of
        # what it holds. Blocks from mmap go back when freed (at some speed: DDP, whose tensors live on, keeps glibc's
        # default)
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    return env


def rendezvous_endpoint(runtime: RuntimeConfig) -> str:
    """Where machine 0 hosts the rendezvous: ``runtime.rdzv_endpoint``; ``auto``: this machine's address (as its
    host name resolves: a pod's IP) and a free port; empty on one machine: a free local port."""
    if runtime.rdzv_endpoint != "auto":
        return runtime.rdzv_endpoint or f"127.0.0.1:{_free_port()}"
    host = socket.gethostbyname(socket.gethostname())
    if runtime.num_machines > 1 and host.startswith("127."):
        raise StageLaunchError(
            f"runtime.rdzv_endpoint=auto: this machine's name ({socket.gethostname()}) resolves to {host}, which the "
            f"other machines cannot reach. Fix: pass runtime.rdzv_endpoint=<address of machine 0>:<port>."
        )
    return f"{host}:{_free_port('0.0.0.0')}"


def launch_command(runtime: RuntimeConfig, spec: Path, endpoint: str) -> list[str]:
    """torchrun on this machine: ``runtime.num_processes`` processes (one per device), joined through the c10d
    rendezvous at ``endpoint`` with those of the other ``runtime.num_machines - 1`` machines; the rendezvous id is
    the stage folder's, the same on every machine. The rendezvous numbers the processes (global rank 0, which logs
    and writes the result, may be on any machine: every machine reaches the tracking server and the shared stage
    folder)."""
    # machine 0 hosts the rendezvous store (no guessing from DNS); the others wait for it as long as a stop may take
    wait = int(runtime.stop_grace_s + RDZV_WAIT_S)
    conf = f"is_host={int(runtime.node_rank == 0)},join_timeout={wait},read_timeout={wait}"
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={runtime.num_machines}",
        f"--nproc-per-node={runtime.num_processes}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-conf={conf}",
        f"--rdzv-id={spec.parent.parent.name}",
        "--max-restarts=0",
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
    spec = folder / SPEC_FILE
    launch = {"out_dir": str(out_dir), "runtime": runtime, "seed": seed, "tracking_uri": tracking_uri, "run_id": run_id}
    launch["rdzv_endpoint"] = rendezvous_endpoint(runtime)  # the other machines read it from the spec
    launch["launch_id"] = os.environ.get(LAUNCH_ID_ENV, "")  # and join only this launch's
    checkpoint.atomic_write_bytes(spec, cloudpickle.dumps({"body": body, **launch}))
    log = folder / "log.txt"
    env = {
        **launch_env(runtime),
        # torch elastic kills its processes this long after its own stop: give them the step and the checkpoint
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(int(runtime.stop_grace_s)),
    }
    with log.open("w") as out:
        # a session of its own: the launcher never sees the stop signal; its processes read the stop file
        cmd = launch_command(runtime, spec, launch["rdzv_endpoint"])
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=die_with_parent
        )
        signals.on_first = lambda signum: stop_file.write_text(str(signum))
        signals.on_second = lambda _signum: kill_tree(proc.pid)
        if signals.signum is not None:  # asked before the processes started: they stop after their first step
            signals.on_first(signals.signum)
        try:
            rc = proc.wait()
        finally:  # other machines join a launch through its spec: none joins one that has ended
            spec.unlink(missing_ok=True)
    outcome = json.loads(result.read_text()) if result.exists() else None
    if outcome and "preempted" in outcome:  # the processes stopped on a signal, their last step checkpointed
        raise Preempted(**outcome["preempted"])
    if rc or outcome is None:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise StageLaunchError(
            f"the stage's {runtime.num_processes} processes failed (exit {rc}); the end of {log}:\n{tail}"
        )
    return outcome


def join_launch(
    out_dir: Path,
    runtime: RuntimeConfig,
    wait_s: float = 3600.0,
    launch_id: str | None = None,
    running: Callable[[], bool] | None = None,
) -> None:
    """Machine ``runtime.node_rank`` (> 0)'s part of a stage that machine 0 launches: wait for the stage's spec in
    the shared stage folder (machine 0 writes it when the stage starts, with the rendezvous it hosts), then run this
    machine's processes of the launch; return when they end. Its log: ``<out_dir>/launch/log-node<rank>.txt``.

    ``launch_id``: join only the spec of that launch (machine 0's ``RLHF_LAUNCH_ID``), not one a killed machine 0
    left behind; ``running``: asked every few seconds while waiting, False when machine 0's run has ended without
    launching (this machine then gives up instead of waiting ``wait_s``)."""
    folder = Path(out_dir) / LAUNCH_DIR
    spec = folder / SPEC_FILE
    launch = _wait_for_spec(spec, runtime.node_rank, wait_s, launch_id, running)
    log = folder / f"log-node{runtime.node_rank}.txt"
    with log.open("w") as out:
        cmd = launch_command(runtime, spec, launch["rdzv_endpoint"])
        rc = subprocess.run(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=launch_env(runtime), preexec_fn=die_with_parent
        )
    rc = rc.returncode
    if rc:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise StageLaunchError(f"machine {runtime.node_rank}'s processes failed (exit {rc}); the end of {log}:\n{tail}")


def _wait_for_spec(
    spec: Path, node_rank: int, wait_s: float, launch_id: str | None, running: Callable[[], bool] | None
) -> dict:
    """The launch machine 0 wrote to ``spec`` (of ``launch_id`` where given), once it is there."""
    deadline, seen, asked = time.monotonic() + wait_s, None, time.monotonic()
    while True:
        stamp = spec.stat().st_mtime_ns if spec.exists() else None
        if stamp is not None and stamp != seen:
            seen, launch = stamp, cloudpickle.loads(spec.read_bytes())
            if launch_id is None or launch.get("launch_id") == launch_id:
                return launch
        if running is not None and time.monotonic() - asked > RUNNING_POLL_S:
            asked = time.monotonic()
            if not running():
                raise StageLaunchError(
                    f"machine {node_rank}: machine 0's run of the stage ended before it launched {spec}. Fix: read "
                    f"machine 0's log (the stage's flow run); re-running the pipeline starts the stage again."
                )
        if time.monotonic() > deadline:
            raise StageLaunchError(
                f"machine {node_rank} waited {wait_s:.0f} s for {spec}, which machine 0 writes when it starts "
                f"the stage. Fix: give every machine the same paths.root on a shared volume, and start machine 0."
            )
        time.sleep(0.5)


@record  # a failing process's traceback reaches the launcher's summary, the end of the log
def main(spec_path: str) -> None:
    """One launched process: rank, device and gloo/NCCL group from accelerate; then the stage body."""
    from . import runtime
    from .context import StageContext
    from .progress import ProgressSettings
    from .sharding import Sharding

    die_with_parent()  # the launcher's death (with the pipeline's) takes this process too
    spec = cloudpickle.loads(Path(spec_path).read_bytes())
    rt: RuntimeConfig = spec["runtime"]
    wanted = runtime.setup(rt, spec["seed"], processes=rt.num_processes)
    if rt.strategy == "fsdp" and rt.fsdp.cpu_offload and wanted.type == "cuda":
        # offloaded shards and their gradients are CPU tensors: their collectives (the gradient norm) need gloo
        torch.distributed.init_process_group("cuda:nccl,cpu:gloo")
    accelerator = runtime.accelerator(wanted)
    runtime.seed_all(
        spec["seed"] + accelerator.process_index
    )  # each process its own random stream (resumed per process too)
    device = accelerator.device if wanted.type == "cuda" else torch.device("cpu")  # cuda:<local rank> on GPUs
    if wanted.type == "cuda":
        torch.cuda.set_device(device)
    main_process = accelerator.is_main_process
    sink = _main_sink(spec) if main_process else _NoSink()
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
