"""Concurrent runs share one training per stage; a killed run resumes from its last checkpoint; Optuna sweeps."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

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


def env_for(home: Path) -> dict:
    env = {**os.environ, "PREFECT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def runs_of(root: Path, query: str):
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    return client, client.search_runs([client.get_experiment_by_name("rlhf").experiment_id], query, max_results=1000)


def prepare_store(root: Path) -> None:
    """Create the store and the experiment before fanning out (concurrent SQLite migrations race)."""
    from rlhf.tracking import experiment_id

    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root}/mlflow.db"
    experiment_id(MlflowClient(uri), "rlhf", root, uri)


def test_two_concurrent_runs_train_each_stage_once(tmp_path):
    root = tmp_path / "root"
    prepare_store(root)
    procs = [
        subprocess.Popen(
            pipeline_cmd(root, "experiment=micro"),
            cwd=PROJECT,
            env=env_for(tmp_path / f"home{i}"),
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


def running_until_a_ppo_checkpoint(cmd: list[str], env: dict, root: Path, wait_s: float = 600) -> subprocess.Popen:
    """The pipeline started in a process group of its own (a kill takes the run and its ephemeral Prefect server,
    as a lost machine would), returned once PPO has written a checkpoint and is still running."""
    proc = subprocess.Popen(
        cmd, cwd=PROJECT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and proc.poll() is None:
        if list(root.glob("stages/ppo/*/ckpt/step-*/COMPLETE")):
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before a PPO checkpoint could be interrupted"
    return proc


def test_kill_9_mid_ppo_then_rerun_resumes_to_exactly_the_configured_steps(tmp_path):
    root, steps = tmp_path / "root", 30
    cmd = pipeline_cmd(
        root, "experiment=micro_ppo", f"algo.steps={steps}", "algo.checkpoint_every=2", "algo.eval_every=100"
    )
    env = env_for(tmp_path / "home")
    proc = running_until_a_ppo_checkpoint(cmd, env, root)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(int(p.parent.name.split("-")[1]) for p in root.glob("stages/ppo/*/ckpt/step-*/COMPLETE"))

    out = subprocess.run(cmd, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client, parents = runs_of(root, "tags.pipeline = 'rlhf' and attributes.status = 'FINISHED'")
    assert len(parents) == 1
    _, killed = runs_of(root, "tags.pipeline = 'rlhf' and attributes.status != 'FINISHED'")
    assert len(killed) == 1 and killed[0].info.status == "KILLED"  # no phantom RUNNING parent beside the new one
    assert killed[0].data.tags["rlhf.taken_over_by"] == parents[0].info.run_id
    _, running = runs_of(root, "attributes.status = 'RUNNING'")
    assert not running
    tags = parents[0].data.tags
    assert all(tags[f"stage.{s}.cached"] == "true" for s in ("data", "sft", "reward"))
    ppo_run = client.get_run(tags["stage.ppo.run_id"])
    assert ppo_run.data.tags.get("resumed") == "true" and ppo_run.info.status == "FINISHED"
    kl = client.get_metric_history(ppo_run.info.run_id, "ppo/kl")
    steps_logged = [m.step for m in kl]
    assert max(steps_logged) == steps and steps_logged.count(1) == 1  # continued, not restarted from step 0
    updates_per_step = 2 * (16 // 8)  # micro_ppo: ppo_epochs x rollouts / minibatch
    final = sorted(root.glob("stages/ppo/*/ckpt/step-*/COMPLETE"))[-1]
    assert int(final.parent.name.split("-")[1]) == steps * updates_per_step > killed_at


def test_sigterm_mid_ppo_checkpoints_the_step_exits_and_the_rerun_loses_no_step(tmp_path):
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
    env = env_for(tmp_path / "home")
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


def test_optuna_search_runs_trials_as_mlflow_runs(tmp_path):
    root = tmp_path / "root"
    cmd = pipeline_cmd(root, "hparams_search=ppo_optuna", "experiment=micro_ppo", "hydra.sweeper.n_trials=2")
    out = subprocess.run(cmd, cwd=PROJECT, env=env_for(tmp_path / "home"), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _, parents = runs_of(root, "tags.pipeline = 'rlhf'")
    assert len(parents) == 2 and all("eval/gold_reward" in p.data.metrics for p in parents)
    results = list(root.glob("hydra/multirun/*/*/optimization_results.yaml"))
    assert results and "best_value" in results[0].read_text()
