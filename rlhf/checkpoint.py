"""Atomic, resumable checkpoints.

A checkpoint is a folder written under a temporary name and renamed into place when complete, so a
crash mid-write never leaves a folder that looks finished. ``COMPLETE`` marks a finished training
state; :func:`latest` only ever returns folders that have it.

Layout of a stage's checkpoint folder::

    ckpt/step-000200/   <model>/ (HF folder per trained model), trainer_state.pt, COMPLETE
    ckpt/step-000200/   (runtime.strategy=fsdp) every process's shards of the models and the optimizer
                        (torch.distributed.checkpoint: .metadata, __<rank>_0.distcp), rng-<rank>.pt,
                        trainer_state.pt, COMPLETE
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

COMPLETE = "COMPLETE"


def atomic_write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary sibling and a rename: readers see all or nothing."""
    atomic_write_bytes(path, json.dumps(obj, indent=1, default=str).encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """``data`` to ``path`` through a temporary sibling and a rename: readers see all or nothing."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success replace ``final`` with it, on error remove it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed from; the message names the file and the fix."""


def rng_state() -> dict:
    """This process's random state (Python's, torch's CPU and CUDA generators): plain tensors, numbers and tuples."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir(ckpt_root: Path, step: int) -> Path:
    return Path(ckpt_root) / f"step-{step:06d}"


def save(ckpt_root: Path, step: int, models: dict, tokenizer, trainer_state: dict, keep: int = 2) -> Path:
    """Write ``ckpt_root/step-NNNNNN`` atomically: each model as an HF folder, plus the trainer state (tensors,
    numbers, strings and containers of them only: :func:`load_trainer_state` refuses anything else)."""
    final = step_dir(ckpt_root, step)
    with atomic_dir(final) as tmp:
        for name, model in models.items():
            model.save_pretrained(tmp / name)
            tokenizer.save_pretrained(tmp / name)
        torch.save({**trainer_state, "step": step}, tmp / "trainer_state.pt")
        (tmp / COMPLETE).write_text(str(step))
    for old in complete_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def hf_model(ckpt: Path | None, name: str) -> Path | None:
    """The HF folder of model ``name`` in checkpoint ``ckpt`` (None: no checkpoint, or a sharded one, whose weights
    :func:`load_sharded` restores into the models)."""
    if ckpt is None:
        return None
    folder = Path(ckpt) / name
    return folder if any((folder / f).exists() for f in ("config.json", "adapter_config.json")) else None


def save_sharded(
    ckpt_root: Path, step: int, models: torch.nn.Module, optimizer, trainer_state: dict, rng: dict, keep: int = 2
) -> Path:
    """Every process writes its shards of ``models`` (a ModuleDict: its keys prefix the names) and of the optimizer,
    and its own random state, into one temporary folder that the main process renames into place when all are
    done (the barriers: a crash mid-save leaves the previous checkpoint the newest complete one)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    distributed = dist_ready()
    rank = torch.distributed.get_rank() if distributed else 0
    final = step_dir(ckpt_root, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_state, optim_state = get_state_dict(models, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp), no_dist=not distributed)
    torch.save(rng, tmp / f"rng-{rank}.pt")
    barrier()
    if rank == 0:
        torch.save({**trainer_state, "step": step}, tmp / "trainer_state.pt")
        (tmp / COMPLETE).write_text(str(step))
        old = final.with_name(f".{final.name}.old")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        for done in complete_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(done, ignore_errors=True)
    barrier()
    return final


def load_sharded(ckpt: Path, models: torch.nn.Module, optimizer) -> dict | None:
    """Restore ``models`` and the optimizer from a sharded checkpoint, on any number of processes (each reads the
    parts of every tensor it holds); this process's random state where the checkpoint has one for its rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (Path(ckpt) / ".metadata").exists():
        raise CheckpointError(
            f"{ckpt} is not a sharded checkpoint (runtime.strategy=fsdp writes them; this one was written under ddp). "
            f"Fix: resume with the strategy that wrote it, or pass refresh=[<stage>] to train the stage afresh."
        )
    model_state, optim_state = get_state_dict(models, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(ckpt), no_dist=not dist_ready())
    set_state_dict(models, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rank = torch.distributed.get_rank() if dist_ready() else 0
    rng = Path(ckpt) / f"rng-{rank}.pt"
    return torch.load(rng, weights_only=True) if rng.exists() else None


def dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if dist_ready():
        torch.distributed.barrier()


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    root = Path(ckpt_root)
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step-*") if (p / COMPLETE).exists())


def latest(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint, or None. Half-written folders are never returned."""
    done = complete_checkpoints(ckpt_root)
    return done[-1] if done else None


def load_trainer_state(ckpt: Path) -> dict:
    """The trainer state of a checkpoint, read with ``weights_only``: a file that holds any other object (which
    unpickling would construct, running code from the file) is refused."""
    import pickle

    path = Path(ckpt) / "trainer_state.pt"
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = str(e).strip().splitlines()  # torch names the offending type on its "Unsupported global" line
        reason = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else str(e))[:300]
        raise CheckpointError(
            f"{path} holds more than tensors, numbers and containers ({reason}); loading it would run code stored in "
            f"the file, "
            f"so it is refused. Fix: delete {Path(ckpt)} if this project did not write it (the stage resumes from an "
            f"earlier "
            f"checkpoint), or pass refresh=[<stage>] to train the stage afresh."
        ) from e
