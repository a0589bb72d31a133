"""``runtime.compile`` measured: PPO as shipped against PPO with the update's forwards compiled (torch.compile,
inductor).

    python -m benchmarks.compile [--steps N] [--repeats R] [hydra overrides ...]

The pipeline's upstream stages (data, SFT, reward) once, then PPO with and without ``runtime.compile`` for the
same iterations, each in its own process, ``--repeats`` rounds in alternating order (the fastest run of each
counts, as in :mod:`benchmarks.throughput`, whose children it runs). Per iteration: the update's seconds (what
compiling changes) and the whole iteration's; the first iteration, which pays the compilation, is reported
on its own. Writes ``benchmarks/results/compile_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.throughput import (
    OURS_COMPILED,
    PROJECT,
    RESULTS,
    alternating_rounds,
    best_run,
    run_child,
    run_child_device,
    summarize,
)

IMPLS = {"ours": "eager (as shipped)", OURS_COMPILED: "runtime.compile=true"}


def markdown(report: dict) -> str:
    runs, eager = report["runs"], report["runs"]["ours"]
    lines = [
        "# runtime.compile: PPO's update compiled with torch.compile (inductor) against eager\n",
        f"Device: {report['device']}; torch {report['torch']}. Measured {report['date']} at commit {report['commit']}: "
        f"`{report['command']}`. {report['steps']} PPO iterations of the default settings each, the fastest of "
        f"{report['repeats']} "
        "runs in alternating order; medians over the iterations after the first.\n",
        "| | update s | iteration s | tokens/s | first iteration s (compiles) | whole run s | speed-up of the update "
        "| of an iteration |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for impl, name in IMPLS.items():
        r = runs[impl]
        lines.append(
            f"| {name} | {r['update_s']:.3f} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['first_step_s']:.1f} "
            f"| "
            f"{r['wall_s']:.1f} | **{eager['update_s'] / r['update_s']:.2f}x** | "
            f"**{eager['step_s'] / r['step_s']:.2f}x** |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="PPO iterations per run (the first compiles)")
    ap.add_argument(
        "--repeats", type=int, default=2, help="rounds, alternating the order; the fastest run of each counts"
    )
    ap.add_argument(
        "--root",
        default=None,
        help="pipeline root (default: a fresh temporary folder); its finished upstream is re-used",
    )
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the pipeline config")
    args = ap.parse_args()
    import importlib.metadata as md

    from flows.compose import load_config

    root = Path(args.root or tempfile.mkdtemp(prefix="rlhf-bench-compile-")).resolve()
    (root / "prefect-home").mkdir(exist_ok=True)
    overrides = [f"paths.root={root}", f"tracking.uri=sqlite:///{root}/mlflow.db", *args.overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_HOME": str(root / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    print("upstream stages ...", flush=True)
    run_child("pipeline", {"overrides": overrides}, env)
    ppo_cfg = load_config(["algo=ppo", *overrides])["algo"]

    def run_one(impl: str, i: int) -> dict:
        print(f"ppo: {IMPLS[impl]}, {args.steps} iterations (round {i + 1} of {args.repeats}) ...", flush=True)
        policy_dir = root / f"policy-{impl}-{i}"
        shutil.rmtree(policy_dir, ignore_errors=True)
        spec = {
            "overrides": overrides,
            "impl": impl,
            "ppo": ppo_cfg,
            "steps": args.steps,
            "policy_dir": str(policy_dir),
        }
        run = run_child("ppo", spec, env)
        return {**summarize(run), "first_step_s": run["first_step_s"]}

    runs = alternating_rounds(list(IMPLS), args.repeats, run_one)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT, capture_output=True, text=True
    ).stdout.strip()
    report = {
        "command": " ".join(["python -m benchmarks.compile", *os.sys.argv[1:]]),
        "commit": commit,
        "date": time.strftime("%Y-%m-%d"),
        "device": run_child_device(env),
        "torch": md.version("torch"),
        "steps": args.steps,
        "repeats": args.repeats,
        "runs": {
            impl: {**best_run(rs), "tokens_per_s_each": [r["tokens_per_s"] for r in rs]} for impl, rs in runs.items()
        },
    }
    tag = "cuda" if "cpu" not in report["device"] else "cpu"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"compile_{tag}.json").write_text(json.dumps(report, indent=1))
    (RESULTS / f"compile_{tag}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
