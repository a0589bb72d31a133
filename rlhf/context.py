"""A stage's context: where it writes and logs, its device, and its place among a data-parallel launch's processes."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from . import checkpoint, runtime
from .modeling import save_pretrained_atomic
from .progress import Progress, ProgressSettings
from .sharding import Sharding, full_state_dict
from .trainer import MetricSink

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
    sharding: Sharding = field(default_factory=Sharding)  # runtime.strategy: whole models (ddp) or sharded (fsdp)

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
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
            return None
        if self.accelerator.num_processes == 1:
            return checkpoint.latest(self.ckpt_dir)
        from accelerate.utils import broadcast_object_list

        # the main process's answer for all: on a network filesystem another machine may not see the newest yet
        return broadcast_object_list([checkpoint.latest(self.ckpt_dir)])[0]

    def placed(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` on the stage's device: under FSDP sharded across the processes (each moves its shards there, never
        the whole model), else moved whole."""
        if self.sharding.active:
            return self.sharding.shard(model, self.device)
        return model.to(self.device)

    def save_final(self, model, tokenizer, meta: dict) -> None:
        """The stage's output model, written once (by the main process) and seen by every process after."""
        self.save_model(model, tokenizer, self.final_dir, meta)

    def save_model(self, model, tokenizer, out_dir: Path, meta: dict, merge: bool = True) -> None:
        """A whole HF folder of ``model`` (every process calls it: a sharded model is gathered to the main process,
        which writes it); :func:`~rlhf.modeling.save_pretrained_atomic` says what ``merge`` does."""
        state = full_state_dict(model)
        if self.accelerator.is_main_process:
            save_pretrained_atomic(model, tokenizer, out_dir, meta, merge=merge, state_dict=state)
        self.accelerator.wait_for_everyone()
