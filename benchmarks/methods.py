"""The methods table: DPO, PPO, RLOO, GRPO and best-of-n on the same data, ranked on held-out gold reward.

    python -m benchmarks.methods [--seeds 3] [--root DIR] [hydra overrides ...]

1. One Hydra multirun over the methods and seeds (``-m algo=dpo,ppo,rloo,grpo,best_of_n algo.seed=0,1,2``):
   data, SFT and the reward model are trained once and Cached for every member; the sweep is one MLflow
   row with the members nested under it, its summary (members table, KL curves, Gao et al.'s fitted
   forms) on that row.
2. A second multirun of best-of-n over n in {1, 2, 4, 8, 16} (nothing to train): Gao et al.'s best-of-n
   form R(d) = d (alpha - beta d), d = sqrt(log n - (n - 1) / n), fitted on n <= 8 and checked at n = 16.
3. ``benchmarks/results/methods.{md,json}`` and ``methods_frontier.png``: per method, the held-out gold
   reward gain over SFT and the win rate (mean over seeds, with the standard error over seeds and the
   mean within-run standard error), KL to SFT, proxy gain, answer length, wall time of the policy stage
   and tokens trained; the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
RESULTS = PROJECT / "benchmarks" / "results"
METHODS = ("dpo", "ppo", "rloo", "grpo", "best_of_n")
BON_FIT, BON_CHECK = (1, 2, 4, 8), 16


def multirun(root: Path, overrides: list[str], env: dict) -> str:
    """Run one Hydra multirun; return its sweep id."""
    cmd = [sys.executable, "-m", "flows.pipeline", "-m", f"paths.root={root}", *overrides]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=PROJECT, env=env, check=True)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("rlhf")
    newest = client.search_runs(
        [exp.experiment_id], "tags.`rlhf.sweep` = 'true'", order_by=["attributes.start_time DESC"], max_results=1
    )
    return newest[0].data.tags["sweep_id"]


def members(root: Path, sweep_id: str) -> list:
    from mlflow.tracking import MlflowClient

    from rlhf.reports import sweep_members

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    return client, sweep_members(client, client.get_experiment_by_name("rlhf").experiment_id, sweep_id)


def summarise(values: list[float]) -> tuple[float, float]:
    """Mean and standard error over seeds."""
    return statistics.fmean(values), (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def method_rows(client, runs) -> list[dict]:
    rows = []
    for method in METHODS:
        mine = [r for r in runs if r.data.tags.get("algo") == method]
        if not mine:
            continue
        m = lambda key: [r.data.metrics[key] for r in mine if key in r.data.metrics]  # noqa: E731
        row = {"method": method, "seeds": len(mine)}
        for key in (
            "eval/gold_gain",
            "eval/win_rate_gold",
            "eval/gold_reward",
            "eval/kl",
            "eval/proxy_gain",
            "eval/response_length",
        ):
            row[key], row[f"{key} (se over seeds)"] = summarise(m(key))
        for key in ("eval/gold_gain_se", "eval/win_rate_gold_se"):
            row[f"{key} (mean within run)"] = statistics.fmean(m(key))
        stage_runs = [client.get_run(r.data.tags[f"stage.{method}.run_id"]) for r in mine]
        row["policy stage wall s"] = statistics.fmean(
            s.data.metrics.get(f"{method}/compute_s", 0.0) for s in stage_runs
        )
        row["tokens trained"] = statistics.fmean(
            s.data.metrics.get(f"{method}/tokens_trained", 0.0) for s in stage_runs
        )
        rows.append(row)
    return rows


def best_of_n_check(runs) -> dict:
    """Fit R(d) = d (alpha - beta d) on n in BON_FIT (gold gain vs the analytic sqrt(KL)), predict n = BON_CHECK."""
    from rlhf import frontier

    by_n = {int(r.data.metrics["eval/best_of_n"]): r.data.metrics for r in runs if "eval/best_of_n" in r.data.metrics}
    d = frontier.distance([by_n[n]["eval/kl_analytic"] for n in BON_FIT])
    fit = frontier.fit("bon", d, [by_n[n]["eval/gold_gain"] for n in BON_FIT])
    check = by_n[BON_CHECK]
    predicted = float(fit.predict(math.sqrt(check["eval/kl_analytic"]))[0])
    return {
        "alpha": fit.alpha,
        "beta": fit.beta,
        "r2": fit.r2,
        "n": BON_CHECK,
        "predicted_gold_gain": predicted,
        "measured_gold_gain": check["eval/gold_gain"],
        "se": check["eval/gold_gain_se"],
        "within_2_se": abs(predicted - check["eval/gold_gain"]) <= 2 * check["eval/gold_gain_se"],
        "kl_analytic": check["eval/kl_analytic"],
        "kl_sampled": check["eval/kl"],
        "kl_sampled_se": check["eval/kl_se"],
        "points": {
            n: {
                "d": math.sqrt(by_n[n]["eval/kl_analytic"]),
                "gold_gain": by_n[n]["eval/gold_gain"],
                "se": by_n[n]["eval/gold_gain_se"],
            }
            for n in sorted(by_n)
        },
    }


def figure(runs, bon: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlhf import frontier

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, method in enumerate(METHODS):
        mine = [
            r.data.metrics for r in runs if r.data.tags.get("algo") == method and "eval/gold_gain" in r.data.metrics
        ]
        kl_key = "eval/kl_analytic" if method == "best_of_n" else "eval/kl"
        d = frontier.distance([m[kl_key] for m in mine]).tolist()
        ax.errorbar(
            d,
            [m["eval/gold_gain"] for m in mine],
            yerr=[2 * m["eval/gold_gain_se"] for m in mine],
            fmt="o",
            color=f"C{i}",
            label=method,
            capsize=2,
        )
    pts = bon["points"]
    fit = frontier.Fit("bon", bon["alpha"], bon["beta"], bon["r2"], len(BON_FIT))
    grid = [x / 50 * max(p["d"] for p in pts.values()) * 1.1 for x in range(51)]
    ax.plot(grid, fit.predict(grid), color="grey", lw=1, label=f"best-of-n fit on n<=8 (R2 {fit.r2:.2f})")
    ax.scatter(
        [p["d"] for p in pts.values()],
        [p["gold_gain"] for p in pts.values()],
        marker="x",
        color="grey",
        label="best-of-n, n=1..16",
    )
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("d = sqrt(KL to SFT)  (best-of-n: analytic)")
    ax.set_ylabel("held-out gold reward gain over SFT (+- 2 SE)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def markdown(rows: list[dict], bon: dict, meta: dict) -> str:
    lines = [
        f"# Methods on the default task, {meta['seeds']} seeds",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; commit {meta['commit']}; {meta['wall_min']:.0f} min in all.",
        "",
        "Gold gain and win rate are against the SFT policy on the same held-out prompts (paired); each cell is the "
        "mean "
        "over seeds +- its standard error over seeds, and in brackets the mean within-run standard error (over "
        "prompts).",
        "",
        "| method | gold gain over SFT | win rate (gold) | KL to SFT | proxy gain | length (tokens) | policy stage s "
        "| tokens trained |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['eval/gold_gain']:+.3f} +- {r['eval/gold_gain (se over seeds)']:.3f} "
            f"({r['eval/gold_gain_se (mean within run)']:.3f}) "
            f"| {r['eval/win_rate_gold']:.3f} +- {r['eval/win_rate_gold (se over seeds)']:.3f} "
            f"({r['eval/win_rate_gold_se (mean within run)']:.3f}) "
            f"| {r['eval/kl']:.2f} | {r['eval/proxy_gain']:+.3f} | {r['eval/response_length']:.1f} | "
            f"{r['policy stage wall s']:.0f} "
            f"| {r['tokens trained']:,.0f} |"
        )
    lines += [
        "",
        f"Best-of-n: Gao et al.'s form R(d) = d (alpha - beta d) fitted on n in {list(BON_FIT)} (alpha "
        f"{bon['alpha']:.3f}, "
        f"beta {bon['beta']:.3f}, R2 {bon['r2']:.2f}) predicts a gold gain of {bon['predicted_gold_gain']:+.3f} at n "
        f"= {bon['n']}; "
        f"measured {bon['measured_gold_gain']:+.3f} +- {bon['se']:.3f} "
        f"({'within' if bon['within_2_se'] else 'outside'} 2 SE). "
        f"KL at n = {bon['n']}: analytic {bon['kl_analytic']:.3f}, sampled {bon['kl_sampled']:.3f} +- "
        f"{bon['kl_sampled_se']:.3f}.",
        "",
        "![gold gain vs sqrt(KL)](methods_frontier.png)",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--root", type=Path, default=PROJECT / "benchmarks" / "results" / "methods_store")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.time()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT, capture_output=True, text=True
    ).stdout.strip()  # the code that runs
    seeds = ",".join(str(s) for s in range(args.seeds))
    sweep = multirun(args.root, [f"algo={','.join(METHODS)}", f"algo.seed={seeds}", *args.overrides], env)
    bon_sweep = multirun(
        args.root, ["algo=best_of_n", f"algo.n={','.join(str(n) for n in (*BON_FIT, BON_CHECK))}", *args.overrides], env
    )
    client, runs = members(args.root, sweep)
    _, bon_runs = members(args.root, bon_sweep)
    rows, bon = method_rows(client, runs), best_of_n_check(bon_runs)
    import torch

    meta = {
        "command": "python -m benchmarks.methods " + " ".join(sys.argv[1:]),
        "seeds": args.seeds,
        "commit": commit,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU'}",
        "wall_min": (time.time() - started) / 60,
        "sweep_id": sweep,
        "best_of_n_sweep_id": bon_sweep,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    figure(runs, bon, RESULTS / "methods_frontier.png")
    (RESULTS / "methods.json").write_text(json.dumps({"meta": meta, "methods": rows, "best_of_n": bon}, indent=1))
    (RESULTS / "methods.md").write_text(markdown(rows, bon, meta))
    print((RESULTS / "methods.md").read_text())


if __name__ == "__main__":
    main()
