"""The training stages' config: the shared optimiser and loop, SFT, the reward model, sampling, the on-policy loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .settings import ConfigError, default, require_multiple, setting


# --------------------------------------------------------------------------------------------------
# Training stages
# --------------------------------------------------------------------------------------------------
@dataclass
class OptimConfig:
    """Optimiser and loop settings shared by every trainer (SFT, reward, DPO, PPO)."""

    lr: float = setting(1e-3, "Peak learning rate (AdamW).", gt=0.0)
    weight_decay: float = setting(0.0, "AdamW weight decay.", ge=0.0)
    warmup_ratio: float = setting(0.05, "Share of steps with linear warm-up.", ge=0.0, lt=1.0)
    schedule: str = setting("cosine", "Decay after warm-up.", choices=["cosine", "linear", "constant"])
    grad_accum: int = setting(1, "Micro-batches per optimizer step.", ge=1)
    max_grad_norm: float = setting(1.0, "Gradient clipping norm.", gt=0.0)
    log_every: int = setting(10, "Log metrics every N steps (the first step is always logged).", ge=1)
    eval_every: int = setting(50, "Evaluate every N steps.", ge=1)
    checkpoint_every: int = setting(200, "Write a resumable checkpoint every N steps.", ge=1)
    seed: int = setting(0, "Seed of initialisation, shuffling and sampling.", ge=0)


@dataclass
class SupervisedConfig(OptimConfig):
    """Epochs over a fixed dataset (SFT, reward, DPO)."""

    batch_size: int = setting(32, "Examples per optimizer step (across accumulation).", ge=1)
    epochs: float = setting(1.0, "Passes over the training data.", gt=0.0)

    def check(self, key: str) -> None:
        require_multiple(self, key, "batch_size", "grad_accum")


@dataclass
class SFTConfig(SupervisedConfig):
    """Supervised fine-tuning on the demonstrations."""

    lr: float = default(SupervisedConfig, "lr", 2e-3)
    epochs: float = default(SupervisedConfig, "epochs", 2.0)
    checkpoint_every: int = default(SupervisedConfig, "checkpoint_every", 100)


@dataclass
class RewardConfig(SupervisedConfig):
    """Bradley-Terry reward model on the preference pairs, from the SFT backbone with a zeroed head."""

    epochs: float = default(SupervisedConfig, "epochs", 2.0)
    checkpoint_every: int = default(SupervisedConfig, "checkpoint_every", 100)
    center_rewards_coef: float = setting(0.0, "Penalty on the squared mean reward (keeps scores centred).", ge=0.0)
    missing_eos_penalty: float = setting(
        1.0,
        "The reward model's scoring rule wherever it scores sampled answers (on-policy training, "
        "evaluation): subtracted from answers that never end. Not part of the reward model's "
        "training, so not of its cache key.",
        ge=0.0,
    )
    ensemble_size: int = setting(
        1,
        "Reward models trained (Coste et al. 2023): member i uses seed + i (its data order) and, with "
        "bootstrap, its own resample of the pairs; each member is a cached stage (reward, reward.1, ...), "
        "so a larger ensemble re-uses the smaller one's members.",
        ge=1,
    )
    bootstrap: bool = setting(
        False,
        "Train each ensemble member on a bootstrap resample of the pairs (members > 0 when the ensemble "
        "has one member: member 0 is always the single reward model).",
    )

    SCORING_ONLY = ("missing_eos_penalty", "ensemble_size")  # fields that do not change what a member trains


@dataclass
class SamplingConfig:
    temperature: float = setting(1.0, "Sampling temperature.", gt=0.0)
    top_k: int = setting(0, "Top-k filter (0: off).", ge=0)
    top_p: float = setting(1.0, "Nucleus filter (1.0: off).", gt=0.0, le=1.0)
    max_new_tokens: int = setting(24, "Longest answer in tokens.", ge=1)
    batch_size: int = setting(128, "Prompts per generation batch.", ge=1)

    def refuse_truncation(self, key: str, why: str, fix: str = "") -> None:
        """Top-k or top-p sampling would draw from another distribution than the policy's softmax, which ``why``
        needs; the error names both keys and the fix."""
        if self.top_k or self.top_p < 1.0:
            raise ConfigError(
                f"{key}.sampling.top_k={self.top_k} / top_p={self.top_p}: {why}. Fix: pass {key}.sampling.top_k=0 "
                f"{key}.sampling.top_p=1.0{fix}."
            )


@dataclass
class OnPolicyConfig(OptimConfig):
    """What every on-policy method shares (PPO and the critic-free ones): sample answers for a batch of
    prompts, score them, take ``ppo_epochs`` passes of clipped updates over minibatches, KL to the SFT
    reference with strength ``beta``. ``steps``, ``log_every``, ``eval_every`` and ``checkpoint_every``
    count iterations (rollout + update)."""

    beta: float = setting(
        0.05, "KL strength: per-token reward -beta * (log pi - log pi_ref) (initial value if adaptive).", gt=0.0
    )
    clip_range: float = setting(0.2, "Ratio clip epsilon of the surrogate objective.", gt=0.0, lt=1.0)
    steps: int = setting(60, "Iterations (rollout + update); log/eval/checkpoint_every count these.", ge=1)
    rollout_batch_size: int = setting(64, "Prompts sampled per iteration.", ge=1)
    minibatch_size: int = setting(16, "Rollouts per optimizer step; must divide rollout_batch_size.", ge=1)
    ppo_epochs: int = setting(4, "Passes over each rollout batch.", ge=1)
    score_norm: bool = setting(True, "Shift scores so SFT answers score mean 0 (measured before training).")
    reward_ensemble: str = setting(
        "mean",
        "How a reward-model ensemble (reward.ensemble_size > 1) scores an answer, each member "
        "first standardised on SFT answers: mean, worst (the minimum, WCO) or uncertainty "
        "(mean - uncertainty_coef * variance, UWO; Coste et al. 2023).",
        choices=["mean", "worst", "uncertainty"],
    )
    uncertainty_coef: float = setting(0.5, "lambda of reward_ensemble=uncertainty.", ge=0.0)
    guard: str = setting(
        "none",
        "Over-optimisation guard (never sees gold): keep the held-out checkpoint with the best guard_score "
        "(conservative), the latest within guard_kl_budget (kl), or the best within the budget (both); the "
        "stage returns that checkpoint, and may stop early (guard_patience). none: the last iteration.",
        choices=["none", "conservative", "kl", "both"],
    )
    guard_score: str = setting(
        "worst",
        "The guard's held-out score: the reward ensemble aggregated this way (mean, worst, "
        "uncertainty); with one reward model, its score.",
        choices=["mean", "worst", "uncertainty"],
    )
    guard_kl_budget: Optional[float] = setting(
        None,
        "Largest held-out KL to the reference (nats per answer) a kept checkpoint may have. Required by guard=kl|both.",
        gt=0.0,
    )
    guard_patience: int = setting(
        3,
        "Evaluations without a better eligible checkpoint (one past the KL budget counts as none) "
        "before training stops; 0: train to the end and keep the guard's checkpoint.",
        ge=0,
    )
    rollout_correction: str = setting(
        "none",
        "Correct the update for the rollout engine's log-probs differing from the trainer's (rollout.engine=vllm): "
        "tis multiplies each token's policy loss by min(pi_trainer / pi_engine, rollout_correction_cap), truncated "
        "importance sampling (Yao et al. 2025); none: the gap is only logged (rollout/logprob_abs_diff_*).",
        choices=["none", "tis"],
    )
    rollout_correction_cap: float = setting(2.0, "The cap C of rollout_correction=tis.", gt=0.0)
    forward_batch_size: int = setting(
        64,
        "Rollouts per forward in the experience pass (old / reference log-probs, values, scores): "
        "bounds its activation memory.",
        ge=1,
    )
    lr: float = default(OptimConfig, "lr", 1e-4)
    warmup_ratio: float = default(OptimConfig, "warmup_ratio", 0.0)
    schedule: str = default(OptimConfig, "schedule", "constant")
    log_every: int = default(OptimConfig, "log_every", 1)
    eval_every: int = default(OptimConfig, "eval_every", 10)
    checkpoint_every: int = default(OptimConfig, "checkpoint_every", 20)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(batch_size=64))

    def check(self, key: str) -> None:
        if self.guard in ("kl", "both") and self.guard_kl_budget is None:
            raise ConfigError(
                f"{key}.guard={self.guard} keeps checkpoints within a KL budget, and {key}.guard_kl_budget is not set. "
                f"Fix: pass {key}.guard_kl_budget=<nats>, e.g. 2.0, or {key}.guard=conservative."
            )
        self.sampling.refuse_truncation(
            key,
            "the rollouts would come from the truncated distribution while the ratios, the KL penalty and the "
            "advantages use the policy's full (temperature-scaled) softmax, so the update would refer to a policy that "
            "did not sample the data",
            f" (lower {key}.sampling.temperature for more focused samples)",
        )
        require_multiple(self, key, "rollout_batch_size", "minibatch_size")
        require_multiple(self, key, "minibatch_size", "grad_accum")
