"""Every loss of the pipeline as a pure function: tensors in, (loss, metrics) out.

Notation: B batch, T tokens, ``mask`` is 1 on answer tokens (EOS included) and 0 elsewhere. Per-token
log-probs are log pi(y_t | x, y_<t). Metrics are detached floats-as-tensors for the logger.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of ``x`` where ``mask`` is 1 (over everything, or along ``dim``)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def token_mean(x: torch.Tensor, mask: torch.Tensor, tokens: float | None = None) -> torch.Tensor:
    """sum_{i,t} m_it x_it / tokens, with ``tokens`` = sum_{i,t} m_it (this batch's count) unless given.

    A data-parallel update passes the minibatch's count over every process and micro-batch, divided by their
    number: each micro-batch's gradient is then averaged over micro-batches and processes, and every token of the
    minibatch weighs the same however the minibatch was split.
    """
    return (x * mask).sum() / (tokens if tokens else mask.sum().clamp(min=1))


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of ``x`` over the masked entries."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return masked_sum((x - mean) ** 2, mask) / (n - 1).clamp(min=1)


def sft_loss(logp: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Negative log-likelihood of the answer tokens, averaged over tokens.

        L = - sum_t m_t log pi(y_t) / sum_t m_t

    logp, mask: (B, T).
    """
    loss = -masked_mean(logp, mask)
    return loss, {"loss": loss.detach()}


def pairwise_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, center_coef: float = 0.0
) -> tuple[torch.Tensor, dict]:
    """Bradley-Terry reward-model loss (Ouyang et al. 2022), with optional centring (Eisenstein et al. 2023).

        L = -mean log sigmoid(r_c - r_r) + center_coef * mean (r_c + r_r)^2

    r_chosen, r_rejected: (B,).
    """
    margin = r_chosen - r_rejected  # (B,)
    loss = -F.logsigmoid(margin).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    metrics = {
        "loss": loss.detach(),
        "accuracy": (margin > 0).float().mean(),
        "margin": margin.detach().mean(),
        "reward_mean": torch.cat([r_chosen, r_rejected]).detach().mean(),
    }
    return loss, metrics


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """Direct Preference Optimisation (Rafailov et al. 2023), with conservative label smoothing.

        h = beta * [(log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r))]
        L = -(1 - eps) log sigmoid(h) - eps log sigmoid(-h)

    All inputs are sequence log-probs (sums over answer tokens), shape (B,). At initialisation
    (pi = pi_ref) h = 0 and L = ln 2.
    """
    chosen_ratio = policy_chosen - ref_chosen  # (B,)
    rejected_ratio = policy_rejected - ref_rejected  # (B,)
    h = beta * (chosen_ratio - rejected_ratio)
    loss = (-(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)).mean()
    rewards_chosen = beta * chosen_ratio.detach()
    rewards_rejected = beta * rejected_ratio.detach()
    metrics = {
        "loss": loss.detach(),
        "rewards_chosen": rewards_chosen.mean(),
        "rewards_rejected": rewards_rejected.mean(),
        "margin": (rewards_chosen - rewards_rejected).mean(),
        "accuracy": (rewards_chosen > rewards_rejected).float().mean(),
        # k1 estimate of KL(pi || pi_ref) per sequence on the training answers (off-policy).
        "kl": torch.cat([chosen_ratio, rejected_ratio]).detach().mean(),
    }
    return loss, metrics


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k1 estimator of KL(pi || pi_ref) on samples from pi: log pi - log pi_ref (can be < 0)."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator (Schulman 2020): r - 1 - log r with r = pi_ref / pi; unbiased and >= 0 (computed as
    expm1(log r) - log r: exp(x) - 1 - x rounds below 0 for small x in float32)."""
    log_ratio = ref_logp - logp
    return torch.expm1(log_ratio) - log_ratio


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    how: str = "token",
    max_tokens: int | None = None,
    tokens: float | None = None,
) -> torch.Tensor:
    """A per-token loss (B, T) as one number.

        token:    sum_{i,t} m_it l_it / sum_{i,t} m_it          (every answer token weighs the same: DAPO)
        sequence: mean_i [ sum_t m_it l_it / sum_t m_it ]       (every answer weighs the same: Shao et al. 2024)
        dr_grpo:  sum_{i,t} m_it l_it / (B * max_tokens)        (a constant normaliser, no length bias: Liu et al. 2025)

    ``max_tokens``: the longest answer the sampler may write (``sampling.max_new_tokens``), for dr_grpo; ``tokens``:
    the token level's denominator (:func:`token_mean`).
    """
    if how == "sequence":
        return masked_mean(per_token, mask, dim=1).mean()
    if how == "dr_grpo":
        if not max_tokens:
            raise ValueError("aggregate(how='dr_grpo') needs max_tokens, the sampler's max_new_tokens")
        return masked_sum(per_token, mask) / (per_token.shape[0] * max_tokens)
    return token_mean(per_token, mask, tokens)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    aggregation: str = "token",
    max_tokens: int | None = None,
    tokens: float | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate (Schulman et al. 2017), aggregated over answer tokens (:func:`aggregate`).

        rho_t = exp(log pi(y_t) - log pi_old(y_t))
        L = mean_t w_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))

    logp, old_logp, advantages, mask: (B, T); ``weights`` w_t (B, T), no gradient: the rollout correction
    (:func:`truncated_is_weights`), else 1. ``approx_kl`` is the k3 estimate of KL(pi_old || pi). The metrics are
    token means (:func:`token_mean` with ``tokens``).
    """
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.maximum(unclipped, clipped)  # (B, T)
    if weights is not None:
        per_token = per_token * weights.detach()
    loss = aggregate(per_token, mask, aggregation, max_tokens, tokens)
    with torch.no_grad():
        metrics = {
            "policy_loss": loss.detach(),
            "clipfrac": token_mean((clipped > unclipped).float(), mask, tokens),
            "approx_kl": token_mean(torch.expm1(log_ratio) - log_ratio, mask, tokens),  # k3 of the update, >= 0
            "ratio": token_mean(ratio, mask, tokens),
        }
    return loss, metrics


def truncated_is_weights(old_logp: torch.Tensor, engine_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling of the rollout engine (Yao et al. 2025): the answers were drawn from the
    engine's distribution mu, the surrogate assumes the trainer's pi_old; each token's loss is reweighted by

        w_t = min(pi_old(y_t) / mu(y_t), C)

    old_logp, engine_logp: (B, T) -> (B, T), no gradient (0 / 0 on padding gives exp(0) = 1: masked downstream)."""
    return (old_logp - engine_logp).exp().clamp(max=cap).detach()


def engine_mismatch(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """How far the engine's log-probs of the sampled tokens lie from the trainer's: the mean and largest absolute
    difference, and KL(mu || pi_old) by the k3 estimator on the engine's samples (r_t = pi_old / mu: r - 1 - log r,
    >= 0). old_logp, engine_logp, mask: (B, T)."""
    diff = (old_logp - engine_logp) * mask  # (B, T) log r_t
    n = mask.sum().clamp(min=1)
    return {
        "logprob_abs_diff_mean": diff.abs().sum() / n,
        "logprob_abs_diff_max": diff.abs().max(),
        "engine_kl": ((torch.expm1(diff) - diff) * mask).sum() / n,
    }


def kl_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    aggregation: str = "token",
    max_tokens: int | None = None,
    tokens: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """KL to the reference as a loss term (GRPO, Shao et al. 2024; RLOO's loss-side option): the k3 estimator
    of KL(pi || pi_ref) on the sampled tokens, with gradient through log pi.

        r_t = pi_ref(y_t) / pi(y_t);   L = aggregate(r_t - 1 - log r_t)

    logp, ref_logp, mask: (B, T).
    """
    per_token = kl_k3(logp, ref_logp)
    loss = aggregate(per_token, mask, aggregation, max_tokens, tokens)
    return loss, {"kl_loss": loss.detach()}


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    tokens: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """Clipped value loss (as in OpenAI's baselines and Huang et al. 2024), over answer tokens.

        V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
        L = 0.5 * mean_t max((V - R)^2, (V_clip - R)^2)

    values, old_values, returns, mask: (B, T); the means are :func:`token_mean` with ``tokens``.
    """
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    loss = 0.5 * token_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask, tokens)
    with torch.no_grad():
        metrics = {
            "value_loss": loss.detach(),
            "value_clipfrac": token_mean(((clipped - returns) ** 2 > (values - returns) ** 2).float(), mask, tokens),
        }
    return loss, metrics
