"""Iterated against one-shot RLHF on the default task, and the promotion gate at work.

    python -m benchmarks.campaign            # writes benchmarks/results/campaign.{json,md}
    python -m benchmarks.campaign --report   # the report (and the README's sentence) again from the JSON

Both arms spend the same labels and the same policy iterations (RLOO), from the same SFT model and the same
initial preference pairs, and both are gated as a team would serve them (the final champion):

- iterated: ROUNDS rounds of PROMPTS_PER_ROUND labelled pairs of the current champion's answers each, the reward
  model retrained on every label so far, STEPS iterations per challenger (from the champion);
- one-shot: one round of ROUNDS x PROMPTS_PER_ROUND pairs of SFT's answers, one challenger of ROUNDS x STEPS
  iterations.

Each arm runs with every seed in SEEDS (the reward model's and RLOO's; the round's prompts and answer keys follow
``eval.seed``). The number compared is the held-out gold reward of the final champion (SFT where nothing was
promoted), measured after the campaign on the held-out prompts with answer keys no round used (the gate chose on
its rounds' own answers), with its SE over prompts and its paired gain over SFT, and the mean over seeds.
Then, on the iterated campaign of the first seed, one more round whose
challenger over-optimises (a small beta, a long run): the gate must reject it and say why.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
RESULTS = PROJECT / "benchmarks" / "results"
STORE = RESULTS / "campaign_store"
ROUNDS, PROMPTS_PER_ROUND, STEPS = 3, 128, 30
SEEDS = (0, 1)
FINAL_EVAL = {"n_prompts": 256, "n_samples": 2, "seed": 98765}  # fresh answer keys for the final champion
MAX_LENGTH = 64  # the default model's context (model.max_length)
BASE = ["algo=rloo", "data.n_pref=256", f"algo.steps={STEPS}", "algo.eval_every=1000", "eval.n_prompts=256"]
OVEROPTIMISING = ["algo.beta=0.001", f"algo.steps={4 * STEPS}", "algo.lr=3e-5"]


def campaign(name: str, seed: int, *overrides: str) -> dict:
    from flows.campaign import rlhf_campaign
    from flows.compose import load_config

    seeds = [f"algo.seed={seed}", f"reward.seed={seed}", f"eval.seed={1234 + seed}"]
    own = [f"campaign.name={name}-s{seed}", f"tracking.policy_model_name=policy-{name}-s{seed}"]
    own.append(f"tracking.reward_model_name=reward-{name}-s{seed}")
    return rlhf_campaign(load_config([f"paths.root={STORE}", *BASE, *seeds, *own, *overrides]))


class _Metrics:
    def log_metrics(self, metrics: dict, step: int) -> None:
        pass


def final_champion(rounds: list[dict]) -> dict:
    """The held-out gold of what the campaign would serve, against SFT, on answers drawn with fresh keys
    (``FINAL_EVAL``): the gate chose on its rounds' own answers, which would flatter what it chose."""
    import tempfile

    import torch

    from rlhf.config import EvalConfig
    from rlhf.context import StageContext
    from rlhf.stages import evaluate
    from rlhf.synthetic import gold_reward
    from tasks.records import read_record

    last = rounds[-1]
    sft = read_record(STORE, "sft", last["keys"]["sft"])["model_path"]
    data_dir, policy = last["store"]["data_dir"], last["champion_path"]
    with tempfile.TemporaryDirectory() as tmp:
        ctx = StageContext(Path(tmp), _Metrics(), torch.device("cpu"))
        m = evaluate.run(EvalConfig(**FINAL_EVAL), MAX_LENGTH, gold_reward, data_dir, policy, sft, None, ctx)
    m = m["metrics"]
    return {
        "gold": m["eval/gold_reward"],
        "gold_se": m["eval/gold_reward_se"],
        "gain_over_sft": m["eval/gold_gain"],
        "gain_over_sft_se": m["eval/gold_gain_se"],
        "version": last["champion_after"],
        "promoted_rounds": [r["round"] for r in rounds if r["promoted"]],
    }


def arm(name: str, overrides: list[str]) -> dict:
    runs = {seed: campaign(name, seed, *overrides)["rounds"] for seed in SEEDS}
    finals = {seed: final_champion(rounds) for seed, rounds in runs.items()}
    golds = [f["gold"] for f in finals.values()]
    return {
        "overrides": overrides,
        "seeds": {str(s): {**finals[s], "rounds": [_round(r) for r in runs[s]]} for s in SEEDS},
        "gold_mean": statistics.mean(golds),
        "gold_seed_sd": statistics.stdev(golds) if len(golds) > 1 else 0.0,
    }


def _round(r: dict) -> dict:
    m = r["metrics"]
    return {
        "round": r["round"],
        "promoted": r["promoted"],
        "reason": r["reason"],
        "n_labels": r["n_labels"],
        **{k.split("/")[1]: m[k] for k in ("eval/gold_gain", "eval/gold_gain_se", "eval/kl", "eval/gold_reward")},
    }


def meta(started: float) -> dict:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT, capture_output=True, text=True)
    return {
        "command": "python -m benchmarks.campaign",
        "commit": commit.stdout.strip(),
        "minutes": (time.time() - started) / 60,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "rounds": ROUNDS,
        "prompts_per_round": PROMPTS_PER_ROUND,
        "steps": STEPS,
        "seeds": list(SEEDS),
        "base": BASE,
    }


def difference(out: dict) -> tuple[float, float]:
    """Iterated minus one-shot held-out gold, paired by seed (both arms of a seed share SFT, the initial pairs and
    the final evaluation's prompts and answer keys): the mean over seeds and its standard error."""
    seeds = out["iterated"]["seeds"]
    diffs = [seeds[s]["gold"] - out["one_shot"]["seeds"][s]["gold"] for s in seeds]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return statistics.mean(diffs), se


def verdict(diff: float, se: float) -> str:
    z = diff / se if se > 0 else float("nan")
    if abs(z) < 2:
        return f"{z:.1f} SE, within the noise: no difference measured"
    return f"{z:.1f} SE: {'iterated' if diff > 0 else 'one-shot'} ahead"


def headline(out: dict) -> str:
    """The README's sentence on the result (``python -m benchmarks.campaign --report`` writes it there)."""
    m, gate = out["meta"], out["gate"]
    diff, se = difference(out)
    return (
        f"Measured on the default task ({len(m['seeds'])} seeds): {m['rounds']} rounds of {m['prompts_per_round']} "
        f"labels against one round of all {m['rounds'] * m['prompts_per_round']} with the same policy iterations: "
        f"iterated minus one-shot held-out gold {diff:+.3f} ± {se:.3f} ({verdict(diff, se)}); a deliberately "
        f"over-optimising challenger was {'promoted' if gate['promoted'] else 'rejected by the gate'}: "
        f"[campaigns](docs/campaign.md#measured-iterated-against-one-shot-and-the-gate-at-work)."
    )


README = PROJECT / "README.md"
HEADLINE = re.compile(r"(<!-- benchmarks/results/campaign\.json -->\n).*?(<!-- end -->)", re.S)


def write_reports(out: dict) -> None:
    """campaign.md, and the README's sentence, from the JSON."""
    (RESULTS / "campaign.md").write_text(markdown(out))
    README.write_text(HEADLINE.sub(lambda g: g[1] + headline(out) + "\n" + g[2], README.read_text()))


def markdown(out: dict) -> str:
    it, one, gate = out["iterated"], out["one_shot"], out["gate"]
    m = out["meta"]
    lines = [
        "# Iterated against one-shot RLHF, and the gate",
        "",
        f"Iterated ({m['rounds']} rounds of {m['prompts_per_round']} labels, {m['steps']} RLOO iterations each) "
        f"against one-shot (one round of {m['rounds'] * m['prompts_per_round']} labels, "
        f"{m['rounds'] * m['steps']} iterations), the same SFT and initial pairs; held-out gold of the final champion "
        f"(SE over prompts), seeds {', '.join(map(str, m['seeds']))}.",
        "",
        "| seed | iterated: gold | gain over SFT | labels | promoted rounds | one-shot: gold | gain over SFT | labels "
        "| promoted |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in it["seeds"]:
        cells = []
        for arm_out in (it, one):
            a = arm_out["seeds"][s]
            labels = sum(r["n_labels"] for r in a["rounds"])
            cells.append(
                f"{a['gold']:+.3f} ± {a['gold_se']:.3f} | {a['gain_over_sft']:+.3f} ± {a['gain_over_sft_se']:.3f} | "
                f"{labels} | {', '.join(map(str, a['promoted_rounds'])) or 'none'}"
            )
        lines.append(f"| {s} | {cells[0]} | {cells[1]} |")
    diff, diff_se = difference(out)
    lines += [
        f"| mean | {it['gold_mean']:+.3f} | | | | {one['gold_mean']:+.3f} | | | |",
        "",
        f"Iterated minus one-shot, paired by seed: {diff:+.3f} ± {diff_se:.3f} (SE over seeds; seed-to-seed SD of the "
        f"gold: iterated {it['gold_seed_sd']:.3f}, one-shot {one['gold_seed_sd']:.3f}): "
        f"{verdict(diff, diff_se)}.",
        "",
        f"The gate at work: an over-optimising challenger ({', '.join(gate['overrides'])}) in round {gate['round']}: "
        f"{'promoted' if gate['promoted'] else 'rejected'}: {gate['reason']}.",
        "",
        f"`{m['command']}` at {m['commit']} on {m['machine']}, {m['minutes']:.0f} minutes.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:] == ["--report"]:  # the report again from the committed JSON
        write_reports(json.loads((RESULTS / "campaign.json").read_text()))
        return
    started = time.time()
    out = {
        "iterated": arm("iterated", [f"campaign.rounds={ROUNDS}", f"campaign.prompts_per_round={PROMPTS_PER_ROUND}"]),
        "one_shot": arm(
            "oneshot",
            [
                "campaign.rounds=1",
                f"campaign.prompts_per_round={ROUNDS * PROMPTS_PER_ROUND}",
                f"algo.steps={ROUNDS * STEPS}",
            ],
        ),
    }
    over = campaign(
        "iterated",
        SEEDS[0],
        f"campaign.rounds={ROUNDS + 1}",
        f"campaign.prompts_per_round={PROMPTS_PER_ROUND}",
        *OVEROPTIMISING,
    )
    last = over["rounds"][-1]
    out["gate"] = {"overrides": OVEROPTIMISING, **_round(last)}
    out["meta"] = meta(started)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "campaign.json").write_text(json.dumps(out, indent=1))
    write_reports(out)
    print(markdown(out))


if __name__ == "__main__":
    sys.exit(main())
