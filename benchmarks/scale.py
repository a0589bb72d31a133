"""DDP against FSDP2: each process's peak memory and the tokens/s of SFT and of PPO (its four models), side by side.

    python -m benchmarks.scale [--processes 2] [--rounds 2] [--n-layer 8] [--n-embd 896] [--steps 4]

A llama built from config (``--n-layer`` blocks of width ``--n-embd``: 103M parameters by default) trains SFT for
``--steps`` optimizer steps and PPO for ``--steps`` iterations, each under ``runtime.strategy=ddp`` and ``fsdp``
in ``--processes`` processes (gloo on CPU, NCCL on GPUs), ``--rounds`` rounds in alternating order. Per process:
its peak resident memory (``ru_maxrss``) and its memory at the start of the stage's body (Python, torch and
transformers loaded, no model yet), whose difference is what the stage itself holds; per run: the stage's
tokens/s as it logs them, and PPO's generation tokens/s (under FSDP from the policy gathered whole). Writes
``benchmarks/results/scale_<device>.json`` and ``.md``, with a computed table
of what fits on one GPU for 0.5B, 7B and 70B models.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.throughput import device_name, git_commit, write_results

GiB = 1024**3
STRATEGIES = ("ddp", "fsdp")
RATES = ("tokens_per_s", "gen_tokens_per_s")  # a stage's training tokens/s; PPO's generation tokens/s


def rss_mb() -> float:
    """This process's resident memory now (Linux: /proc/self/statm)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def measured(body):
    """``body`` with every process's memory at its start and its peak, gathered to the main process."""

    def run(ctx) -> dict:
        start = rss_mb()
        result = body(ctx)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        import torch

        cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        from accelerate.utils import gather_object

        ranks = gather_object([{"start_mb": start, "peak_mb": peak, "cuda_peak_mb": cuda}])
        return {**result, "ranks": ranks}

    return run


def workspace(root: Path, n_layer: int, n_embd: int):
    """The synthetic data and the llama (built once, untrained) that SFT starts from and PPO's four models load."""
    from rlhf.config import DataConfig, ModelConfig
    from rlhf.context import StageContext
    from rlhf.stages import prepare, sft

    model = ModelConfig(arch="llama", n_layer=n_layer, n_embd=n_embd, n_head=n_embd // 64, max_length=64)
    quiet = type("Quiet", (), {"log_metrics": lambda *a: None, "flush": lambda *a: None})()
    ctx = lambda name: StageContext(root / name, quiet, __import__("torch").device("cpu"))  # noqa: E731
    data = prepare.run(
        DataConfig(n_sft=512, n_pref=64, n_eval_prompts=16, n_eval_pref=16, n_ppo_prompts=256), ctx("data")
    )["data_dir"]
    base = sft.base_model(model, Path(data), ctx("sft-base"))
    return model, data, base


def bodies(model, data: str, base: str, steps: int):
    from rlhf.algorithms import PolicyInputs
    from rlhf.config import SamplingConfig, SFTConfig
    from rlhf.config_algorithms import PPOConfig
    from rlhf.stages import ppo, sft
    from rlhf.synthetic import gold_reward

    pretrained = dataclasses.replace(model, pretrained=base)
    train_rows = 512 - 25  # n_sft less the 5 % SFT holds out
    sft_cfg = SFTConfig(lr=1e-4, epochs=(steps * 16 - 0.5) / train_rows, batch_size=16, log_every=1, eval_every=1000)
    ppo_cfg = PPOConfig(
        steps=steps,
        rollout_batch_size=16,
        minibatch_size=8,
        ppo_epochs=1,
        eval_every=1000,
        checkpoint_every=1000,
        sampling=SamplingConfig(max_new_tokens=16),
    )
    inputs = PolicyInputs(data, base, base, gold_reward)
    return {
        "sft": (lambda c: sft.run(pretrained, sft_cfg, data, c), "sft/tokens_per_s"),
        "ppo": (lambda c: ppo.run(ppo_cfg, model, inputs, c), "ppo/train_tokens_per_s"),
    }


def measure(args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="rlhf-bench-scale-"))  # ~9 GB of models and checkpoints at the default size
    try:
        return measure_in(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def measure_in(root: Path, args) -> dict:
    from mlflow.tracking import MlflowClient

    from rlhf.config import RuntimeConfig
    from rlhf.launch import run_data_parallel

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.create_experiment("scale", artifact_location=str(root / "artifacts"))
    model, data, base = workspace(root, args.n_layer, args.n_embd)
    runs: dict = {stage: {s: [] for s in STRATEGIES} for stage in ("sft", "ppo")}
    for stage, (body, rate) in bodies(model, data, base, args.steps).items():
        for i in range(args.rounds):
            for strategy in STRATEGIES if i % 2 == 0 else STRATEGIES[::-1]:
                print(f"{stage}: {strategy}, round {i + 1} of {args.rounds} ...", flush=True)
                rt = RuntimeConfig(num_processes=args.processes, strategy=strategy, threads=args.threads)
                run_id = client.create_run(exp, run_name=f"{stage}-{strategy}-{i}").info.run_id
                started = time.perf_counter()
                out = run_data_parallel(
                    measured(body), root / f"{stage}-{strategy}-{i}", rt, 0, client.tracking_uri, run_id
                )
                median = (
                    lambda name: statistics.median(  # noqa: E731  (the first step warms up)
                        [m.value for m in client.get_metric_history(run_id, name)][1:]
                    )
                )
                runs[stage][strategy].append(
                    {
                        "tokens_per_s": median(rate),
                        **({"gen_tokens_per_s": median("ppo/gen_tokens_per_s")} if stage == "ppo" else {}),
                        "ranks": out["ranks"],
                        "wall_s": time.perf_counter() - started,
                    }
                )
    n_params = sum(
        p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(base).parameters()
    )
    return {"runs": runs, "parameters": n_params}


def stage_mb(rank: dict) -> float:
    return rank["peak_mb"] - rank["start_mb"]


def summary(runs: dict) -> dict:
    """Per stage and strategy: the largest per-process peak (resident, and above the body's start) of each round,
    the medians over rounds, FSDP's ratios to DDP."""
    out = {}
    for stage, by in runs.items():
        row = {}
        for strategy, rounds in by.items():
            row[strategy] = {
                "peak_mb": statistics.median(max(r["peak_mb"] for r in x["ranks"]) for x in rounds),
                "stage_mb": statistics.median(max(stage_mb(r) for r in x["ranks"]) for x in rounds),
                **{k: statistics.median(x[k] for x in rounds) for k in RATES if k in rounds[0]},
            }
        row["ratio"] = {k: row["fsdp"][k] / row["ddp"][k] for k in row["ddp"]}
        out[stage] = row
    return out


def fits(params: float, gpus: int, gpu_gib: float) -> list[dict]:
    """Computed, not measured: GiB per GPU of weights, gradients and AdamW state (no activations) for PPO's four
    models (policy and value trained, reference and reward frozen) and for SFT, fp32 master weights as this project
    keeps them (4 bytes a weight, 4 a gradient, 8 of AdamW moments per trained weight; 4 per frozen weight)."""
    rows = []
    for lora in (False, True):
        trained, frozen = (0.0, 4.0) if lora else (16.0, 4.0)  # bytes a weight; LoRA's adapters: under 1 %
        for strategy in STRATEGIES:
            if lora and strategy == "fsdp":
                continue  # refused: rlhf.validate
            share = gpus if strategy == "fsdp" else 1
            if lora:  # one base per trained model, shared with its frozen twin (model.lora_shared_reference)
                ppo, sft = 2 * frozen * params, frozen * params
            else:
                ppo, sft = (2 * trained + 2 * frozen) * params, trained * params
            ppo_gib, sft_gib = ppo / share / GiB, sft / share / GiB
            rows.append(
                {
                    "strategy": strategy,
                    "lora": lora,
                    "sft_gib": sft_gib,
                    "ppo_gib": ppo_gib,
                    "sft_fits": sft_gib < gpu_gib,
                    "ppo_fits": ppo_gib < gpu_gib,
                }
            )
    return rows


def markdown(report: dict) -> str:
    s, a = report["summary"], report["args"]
    lines = [
        "# DDP against FSDP2: memory per process and tokens/s\n",
        f"Device: {report['device']}; torch {report['torch']}. Measured {report['date']} at commit {report['commit']}: "
        f"`{report['command']}`. A llama of {report['parameters'] / 1e6:.1f}M parameters ({a['n_layer']} blocks of "
        f"width {a['n_embd']}) in {a['processes']} processes; {a['steps']} SFT steps and {a['steps']} PPO iterations "
        f"per run, {a['rounds']} rounds in alternating order, medians over rounds of the largest process's peak.\n",
        "| stage | strategy | peak resident MB | held by the stage MB | tokens/s (SFT: a step's; PPO: the update's) "
        "| generation tokens/s (sampled from whole weights) |",
        "|---|---|---|---|---|---|",
    ]
    rate = lambda r, k, f: f.format(r[k]) if k in r else "-"  # noqa: E731  (SFT samples nothing)
    for stage, row in s.items():
        for strategy in STRATEGIES:
            r = row[strategy]
            lines.append(
                f"| {stage} | {strategy} | {r['peak_mb']:,.0f} | {r['stage_mb']:,.0f} | {r['tokens_per_s']:,.0f} | "
                f"{rate(r, 'gen_tokens_per_s', '{:,.0f}')} |"
            )
        q = row["ratio"]
        lines.append(
            f"| {stage} | **fsdp / ddp** | **{q['peak_mb']:.2f}x** | **{q['stage_mb']:.2f}x** | "
            f"**{q['tokens_per_s']:.2f}x** | {rate(q, 'gen_tokens_per_s', '**{:.2f}x**')} |"
        )
    lines += [
        "",
        "Peak resident memory counts Python, torch and transformers too (the same in both); held by the stage is the "
        "peak less the process's memory when the stage's body started.\n",
        "## What fits on one GPU (computed, not measured)\n",
        f"{report['fits']['gpus']} GPUs of {report['fits']['gpu_gib']} GiB; weights, gradients and AdamW state only "
        "(activations, the sampler's KV cache and the gathered blocks come on top): fp32 weights, 16 bytes a trained "
        "weight, 4 a frozen one, divided over the GPUs under FSDP.\n",
        "| model | strategy | LoRA | SFT GiB / GPU | PPO GiB / GPU |",
        "|---|---|---|---|---|",
    ]
    for size, rows in report["fits"]["models"].items():
        for r in rows:
            sft = f"{r['sft_gib']:,.1f}" + ("" if r["sft_fits"] else " (does not fit)")
            ppo = f"{r['ppo_gib']:,.1f}" + ("" if r["ppo_fits"] else " (does not fit)")
            lines.append(f"| {size} | {r['strategy']} | {'on' if r['lora'] else 'off'} | {sft} | {ppo} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--processes", type=int, default=2, help="processes per stage")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per strategy, alternating which goes first")
    ap.add_argument("--n-layer", type=int, default=8, help="llama blocks")
    ap.add_argument("--n-embd", type=int, default=896, help="llama width (heads of 64)")
    ap.add_argument("--steps", type=int, default=4, help="SFT steps and PPO iterations per run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = ap.parse_args()
    import torch

    measurement = measure(args)
    report = {
        "command": " ".join(["python -m benchmarks.scale", *sys.argv[1:]]),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "device": device_name(),
        "torch": torch.__version__,
        "args": vars(args),
        **measurement,
        "summary": summary(measurement["runs"]),
        "fits": {
            "gpus": 8,
            "gpu_gib": 80,
            "models": {name: fits(n, 8, 80) for name, n in (("0.5B", 0.5e9), ("7B", 7e9), ("70B", 70e9))},
        },
    }
    tag = "cuda" if torch.cuda.is_available() else "cpu"
    write_results(f"scale_{tag}", report, markdown)


if __name__ == "__main__":
    main()
