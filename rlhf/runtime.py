"""Device, threads and seeds: set on purpose, never left to chance."""

from __future__ import annotations

import os
import random

import torch

from .config import RuntimeConfig


def setup(cfg: RuntimeConfig, seed: int) -> torch.device:
    """Pick the device, fix torch's thread count (see README: 2-core machines stall with more), seed everything."""
    threads = cfg.threads or max(1, min(4, (os.cpu_count() or 2) // 2))
    torch.set_num_threads(threads)
    random.seed(seed)
    torch.manual_seed(seed)
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)
