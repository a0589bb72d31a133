"""The on-policy loop every on-policy stage runs (:func:`run_method`), one iteration at a time:

  1. rollout:    sample answers for the iteration's prompts with the KV cache, ``samples_per_prompt`` each
  2. experience: once per batch, under no_grad and in chunks: old and reference log-probs, the reward model's
                 scores (and values, where the method has a critic); the method's advantages
  3. update:     ``ppo_epochs`` passes over shuffled minibatches of the method's losses
  4. evaluate:   every ``eval_every`` iterations (and after the first and the last), the held-out proxy and gold
                 reward and KL of the current policy; the guard keeps its checkpoint or stops training
  5. checkpoint: every ``checkpoint_every`` iterations and at the end; a stop signal checkpoints and stops here

Before the first iteration: the SFT answers' score offset and one evaluation of the policy before training (SFT).
After the last: the KL curve, the frontier fit, and the stage's model (the guard's checkpoint where it kept one).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from accelerate.utils import broadcast_object_list

from . import checkpoint
from .algorithms import PolicyInputs
from .config import ModelConfig
from .config_training import OnPolicyConfig
from .context import StageContext
from .curves import CURVES, save_figures
from .data import encode_prompts, load_rows
from .guard import GUARD_DIR
from .modeling import is_lora, load_adapters
from .onpolicy import OnPolicy
from .onpolicy_models import OnPolicyModels

EVAL_PROMPTS = 256  # held-out prompts scored at each evaluation during training (the default task has 258)


def run_method(
    method_cls: type[OnPolicy],
    cfg: OnPolicyConfig,
    model_cfg: ModelConfig,
    inputs: PolicyInputs,
    ctx: StageContext,
    value_init: str | None = None,
) -> dict:
    """An on-policy stage: its models (``value_init``: where a critic starts), prompts and the loop; its record."""
    resume = ctx.resume_point()
    models = OnPolicyModels(model_cfg, inputs, resume, ctx.device, value_init=value_init, place=ctx.placed)
    prompts, eval_prompts, eval_ids = prompts_of(cfg, model_cfg, inputs, models.tokenizer)
    return train(method_cls(cfg, models, prompts, ctx, inputs), eval_prompts, eval_ids, resume)


def prompts_of(cfg: OnPolicyConfig, model_cfg: ModelConfig, inputs: PolicyInputs, tokenizer) -> tuple[list, list, list]:
    """Training prompt ids, and the held-out prompts (text and ids) scored during training."""
    max_prompt = model_cfg.max_length - cfg.sampling.max_new_tokens
    rows = load_rows(inputs.data_dir, "ppo_prompts", tokenizer)
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in rows], max_prompt)
    eval_prompts = [r["prompt"] for r in load_rows(inputs.data_dir, "eval_prompts", tokenizer)][:EVAL_PROMPTS]
    return prompts, eval_prompts, encode_prompts(tokenizer, eval_prompts, max_prompt)


def train(method: OnPolicy, eval_prompts: list[str], eval_ids: list, resume: Path | None) -> dict:
    """The loop of the module docstring; returns the stage's record."""
    cfg, ctx, m, name = method.cfg, method.ctx, method.m, method.name
    start(method, resume, eval_prompts, eval_ids)
    progress = method.trainer.progress = ctx.progress(name, cfg.steps, method.iteration)
    metrics: dict[str, float] = {}
    while method.iteration < cfg.steps and not method.guard.stopped:
        times = [time.perf_counter()]
        with m.amp():
            with ctx.sharding.gathered(m.policy):  # sampled whole: each process's answers end when they end
                samples = method.rollout(m.policy, method.iteration)  # 1. rollout
            method.engine.release()  # vLLM on a GPU: its memory back to the update until the next rollout
            times.append(time.perf_counter())
            exp, stats = method.experience(samples)  # 2. experience
            times.append(time.perf_counter())
        method.iteration += 1
        trained = method.update(exp)  # 3. update
        times.append(time.perf_counter())
        method.kl_ctl.update(float(stats["kl"]), cfg.rollout_batch_size)
        metrics, tokens = iteration_metrics(method, {**stats, **trained}, exp, times)
        if method.iteration == cfg.steps or (
            method.trains_policy() and (method.iteration % cfg.eval_every == 0 or method.iteration == 1)
        ):
            metrics.update(evaluate(method, eval_prompts, eval_ids))  # 4. evaluate (none while only a critic trains)
        ctx.sink.log_metrics(metrics, method.iteration)
        progress.update(method.iteration, metrics, tokens)
        for k in (f"{name}/{c}" for c in CURVES[:3]):
            method.history.setdefault(k, []).append((method.iteration, metrics[k]))
        saved = method.iteration % cfg.checkpoint_every == 0 or method.iteration == cfg.steps or method.guard.stopped
        if saved:
            method.trainer.save(method.state())  # 5. checkpoint
        method.trainer.stop_if_requested(method.state, saved, at=f"iteration {method.iteration}")
    progress.close()
    return finish(method, metrics)


def start(method: OnPolicy, resume: Path | None, eval_prompts: list[str], eval_ids: list) -> None:
    """Resume from a checkpoint, or measure the SFT answers' score offset and evaluate the policy before training."""
    cfg, m = method.cfg, method.m
    if resume:
        method.load(resume)
        return
    if cfg.score_norm or len(m.rewards) > 1:
        with m.amp():
            offset = method.measure_score_offset()
        method.score_offset = offset if cfg.score_norm else 0.0
    before = {f"{method.name}/score_offset": method.score_offset, **held_out(method, eval_prompts, eval_ids)}
    method.ctx.sink.log_metrics(before, 0)


def iteration_metrics(method: OnPolicy, stats: dict, exp, times: list[float]) -> tuple[dict, int]:
    """The iteration's metrics, named ``<algo>/...``, with its throughput and time split; and its tokens (``exp``
    holds every process's rows)."""
    name, cfg = method.name, method.cfg
    gen_tokens, train_tokens = float(exp.mask.sum()), float(exp.samples.attention_mask.sum()) * cfg.ppo_epochs
    method.trainer.tokens_trained += int(train_tokens)
    generation, scoring, update = (b - a for a, b in zip(times, times[1:]))
    metrics = {k if "/" in k else f"{name}/{k}": float(v) for k, v in stats.items()}  # rollout/...: engine-wide
    metrics.update(
        {
            f"{name}/tokens_trained": method.trainer.tokens_trained,
            f"{name}/gen_tokens_per_s": gen_tokens / generation,
            f"{name}/train_tokens_per_s": train_tokens / update,
            f"{name}/time_generation_s": generation,
            f"{name}/time_scoring_s": scoring,
            f"{name}/time_update_s": update,
        }
    )
    return metrics, int(gen_tokens + train_tokens)


def held_out(method: OnPolicy, eval_prompts: list[str], eval_ids: list) -> dict:
    """The policy on held-out prompts, kept for the KL curve. Every process evaluates the same prompts with the same
    random stream (sharded models take every process's forwards; no process waits longer than for the main's
    evaluation alone); the main process's numbers are logged."""
    with method.m.amp():
        out = {f"{method.name}/{k}": v for k, v in method.evaluate(eval_prompts, eval_ids).items()}
    if not method.ctx.accelerator.is_main_process:
        return {}
    for k in (f"{method.name}/{c}" for c in (*CURVES, "eval_kl")):
        if k in out:
            method.history.setdefault(k, []).append((method.iteration, out[k]))
    return out


def evaluate(method: OnPolicy, eval_prompts: list[str], eval_ids: list) -> dict:
    """A held-out evaluation during training, and the guard's decision on it (taken on the main process, known to
    every process: they stop together)."""
    out = held_out(method, eval_prompts, eval_ids)
    if method.guard.on:
        kept = method.ctx.accelerator.is_main_process and method.guard.keeps(
            {k.split("/", 1)[1]: v for k, v in out.items()}, method.iteration
        )
        method.guard.state, kept = broadcast_object_list([method.guard.state, kept])
        if kept:
            method.keep_for_guard()
        if method.guard.stopped:
            out[f"{method.name}/guard_stopped_at"] = method.iteration
    return out


def finish(method: OnPolicy, metrics: dict) -> dict:
    """The run's figures and fits, and the stage's model: the guard's kept checkpoint where it kept one (the eval
    stage evaluates what the guard chose), else the last policy. Returns the stage's record."""
    ctx, m, name = method.ctx, method.m, method.name
    summary = dict(metrics)
    if ctx.accelerator.is_main_process:
        fitted = save_figures(method.history, name, ctx.out_dir / "figures", method.gold is not None)
        ctx.sink.log_metrics(fitted, method.iteration)
        summary.update(fitted)
    kept, guard = ctx.out_dir / GUARD_DIR, method.guard.state
    kept_one = [(kept / "rlhf_meta.json").exists()]
    if ctx.accelerator.num_processes > 1:  # the main process's answer for all (the branches' collectives differ)
        kept_one = broadcast_object_list(kept_one)
    if method.guard.on and guard["iteration"] is not None and kept_one[0]:
        if is_lora(m.policy):  # kept as adapters: back into the policy, then saved merged
            load_adapters(m.policy, kept)
            ctx.save_final(m.policy, m.tokenizer, {"stage": name, "iterations": guard["iteration"]})
        elif ctx.accelerator.is_main_process:
            with checkpoint.atomic_dir(ctx.final_dir) as tmp:
                shutil.copytree(kept, tmp, dirs_exist_ok=True)
        ctx.accelerator.wait_for_everyone()
        chosen = {f"{name}/guard_iteration": guard["iteration"], f"{name}/guard_score": guard["best"]}
        ctx.sink.log_metrics(chosen, method.iteration)
        summary.update(chosen)
    else:
        ctx.save_final(m.policy, m.tokenizer, {"stage": name, "iterations": method.iteration})
    final = {k: v for k, v in summary.items() if "/time_" not in k}
    return {"model_path": str(ctx.final_dir), "metrics": final, "steps": method.iteration}
