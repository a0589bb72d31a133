"""Device, threads and seeds: set on purpose, never left to chance."""

from __future__ import annotations

import os
import random

import torch

from .config import RuntimeConfig


def setup(cfg: RuntimeConfig, seed: int, processes: int = 1) -> torch.device:
    """Pick the device, fix torch's thread count, seed everything.

    threads=0 shares the cores out between the ``processes`` of a stage, at most 4 each (2 threads ran a
    tiny-model step 1.7x faster than 1 on a 2-core machine when alone); set runtime.threads=1 when other
    work shares the machine (the tests do).
    """
    threads = cfg.threads or max(1, min(4, (os.cpu_count() or 1) // processes))
    torch.set_num_threads(threads)
    seed_all(seed)
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def seed_all(seed: int) -> None:
    """Python's and torch's generators (every device's). Each process of a data-parallel stage seeds with
    ``seed + rank``: its own dropout stream; the weights are the same in all (DDP broadcasts rank 0's)."""
    random.seed(seed)
    torch.manual_seed(seed)


def accelerator(device: torch.device):
    """The :class:`accelerate.Accelerator` of a stage's process: a no-op in a single process, DDP (NCCL on
    GPUs, gloo on CPU) under ``accelerate launch``. Models stay where the stage put them."""
    from accelerate import Accelerator

    return Accelerator(cpu=device.type == "cpu", device_placement=False)
