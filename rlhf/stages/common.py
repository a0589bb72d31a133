"""What the stages share: a stage context and the policy/scalar model loading with resume."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from .. import checkpoint, runtime
from ..config import SupervisedConfig
from ..modeling import save_pretrained_atomic
from ..progress import Progress, ProgressSettings
from ..trainer import MetricSink, Trainer, steps_for

CKPT_DIR, FINAL_DIR = "ckpt", "model"  # a stage folder's resumable checkpoints and its output model


@dataclass
class StageContext:
    """Where a stage writes, where it logs, on which device it runs, and its place among the processes
    of a data-parallel launch (``accelerator``: one process unless launched by ``accelerate launch``)."""

    out_dir: Path
    sink: MetricSink
    device: torch.device
    fresh: bool = False  # ignore existing checkpoints (refresh=[stage])
    accelerator: Accelerator | None = None  # None: this process alone
    progress_settings: ProgressSettings = field(
        default_factory=ProgressSettings
    )  # runtime.progress*: bar, log lines or off
    compile: bool = False  # runtime.compile: torch.compile the models an on-policy stage trains

    def __post_init__(self) -> None:
        self.accelerator = self.accelerator or runtime.accelerator(self.device)

    def progress(self, name: str, total: int, start: int = 0) -> Progress:
        """The stage's progress bar or log lines (shown by the main process only)."""
        settings = self.progress_settings if self.accelerator.is_main_process else ProgressSettings("off")
        return Progress(name, total, settings, start)

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / CKPT_DIR

    @property
    def final_dir(self) -> Path:
        return self.out_dir / FINAL_DIR

    def resume_point(self) -> Path | None:
        """The newest complete checkpoint to continue from, unless a fresh start was asked for."""
        if self.fresh:
            import shutil

            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
            return None
        return checkpoint.latest(self.ckpt_dir)

    def save_final(self, model, tokenizer, meta: dict) -> None:
        """The stage's output model, written once (by the main process) and seen by every process after."""
        if self.accelerator.is_main_process:
            save_pretrained_atomic(model, tokenizer, self.final_dir, meta)
        self.accelerator.wait_for_everyone()


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
    )
    if resume:
        trainer.load(resume)
    trainer.progress = ctx.progress(prefix, trainer.total_steps, trainer.step)
    model.train()
    return trainer
