"""Advantage estimation and normalisation for PPO, vectorised over tokens (no Python loop over time)."""

from __future__ import annotations

import torch

from .losses import masked_mean, masked_var


def discount_matrix(length: int, factor: float, device=None) -> torch.Tensor:
    """M[t, j] = factor^(j - t) for j >= t else 0; shape (T, T). ``x @ M.T`` is a discounted suffix sum."""
    idx = torch.arange(length, device=device)
    exponent = (idx[None, :] - idx[:, None]).to(torch.float64)  # (T, T): j - t
    m = torch.where(
        exponent >= 0, torch.tensor(factor, dtype=torch.float64, device=device) ** exponent.clamp(min=0), 0.0
    )
    return m.to(torch.float32)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016).

        delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
        A_t     = sum_{l >= 0} (gamma * lam)^l * delta_{t+l}       (masked positions contribute 0)
        R_t     = A_t + V_t                                         (the value targets)

    rewards, values, mask: (B, T), mask 1 on answer tokens, which are contiguous per row. Returns
    (advantages, returns), both (B, T) and zero where mask is 0. With gamma = lam = 1,
    A_t = sum_{j >= t} r_j - V_t (reward-to-go minus value).
    """
    mask = mask.to(rewards.dtype)
    values = values * mask
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)  # (B, T): V_{t+1} m_{t+1}
    deltas = (rewards + gamma * next_values - values) * mask  # (B, T)
    advantages = deltas @ discount_matrix(rewards.shape[1], gamma * lam, rewards.device).T  # (B, T)
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def leave_one_out(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO advantages (Kool et al. 2019; Ahmadian et al. 2024): each sample's baseline is the mean reward
    of the other k - 1 samples of its prompt.

        A_i = r_i - 1/(k-1) sum_{j != i} r_j = k/(k-1) (r_i - mean_j r_j)

    rewards: (G, k), G prompts with k >= 2 samples each -> (G, k).
    """
    k = rewards.shape[1]
    return (rewards - rewards.mean(1, keepdim=True)) * k / (k - 1)


def group_normalized(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages (Shao et al. 2024): each reward against its group's mean, divided by the group's
    standard deviation (unbiased) when ``scale``.

        A_i = (r_i - mean_j r_j) / (std_j r_j + eps)

    rewards: (G, k) -> (G, k). A group whose answers all score the same has advantages 0.
    """
    centred = rewards - rewards.mean(1, keepdim=True)
    return centred / (rewards.std(1, keepdim=True) + eps) if scale else centred


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; masked-out entries are returned as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


class RunningMoments:
    """Running mean / std of a scalar stream (Chan et al. parallel update), for reward normalisation."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 1e-8

    def update(self, x: torch.Tensor) -> None:
        batch_mean, batch_var, n = x.mean().item(), x.var(unbiased=False).item(), x.numel()
        delta, total = batch_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total

    @property
    def std(self) -> float:
        return max(self.var, 1e-12) ** 0.5

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]
