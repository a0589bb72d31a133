"""RLOO stage: REINFORCE with a leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024).

On the shared on-policy loop (:mod:`rlhf.onpolicy`), with no value model: each prompt gets k answers;
an answer's reward is its score minus beta times its sequence KL to the reference (k1,
``kl_penalty=reward``), and its advantage is that reward minus the mean reward of the prompt's other
k - 1 answers, on every token of the answer. The update is the clipped surrogate with ``clip_range``
over ``ppo_epochs`` passes (with one pass and no clipping active it is plain RLOO). With
``kl_penalty=loss`` the KL leaves the reward and enters the loss as beta times its k3 estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..advantages import leave_one_out, whiten
from ..algorithms import Algorithm, PolicyInputs
from ..config import ConfigError, ModelConfig, OnPolicyConfig, setting
from ..onpolicy import Experience, OnPolicy, OnPolicyModels, prompts_of, train
from ..rollout import Samples
from .common import StageContext


@dataclass
class RLOOConfig(OnPolicyConfig):
    """RLOO's own hyperparameters beside the on-policy loop's; ``rollout_batch_size`` counts answers."""

    algo: str = setting("rloo", "Algorithm name.", choices=["rloo"])
    samples_per_prompt: int = setting(
        4, "k: answers per prompt, each baselined by the mean reward of the other k - 1.", ge=2
    )
    kl_penalty: str = setting(
        "reward",
        "Where the KL to the reference acts: in the reward (k1 sequence KL times beta) or as a "
        "loss term (k3 times beta).",
        choices=["reward", "loss"],
    )
    whiten_advantages: bool = setting(False, "Normalise the advantages over the batch.")

    def check(self, key: str) -> None:
        super().check(key)
        if self.rollout_batch_size % self.samples_per_prompt:
            raise ConfigError(
                f"{key}.rollout_batch_size={self.rollout_batch_size} is not a multiple of {key}.samples_per_prompt="
                f"{self.samples_per_prompt} (it counts answers, k per prompt). Fix: make it a multiple."
            )


class RLOO(OnPolicy):
    def __init__(
        self, cfg: RLOOConfig, models: OnPolicyModels, prompts: list, ctx: StageContext, inputs: PolicyInputs
    ) -> None:
        self.samples_per_prompt = cfg.samples_per_prompt
        super().__init__("rloo", cfg, models, prompts, ctx, inputs)

    def experience(self, samples: Samples) -> tuple[Experience, dict]:
        exp, stats = self.sequence_experience(samples, leave_one_out, kl_in_reward=self.cfg.kl_penalty == "reward")
        if self.cfg.whiten_advantages:
            exp.advantages = whiten(exp.advantages, exp.mask)
        return exp, stats

    def minibatch_losses(self, exp: Experience, train_policy: bool):
        kl_coef = self.cfg.beta if self.cfg.kl_penalty == "loss" else 0.0
        for e in self.micro_batches(exp):
            yield self.policy_terms(e, "token", kl_coef)


def run(cfg: RLOOConfig, model_cfg: ModelConfig, inputs: PolicyInputs, ctx: StageContext) -> dict:
    resume = ctx.resume_point()
    models = OnPolicyModels(model_cfg, inputs, resume, ctx.device)
    prompts, eval_prompts, eval_ids = prompts_of(cfg, model_cfg, inputs, models.tokenizer)
    return train(RLOO(cfg, models, prompts, ctx, inputs), eval_prompts, eval_ids, inputs, resume)


ALGORITHM = Algorithm("rloo", RLOOConfig, run, needs_reward=True)
