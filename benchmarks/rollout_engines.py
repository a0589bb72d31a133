"""The rollout engines side by side: HF forwards with a KV cache (rollout.engine=hf) against vLLM (rollout.engine=vllm).

    python -m benchmarks.rollout_engines [--rounds 3] [--ppo-seeds 2] [--skip-ppo]

1. Generation tokens/s on the same work: 64 prompts of the default task, answers of up to 24 tokens, sampled at
   temperature 1 from random weights (answers rarely end early, so both engines generate every token), at the
   default model's size and at a llama of ~100M parameters. Each engine in ``--rounds`` alternating rounds after one
   warm-up batch; the median round counts. Tokens/s = answer tokens / seconds of the batch.
2. PPO on the default task with each engine (``algo=ppo`` with ``rollout.engine=hf`` and ``=vllm``, the same
   data, SFT and reward model, cached across the runs), ``--ppo-seeds`` seeds each: the eval stage's held-out gold
   reward with its standard error over prompts, and whether the engines agree within two standard errors of their
   difference.

Writes ``benchmarks/results/rollout_engines_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.throughput import PROJECT, device_name, git_commit, sync, write_results

PROMPTS, ANSWER_TOKENS = 64, 24
SIZES = {  # name -> the model config's overrides (heads of 32 and 64: what vLLM's CPU kernels take)
    "default (gpt2, 0.8M)": {"arch": "gpt2"},
    "llama 103M": {"arch": "llama", "n_layer": 8, "n_embd": 896, "n_head": 14},
}
CUDA_SIZES = {  # on a GPU, beside those: Qwen2-0.5B's shape (24 blocks, width 896), the local tokenizer's vocabulary
    "qwen2 0.5B-shape": {"arch": "qwen2", "n_layer": 24, "n_embd": 896, "n_head": 14},
}


def build(root: Path, overrides: dict) -> tuple[str, list[list[int]]]:
    """A saved model of the given sizes (random weights, the locally trained tokenizer) and 64 prompts' ids."""
    import torch

    from rlhf.config import DataConfig, ModelConfig
    from rlhf.context import StageContext
    from rlhf.data import encode_prompts, load_rows
    from rlhf.modeling import load_tokenizer
    from rlhf.stages import prepare, sft

    cfg = ModelConfig(**overrides)
    quiet = type("Quiet", (), {"log_metrics": lambda *a: None, "flush": lambda *a: None})()
    ctx = lambda name: StageContext(root / name, quiet, torch.device("cpu"))  # noqa: E731
    data = prepare.run(DataConfig(n_sft=256, n_pref=64, n_eval_prompts=PROMPTS, n_ppo_prompts=64), ctx("data"))
    path = str(sft.base_model(cfg, Path(data["data_dir"]), ctx("base")))
    tok = load_tokenizer(path)
    prompts = [r["prompt"] for r in load_rows(data["data_dir"], "eval_prompts", tok)][:PROMPTS]
    return path, encode_prompts(tok, prompts, cfg.max_length - ANSWER_TOKENS)


def generation(size: str, rounds: int) -> dict:
    """Answer tokens per second of each engine on one model, alternating rounds after a warm-up each."""
    import torch

    from rlhf.answer_keys import AnswerStream
    from rlhf.config import RolloutConfig, SamplingConfig
    from rlhf.data import left_pad
    from rlhf.engines import HFEngine, open_engine
    from rlhf.modeling import load_policy, load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path, prompt_ids = build(Path(tmp), sizes()[size])
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        tok = load_tokenizer(path)
        model = load_policy(path, tok).to(device).eval()
        ids, mask = (t.to(device) for t in left_pad(prompt_ids, tok.pad_token_id))
        started = time.perf_counter()
        engines = {"hf": HFEngine(), "vllm": open_engine(RolloutConfig(engine="vllm"), path, 64, device, 0, PROMPTS)}
        startup = time.perf_counter() - started
        sampling = SamplingConfig(max_new_tokens=ANSWER_TOKENS)
        eos, pad = tok.eos_token_id, tok.pad_token_id
        per_round: dict[str, list[float]] = {name: [] for name in engines}
        for r in range(rounds + 1):  # round 0: the warm-up
            for name in engines if r % 2 else list(engines)[::-1]:
                keys = AnswerStream(r).take(PROMPTS, device)
                sync()
                t = time.perf_counter()
                s = engines[name].sample(model, "random", ids, mask, sampling, eos, pad, keys)
                sync()
                seconds = time.perf_counter() - t
                if r:
                    per_round[name].append(float(s.response_mask.sum()) / seconds)
        params = sum(p.numel() for p in model.parameters())
    del engines
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    medians = {name: statistics.median(v) for name, v in per_round.items()}
    return {
        "params_m": params / 1e6,
        "tokens_per_s": medians,
        "rounds": per_round,
        "vllm_over_hf": medians["vllm"] / medians["hf"],
        "vllm_startup_s": startup,
    }


def ppo_gold(seeds: int) -> dict:
    """The default task's PPO with each engine and seed, in one root (data, SFT and reward trained once)."""
    from benchmarks.throughput import pipeline_workspace

    root, base, env = pipeline_workspace(None, "rlhf-bench-engines-", [])
    runs = []
    for seed in range(seeds):
        for engine in ("hf", "vllm"):
            overrides = [*base, "algo=ppo", f"rollout.engine={engine}", f"algo.seed={seed}", f"eval.seed={1234 + seed}"]
            t = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.rollout_engines", "--child-pipeline", *overrides],
                cwd=PROJECT,
                env=env,
                capture_output=True,
                text=True,
            )
            if out.returncode:
                raise RuntimeError(f"PPO with rollout.engine={engine} failed:\n{out.stderr[-3000:]}")
            metrics = eval(out.stdout.strip().splitlines()[-1])  # the child's last line: its eval metrics, a dict
            runs.append({"engine": engine, "seed": seed, "wall_s": time.perf_counter() - t, **metrics})
            print(runs[-1], flush=True)
    return {"runs": runs, **_agreement(runs)}


def _agreement(runs: list[dict]) -> dict:
    """Per engine, the mean over seeds of the held-out gold and of its gain over SFT (each run's SE over prompts,
    combined); and the engines' difference in units of its standard error, for both."""
    out: dict = {"engines": {}}
    for engine in ("hf", "vllm"):
        mine = [r for r in runs if r["engine"] == engine]
        timed = [r["wall_s"] for r in mine if r is not runs[0]]  # the first run also trained data, SFT and reward
        e = out["engines"][engine] = {"seconds": statistics.mean(timed)}
        for metric in ("gold_reward", "gold_gain"):
            e[metric] = statistics.mean(r[f"eval/{metric}"] for r in mine)
            e[f"{metric}_se"] = (sum(r[f"eval/{metric}_se"] ** 2 for r in mine) ** 0.5) / len(mine)
    for metric in ("gold_reward", "gold_gain"):
        hf, vllm = out["engines"]["hf"], out["engines"]["vllm"]
        gap, se = vllm[metric] - hf[metric], (vllm[f"{metric}_se"] ** 2 + hf[f"{metric}_se"] ** 2) ** 0.5
        out[metric] = {"gap": gap, "se": se, "within_2_se": abs(gap) <= 2 * se}
    return out


def sizes() -> dict:
    import torch

    return {**SIZES, **(CUDA_SIZES if torch.cuda.is_available() else {})}


def child_pipeline(overrides: list[str]) -> None:
    from flows.compose import load_config
    from flows.dag import rlhf_pipeline

    result = rlhf_pipeline(load_config(overrides))
    print({k: v for k, v in result["metrics"].items() if k.startswith("eval/gold")})


def markdown(report: dict) -> str:
    lines = [
        "# Rollout engines: HF against vLLM",
        "",
        f"`{report['command']}` at commit {report['commit']} on {report['machine']}.",
        "",
        f"Generation: {PROMPTS} prompts of the default task, answers of up to {ANSWER_TOKENS} tokens at temperature "
        f"1 from random weights, median of {report['rounds']} alternating rounds after a warm-up.",
        "",
        "| model | parameters | HF tokens/s | vLLM tokens/s | vLLM / HF | vLLM start-up s |",
        "|---|---|---|---|---|---|",
    ]
    for size, g in report["generation"].items():
        t = g["tokens_per_s"]
        lines.append(
            f"| {size} | {g['params_m']:.1f}M | {t['hf']:,.0f} | {t['vllm']:,.0f} | {g['vllm_over_hf']:.2f}x | "
            f"{g['vllm_startup_s']:.1f} |"
        )
    if "ppo" in report:
        p = report["ppo"]
        lines += [
            "",
            f"PPO on the default task with each engine, {len(p['runs']) // 2} seed(s) each, the eval stage's 256 "
            "held-out prompts (its SFT baseline sampled with the same engine); mean over seeds ± SE:",
            "",
            "| engine | held-out gold | gold gain over SFT | seconds per run |",
            "|---|---|---|---|",
        ]
        for engine, e in p["engines"].items():
            lines.append(
                f"| {engine} | {e['gold_reward']:.4f} ± {e['gold_reward_se']:.4f} | "
                f"{e['gold_gain']:.4f} ± {e['gold_gain_se']:.4f} | {e['seconds']:.0f} |"
            )
        lines.append("")
        for metric, label in (("gold_reward", "Held-out gold"), ("gold_gain", "Gold gain")):
            g = p[metric]
            verdict = "within" if g["within_2_se"] else "not within"
            lines.append(f"{label}, vLLM minus HF: {g['gap']:+.4f} ± {g['se']:.4f}, {verdict} two standard errors.")
        lines.append(
            "Seconds: wall time of the pipeline (PPO and the eval stage; data, SFT and the reward model cached), "
            "leaving out the first run, which trained them."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["--child-pipeline"]:
        return child_pipeline(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ppo-seeds", type=int, default=2)
    ap.add_argument("--skip-ppo", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = {
        "command": "python -m benchmarks.rollout_engines " + " ".join(sys.argv[1:]),
        "commit": git_commit(),
        "machine": f"{platform.machine()}, {device_name()}",
        "rounds": args.rounds,
        "generation": {size: generation(size, args.rounds) for size in sizes()},
    }
    if not args.skip_ppo:
        report["ppo"] = ppo_gold(args.ppo_seeds)
    write_results(f"rollout_engines_{'cuda' if 'cpu' not in device_name() else 'cpu'}", report, markdown)


if __name__ == "__main__":
    main()
