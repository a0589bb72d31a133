"""Speed, measured on one machine in one run: each stage against the reference a user would pick instead.

    python -m benchmarks.throughput [--phases pipeline,stages,ppo] [--ppo-steps N] [--threads T] [hydra overrides ...]

1. The pipeline (default config unless overridden) in a child process: wall time of the flow against
   the sum of the stages' own compute (``compute_s`` of each stage record) = orchestration overhead
   (Prefect tasks, cache, MLflow runs and artifact upload); then the same flow again, fully Cached.
   Start-up (imports, Prefect's ephemeral server, a new MLflow store) is reported on its own: a
   deployment against running servers does not pay it per run.
2. SFT, reward, DPO: ours against TRL's SFTTrainer, RewardTrainer and DPOTrainer, each in its own child
   process (clean peak memory), same start model, data, batch size, epochs, learning rate, schedule,
   sequence length, precision. Tokens/s = real (non-pad) tokens of the training batches / seconds of
   training (for DPO including the reference log-probs, which both compute).
3. PPO, the config's iterations each, one after the other in ``--ppo-repeats`` rounds of alternating
   order (the fastest run of each counts: identical runs differ by up to 15 % on a shared 2-core host):
   our stage, TRL's PPOTrainer (1.12, the last release that has it, in its own virtual environment
   ``benchmarks/.venv-trl-ppo`` made on first use: ``benchmarks/trl_ppo.py``),
   ``benchmarks/ppo_baseline.py`` (a plain PyTorch loop: HF ``generate``, separate forwards, GAE looped
   over tokens), then ours with one change undone (the fused GELU kernel our loader swaps in for
   GPT-2's, AdamW's fused kernel, old log-probs from the sampler). Same start model, reward and value models, prompts
   and
   settings. (``runtime.compile`` has its own measurement: ``benchmarks/compile.py``.)
   Seconds per iteration = wall time from the end of one iteration to the end of the next, split into
   generation, scoring (old/ref log-probs, values, reward) and update; tokens/s = the rollout's real
   tokens per second of it. Then each trained policy's held-out gold reward against SFT (our eval stage):
   a faster PPO that learns less does not count.

Model-FLOPs utilisation of the training phases (PaLM's convention): a trained token costs
6 N + 12 L d T FLOPs, N the parameters that multiply (embedding lookups excluded, a tied LM head
included), L layers, d width, T the context; DPO adds the reference forward (1/3 of that), PPO's update
trains policy and value. MFU = achieved FLOP/s over the device's dense peak for the config's precision
(``--peak-tflops``, or the table below for known GPUs; none on CPU).

Writes ``benchmarks/results/throughput_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rlhf.synthetic import gold_reward

PROJECT = Path(__file__).resolve().parents[1]
RESULTS = PROJECT / "benchmarks" / "results"


# ------------------------------------------------------------------------------------------------
# measurement helpers (children)
# ------------------------------------------------------------------------------------------------
def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return (
        f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    )


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_mb() -> dict:
    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# Dense peak TFLOP/s per device (vendor data sheets, SXM parts): bf16 tensor cores, plain fp32.
PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.0, "float32": 67.0},
    "H100": {"bfloat16": 989.0, "float32": 67.0},
    "A100": {"bfloat16": 312.0, "float32": 19.5},
    "L4": {"bfloat16": 121.0, "float32": 30.3},
}


def peak_tflops(device: str, precision: str, override: float | None) -> float | None:
    if override:
        return override
    precision = "bfloat16" if precision == "float16" else precision  # the same tensor-core peak
    return next((p[precision] for name, p in PEAK_TFLOPS.items() if name in device), None)


def training_flops_per_token(path: str, seq_len: int, scalar: bool = False) -> float:
    """6 N + 12 L d T for the model at ``path`` (a causal LM, or with ``scalar`` a reward/value model)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path, **({"num_labels": 1} if scalar else {}))
    with torch.device("meta"):  # shapes only, no memory
        model = (
            AutoModelForSequenceClassification.from_config(config)
            if scalar
            else AutoModelForCausalLM.from_config(config)
        )
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    n = sum(p.numel() for p in model.parameters() if id(p) not in lookups)
    head = None if scalar else model.get_output_embeddings()
    if head is not None and id(head.weight) in lookups:  # tied: the LM head is a matmul with the embedding
        n += head.weight.numel()
    return 6 * n + 12 * config.num_hidden_layers * config.hidden_size * seq_len


class NullSink:
    """Metric sink that keeps what PPO logs (its step timings) and drops the rest."""

    def __init__(self) -> None:
        self.history: list[tuple[int, dict]] = []
        self.times: list[float] = []  # when each entry of history was logged (perf_counter)

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.history.append((step, dict(metrics)))
        self.times.append(time.perf_counter())

    def log_table(self, *_a, **_k) -> None:
        pass

    def flush(self) -> None:
        pass


def pipeline_inputs(overrides: list[str]):
    """The composed config and the finished upstream stages of the pipeline run of phase 1."""
    from flows.compose import load_config
    from rlhf.validate import validate
    from tasks.keys import pipeline_keys
    from tasks.records import read_record

    cfg = validate(load_config(overrides))
    keys = pipeline_keys(cfg)
    rec = {s: read_record(cfg.paths.root, s, keys[s]) for s in ("data", "sft", "reward")}
    return cfg, rec


# ------------------------------------------------------------------------------------------------
# phase 1: the pipeline, its orchestration overhead and a Cached re-run
# ------------------------------------------------------------------------------------------------
def child_pipeline(spec: dict) -> dict:
    t_launch = spec["t_launch"]
    import tasks  # noqa: F401  (Prefect's defaults, set in tasks/__init__.py, before Prefect is imported)

    # isort: split
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client

    from flows.compose import load_config
    from flows.dag import rlhf_pipeline
    from rlhf.tracking import experiment_id, resolve_uri
    from rlhf.validate import validate
    from tasks.records import read_record

    t_imported = time.time()
    with get_client(sync_client=True) as client:  # starts Prefect's ephemeral server
        client.hello()
    t_server = time.time()
    config = load_config(spec["overrides"])
    cfg = validate(config)
    uri = resolve_uri(cfg.tracking, cfg.paths.root)
    Path(cfg.paths.root).mkdir(parents=True, exist_ok=True)
    experiment_id(MlflowClient(uri), cfg.tracking.experiment, Path(cfg.paths.root), uri)  # a new store: migrations
    t_store = time.time()

    t0 = time.perf_counter()
    first = rlhf_pipeline(config)
    t1 = time.perf_counter()
    again = rlhf_pipeline(config)
    t2 = time.perf_counter()
    assert all(again["cached"].values()), again["cached"]
    compute = {s: read_record(cfg.paths.root, s, k)["compute_s"] for s, k in first["keys"].items()}
    wall = t1 - t0
    return {
        "startup_s": {
            "imports": t_imported - t_launch,
            "prefect_server": t_server - t_imported,
            "mlflow_store": t_store - t_server,
        },
        "pipeline_wall_s": wall,
        "stage_compute_s": compute,
        "compute_s": sum(compute.values()),
        "overhead_s": wall - sum(compute.values()),
        "overhead_pct": 100 * (wall - sum(compute.values())) / wall,
        "cached_rerun_s": t2 - t1,
        "metrics": first["metrics"],
        **peak_memory_mb(),
    }


# ------------------------------------------------------------------------------------------------
# phase 2: SFT, reward, DPO, ours vs TRL
# ------------------------------------------------------------------------------------------------
class Meter:
    def __init__(self) -> None:
        self.seconds, self.tokens = 0.0, 0

    def timed(self, fn):
        def wrapper(*args, **kwargs):
            sync()
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            self.seconds += time.perf_counter() - t
            return out

        return wrapper


def ours(stage: str, cfg, rec: dict, work: Path) -> Meter:
    """Our stage's run(), timing every optimizer step (and DPO's reference pass), counting trained tokens."""
    import rlhf.trainer as trainer_mod
    from rlhf import runtime
    from rlhf.algorithms import PolicyInputs
    from rlhf.context import StageContext
    from rlhf.stages import dpo, reward, sft

    meter = Meter()
    trainer_mod.Trainer.optimizer_step = meter.timed(trainer_mod.Trainer.optimizer_step)
    record = trainer_mod.Trainer.record

    def counting(self, metrics, tokens=0):
        meter.tokens += tokens
        return record(self, metrics, tokens)

    trainer_mod.Trainer.record = counting
    device = runtime.setup(cfg.runtime, 0)
    ctx = StageContext(work, NullSink(), device, fresh=True)
    if stage == "sft":
        shutil.copytree(Path(rec["sft"]["out_dir"]) / "base", work / "base")  # the same start model as TRL's
        sft.run(cfg.model, cfg.sft, rec["data"]["data_dir"], ctx)
    elif stage == "reward":
        reward.run(cfg.reward, cfg.model, rec["data"]["data_dir"], rec["sft"]["model_path"], ctx)
    else:
        dpo.reference_logps = meter.timed(dpo.reference_logps)
        dpo.run(cfg.algo, cfg.model, PolicyInputs(rec["data"]["data_dir"], rec["sft"]["model_path"]), ctx)
    return meter


def trl_optimizer(cfg) -> dict:
    """Our optimiser and schedule settings (an OptimConfig) in TRL's argument names: the same AdamW, the same steps."""
    return dict(
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.schedule,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        adam_beta2=0.95,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
    )


def trl_args(stage_cfg, work: Path, device, **extra) -> dict:
    """TrainingArguments shared by the three TRL trainers, set to our config's values."""
    return dict(
        output_dir=str(work),
        per_device_train_batch_size=stage_cfg.batch_size,
        gradient_accumulation_steps=stage_cfg.grad_accum,
        num_train_epochs=stage_cfg.epochs,
        **trl_optimizer(stage_cfg),
        logging_steps=stage_cfg.log_every,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=device.type == "cpu",
        **extra,
    )


def trl(stage: str, cfg, rec: dict, work: Path) -> Meter:
    """TRL's trainer for the stage on the same start model and rows, timing ``train()``, counting batch tokens."""
    import torch
    import trl as T
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhf import runtime
    from rlhf.chat import render_answer
    from rlhf.data import load_split
    from rlhf.stages.sft import EVAL_SHARE

    device = runtime.setup(cfg.runtime, 0)
    data_dir = rec["data"]["data_dir"]
    max_length = cfg.model.max_length
    if stage == "sft":
        start = str(Path(rec["sft"]["out_dir"]) / "base")
        rows = load_split(data_dir, "sft")
        rows = rows[max(1, int(EVAL_SHARE * len(rows))) :]  # the rows our SFT trains on
        ds = Dataset.from_list(
            [{"prompt": r["prompt"], "completion": render_answer(None, r["prompt"], r["response"])} for r in rows]
        )
        args = T.SFTConfig(
            **trl_args(cfg.sft, work, device, max_length=max_length, completion_only_loss=True, packing=False)
        )
        tok = AutoTokenizer.from_pretrained(start)
        trainer = T.SFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(start), args=args, train_dataset=ds, processing_class=tok
        )
    else:
        start = rec["sft"]["model_path"]
        tok = AutoTokenizer.from_pretrained(start)
        rows = load_split(data_dir, "pref")
        ds = Dataset.from_list(
            [
                {
                    "prompt": r["prompt"],
                    "chosen": render_answer(None, r["prompt"], r["chosen"]),
                    "rejected": render_answer(None, r["prompt"], r["rejected"]),
                }
                for r in rows
            ]
        )
        if stage == "reward":
            model = AutoModelForSequenceClassification.from_pretrained(start, num_labels=1)
            model.config.pad_token_id = tok.pad_token_id
            args = T.RewardConfig(**trl_args(cfg.reward, work, device, max_length=max_length, disable_dropout=True))
            trainer = T.RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
        else:
            args = T.DPOConfig(
                **trl_args(
                    cfg.algo,
                    work,
                    device,
                    max_length=max_length,
                    beta=cfg.algo.beta,
                    label_smoothing=cfg.algo.label_smoothing,
                    disable_dropout=True,
                )
            )
            trainer = T.DPOTrainer(
                model=AutoModelForCausalLM.from_pretrained(start), args=args, train_dataset=ds, processing_class=tok
            )
    meter = Meter()
    compute_loss = trainer.compute_loss

    def counting(model, inputs, *a, **k):
        masks = [v for name, v in inputs.items() if name.endswith("attention_mask") and torch.is_tensor(v)]
        prompt = [v for name, v in inputs.items() if name == "prompt_attention_mask"]
        # a prompt mask of its own stands for the prompt of both the chosen and the rejected sequence
        meter.tokens += int(sum(int(m.sum()) for m in masks) + sum(int(m.sum()) for m in prompt))
        return compute_loss(model, inputs, *a, **k)

    trainer.compute_loss = counting
    meter.timed(trainer.train)()
    return meter


def rows_that_fit(data_dir: str, tokenizer_dir: str, max_length: int, out_dir: Path, limit: int) -> str:
    """A copy of the SFT and preference splits keeping rows whose prompt + answer + EOS fit ``max_length``.

    TRL drops preference rows that are too long and truncates SFT rows; we cut answers. On rows that fit,
    both do exactly the same work.
    """
    from transformers import AutoTokenizer

    from rlhf.chat import render_answer
    from rlhf.data import load_split, save_splits

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)

    def fits(prompt: str, *answers: str) -> bool:
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        return all(
            n_prompt + len(tok(render_answer(None, prompt, a), add_special_tokens=False)["input_ids"]) + 1 <= max_length
            for a in answers
        )

    splits = {
        "sft": [r for r in load_split(data_dir, "sft") if fits(r["prompt"], r["response"])][:limit],
        "pref": [r for r in load_split(data_dir, "pref") if fits(r["prompt"], r["chosen"], r["rejected"])][:limit],
    }
    # Our stages also score a held-out set (DPO: its reference log-probs up front); TRL's runs have no eval
    # set: one held-out row keeps that extra work out of the comparison.
    splits["eval_pref"] = load_split(data_dir, "eval_pref")[:1]
    splits["eval_prompts"] = load_split(data_dir, "eval_prompts")[:1]  # where the stages read the data's format
    save_splits(splits, out_dir)
    return str(out_dir)


def child_stage(spec: dict) -> dict:
    import torch

    cfg, rec = pipeline_inputs(spec["overrides"])
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as work:
        tok_dir = str(Path(rec["sft"]["out_dir"]) / "base") if spec["stage"] == "sft" else rec["sft"]["model_path"]
        rec["data"] = {
            "data_dir": rows_that_fit(
                rec["data"]["data_dir"], tok_dir, cfg.model.max_length, Path(work) / "data", spec["rows"]
            )
        }
        meter = (ours if spec["impl"] == "ours" else trl)(spec["stage"], cfg, rec, Path(work) / "run")
    flops = training_flops_per_token(tok_dir, cfg.model.max_length, scalar=spec["stage"] == "reward")
    if spec["stage"] == "dpo":
        flops *= 4 / 3  # the frozen reference's forward on every token
    tps = meter.tokens / meter.seconds
    return {
        "tokens": meter.tokens,
        "seconds": meter.seconds,
        "tokens_per_s": tps,
        "tflops": flops * tps / 1e12,
        **peak_memory_mb(),
    }


# ------------------------------------------------------------------------------------------------
# phase 3: PPO, ours against TRL's PPOTrainer and a plain PyTorch loop, then held-out gold of each
# ------------------------------------------------------------------------------------------------
TRL_PPO = "1.12.0"  # the last TRL release with PPOTrainer
TRL_VENV = PROJECT / "benchmarks" / ".venv-trl-ppo"


def trl_ppo_python() -> Path:
    """The interpreter of TRL 1.12's own virtual environment, made on first use with our torch and transformers."""
    import importlib.metadata as md

    python = TRL_VENV / "bin" / "python"
    if not python.exists():
        print(f"installing trl=={TRL_PPO} into {TRL_VENV} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, f"torch=={md.version('torch')}"], check=True)  # the local CPU wheel, as in the README
        subprocess.run([*pip, f"trl=={TRL_PPO}", f"transformers=={md.version('transformers')}"], check=True)
    return python


def ppo_settings(spec: dict):
    return onpolicy_settings({"algo_cfg": spec["ppo"], "steps": spec["steps"]})[1]


OURS = (
    "ours",
    "ours_gpt2_gelu",
    "ours_foreach_adamw",
    "ours_recomputed_logprobs",
)  # as shipped, then one change undone at a time
OURS_COMPILED = "ours_compiled"  # ours with runtime.compile (benchmarks/compile.py)


def child_ppo(spec: dict) -> dict:
    """Ours (or a variant of :data:`OURS`) or the plain loop for ``steps`` iterations; the trained policy goes to
    ``policy_dir``."""
    import torch

    from rlhf import runtime
    from rlhf.algorithms import PolicyInputs
    from rlhf.context import StageContext
    from rlhf.stages import ppo

    cfg, rec = pipeline_inputs(spec["overrides"])
    ppo_cfg = ppo_settings(spec)
    device = runtime.setup(cfg.runtime, 0)
    sft_path, reward_path = rec["sft"]["model_path"], rec["reward"]["model_path"]
    started = time.perf_counter()
    if spec["impl"] in (*OURS, OURS_COMPILED):
        if (
            spec["impl"] == "ours_gpt2_gelu"
        ):  # one change undone: GPT-2's own GELU (Python-level ops), not the fused kernel
            import rlhf.modeling as modeling_mod

            modeling_mod.FUSED_ACTIVATIONS.clear()
            modeling_mod.FUSED_ACTIVATIONS["gelu_pytorch_tanh"] = (
                "gelu_new"  # the checkpoints we trained were saved with the swap
            )
        if (
            spec["impl"] == "ours_foreach_adamw"
        ):  # one change undone: PyTorch's default AdamW (on CPU a per-tensor loop, no foreach)
            import rlhf.trainer as trainer_mod

            trainer_mod.adamw = lambda groups, c: torch.optim.AdamW(
                groups, lr=c.lr, weight_decay=c.weight_decay, betas=(0.9, 0.95), eps=1e-8
            )
        if (
            spec["impl"] == "ours_recomputed_logprobs"
        ):  # one change undone: old log-probs from a forward, not from the sampler
            import rlhf.onpolicy_models as onpolicy_models

            onpolicy_models.sampler_logprobs_exact = lambda model_cfg: False
        sink = NullSink()
        with tempfile.TemporaryDirectory() as work:
            ctx = StageContext(Path(work), sink, device, fresh=True, compile=spec["impl"] == OURS_COMPILED)
            ppo.run(
                ppo_cfg,
                cfg.model,
                PolicyInputs(
                    rec["data"]["data_dir"], sft_path, reward_path, missing_eos_penalty=cfg.reward.missing_eos_penalty
                ),
                ctx,
            )
            shutil.copytree(ctx.final_dir, spec["policy_dir"])
        logged = [(t, m) for (_, m), t in zip(sink.history, sink.times) if "ppo/time_update_s" in m]
        before = max(t for (step, _), t in zip(sink.history, sink.times) if step == 0)  # the held-out evaluation of SFT
        first_step_s = logged[0][0] - before  # the first iteration (compiling, where runtime.compile is on)
        rows = []
        for (t_prev, _), (t, m) in zip(logged, logged[1:]):  # the first step warms up
            tokens = (
                m["ppo/train_tokens_per_s"] * m["ppo/time_update_s"] / ppo_cfg.ppo_epochs
            )  # prompt + answer tokens of the rollout
            rows.append(
                {
                    "step_s": t - t_prev,
                    **{f"{k}_s": m[f"ppo/time_{k}_s"] for k in ("generation", "scoring", "update")},
                    "gen_tokens_per_s": m["ppo/gen_tokens_per_s"],
                    "train_tokens_per_s": m["ppo/train_tokens_per_s"],
                    "tokens_per_s": tokens / (t - t_prev),
                }
            )
    else:
        from benchmarks.ppo_baseline import run_baseline

        rows = run_baseline(
            ppo_cfg, cfg.model.max_length, rec["data"]["data_dir"], sft_path, reward_path, device, spec["policy_dir"]
        )
    return {
        "steps": rows,
        "wall_s": time.perf_counter() - started,
        "flops_per_token": ppo_flops(cfg, rec, ppo_cfg),
        **peak_memory_mb(),
        **({"first_step_s": first_step_s} if spec["impl"] in (*OURS, OURS_COMPILED) else {}),
    }


def ppo_flops(cfg, rec: dict, ppo_cfg) -> float:
    """Training FLOPs per token of PPO's update: the policy and the value model."""
    sft_path, reward_path = rec["sft"]["model_path"], rec["reward"]["model_path"]
    value_path = reward_path if ppo_cfg.value_init == "reward" else sft_path
    return training_flops_per_token(sft_path, cfg.model.max_length) + training_flops_per_token(
        value_path, cfg.model.max_length, scalar=True
    )


def run_trl_ppo(spec: dict) -> dict:
    """TRL's PPOTrainer (``benchmarks/trl_ppo.py`` in its own environment) on the same models, prompts and settings."""
    import dataclasses

    import torch

    from rlhf import runtime
    from rlhf.data import encode_prompts, load_rows
    from rlhf.modeling import load_tokenizer

    cfg, rec = pipeline_inputs(spec["overrides"])
    ppo_cfg = ppo_settings(spec)
    runtime.setup(cfg.runtime, 0)  # the threads ours runs with
    sft_path, reward_path = rec["sft"]["model_path"], rec["reward"]["model_path"]
    tok = load_tokenizer(sft_path)
    prompts = encode_prompts(
        tok,
        [r["prompt"] for r in load_rows(rec["data"]["data_dir"], "ppo_prompts", tok)],
        cfg.model.max_length - ppo_cfg.sampling.max_new_tokens,
    )
    if ppo_cfg.value_init == "sft":
        raise SystemExit(
            "value_init=sft zeroes our value head; TRL's value model keeps its head: compare with value_init=reward"
        )
    with tempfile.TemporaryDirectory() as work:
        trl_spec = {
            "sft_path": sft_path,
            "reward_path": reward_path,
            "value_path": reward_path,
            "prompt_ids": prompts,
            "ppo": dataclasses.asdict(ppo_cfg),
            "steps": spec["steps"],
            "out_dir": work,
            "missing_eos_penalty": cfg.reward.missing_eos_penalty,
            "threads": torch.get_num_threads(),
        }
        (Path(work) / "spec.json").write_text(json.dumps(trl_spec))
        out = subprocess.run(
            [str(trl_ppo_python()), str(PROJECT / "benchmarks" / "trl_ppo.py"), str(Path(work) / "spec.json")],
            cwd=PROJECT,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
            capture_output=True,
            text=True,
            timeout=3600,
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            raise RuntimeError(f"TRL PPO failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
        result = json.loads(lines[-1][len("RESULT ") :])
        shutil.copytree(result.pop("policy_dir"), spec["policy_dir"])
    return {**result, "flops_per_token": ppo_flops(cfg, rec, ppo_cfg)}


def child_ppo_gold(spec: dict) -> dict:
    """Held-out gold of each trained policy against SFT: our eval stage with the config's eval settings."""
    from rlhf import runtime
    from rlhf.context import StageContext
    from rlhf.stages import evaluate

    cfg, rec = pipeline_inputs(spec["overrides"])
    device = runtime.setup(cfg.runtime, 0)
    out = {}
    for impl, policy_dir in spec["policies"].items():
        with tempfile.TemporaryDirectory() as work:
            m = evaluate.run(
                cfg.eval,
                cfg.model.max_length,
                gold_reward,
                rec["data"]["data_dir"],
                policy_dir,
                rec["sft"]["model_path"],
                [rec["reward"]["model_path"]],
                StageContext(Path(work), NullSink(), device, fresh=True),
                cfg.reward.missing_eos_penalty,
            )["metrics"]
        out[impl] = {
            k: m[f"eval/{k}"]
            for k in ("gold_gain", "gold_gain_se", "win_rate_gold", "win_rate_gold_se", "kl", "kl_se", "proxy_gain")
        }
    return out


# ------------------------------------------------------------------------------------------------
# phase 4: RLOO and GRPO, ours against TRL's RLOOTrainer and GRPOTrainer
# ------------------------------------------------------------------------------------------------
def onpolicy_settings(spec: dict):
    from rlhf.algorithms import registry
    from rlhf.settings import from_dict

    algorithm = registry()[spec["algo_cfg"]["algo"]]
    return algorithm, from_dict(
        algorithm.schema, {**spec["algo_cfg"], "steps": spec["steps"], "eval_every": 10**6, "checkpoint_every": 10**6}
    )


def child_critic_free(spec: dict) -> dict:
    """RLOO or GRPO for ``steps`` iterations, ours or TRL's trainer (its current release, the project's
    environment): every iteration's real tokens (prompts + answers) and when it ended; the policy to ``policy_dir``.

    TRL's iteration: one generation batch of ``rollout_batch_size`` answers (``generation_batch_size``), then
    ``ppo_epochs`` (``num_iterations``) passes of ``rollout_batch_size / minibatch_size`` optimizer steps
    (``steps_per_generation``) of ``minibatch_size`` answers (``per_device_train_batch_size``). Its reward is
    our reward model under our scoring rule (the score at the answer's last token, EOS included, minus the
    missing-EOS penalty), as a reward function on the token ids TRL sampled."""
    from rlhf import runtime
    from rlhf.algorithms import PolicyInputs
    from rlhf.context import StageContext

    cfg, rec = pipeline_inputs(spec["overrides"])
    algorithm, c = onpolicy_settings(spec)
    device = runtime.setup(cfg.runtime, 0)
    sft_path, reward_path = rec["sft"]["model_path"], rec["reward"]["model_path"]
    ends: list[tuple[float, float]] = []  # (when an iteration ended, its real tokens)
    started = time.perf_counter()
    if spec["impl"] == "ours":
        sink = NullSink()
        with tempfile.TemporaryDirectory() as work:
            ctx = StageContext(Path(work), sink, device, fresh=True)
            algorithm.run(
                c,
                cfg.model,
                PolicyInputs(
                    rec["data"]["data_dir"], sft_path, reward_path, missing_eos_penalty=cfg.reward.missing_eos_penalty
                ),
                ctx,
            )
            shutil.copytree(ctx.final_dir, spec["policy_dir"])
        name = c.algo
        ends = [
            (t, m[f"{name}/train_tokens_per_s"] * m[f"{name}/time_update_s"] / c.ppo_epochs)
            for (_, m), t in zip(sink.history, sink.times)
            if f"{name}/time_update_s" in m
        ]
    else:
        ends = trl_critic_free(spec, cfg, rec, c, device)
    import statistics

    spans = [(t - t_prev, n) for (t_prev, _), (t, n) in zip(ends, ends[1:])]  # the first iteration warms up
    return {
        "iterations": len(ends),
        "tokens_per_s": statistics.median(n / dt for dt, n in spans),
        "iteration_s": statistics.median(dt for dt, _ in spans),
        "wall_s": time.perf_counter() - started,
        **peak_memory_mb(),
    }


def trl_critic_free(spec: dict, cfg, rec: dict, c, device) -> list[tuple[float, float]]:
    import torch
    import trl as T
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback

    from rlhf.data import load_rows
    from rlhf.modeling import load_scalar_model, load_tokenizer, sequence_scores

    sft_path, reward_path = rec["sft"]["model_path"], rec["reward"]["model_path"]
    tok = load_tokenizer(sft_path)
    tok.padding_side = "left"
    reward_model = load_scalar_model(reward_path, tok, zero_head=False).to(device).eval()
    eos, penalty = tok.eos_token_id, cfg.reward.missing_eos_penalty
    prompts = [r["prompt"] for r in load_rows(rec["data"]["data_dir"], "ppo_prompts", tok)]

    @torch.no_grad()
    def our_reward(prompts, completions, completion_ids, prompt_ids=None, **_):
        """Our reward model's score at the answer's last token (EOS included), minus the missing-EOS penalty."""
        p_ids = tok(prompts, add_special_tokens=False)["input_ids"]
        rows = [p + a for p, a in zip(p_ids, completion_ids)]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):  # left padding: the last token of every row in the last column
            ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r), 1
        scores = sequence_scores(
            reward_model, ids.to(device), mask.to(device), torch.full((len(rows),), width - 1, device=device)
        )
        ended = torch.tensor([eos in a for a in completion_ids], device=device)
        return (scores - penalty * (~ended).float()).tolist()

    common = dict(
        output_dir=str(Path(spec["policy_dir"]).with_suffix(".trainer")),
        **trl_optimizer(c),
        per_device_train_batch_size=c.minibatch_size,
        steps_per_generation=c.rollout_batch_size // c.minibatch_size,
        num_generations=c.samples_per_prompt,
        num_iterations=c.ppo_epochs,
        max_completion_length=c.sampling.max_new_tokens,
        temperature=c.sampling.temperature,
        top_k=0,
        top_p=1.0,
        beta=c.beta,
        epsilon=c.clip_range,
        max_steps=spec["steps"] * (c.rollout_batch_size // c.minibatch_size) * c.ppo_epochs,
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        bf16=False,
        fp16=False,
        use_cpu=device.type == "cpu",
        dataloader_num_workers=0,
        log_completions=False,
    )
    if c.algo == "grpo":
        trainer_cls, args = (
            T.GRPOTrainer,
            T.GRPOConfig(
                **common,
                loss_type={"sequence": "grpo", "token": "dapo", "dr_grpo": "dr_grpo"}[c.loss_aggregation],
                scale_rewards="group" if c.scale_rewards else "none",
            ),
        )
    else:
        trainer_cls, args = T.RLOOTrainer, T.RLOOConfig(**common, normalize_advantages=c.whiten_advantages)
    trainer = trainer_cls(
        model=AutoModelForCausalLM.from_pretrained(sft_path),
        reward_funcs=our_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tok,
    )
    batches: list[float] = []
    score = trainer._generate_and_score_completions

    def counting(inputs):
        out = score(inputs)
        batches.append(float(out["prompt_mask"].sum() + out["completion_mask"].sum()))
        return out

    trainer._generate_and_score_completions = counting
    per_iteration = args.steps_per_generation * args.num_iterations
    ends: list[tuple[float, float]] = []

    class IterationEnd(TrainerCallback):
        def on_step_end(self, args_, state, control, **kwargs):
            if state.global_step % per_iteration == 0:
                ends.append((time.perf_counter(), batches[-1]))

    trainer.add_callback(IterationEnd())
    trainer.train()
    trainer.model.save_pretrained(spec["policy_dir"])
    tok.save_pretrained(spec["policy_dir"])
    return ends


def measure_critic_free(overrides: list[str], steps: int, env: dict, repeats: int) -> dict:
    """RLOO and GRPO: ours and TRL's for the same iterations, ``repeats`` rounds in alternating order (the
    fastest run of each counts), then the held-out gold of each counted run's policy."""
    from flows.compose import load_config

    policies = Path(tempfile.mkdtemp(prefix="rlhf-bench-cf-"))
    out: dict = {}
    counted: dict[str, str] = {}
    for algo in ("rloo", "grpo"):
        algo_cfg = load_config([f"algo={algo}", *overrides])["algo"]
        n = steps or algo_cfg["steps"]
        out[algo] = {"steps": n, "repeats": repeats}

        spec = {"overrides": overrides, "algo_cfg": algo_cfg, "steps": n}
        runs = timed_rounds(algo, {"ours": "critic_free", "trl": "critic_free"}, spec, repeats, env, policies)
        for impl, (result, policy_dir) in runs.items():
            out[algo][impl] = result
            counted[f"{algo}-{impl}"] = policy_dir
        out[algo]["ratio"] = out[algo]["ours"]["tokens_per_s"] / out[algo]["trl"]["tokens_per_s"]
    print("rloo, grpo: held-out gold of each ...", flush=True)
    gold = run_child("ppo_gold", {"overrides": overrides, "policies": counted}, env)
    for algo in ("rloo", "grpo"):
        out[algo]["gold"] = {i: gold[f"{algo}-{i}"] for i in ("ours", "trl")}
    shutil.rmtree(policies, ignore_errors=True)
    return out


def summarize(run: dict) -> dict:
    """Medians over the steps after the first, beside every step's time."""
    import statistics

    rows = run["steps"]
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {
        **med,
        "update_tflops": run["flops_per_token"] * med["train_tokens_per_s"] / 1e12,
        **{k: v for k, v in run.items() if k not in ("steps", "flops_per_token")},
        "step_s_each": [r["step_s"] for r in rows],
    }


CHILDREN = {
    "pipeline": child_pipeline,
    "stage": child_stage,
    "ppo": child_ppo,
    "ppo_gold": child_ppo_gold,
    "trl_ppo": run_trl_ppo,
    "critic_free": child_critic_free,
}


# ------------------------------------------------------------------------------------------------
# parent: run the children, write the report
# ------------------------------------------------------------------------------------------------
def run_child(kind: str, spec: dict, env: dict) -> dict:
    spec = {**spec, "t_launch": time.time()}
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.throughput", "--child", kind, json.dumps(spec)],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(
            f"{kind} {spec.get('stage', '')} {spec.get('impl', '')} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
        )
    return json.loads(lines[-1][len("RESULT ") :])


def markdown(report: dict) -> str:
    p = report.get("pipeline")
    lines = [
        "# Throughput: ours against the reference implementations\n",
        f"Device: {report['device']}. Config: `{' '.join(report['overrides']) or 'default'}`; torch "
        f"{report['versions']['torch']}, "
        f"trl {report['versions']['trl']}, transformers {report['versions']['transformers']}, prefect "
        f"{report['versions']['prefect']}, "
        f"mlflow {report['versions']['mlflow']}. Measured {report['date']} at commit {report.get('commit', '?')}: "
        f"`{report.get('command', '')}`"
        + (
            f" (phases measured on other dates keep theirs: {report['measured']})"
            if len(set(report.get("measured", {}).values())) > 1
            else ""
        )
        + ".\n",
    ]
    if p:
        lines += [
            "## Pipeline and orchestration\n",
            "| measure | value |",
            "|---|---|",
            f"| pipeline wall (flow run, all stages ran) | {p['pipeline_wall_s']:.1f} s |",
            f"| stages' own compute ({', '.join(f'{k} {v:.1f}' for k, v in p['stage_compute_s'].items())}) | "
            f"{p['compute_s']:.1f} s |",
            f"| **orchestration overhead** (wall − compute) | "
            f"**{p['overhead_s']:.1f} s = {p['overhead_pct']:.1f} %** |",
            f"| fully Cached re-run (same process) | {p['cached_rerun_s']:.1f} s |",
            f"| start-up of a new process: imports / Prefect ephemeral server / new MLflow store | "
            f"{p['startup_s']['imports']:.1f} / {p['startup_s']['prefect_server']:.1f} / "
            f"{p['startup_s']['mlflow_store']:.1f} s |",
            f"| peak RSS of the pipeline process | {p['peak_rss_mb']:.0f} MB |",
        ]
    lines += [
        f"\n## SFT, reward, DPO: tokens/s of training (real tokens, same work; {report['rows']} rows that fit the "
        f"context, "
        f"the config's epochs; best of {report['repeats']} runs each, alternating order; every run in the JSON)\n",
        "| stage | ours tok/s | reference | reference tok/s | ours / reference | ours s | ref s | tokens ours / ref | "
        "peak MB ours / ref "
        "| ours TFLOP/s | ours MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    refs = {"sft": "TRL SFTTrainer", "reward": "TRL RewardTrainer", "dpo": "TRL DPOTrainer"}
    peak = report.get("peak_tflops")
    mfu = lambda tflops: f"{100 * tflops / peak:.1f} %" if peak else "n/a"  # noqa: E731
    for stage, r in report["stages"].items():
        o, t = r["ours"], r["reference"]
        mem = lambda x: f"{x.get('peak_cuda_mb', x['peak_rss_mb']):.0f}"  # noqa: E731
        lines.append(
            f"| {stage} | {o['tokens_per_s']:,.0f} | {refs[stage]} | {t['tokens_per_s']:,.0f} | **{r['ratio']:.2f}x** "
            f"| "
            f"{o['seconds']:.1f} | {t['seconds']:.1f} | {o['tokens']:,} / {t['tokens']:,} | {mem(o)} / {mem(t)} | "
            f"{o['tflops']:.4g} | {mfu(o['tflops'])} |"
        )
    ppo = report["ppo"]
    o = ppo["ours"]
    lines += [
        f"\n## PPO: {ppo['steps']} iterations each on the default PPO settings; medians over the iterations after the "
        f"first; "
        f"the fastest of {ppo.get('repeats', 1)} runs each, alternating order (every run's tokens/s in the JSON)\n",
        "tokens/s = the rollout's real tokens (prompt + answer) per second of an iteration's wall time (end of one "
        "iteration "
        "to the end of the next); generation, scoring and update split it.\n",
        "| | step s | tokens/s | generation s | scoring s | update s | gen tok/s | train tok/s | peak MB | update "
        "TFLOP/s | update MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = {
        "ours": "ours (rlhf/stages/ppo.py)",
        "trl": f"TRL {report['versions'].get('trl_ppo', '1.12.0')} PPOTrainer (benchmarks/trl_ppo.py)",
        "reference": "plain PyTorch loop (benchmarks/ppo_baseline.py)",
    }
    for impl, name in names.items():
        r = ppo[impl]
        lines.append(
            f"| {name} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['generation_s']:.3f} | "
            f"{r['scoring_s']:.3f} | "
            f"{r['update_s']:.3f} | {r['gen_tokens_per_s']:,.0f} | {r['train_tokens_per_s']:,.0f} | "
            f"{r.get('peak_cuda_mb', r['peak_rss_mb']):.0f} | {r['update_tflops']:.4g} | {mfu(r['update_tflops'])} |"
        )
    for impl in ("trl", "reference"):
        r = ppo[impl]
        lines.append(
            f"| ours / {impl if impl == 'trl' else 'plain'}, speed-up | {r['step_s'] / o['step_s']:.2f}x | "
            f"**{o['tokens_per_s'] / r['tokens_per_s']:.2f}x** | {r['generation_s'] / o['generation_s']:.2f}x | "
            f"{r['scoring_s'] / o['scoring_s']:.2f}x | {r['update_s'] / o['update_s']:.2f}x | | | | | |"
        )
    variants = {
        "ours_gpt2_gelu": "ours with GPT-2's own GELU (the fused-kernel swap undone)",
        "ours_foreach_adamw": "ours with PyTorch's default AdamW (a loop over the tensors on CPU; the fused kernel "
        "undone)",
        "ours_recomputed_logprobs": "ours with the old log-probs recomputed by a forward (the sampler's not reused)",
    }
    if all(v in ppo for v in variants):
        lines += [
            "\nOne change undone at a time (the same iterations; the whole run's wall time also holds our held-out "
            "evaluations "
            "before training, after the first iteration and after the last; `runtime.compile`: "
            "benchmarks/results/compile_cpu.md):\n",
            "| | step s | tokens/s | generation s | scoring s | update s | whole run s | ours / this |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for impl, name in {"ours": "ours as shipped", **variants}.items():
            r = ppo[impl]
            lines.append(
                f"| {name} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['generation_s']:.3f} | "
                f"{r['scoring_s']:.3f} | "
                f"{r['update_s']:.3f} | {r['wall_s']:.1f} | {o['tokens_per_s'] / r['tokens_per_s']:.2f}x |"
            )
    g = ppo["gold"]
    lines += [
        f"\nHeld-out gold after the {ppo['steps']} iterations (our eval stage on each trained policy, the config's "
        f"eval prompts and seed; "
        "± one standard error over prompts):\n",
        "| | gold gain over SFT | win rate (gold) | KL to SFT | proxy gain |",
        "|---|---|---|---|---|",
    ]
    for impl, name in {**names, **variants}.items():
        if impl in g:
            r = g[impl]
            lines.append(
                f"| {name} | {r['gold_gain']:+.3f} ± {r['gold_gain_se']:.3f} | {r['win_rate_gold']:.3f} ± "
                f"{r['win_rate_gold_se']:.3f} | "
                f"{r['kl']:.2f} ± {r['kl_se']:.2f} | {r['proxy_gain']:+.3f} |"
            )
    cf = report.get("critic_free")
    if cf:
        lines += [
            f"\n## RLOO and GRPO: ours against TRL {report['versions']['trl']}'s RLOOTrainer and GRPOTrainer\n",
            "The same iterations of each method's default settings; tokens/s = an iteration's real tokens (prompts + "
            "answers) over "
            f"its wall time, median over the iterations after the first; the fastest of "
            f"{next(iter(cf.values())).get('repeats', 1)} runs each, "
            "alternating order. TRL's reward is our reward model under our scoring rule. Held-out gold "
            "± one standard error over prompts.\n",
            "| method | ours tok/s | TRL tok/s | ours / TRL | ours s / iteration | TRL s / iteration | gold gain ours "
            "| gold gain TRL | "
            "win rate ours | win rate TRL |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for algo, r in cf.items():
            o, t, g = r["ours"], r["trl"], r["gold"]
            lines.append(
                f"| {algo} ({r['steps']} iterations) | {o['tokens_per_s']:,.0f} | {t['tokens_per_s']:,.0f} | "
                f"**{r['ratio']:.2f}x** | "
                f"{o['iteration_s']:.2f} | {t['iteration_s']:.2f} | {g['ours']['gold_gain']:+.3f} ± "
                f"{g['ours']['gold_gain_se']:.3f} | "
                f"{g['trl']['gold_gain']:+.3f} ± {g['trl']['gold_gain_se']:.3f} | {g['ours']['win_rate_gold']:.3f} | "
                f"{g['trl']['win_rate_gold']:.3f} |"
            )
    lines.append(
        f"\nMFU: model FLOPs (6 N + 12 L d T per trained token) over the dense peak of {report['precision']} on this "
        f"device "
        f"({f'{peak:g} TFLOP/s' if peak else 'unknown: pass --peak-tflops'})."
    )
    return "\n".join(lines) + "\n"


PHASES = ("pipeline", "stages", "ppo", "critic_free")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    ap.add_argument(
        "--ppo-steps",
        type=int,
        default=0,
        help="PPO iterations per implementation (0: the config's algo.steps; the first warms up)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: the config's)")
    ap.add_argument(
        "--rows", type=int, default=768, help="training rows (SFT examples, preference pairs) per stage comparison"
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="SFT / reward / DPO measurements per implementation, alternating which goes first",
    )
    ap.add_argument(
        "--ppo-repeats",
        type=int,
        default=3,
        help="rounds of the PPO, RLOO and GRPO runs, alternating the order (the fastest run counts)",
    )
    ap.add_argument(
        "--phases",
        default="pipeline,stages,ppo,critic_free",
        help="phases to measure; the others keep the last results' values",
    )
    ap.add_argument(
        "--peak-tflops", type=float, default=None, help="the device's dense peak TFLOP/s for MFU (default: known GPUs)"
    )
    add_pipeline_arguments(ap, "without the pipeline phase it must hold a finished one")
    args = ap.parse_args()
    if args.child:
        result = CHILDREN[args.child[0]](json.loads(args.child[1]))
        print("RESULT " + json.dumps(result))
        return

    import importlib.metadata as md

    ensure_bench_extra()
    threads = [f"runtime.threads={args.threads}"] if args.threads else []
    root, overrides, env = pipeline_workspace(args.root, "rlhf-bench-", [*args.overrides, *threads])
    report: dict = {
        "overrides": args.overrides,
        "date": time.strftime("%Y-%m-%d"),
        "commit": git_commit(),
        "command": " ".join(["python -m benchmarks.throughput", *sys.argv[1:]]),
        "rows": args.rows,
        "repeats": args.repeats,
        "versions": {
            **{p: md.version(p) for p in ("torch", "trl", "transformers", "prefect", "mlflow")},
            "trl_ppo": TRL_PPO,
        },
    }
    phases = set(args.phases.split(","))
    if unknown := phases - set(PHASES):
        ap.error(f"--phases: unknown {sorted(unknown)}; choose from {', '.join(PHASES)}")
    last = (
        json.loads((RESULTS / "throughput_cpu.json").read_text()) if (RESULTS / "throughput_cpu.json").exists() else {}
    )
    report.update({k: last[k] for k in PHASES if k not in phases and k in last})
    if "stages" not in phases:  # the kept stage results were measured with the last run's rows and repeats
        report.update({k: last[k] for k in ("rows", "repeats") if k in last})
    stamp = f"{report['date']} at {report['commit']}"
    report["measured"] = {
        k: stamp if k in phases else last.get("measured", {}).get(k, f"{last.get('date')} at {last.get('commit', '?')}")
        for k in PHASES
    }
    if "pipeline" in phases:
        print("pipeline ...", flush=True)
        report["pipeline"] = run_child("pipeline", {"overrides": overrides}, env)
    for stage in ("sft", "reward", "dpo") if "stages" in phases else ():
        report.setdefault("stages", {})
        print(f"{stage}: ours, TRL ...", flush=True)
        runs = alternating_rounds(
            ["ours", "trl"],
            args.repeats,
            lambda impl, i: run_child(
                "stage", {"overrides": overrides, "stage": stage, "impl": impl, "rows": args.rows}, env
            ),
        )
        r = {impl: best_run(rs) for impl, rs in runs.items()}
        report["stages"][stage] = {
            "ours": r["ours"],
            "reference": r["trl"],
            "ratio": r["ours"]["tokens_per_s"] / r["trl"]["tokens_per_s"],
            "tokens_per_s_each": {impl: [x["tokens_per_s"] for x in rs] for impl, rs in runs.items()},
        }
    from flows.compose import load_config

    if "ppo" in phases:
        report["ppo"] = measure_ppo(
            load_config(["algo=ppo", *overrides])["algo"], args.ppo_steps, overrides, env, args.ppo_repeats
        )
    if "critic_free" in phases:
        report["critic_free"] = measure_critic_free(overrides, args.ppo_steps, env, args.ppo_repeats)
    report["device"] = run_child_device(env)
    from rlhf.validate import validate

    model_cfg = validate(load_config(overrides)).model
    report["precision"] = model_cfg.autocast if model_cfg.autocast != "none" else model_cfg.dtype
    report["peak_tflops"] = peak_tflops(report["device"], report["precision"], args.peak_tflops)
    tag = "cuda" if "cpu" not in report["device"] else "cpu"
    write_results(f"throughput_{tag}", report, markdown)
    print(markdown(report))


def ensure_bench_extra() -> None:
    """TRL, the peer the benchmark measures against, is the project's ``bench`` extra: installed here on first use."""
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        print("installing the bench extra (trl) ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", f"{PROJECT}[bench]"], check=True)


def measure_ppo(ppo_cfg: dict, steps: int, overrides: list[str], env: dict, repeats: int) -> dict:
    """Ours, TRL's PPOTrainer, the plain loop and ours with one change undone or added, one after the other
    for the same iterations, ``repeats`` rounds in alternating order (the fastest run of each counts); then
    the held-out gold each trained policy reaches (the counted run's)."""
    steps = steps or ppo_cfg["steps"]
    policies = Path(tempfile.mkdtemp(prefix="rlhf-bench-ppo-"))
    impls = {"ours": "ppo", "trl": "trl_ppo", "reference": "ppo", **{v: "ppo" for v in OURS[1:]}}

    out: dict = {"steps": steps, "repeats": repeats}
    spec = {"overrides": overrides, "ppo": ppo_cfg, "steps": steps}
    counted = timed_rounds("ppo", impls, spec, repeats, env, policies, post=summarize)
    out.update({impl: r for impl, (r, _) in counted.items()})
    print("ppo: held-out gold of each ...", flush=True)
    out["gold"] = run_child(
        "ppo_gold", {"overrides": overrides, "policies": {impl: d for impl, (_, d) in counted.items()}}, env
    )
    shutil.rmtree(policies, ignore_errors=True)
    return out


def add_pipeline_arguments(ap: argparse.ArgumentParser, root_note: str) -> None:
    """A benchmark's ``--root`` and its Hydra overrides of the pipeline config."""
    ap.add_argument("--root", default=None, help=f"pipeline root (default: a fresh temporary folder); {root_note}")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the pipeline config")


def pipeline_workspace(root: str | None, prefix: str, overrides: list[str]) -> tuple[Path, list[str], dict]:
    """A benchmark's pipeline root (``root`` or a fresh temporary folder), the overrides that put the pipeline
    and its MLflow store there, and the children's environment: offline, with a Prefect home of its own."""
    path = Path(root or tempfile.mkdtemp(prefix=prefix)).resolve()
    (path / "prefect-home").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_HOME": str(path / "prefect-home")}
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.pop("PREFECT_API_URL", None)
    return path, [f"paths.root={path}", f"tracking.uri=sqlite:///{path}/mlflow.db", *overrides], env


def write_results(name: str, report: dict, markdown) -> None:
    """``benchmarks/results/<name>.json`` (the measurement, with command, commit and machine) and ``<name>.md``, its
    prose rendered by ``markdown`` (the docs render the JSON with the same function); the prose printed."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown(report))
    print(markdown(report))


def git_commit() -> str:
    """The project's commit, short, as a result records it."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT, capture_output=True, text=True)
    return out.stdout.strip()


def timed_rounds(label: str, children: dict[str, str], spec: dict, repeats: int, env: dict, policies: Path, post=None):
    """Each implementation (``children``: implementation -> the child kind that runs it) for ``spec["steps"]``
    iterations, ``repeats`` alternating rounds; per implementation the counted run's result (``post`` applied)
    and the folder of the policy it trained (see ``counted_runs``)."""

    def run_one(impl: str, i: int) -> dict:
        print(f"{label}: {impl}, {spec['steps']} iterations (round {i + 1} of {repeats}) ...", flush=True)
        policy_dir = str(policies / f"{label}-{impl}-{i}")
        shutil.rmtree(policy_dir, ignore_errors=True)  # a re-used root's
        result = run_child(children[impl], {**spec, "impl": impl, "policy_dir": policy_dir}, env)
        return {**(post(result) if post else result), "policy_dir": policy_dir}

    return counted_runs(alternating_rounds(list(children), repeats, run_one))


def alternating_rounds(impls: list[str], repeats: int, run_one) -> dict[str, list[dict]]:
    """``repeats`` rounds of one run per implementation (``run_one(impl, round)``), the order reversed every
    other round so that none always runs on a warmer machine: {impl: [each round's result]}."""
    runs: dict[str, list[dict]] = {impl: [] for impl in impls}
    for i in range(repeats):
        for impl in impls if i % 2 == 0 else impls[::-1]:
            runs[impl].append(run_one(impl, i))
    return runs


def best_run(runs: list[dict]) -> dict:
    """The fastest run: on a shared machine other work only ever slows a run down (timeit's rule)."""
    return max(runs, key=lambda r: r["tokens_per_s"])


def counted_runs(runs: dict[str, list[dict]]) -> dict[str, tuple[dict, str]]:
    """Per implementation, the fastest run's result (with every round's tokens/s) and the folder of the policy it
    trained."""
    counted = {}
    for impl, rs in runs.items():
        best = best_run(rs)
        counted[impl] = (
            {
                **{k: v for k, v in best.items() if k != "policy_dir"},
                "tokens_per_s_each": [r["tokens_per_s"] for r in rs],
            },
            best["policy_dir"],
        )
    return counted


def run_child_device(env: dict) -> str:
    out = subprocess.run(
        [sys.executable, "-c", "from benchmarks.throughput import device_name; print(device_name())"],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out.stdout.strip()


if __name__ == "__main__":
    main()
