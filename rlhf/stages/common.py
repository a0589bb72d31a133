"""What the stages share: a stage context and the policy/scalar model loading with resume."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoint
from ..config import SupervisedConfig
from ..trainer import MetricSink, Trainer, steps_for


@dataclass
class StageContext:
    """Where a stage writes, where it logs, on which device it runs."""

    out_dir: Path
    sink: MetricSink
    device: torch.device
    fresh: bool = False  # ignore existing checkpoints (refresh=[stage])

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "ckpt"

    @property
    def final_dir(self) -> Path:
        return self.out_dir / "model"

    def resume_point(self) -> Path | None:
        """The newest complete checkpoint to continue from, unless a fresh start was asked for."""
        if self.fresh:
            import shutil

            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
            return None
        return checkpoint.latest(self.ckpt_dir)


@torch.no_grad()
def batched(fn, n: int, batch_size: int):
    """Apply ``fn(indices)`` over 0..n-1 in batches and concatenate the (tensor) results."""
    return torch.cat([fn(torch.arange(i, min(i + batch_size, n))) for i in range(0, n, batch_size)])


def supervised_trainer(name: str, model: torch.nn.Module, tokenizer, cfg: SupervisedConfig, n_examples: int, prefix: str,
                       ctx: StageContext, resume: Path | None, amp=contextlib.nullcontext) -> Trainer:
    """The shared trainer for one model over a fixed dataset, restored from ``resume`` when given."""
    trainer = Trainer({name: model}, tokenizer, cfg, steps_for(n_examples, cfg), prefix, ctx.sink, ctx.ckpt_dir, amp=amp)
    if resume:
        trainer.load(resume)
    model.train()
    return trainer
