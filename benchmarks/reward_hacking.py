"""Reward hacking, measured on the default task, whose gold reward is known.

    python -m benchmarks.reward_hacking overoptimisation   # experiment=overoptimisation: one long PPO run
    python -m benchmarks.reward_hacking ensembles          # single reward model vs 4-member ensembles
    python -m benchmarks.reward_hacking beta_sweep         # a 4-point beta sweep and its fitted frontier
    python -m benchmarks.reward_hacking all

Each runs the real pipeline (``flows.pipeline``) in this process, reads what it logged in MLflow and writes
``benchmarks/results/<name>.{md,json}`` (and figures). The pipelines share one store under
``benchmarks/results/reward_hacking_store``: data, SFT and the reward models are trained once per data
config and come back Cached for the other runs.

- overoptimisation: PPO with beta 0.01 for 100 iterations (10 of value warm-up), evaluated every 5 on 256 held-out
prompts;
  then the same config with another PPO seed and with other data (another SFT and reward model).
  Checks that held-out gold peaks and then falls by more than 3 standard errors while the proxy rises,
  that Gao et al.'s RL form fitted over the run's evaluations has R^2 >= 0.8 for gold, and that the
  guard's checkpoint (never seeing gold) is within 2 standard errors of the best evaluation's gold and
  above the last one's.
- ensembles: Coste et al.'s setting (experiment=ensembles: 400 pairs, noisy annotators, no shared bias, no length
trend):
  one reward model against 4-member ensembles scoring with ``worst`` and ``uncertainty``, the same beta and
  budget, each arm also with two more PPO seeds (the run-to-run spread); then the same comparison where
  every annotator shares a length bias (Eisenstein et al. 2023: errors every member shares persist); and
  what the members say about each policy's answers.
- beta_sweep: ``-m algo.beta=...`` with PPO on the default task: the sweep's row carries alpha, beta, R^2
  and d* of the fitted frontier.
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
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
EVAL_PROMPTS = (
    256  # held-out prompts of each evaluation during training (rlhf.onpolicy_loop.EVAL_PROMPTS, the default task's)
)
RESULTS = PROJECT / "benchmarks" / "results"
STORE = RESULTS / "reward_hacking_store"
ENSEMBLE_RUNS = {
    "single reward model": ["reward.ensemble_size=1"],
    "ensemble of 4, worst": ["algo.reward_ensemble=worst"],
    "ensemble of 4, uncertainty": ["algo.reward_ensemble=uncertainty"],
}
ENSEMBLE_SEEDS = (1, 2)  # PPO seeds run besides the default's 0 for every arm of the ensemble comparison
BETAS = (0.005, 0.01, 0.03, 0.1)


def pipeline(*overrides: str) -> dict:
    from flows.compose import load_config
    from flows.dag import rlhf_pipeline

    return rlhf_pipeline(load_config([f"paths.root={STORE}", *overrides]))


def client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{STORE}/mlflow.db")


def history(run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client().get_metric_history(run_id, key)}


COMMIT = subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT, capture_output=True, text=True
).stdout.strip()  # the code this process runs


def meta(started: float) -> dict:
    import torch

    return {
        "command": "python -m benchmarks.reward_hacking " + " ".join(sys.argv[1:]),
        "commit": COMMIT,
        "minutes": (time.time() - started) / 60,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU'}",
    }


def write(name: str, payload: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)


# ---- over-optimisation and the guard --------------------------------------------------------------
OVEROPTIMISATION_SEEDS = (
    ["algo.seed=1"],
    ["data.seed=1"],
)  # other seeds of the same config: another PPO run; other data, SFT and reward model


def overoptimisation_run(*overrides: str) -> tuple[dict, dict]:
    """One ``experiment=overoptimisation`` pipeline and what the checks read from it."""
    r = pipeline("experiment=overoptimisation", *overrides)
    ppo_run = r["records"]["ppo"]["run_id"]
    gold, se = history(ppo_run, "ppo/eval_gold_reward"), history(ppo_run, "ppo/eval_gold_reward_se")
    proxy, kl = history(ppo_run, "ppo/eval_proxy_reward"), history(ppo_run, "ppo/eval_kl")
    steps = sorted(gold)
    peak, last = max(steps, key=gold.get), steps[-1]
    kept = int(client().get_run(ppo_run).data.metrics["ppo/guard_iteration"])
    metrics = client().get_run(ppo_run).data.metrics
    fall_se = math.hypot(se[peak], se[last])
    out = {
        "peak_iteration": peak,
        "peak_gold": gold[peak],
        "peak_se": se[peak],
        "last_gold": gold[last],
        "last_se": se[last],
        "fall": gold[peak] - gold[last],
        "fall_in_se": (gold[peak] - gold[last]) / fall_se,
        "proxy_at_peak": proxy[peak],
        "proxy_last": proxy[last],
        "fit_gold_r2": metrics["ppo/frontier_gold_r2"],
        "fit_gold_alpha": metrics["ppo/frontier_gold_alpha"],
        "fit_gold_beta": metrics["ppo/frontier_gold_beta"],
        "fit_gold_d_star": metrics["ppo/frontier_gold_d_star"],
        "guard_iteration": kept,
        "guard_gold": gold[kept],
        "guard_kl": kl[kept],
        "guard_within_2se_of_best": gold[peak] - gold[kept] <= 2 * math.hypot(se[peak], se[kept]),
        "guard_above_last": gold[kept] > gold[last],
        "eval_stage": {k: v for k, v in r["metrics"].items() if k.startswith("eval/")},
        "curve": {s: {"gold": gold[s], "gold_se": se[s], "proxy": proxy[s], "kl": kl[s]} for s in steps},
    }
    out["checks"] = {
        "gold peaks then falls by > 3 SE while the proxy rises": out["fall_in_se"] > 3 and proxy[last] > proxy[peak],
        "RL form R2 >= 0.8 for gold": out["fit_gold_r2"] >= 0.8,
        "guard within 2 SE of the best gold and above the last": out["guard_within_2se_of_best"]
        and out["guard_above_last"],
    }
    return r, out


def overoptimisation() -> dict:
    started = time.time()
    r, out = overoptimisation_run()
    out["guard_kl_budget"] = float(client().get_run(r["run_id"]).data.params["algo.guard_kl_budget"])
    out["other_seeds"] = {" ".join(o): overoptimisation_run(*o)[1] for o in OVEROPTIMISATION_SEEDS}
    figure = STORE / "stages" / "ppo" / r["keys"]["ppo"] / "figures"
    out["figures"] = str(figure.relative_to(PROJECT))
    for src, dst in (("kl_curve.png", "overoptimisation_curve.png"), ("frontier.png", "overoptimisation_frontier.png")):
        if (figure / src).exists():
            (RESULTS / dst).write_bytes((figure / src).read_bytes())
    out["meta"] = meta(started)
    write("overoptimisation", out, overoptimisation_markdown(out))
    return out


def overoptimisation_markdown(out: dict) -> str:
    """The report of :func:`overoptimisation`, from its JSON alone."""
    curve = {int(s): c for s, c in out["curve"].items()}
    peak, last, kept = out["peak_iteration"], max(curve), out["guard_iteration"]
    gold, se, proxy, kl = ({s: c[k] for s, c in curve.items()} for k in ("gold", "gold_se", "proxy", "kl"))
    ev = out["eval_stage"]
    md = [
        "# Over-optimisation on the default task (`experiment=overoptimisation`: PPO, beta 0.01, 100 iterations, the "
        "first 10 "
        "training only the value model)",
        "",
        f"Held-out gold ({EVAL_PROMPTS} prompts, every 5 iterations once the policy moves) peaks at iteration {peak}: "
        f"{gold[peak]:+.3f} +- {se[peak]:.3f}; at the last "
        f"iteration it is {gold[last]:+.3f} +- {se[last]:.3f}, a fall of {out['fall']:.3f} = {out['fall_in_se']:.1f} "
        f"standard errors, "
        f"while the proxy rose from {proxy[peak]:.3f} to {proxy[last]:.3f}.",
        "",
        f"Gao et al.'s RL form fitted over the run's evaluations (d = sqrt(held-out KL)): alpha "
        f"{out['fit_gold_alpha']:.3f}, beta "
        f"{out['fit_gold_beta']:.3f}, R2 {out['fit_gold_r2']:.2f}, peak d* {out['fit_gold_d_star']:.2f} (KL "
        f"{out['fit_gold_d_star'] ** 2:.2f}).",
        "",
        f"The guard (`guard=kl`, budget {out['guard_kl_budget']:g} nats, never seeing gold) kept iteration {kept} "
        f"(held-out KL {kl[kept]:.2f}): gold "
        f"{gold[kept]:+.3f}, {'within' if out['guard_within_2se_of_best'] else 'outside'} 2 SE of the best and "
        f"{'above' if out['guard_above_last'] else 'not above'} the last. The eval stage evaluated the guard's "
        f"checkpoint: "
        f"gold gain over SFT {ev['eval/gold_gain']:+.3f} +- {ev['eval/gold_gain_se']:.3f}, win rate "
        f"{ev['eval/win_rate_gold']:.3f} +- {ev['eval/win_rate_gold_se']:.3f}.",
        "",
        "| iteration | held-out gold | +- SE | proxy | KL |",
        "|---|---|---|---|---|",
    ]
    md += [
        f"| {s}{' (guard)' if s == kept else ''}{' (peak)' if s == peak else ''} | {gold[s]:+.3f} | {se[s]:.3f} | "
        f"{proxy[s]:.3f} | {kl[s]:.2f} |"
        for s in sorted(curve)
    ]
    md += [
        "",
        "Checks: " + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in out["checks"].items()),
        "",
        "The same config with other seeds (how much the checks depend on the run):",
        "",
        "| run | gold peak (iteration) | last | fall in SE | gold R2 | guard's iteration | checks met |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, o in {"as documented": out, **out["other_seeds"]}.items():
        md.append(
            f"| {name} | {o['peak_gold']:+.3f} ({o['peak_iteration']}) | {o['last_gold']:+.3f} | "
            f"{o['fall_in_se']:.1f} | {o['fit_gold_r2']:.2f} | "
            f"{o['guard_iteration']} | {sum(o['checks'].values())} of {len(o['checks'])} |"
        )
    md += [
        "",
        f"The run's figures: `{out['figures']}/` (kl_curve.png, frontier.png), copied to "
        "`overoptimisation_curve.png` and `overoptimisation_frontier.png`.",
        "",
        f"Machine: {out['meta']['machine']}; commit {out['meta']['commit']}; {out['meta']['minutes']:.0f} min.",
    ]
    return "\n".join(md)


# ---- ensembles ------------------------------------------------------------------------------------
def ensembles() -> dict:
    started = time.time()
    settings = {
        "Coste et al.: limited, noisy pairs, no shared bias": [],
        "a length bias every annotator shares (bias 0.3/word)": [
            "data.annotator_length_bias=0.3",
            "data.n_pref=4000",
            "data.annotator_temperature=0.3",
        ],
    }
    out, views = {}, {}
    for setting, extra in settings.items():
        rows, policies = {}, {}
        for name, overrides in ENSEMBLE_RUNS.items():
            r = pipeline("experiment=ensembles", *extra, *overrides)
            policies[name], m = r["records"], r["metrics"]
            rows[name] = {
                k: m[k]
                for k in (
                    "eval/gold_gain",
                    "eval/gold_gain_se",
                    "eval/win_rate_gold",
                    "eval/win_rate_gold_se",
                    "eval/kl",
                    "eval/proxy_gain",
                )
                if k in m
            } | ({"eval/ensemble_std": m["eval/ensemble_std"]} if "eval/ensemble_std" in m else {})
            rows[name]["seeds"] = {
                0: m["eval/gold_gain"],
                **{
                    seed: pipeline("experiment=ensembles", *extra, *overrides, f"algo.seed={seed}")["metrics"][
                        "eval/gold_gain"
                    ]
                    for seed in ENSEMBLE_SEEDS
                },
            }  # the same reward models, other PPO runs: the run-to-run spread
            gains = list(rows[name]["seeds"].values())
            rows[name]["seeds_mean"], rows[name]["seeds_se"] = (
                statistics.mean(gains),
                statistics.stdev(gains) / math.sqrt(len(gains)),
            )
        single = rows["single reward model"]
        for name, row in rows.items():
            if name != "single reward model":  # independent runs: the SE of the difference
                diff_se = math.hypot(row["eval/gold_gain_se"], single["eval/gold_gain_se"])
                row["gold_gain_over_single"] = row["eval/gold_gain"] - single["eval/gold_gain"]
                row["in_se"] = row["gold_gain_over_single"] / diff_se
                row["seeds_over_single"] = row["seeds_mean"] - single["seeds_mean"]
                row["seeds_in_se"] = row["seeds_over_single"] / math.hypot(row["seeds_se"], single["seeds_se"])
        out[setting] = rows
        views[setting] = members_view(policies)
    from flows.compose import load_config
    from rlhf.validate import validate

    algo = validate(load_config(["experiment=ensembles"])).algo
    out["members_view"] = views
    out["settings"] = {"beta": algo.beta, "steps": algo.steps}
    out["meta"] = meta(started)
    write("ensembles", out, ensembles_markdown(out))
    return out


def _ensemble_table(rows: dict, versus: str) -> list[str]:
    """One of the ensemble report's tables: each arm's gold over prompts (``versus="in_se"``) or over PPO runs."""
    if versus == "in_se":
        head = ["| reward | gold gain | win rate (gold) | KL | proxy gain | vs single |", "|---|---|---|---|---|---|"]
        cells = lambda r: (
            f"{r['eval/gold_gain']:+.3f} +- {r['eval/gold_gain_se']:.3f} | {r['eval/win_rate_gold']:.3f} "  # noqa: E731
            f"+- {r['eval/win_rate_gold_se']:.3f} | {r['eval/kl']:.2f} | {r['eval/proxy_gain']:+.3f}"
        )
        diff = "gold_gain_over_single"
    else:
        head = ["| reward | gold gain of each run | mean over runs | vs single |", "|---|---|---|---|"]
        cells = lambda r: (
            f"{', '.join(f'{g:+.3f}' for g in r['seeds'].values())} | {r['seeds_mean']:+.3f} +- "  # noqa: E731
            f"{r['seeds_se']:.3f}"
        )
        diff = "seeds_over_single"
    rows_md = [
        f"| {name} | {cells(r)} | " + (f"{r[diff]:+.3f} ({r[versus]:+.1f} SE)" if versus in r else "") + " |"
        for name, r in rows.items()
    ]
    return head + rows_md


def ensembles_markdown(out: dict) -> str:
    """The report of :func:`ensembles`, from its JSON alone."""
    views, settings = out["members_view"], out["settings"]
    md = [
        f"# Reward-model ensembles against a single reward model (PPO, beta {settings['beta']:g}, {settings['steps']} "
        f"iterations)",
        "",
        "Held-out gold gain over SFT (256 prompts, +- SE over prompts); for the ensembles, the difference to the "
        "single model "
        "in standard errors of the difference (independent runs).",
        "",
    ]
    for setting, rows in out.items():
        if setting in ("members_view", "settings", "meta"):
            continue
        seeds = [s for s in next(iter(rows.values()))["seeds"] if str(s) != "0"]
        md += [
            f"## {setting}",
            "",
            *_ensemble_table(rows, "in_se"),
            "",
            f"Run to run: the same reward models, PPO seeds 0, {', '.join(map(str, seeds))} (`algo.seed`); mean +- "
            "SE over the runs.",
            "",
            *_ensemble_table(rows, "seeds_in_se"),
        ]
        md.append("")
        view, pairs = views[setting]["policies"], views[setting]["pairs"]
        md += [
            f"In the {pairs['n']} preference pairs the shorter answer is the chosen one in "
            f"{pairs['shorter_chosen']:.0%} of those of "
            f"unequal length; over their answers, length correlates {pairs['corr_length_gold']:+.2f} with gold.",
            "",
            "What the four members say about each policy's held-out answers (one sample per prompt; member scores "
            "standardised "
            "on SFT answers, so SFT is 0): an error every member shares is one no aggregation of them can see.",
            "",
            "| policy | mean gold | answer words | "
            + " | ".join(f"member {k}" for k in range(len(view["SFT"]["members_z"])))
            + " |",
            "|---|---|---|" + "---|" * len(view["SFT"]["members_z"]),
        ]
        md += [
            f"| {name} | {v['gold']:+.3f} | {v['words']:.2f} | "
            + " | ".join(f"{z:+.2f}" for z in v["members_z"])
            + " |"
            for name, v in view.items()
        ]
        md.append("")
    md.append(f"Machine: {out['meta']['machine']}; commit {out['meta']['commit']}; {out['meta']['minutes']:.0f} min.")
    return "\n".join(md)


def members_view(policies: dict[str, dict]) -> dict[str, dict]:
    """Each policy's answers to the held-out prompts (one sample each, the same seed) through the eyes of the
    ensemble's members, beside the gold reward and the answers' length in words: {policy: {gold, words, members_z}}."""
    import torch

    from rlhf.answer_keys import AnswerStream
    from rlhf.config import SamplingConfig
    from rlhf.data import left_pad, load_split
    from rlhf.modeling import load_policy, load_scalar_model, load_tokenizer, sequence_scores
    from rlhf.rollout import decode_responses, generate
    from rlhf.synthetic import gold_reward, pair_length_stats

    records = next(r for r in policies.values() if "reward.1" in r)  # an ensemble's run: every member's record
    members = [k for k in records if k == "reward" or k.startswith("reward.")]
    tok = load_tokenizer(records["sft"]["model_path"])
    rewards = [load_scalar_model(records[k]["model_path"], tok, zero_head=False).eval() for k in members]
    prompts = [row["prompt"] for row in load_split(records["data"]["data_dir"], "eval_prompts")]
    ids, mask = left_pad([tok(p, add_special_tokens=False)["input_ids"] for p in prompts], tok.pad_token_id)
    view, sft_stats = {}, None
    for name, path in {
        "SFT": records["sft"]["model_path"],
        **{n: r["ppo"]["model_path"] for n, r in policies.items()},
    }.items():
        with torch.no_grad():
            s = generate(
                load_policy(path, tok).eval(),
                ids,
                mask,
                SamplingConfig(),
                tok.eos_token_id,
                tok.pad_token_id,
                AnswerStream(0).take(len(ids)),
            )
            scores = torch.stack(
                [sequence_scores(m, s.input_ids, s.attention_mask, s.last_index) for m in rewards]
            )  # (K, N)
        sft_stats = sft_stats or (scores.mean(1, keepdim=True), scores.std(1, keepdim=True))
        texts = decode_responses(tok, s)
        view[name] = {
            "gold": sum(gold_reward(p, t, e) for p, t, e in zip(prompts, texts, s.ended.tolist())) / len(prompts),
            "words": sum(len(t.split()) for t in texts) / len(texts),
            "members_z": ((scores - sft_stats[0]) / sft_stats[1]).mean(1).tolist(),
        }
    return {"policies": view, "pairs": pair_length_stats(load_split(records["data"]["data_dir"], "pref"))}


# ---- the beta sweep's fitted frontier ---------------------------------------------------------------
def beta_sweep(report_only: bool = False) -> dict:
    started = time.time()
    cmd = [
        sys.executable,
        "-m",
        "flows.pipeline",
        "-m",
        "algo=ppo",
        f"algo.beta={','.join(str(b) for b in BETAS)}",
        f"paths.root={STORE}",
    ]
    if not report_only:
        subprocess.run(cmd, cwd=PROJECT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
    c = client()
    exp = c.get_experiment_by_name("rlhf").experiment_id
    (row,) = c.search_runs([exp], "tags.`rlhf.sweep` = 'true'", order_by=["attributes.start_time DESC"], max_results=1)
    members = c.search_runs([exp], f"tags.mlflow.parentRunId = '{row.info.run_id}'")
    fitted = {k: v for k, v in row.data.metrics.items() if k.startswith("sweep/")}
    figure = RESULTS / "beta_sweep_frontier.png"
    with tempfile.TemporaryDirectory() as tmp:
        figure.write_bytes(Path(c.download_artifacts(row.info.run_id, "sweep/frontier_fit.png", tmp)).read_bytes())
    out = {
        "sweep_run": row.info.run_id,
        "sweep_name": row.info.run_name,
        "fit": fitted,
        "members": sorted(
            (
                {
                    "beta": float(m.data.params["algo.beta"]),
                    **{
                        k: m.data.metrics[k]
                        for k in (
                            "eval/kl",
                            "eval/gold_gain",
                            "eval/gold_gain_se",
                            "eval/proxy_gain",
                            "eval/win_rate_gold",
                        )
                    },
                }
                for m in members
            ),
            key=lambda x: x["beta"],
        ),
        "meta": meta(started),
    }
    out["command"] = " ".join(cmd[2:])
    if report_only:  # the sweep ran at the commit its row records; this process only reports it
        out["meta"].update(commit=row.data.tags.get("git_commit", "?")[:7], report_commit=COMMIT)
    write("beta_sweep", out, beta_sweep_markdown(out))
    return out


def beta_sweep_markdown(out: dict) -> str:
    """The report of :func:`beta_sweep`, from its JSON alone."""
    md = [
        f"# PPO beta sweep on the default task ({len(out['members'])} members, 60 iterations each)",
        "",
        f"Command: `{out['command']}`",
        "",
        "| beta | KL to SFT | gold gain | win rate (gold) | proxy gain |",
        "|---|---|---|---|---|",
    ]
    md += [
        f"| {m['beta']} | {m['eval/kl']:.2f} | {m['eval/gold_gain']:+.3f} +- {m['eval/gold_gain_se']:.3f} | "
        f"{m['eval/win_rate_gold']:.3f} | "
        f"{m['eval/proxy_gain']:+.3f} |"
        for m in out["members"]
    ]
    md += [
        "",
        "The sweep's MLflow row (`"
        + out["sweep_name"]
        + "`) carries the RL form fitted over the members (d = sqrt(eval/kl)): "
        + ", ".join(f"`{k}` {v:.3f}" for k, v in sorted(out["fit"].items()))
        + ".",
        "",
        "![fitted frontier](beta_sweep_frontier.png)",
        "",
        f"Machine: {out['meta']['machine']}; commit {out['meta']['commit']}"
        + (
            f" (the report written by `--report-only` at {out['meta']['report_commit']})"
            if "report_commit" in out["meta"]
            else ""
        )
        + f"; {out['meta']['minutes']:.0f} min.",
    ]
    return "\n".join(md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["overoptimisation", "ensembles", "beta_sweep", "all"])
    parser.add_argument(
        "--report-only", action="store_true", help="beta_sweep: report the store's latest sweep row without running one"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.report_only:
        if args.what != "beta_sweep":
            parser.error("--report-only applies to beta_sweep")
        beta_sweep(report_only=True)
        return
    for name in ("overoptimisation", "ensembles", "beta_sweep") if args.what == "all" else (args.what,):
        globals()[name]()


if __name__ == "__main__":
    main()
