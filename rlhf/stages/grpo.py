"""GRPO stage: group relative policy optimisation (Shao et al. 2024, DeepSeekMath).

On the shared on-policy loop (:mod:`rlhf.onpolicy`), with no value model: each prompt gets a group of G
answers; an answer's advantage is its score against the group's mean, divided by the group's standard
deviation (``scale_rewards``), on every token of the answer. The loss is the clipped surrogate with
``clip_range`` plus beta times the k3 estimate of KL(pi || pi_ref) (the KL is a loss term, not part of the
reward), both aggregated per ``loss_aggregation``:

    sequence: mean over answers of each answer's token mean (the paper's; short answers weigh as much as long)
    token:    mean over every answer token of the batch (DAPO's; long answers weigh more)
    dr_grpo:  sum over every answer token of the batch / (answers x sampling.max_new_tokens) (Liu et al. 2025)

The default is Shao et al.'s sequence aggregation with the std division off (``scale_rewards=false``, one of
Dr. GRPO's two changes); ``loss_aggregation=dr_grpo`` adds the other, the constant normaliser in place of each
answer's 1/|o|, which together are Dr. GRPO (TRL's ``loss_type="dr_grpo"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from ..advantages import group_normalized
from ..algorithms import Algorithm, PolicyInputs
from ..config import ConfigError, ModelConfig, OnPolicyConfig, default, setting
from ..onpolicy import Experience, OnPolicy, OnPolicyModels, prompts_of, train
from ..rollout import Samples
from .common import StageContext


@dataclass
class GRPOConfig(OnPolicyConfig):
    """GRPO's own hyperparameters beside the on-policy loop's; ``rollout_batch_size`` counts answers."""

    algo: str = setting("grpo", "Algorithm name.", choices=["grpo"])
    beta: float = default(OnPolicyConfig, "beta", 0.04)
    samples_per_prompt: int = setting(4, "G: answers per prompt, the group an advantage is normalised in.", ge=2)
    scale_rewards: bool = setting(
        False,
        "Divide an answer's centred reward by its group's standard deviation (Shao et al.). Off by "
        "default (Liu et al. 2025, Dr. GRPO): it inflates the groups the reward model barely separates; "
        "on the default task it drove the policy to KL 25 and a gold win rate of 0.07, off: KL 1.4, win rate 0.68 "
        "(measured at commit 702fdab; README, section Speed).",
    )
    loss_aggregation: str = setting(
        "sequence",
        "sequence: each answer's token mean, then the mean over answers (Shao et al.); "
        "token: the mean over all answer tokens of the batch (DAPO); dr_grpo: the sum over all "
        "answer tokens divided by answers x sampling.max_new_tokens, a constant (Liu et al. "
        "2025: with scale_rewards=false, the whole of Dr. GRPO).",
        choices=["sequence", "token", "dr_grpo"],
    )

    def check(self, key: str) -> None:
        super().check(key)
        if self.rollout_batch_size % self.samples_per_prompt:
            raise ConfigError(
                f"{key}.rollout_batch_size={self.rollout_batch_size} is not a multiple of {key}.samples_per_prompt="
                f"{self.samples_per_prompt} (it counts answers, G per prompt). Fix: make it a multiple."
            )


class GRPO(OnPolicy):
    def __init__(
        self, cfg: GRPOConfig, models: OnPolicyModels, prompts: list, ctx: StageContext, inputs: PolicyInputs
    ) -> None:
        self.samples_per_prompt = cfg.samples_per_prompt
        super().__init__("grpo", cfg, models, prompts, ctx, inputs)

    def experience(self, samples: Samples) -> tuple[Experience, dict]:
        return self.sequence_experience(
            samples, partial(group_normalized, scale=self.cfg.scale_rewards), kl_in_reward=False
        )

    def minibatch_losses(self, exp: Experience, train_policy: bool):
        for e in self.micro_batches(exp):
            yield self.policy_terms(e, self.cfg.loss_aggregation, self.cfg.beta)


def run(cfg: GRPOConfig, model_cfg: ModelConfig, inputs: PolicyInputs, ctx: StageContext) -> dict:
    resume = ctx.resume_point()
    models = OnPolicyModels(model_cfg, inputs, resume, ctx.device)
    prompts, eval_prompts, eval_ids = prompts_of(cfg, model_cfg, inputs, models.tokenizer)
    return train(GRPO(cfg, models, prompts, ctx, inputs), eval_prompts, eval_ids, inputs, resume)


ALGORITHM = Algorithm("grpo", GRPOConfig, run, needs_reward=True)
