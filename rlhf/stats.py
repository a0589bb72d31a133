"""Standard errors of evaluation metrics: over prompts, paired where two policies answer the same prompts.

Answers are prompt-major (``n_samples`` consecutive answers per prompt). A metric's standard error is
taken over the per-prompt means, so several answers to one prompt count as one observation of that
prompt (they are not independent of each other), and a comparison with SFT uses the per-prompt
difference (or win share), which removes the prompts' own difficulty from the error.
"""

from __future__ import annotations

import math

import torch


def per_prompt(values: torch.Tensor, n_samples: int) -> torch.Tensor:
    """(P * S,) prompt-major values -> (P,) per-prompt means."""
    return values.reshape(-1, n_samples).mean(1)


def mean_se(x: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean, std(x, ddof=1) / sqrt(n) (0 for a single value)."""
    n = x.numel()
    mean = float(x.mean())
    return mean, (float(x.std(unbiased=True)) / math.sqrt(n) if n > 1 else 0.0)


def wins(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 where a beats b, 0.5 for a tie, 0 where b wins (elementwise)."""
    return (a > b).float() + 0.5 * (a == b).float()
