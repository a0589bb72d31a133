"""What the training stages share: batched no-grad passes and the supervised trainer set up with resume."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..config_training import SupervisedConfig
from ..context import StageContext
from ..trainer import Trainer, steps_for


@torch.no_grad()
def batched(fn, n: int, batch_size: int):
    """Apply ``fn(indices)`` over 0..n-1 in batches and concatenate the (tensor) results."""
    return torch.cat([fn(torch.arange(i, min(i + batch_size, n))) for i in range(0, n, batch_size)])


def supervised_trainer(
    name: str,
    model: torch.nn.Module,
    tokenizer,
    cfg: SupervisedConfig,
    n_examples: int,
    prefix: str,
    ctx: StageContext,
    resume: Path | None,
    amp=contextlib.nullcontext,
) -> Trainer:
    """The shared trainer for one model over a fixed dataset, restored from ``resume`` when given."""
    trainer = Trainer(
        {name: model},
        tokenizer,
        cfg,
        steps_for(n_examples, cfg),
        prefix,
        ctx.sink,
        ctx.ckpt_dir,
        amp=amp,
        accelerator=ctx.accelerator,
        sharding=ctx.sharding,
    )
    if resume:
        trainer.load(resume)
    trainer.progress = ctx.progress(prefix, trainer.total_steps, trainer.step)
    model.train()
    return trainer


def finish(trainer: Trainer, ctx: StageContext, model: torch.nn.Module, tokenizer, stage: str, final: dict) -> dict:
    """The end of a supervised stage: its final model saved, its tokens trained logged; its record, with ``final``
    (the last evaluation's metrics, named without prefix) under the trainer's prefix."""
    ctx.save_final(model, tokenizer, {"stage": stage, "step": trainer.step})
    ctx.sink.log_metrics({f"{trainer.prefix}/tokens_trained": trainer.tokens_trained}, trainer.step)
    metrics = {f"{trainer.prefix}/{k}": v for k, v in {**final, "tokens_trained": trainer.tokens_trained}.items()}
    return {"model_path": str(ctx.final_dir), "metrics": metrics, "steps": trainer.step}
