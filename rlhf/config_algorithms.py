"""Each policy-training algorithm's config: its own hyperparameters beside those of the loop it runs on.

Light on purpose (no torch): the algorithm registry (:mod:`rlhf.algorithms`), validation and ``--help`` read
these without loading a model library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .config_training import OnPolicyConfig, SupervisedConfig
from .settings import default, require_multiple, setting


@dataclass
class DPOConfig(SupervisedConfig):
    """DPO's hyperparameters; the loop's (lr, batch_size, epochs, ...) are the supervised trainer's."""

    algo: str = setting("dpo", "Algorithm name.", choices=["dpo"])
    beta: float = setting(0.3, "KL strength: the inverse temperature of the implicit reward.", gt=0.0)
    label_smoothing: float = setting(0.0, "Conservative DPO: assumed label-flip rate.", ge=0.0, lt=0.5)
    lr: float = default(SupervisedConfig, "lr", 1e-4)
    checkpoint_every: int = default(SupervisedConfig, "checkpoint_every", 100)


@dataclass
class PPOConfig(OnPolicyConfig):
    """PPO's own hyperparameters beside the on-policy loop's (beta, clip_range, steps, batch sizes, sampling)."""

    algo: str = setting("ppo", "Algorithm name.", choices=["ppo"])
    gamma: float = setting(1.0, "Discount.", ge=0.0, le=1.0)
    lam: float = setting(0.95, "GAE lambda.", ge=0.0, le=1.0)
    vf_coef: float = setting(0.1, "Value-loss weight.", ge=0.0)
    value_clip_range: float = setting(0.2, "Value clipping around the rollout values.", gt=0.0)
    value_lr: Optional[float] = setting(None, "Value model learning rate (null: same as lr).", gt=0.0)
    whiten_advantages: bool = setting(True, "Normalise advantages per batch.")
    normalize_reward: bool = setting(False, "Scale scores by a running std (which rescales the effective beta).")
    adaptive_kl: bool = setting(False, "Adaptive KL controller (Ziegler et al. 2019).")
    target_kl: float = setting(3.0, "Adaptive controller's target sequence KL (nats).", gt=0.0)
    kl_horizon: int = setting(10000, "Adaptive controller's horizon (samples).", ge=1)
    value_init: str = setting(
        "reward", "Initialise the value model from the reward model or the SFT policy.", choices=["reward", "sft"]
    )
    value_warmup_steps: int = setting(0, "Iterations that train only the value model before the policy moves.", ge=0)


@dataclass
class GroupConfig(OnPolicyConfig):
    """A critic-free method's: several answers per prompt, compared within their group; ``rollout_batch_size``
    counts answers."""

    samples_per_prompt: int = setting(4, "Answers per prompt: the group each answer is compared with.", ge=2)

    def check(self, key: str) -> None:
        super().check(key)
        require_multiple(self, key, "rollout_batch_size", "samples_per_prompt", " (it counts answers, one prompt's)")


@dataclass
class RLOOConfig(GroupConfig):
    """RLOO's own hyperparameters beside the on-policy loop's; ``rollout_batch_size`` counts answers."""

    algo: str = setting("rloo", "Algorithm name.", choices=["rloo"])
    kl_penalty: str = setting(
        "reward",
        "Where the KL to the reference acts: in the reward (k1 sequence KL times beta) or as a "
        "loss term (k3 times beta).",
        choices=["reward", "loss"],
    )
    whiten_advantages: bool = setting(False, "Normalise the advantages over the batch.")


@dataclass
class GRPOConfig(GroupConfig):
    """GRPO's own hyperparameters beside the on-policy loop's; ``rollout_batch_size`` counts answers."""

    algo: str = setting("grpo", "Algorithm name.", choices=["grpo"])
    beta: float = default(OnPolicyConfig, "beta", 0.04)
    scale_rewards: bool = setting(
        False,
        "Divide an answer's centred reward by its group's standard deviation (Shao et al.). Off by "
        "default (Liu et al. 2025, Dr. GRPO): it inflates the groups the reward model barely separates, and on "
        "the default task it drove the policy far from SFT and lost gold (docs: Methods).",
    )
    loss_aggregation: str = setting(
        "sequence",
        "sequence: each answer's token mean, then the mean over answers (Shao et al.); "
        "token: the mean over all answer tokens of the batch (DAPO); dr_grpo: the sum over all "
        "answer tokens divided by answers x sampling.max_new_tokens, a constant (Liu et al. "
        "2025: with scale_rewards=false, the whole of Dr. GRPO).",
        choices=["sequence", "token", "dr_grpo"],
    )


@dataclass
class BestOfNConfig:
    algo: str = setting("best_of_n", "Algorithm name.", choices=["best_of_n"])
    n: int = setting(16, "Answers sampled from SFT per prompt; the reward model keeps the best.", ge=1)
    seed: int = setting(
        0,
        "Seed of the candidates' draws, a stream of its own: the SFT answers they are compared with (eval.seed) "
        "are never among the candidates.",
    )
