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


def expected_calibration_error(p: torch.Tensor, y: torch.Tensor, bins: int = 10) -> tuple[float, torch.Tensor]:
    """ECE of predicted probabilities ``p`` against outcomes ``y`` (0/1), equal-width bins on [0, 1]:

        ECE = sum_b (n_b / n) |mean_{i in b} p_i - mean_{i in b} y_i|

    Returns the ECE and a (bins, 3) table of (mean p, mean y, count) per bin (empty bins: count 0) for the
    reliability diagram.
    """
    idx = (p * bins).long().clamp(max=bins - 1)
    count = torch.bincount(idx, minlength=bins).float()
    mean_p = torch.bincount(idx, weights=p.float(), minlength=bins) / count.clamp(min=1)
    mean_y = torch.bincount(idx, weights=y.float(), minlength=bins) / count.clamp(min=1)
    ece = float((count / count.sum() * (mean_p - mean_y).abs()).sum())
    return ece, torch.stack([mean_p, mean_y, count], 1)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation (0 where either side is constant)."""
    a, b = a.float() - a.float().mean(), b.float() - b.float().mean()
    denominator = (a.norm() * b.norm()).item()
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0
