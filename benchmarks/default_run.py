"""The README's first command as a new user meets it: `make run` in a fresh clone with fresh homes, then again.

    python -m benchmarks.default_run [--keep]

Clones this repository (its HEAD) into a temporary folder, runs `make run` there with a fresh PREFECT_HOME and
no MLflow URI (so the default store under the clone's `.rlhf/`), timing it (the install included), then runs it
again (every stage Cached). Reads the held-out metrics of the pipeline's parent run from the clone's store and
writes ``benchmarks/results/default_run.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.throughput import PROJECT, write_results

SHOWN = (
    "eval/win_rate_gold",
    "eval/gold_gain",
    "eval/kl",
    "eval/rm_accuracy",
)  # with their standard errors where they have one


def markdown(report: dict) -> str:
    m = report["metrics"]
    cell = lambda k: f"{m[k]:.3f} ± {m[k + '_se']:.3f}" if k + "_se" in m else f"{m[k]:.3f}"  # noqa: E731
    return (
        "\n".join(
            [
                "# The default run: `make run` in a fresh clone\n",
                f"Measured {report['date']} at commit {report['commit']} on {report['machine']}: "
                f"`{report['command']}`.\n",
                "| | value |",
                "|---|---|",
                f"| `make run`, fresh clone and homes (install included) | {report['first_s'] / 60:.1f} min |",
                f"| the same command again (every stage Cached) | {report['cached_s']:.1f} s |",
                *(f"| `{k}` (held-out prompts, ± SE over prompts) | {cell(k)} |" for k in SHOWN),
            ]
        )
        + "\n"
    )


def timed_make_run(clone: Path, env: dict) -> tuple[float, str]:
    started = time.monotonic()
    out = subprocess.run(["make", "run"], cwd=clone, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise RuntimeError(f"make run failed in {clone}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return time.monotonic() - started, out.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keep", action="store_true", help="keep the clone (its .venv and .rlhf) instead of deleting it")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rlhf-default-run-"))
    clone = work / "rlhf-flow"
    subprocess.run(["git", "clone", "-q", str(PROJECT), str(clone)], check=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "RLHF_HOME", "VIRTUAL_ENV")
    }
    env.update(PREFECT_HOME=str(work / "prefect-home"), HF_HUB_OFFLINE="1")
    first_s, _ = timed_make_run(clone, env)
    cached_s, cached_out = timed_make_run(clone, env)
    assert "all stages cached" in cached_out, cached_out[-2000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{clone}/.rlhf/mlflow.db")
    exp = client.get_experiment_by_name("rlhf").experiment_id
    parent = client.search_runs([exp], "tags.pipeline = 'rlhf'", order_by=["attributes.start_time ASC"], max_results=1)[
        0
    ]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True
    ).stdout.strip()
    report = {
        "command": "python -m benchmarks.default_run",
        "commit": commit,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "first_s": first_s,
        "cached_s": cached_s,
        "metrics": {k: v for k, v in parent.data.metrics.items() if k.startswith("eval/")},
    }
    write_results("default_run", report, markdown)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
