"""The command line as a user runs it: fresh homes, a terminal, Cached in a new process; bad values; real data."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from .conftest import SHARED_HH, pipeline_env
from .test_flow import EVAL_METRICS, STAGES


def run_on_a_terminal(cmd: list[str], env: dict, cwd: Path, timeout: float = 600) -> tuple[int, str]:
    """Run ``cmd`` with stdout and stderr on a pseudo-terminal, as `make run` in a shell; returns (exit status,
    output)."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    import time

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows x 120 columns
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=follower, stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([leader], [], [], 1.0)[0]:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process ended
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(leader)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_cli_first_run_on_fresh_homes_then_cached_in_a_new_process(tmp_path):
    """As a new user: fresh PREFECT_HOME and MLflow store, offline, on a terminal (a bar per training stage);
    the second process, with its output redirected, finds everything Cached."""
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/store.db",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "flows.pipeline", "experiment=micro", f"paths.root={tmp_path / 'root'}"]
    cwd = Path(__file__).resolve().parents[1]
    rc, shown = run_on_a_terminal(cmd, env, cwd)
    assert rc == 0, shown[-3000:]
    for stage, steps in (
        ("sft", 6),
        ("rm", 12),
        ("dpo", 3),
    ):  # micro: 96 rows / 16 per batch (x2 epochs for sft and rm)
        assert re.search(rf"{stage}: 100%\|[^|]*\| {steps}/{steps} \[", shown), shown[
            -3000:
        ]  # tqdm's bar, drawn to the end
    assert "sft step 1/" not in shown  # a bar, not log lines, on a terminal
    started = time.monotonic()
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - started
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "all stages cached" in out.stdout and "/#/experiments/" in out.stdout
    assert (
        "Starting temporary server" not in out.stdout + out.stderr and elapsed < 20
    )  # no Prefect, no model: ~6 s here
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs(
        [client.get_experiment_by_name("rlhf").experiment_id], "tags.pipeline = 'rlhf'", order_by=["start_time ASC"]
    )
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert all(runs[1].data.tags[f"stage.{s}.cached"] == "true" for s in STAGES)
    assert EVAL_METRICS <= set(runs[1].data.metrics)


def test_cli_rejects_a_bad_value_before_any_training(tmp_path):
    cmd = [sys.executable, "-m", "flows.pipeline", "experiment=micro", f"paths.root={tmp_path}", "algo.beta=-1"]
    out = subprocess.run(
        cmd,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PREFECT_HOME": str(tmp_path / "ph")},
    )
    assert out.returncode != 0
    assert "algo.beta=-1" in out.stderr and "must be > 0" in out.stderr
    assert not (tmp_path / "stages").exists()


@pytest.mark.skipif(
    not SHARED_HH.exists(), reason="needs ../shared/data/hh-rlhf (present in CI, absent in a user's clone)"
)
def test_real_data_path_on_the_hh_rlhf_slice_exits_0_with_a_proxy_objective(tmp_path, prefect_server):
    """The hub-dataset path from the command line, offline: HH-RLHF rows through `datasets`, the tiny model,
    DPO, proxy-only eval; the objective follows the data (no gold reward) and the run ends with status 0."""
    small = [
        "experiment=hh_local_tiny",
        f"data.data_files={SHARED_HH}",
        "data.n_sft=64",
        "data.n_pref=64",
        "data.n_eval_prompts=8",
        "data.n_eval_pref=16",
        "model.n_layer=1",
        "model.n_embd=32",
        "model.n_head=2",
        "eval.n_prompts=8",
        "eval.sampling.max_new_tokens=8",
        "runtime.threads=1",
        f"paths.root={tmp_path}",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
    ]
    env = pipeline_env(tmp_path / "prefect", prefect_server)
    out = subprocess.run(
        [sys.executable, "-m", "flows.pipeline", *small],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("rlhf").experiment_id], "tags.pipeline = 'rlhf'")
    assert {"eval/proxy_reward", "eval/win_rate_proxy", "eval/kl", "eval/rm_accuracy"} <= set(run.data.metrics)
    assert "eval/gold_reward" not in run.data.metrics  # no gold reward for real data
    assert run.data.params["objective"] == "None" and "eval/proxy_reward" in out.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "flows.pipeline", *small, "objective=eval/gold_reward"],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        refused.returncode != 0
        and "needs a gold reward" in refused.stderr
        and "Fix: pass objective=eval/proxy_reward" in refused.stderr
    )
