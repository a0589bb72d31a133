"""Concurrent runs share one training per stage; a preempted run resumes at its last step; Optuna sweeps.

(kill -9 mid-stage, and the rerun that resumes from the checkpoint: tests/test_fsdp.py, under FSDP.) The pipelines
run as subprocesses reporting to the session's Prefect server; each test has a store and root of its own."""

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import pipeline_env

pytestmark = pytest.mark.slow
PROJECT = Path(__file__).resolve().parents[1]


def pipeline_cmd(root: Path, *overrides: str, multirun: bool = False) -> list[str]:
    flags = ["--multirun"] if multirun else []
    return [
        sys.executable,
        "-m",
        "flows.pipeline",
        *flags,
        f"paths.root={root}",
        f"tracking.uri=sqlite:///{root}/mlflow.db",
        *overrides,
    ]


def runs_of(root: Path, query: str):
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    return client, client.search_runs([client.get_experiment_by_name("rlhf").experiment_id], query, max_results=1000)


def prepare_store(root: Path) -> None:
    """Create the store and the experiment before fanning out (concurrent SQLite migrations race)."""
    from rlhf.tracking import experiment_id

    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root}/mlflow.db"
    experiment_id(MlflowClient(uri), "rlhf", root, uri)


def test_two_concurrent_runs_train_each_stage_once(tmp_path, prefect_server):
    root = tmp_path / "root"
    prepare_store(root)
    procs = [
        subprocess.Popen(
            pipeline_cmd(root, "experiment=micro"),
            cwd=PROJECT,
            env=pipeline_env(tmp_path / f"home{i}", prefect_server),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    assert any(re.search(r"sft step \d+/\d+ .*loss", o) for o in outs)  # stdout is no terminal: progress as log lines
    _, sft_runs = runs_of(root, "tags.stage = 'sft'")
    _, parents = runs_of(root, "tags.pipeline = 'rlhf'")
    assert len(sft_runs) == 1 and len(parents) == 2
    assert sorted(p.data.tags["stage.sft.cached"] for p in parents) == ["false", "true"]
    assert len({p.data.tags["stage.sft.run_id"] for p in parents}) == 1


def test_sigterm_mid_ppo_checkpoints_the_step_exits_and_the_rerun_loses_no_step(tmp_path, prefect_server):
    """A preemption (Kubernetes, Slurm, a spot reclaim): SIGTERM to the run's process between two checkpoints. The
    current iteration finishes, a checkpoint is written, both MLflow runs are marked KILLED with the reason, and the
    process exits within 20 s; the next run resumes at that iteration and logs every iteration once."""
    root, steps = tmp_path / "root", 12
    cmd = pipeline_cmd(
        root,
        "experiment=micro_ppo",
        f"algo.steps={steps}",
        "algo.checkpoint_every=1000",
        "algo.eval_every=1000",
        "runtime.progress=log",
        "runtime.progress_every_s=0.2",
    )
    env = pipeline_env(tmp_path / "home", prefect_server)
    proc = subprocess.Popen(
        cmd, cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines = []
    for line in proc.stdout:  # the progress log lines say where PPO is
        lines.append(line)
        if (m := re.search(rf"ppo step (\d+)/{steps}", line)) and int(m.group(1)) >= 3:
            break
    assert proc.poll() is None, "".join(lines[-30:])
    proc.send_signal(signal.SIGTERM)  # to the run's process alone, as Kubernetes signals a pod's main process
    sent = time.monotonic()
    rest, _ = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    assert proc.returncode == 128 + signal.SIGTERM, "".join(lines[-20:]) + rest[-3000:]
    assert took < 20 and "stopped by SIGTERM" in rest, (took, rest[-2000:])
    checkpoints = sorted(root.glob("stages/ppo/*/ckpt/step-*/COMPLETE"))
    assert len(checkpoints) == 1  # no periodic one was due: this is the one the signal asked for
    client, stopped = runs_of(root, "tags.stage = 'ppo'")
    assert stopped[0].info.status == "KILLED" and "stopped by SIGTERM" in stopped[0].data.tags["rlhf.stopped"]
    done = [m.step for m in client.get_metric_history(stopped[0].info.run_id, "ppo/kl")]
    assert done == list(range(1, len(done) + 1)) and len(done) >= 3
    assert int(checkpoints[0].parent.name.split("-")[1]) == len(done) * 2 * (
        16 // 8
    )  # the last iteration done, checkpointed
    _, parents = runs_of(root, "tags.pipeline = 'rlhf'")
    assert [p.info.status for p in parents] == ["KILLED"] and "SIGTERM" in parents[0].data.tags["rlhf.stopped"]

    out = subprocess.run(cmd, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ppo_run = client.get_run(stopped[0].info.run_id)
    assert ppo_run.info.status == "FINISHED" and ppo_run.data.tags.get("resumed") == "true"
    assert [m.step for m in client.get_metric_history(ppo_run.info.run_id, "ppo/kl")] == list(
        range(1, steps + 1)
    )  # each once


def test_optuna_search_runs_trials_as_mlflow_runs(tmp_path, prefect_server):
    root = tmp_path / "root"
    cmd = pipeline_cmd(root, "hparams_search=ppo_optuna", "experiment=micro_ppo", "hydra.sweeper.n_trials=2")
    out = subprocess.run(
        cmd,
        cwd=PROJECT,
        env=pipeline_env(tmp_path / "home", prefect_server),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _, parents = runs_of(root, "tags.pipeline = 'rlhf'")
    assert len(parents) == 2 and all("eval/gold_reward" in p.data.metrics for p in parents)
    results = list(root.glob("hydra/multirun/*/*/optimization_results.yaml"))
    assert results and "best_value" in results[0].read_text()
