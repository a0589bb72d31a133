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
import os
import time

from benchmarks.throughput import (
    OURS_COMPILED,
    add_pipeline_arguments,
    git_commit,
    pipeline_workspace,
    run_child,
    run_child_device,
    summarize,
    timed_rounds,
    write_results,
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
        cells = [
            name,
            f"{r['update_s']:.3f}",
            f"{r['step_s']:.3f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['first_step_s']:.1f}",
            f"{r['wall_s']:.1f}",
            f"**{eager['update_s'] / r['update_s']:.2f}x**",
            f"**{eager['step_s'] / r['step_s']:.2f}x**",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def first_step_too(run: dict) -> dict:
    """A run's summary with its first iteration's seconds, which pay the compilation."""
    return {**summarize(run), "first_step_s": run["first_step_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--steps", type=int, default=30, help="PPO iterations per run (the first compiles)")
    ap.add_argument(
        "--repeats", type=int, default=2, help="rounds, alternating the order; the fastest run of each counts"
    )
    add_pipeline_arguments(ap, "its finished upstream is re-used")
    args = ap.parse_args()
    import importlib.metadata as md

    from flows.compose import load_config

    root, overrides, env = pipeline_workspace(args.root, "rlhf-bench-compile-", args.overrides)
    print("upstream stages ...", flush=True)
    run_child("pipeline", {"overrides": overrides}, env)
    ppo_cfg = load_config(["algo=ppo", *overrides])["algo"]

    spec = {"overrides": overrides, "ppo": ppo_cfg, "steps": args.steps}
    runs = timed_rounds("ppo", dict.fromkeys(IMPLS, "ppo"), spec, args.repeats, env, root, post=first_step_too)
    report = {
        "command": " ".join(["python -m benchmarks.compile", *os.sys.argv[1:]]),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "device": run_child_device(env),
        "torch": md.version("torch"),
        "steps": args.steps,
        "repeats": args.repeats,
        "runs": {impl: result for impl, (result, _) in runs.items()},
    }
    tag = "cuda" if "cpu" not in report["device"] else "cpu"
    write_results(f"compile_{tag}", report, markdown)


if __name__ == "__main__":
    main()
