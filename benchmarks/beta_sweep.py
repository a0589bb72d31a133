"""Beta sweep of PPO on the synthetic task with a strongly length-biased annotator.

Runs the real pipeline once per beta (data, SFT and the reward model are trained once and Cached for
the other members) and records, per beta: final KL to the reference, proxy (reward-model) and gold
reward on held-out prompts at the end of PPO and at its best evaluation, and the answers' length.
Writes ``benchmarks/results/beta_sweep.{md,json}``.

    .venv/bin/python benchmarks/beta_sweep.py                       # betas 0.003 0.01 0.03 0.1 0.3
    .venv/bin/python benchmarks/beta_sweep.py --betas 0.01 0.1 --steps 40 -- data.n_sft=2000
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def history(client, run_id: str, name: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, name)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1, 0.3])
    parser.add_argument("--bias", type=float, default=0.5, help="annotator length bias per word (strong: 0.5)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--root", default=str(HERE / "results" / "beta_sweep_store"))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mlflow.tracking import MlflowClient

    from flows.pipeline import load_config, rlhf_pipeline

    rows = []
    for beta in args.betas:
        overrides = ["algo=ppo", f"algo.beta={beta}", f"algo.steps={args.steps}", f"data.annotator_length_bias={args.bias}",
                     "algo.eval_every=5", f"paths.root={args.root}", *args.overrides]
        t0 = time.perf_counter()
        result = rlhf_pipeline(load_config(overrides))
        client = MlflowClient(result["tracking_uri"])
        ppo_run = client.get_run(result["run_id"]).data.tags["stage.ppo.run_id"]
        gold = history(client, ppo_run, "ppo/eval_gold_reward")
        proxy = history(client, ppo_run, "ppo/eval_proxy_reward")
        kl = history(client, ppo_run, "ppo/kl")
        length = history(client, ppo_run, "ppo/response_length")
        best_step, best_gold = max(gold, key=lambda x: x[1])
        m = result["metrics"]
        rows.append({
            "beta": beta, "final_kl": kl[-1][1], "eval_kl": m["eval/kl"],
            "proxy_start": proxy[0][1], "proxy_end": proxy[-1][1],
            "gold_start": gold[0][1], "gold_best": best_gold, "gold_best_step": best_step, "gold_end": gold[-1][1],
            "length_end": length[-1][1], "win_rate_gold": m["eval/win_rate_gold"], "win_rate_proxy": m["eval/win_rate_proxy"],
            "seconds": time.perf_counter() - t0,
        })
        print(rows[-1], flush=True)

    out = HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "beta_sweep.json").write_text(json.dumps({"bias": args.bias, "steps": args.steps, "rows": rows}, indent=2))
    header = ("| beta | final KL | proxy start → end | gold start → best (step) → end | length | win rate gold / proxy |\n"
              "|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['beta']:g} | {r['final_kl']:.2f} | {r['proxy_start']:.2f} → {r['proxy_end']:.2f} | "
        f"{r['gold_start']:.2f} → {r['gold_best']:.2f} ({r['gold_best_step']}) → {r['gold_end']:.2f} | {r['length_end']:.1f} | "
        f"{r['win_rate_gold']:.2f} / {r['win_rate_proxy']:.2f} |\n"
        for r in rows
    )
    text = f"# PPO beta sweep (annotator length bias {args.bias}, {args.steps} steps)\n\n{header}{body}"
    (out / "beta_sweep.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
