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

from functools import partial

from ..advantages import group_normalized
from ..algorithms import PolicyInputs
from ..config import ModelConfig
from ..config_algorithms import GRPOConfig
from ..context import StageContext
from ..experience import Experience
from ..onpolicy import OnPolicy
from ..onpolicy_loop import run_method
from ..rollout import Samples


class GRPO(OnPolicy):
    name = "grpo"

    def experience(self, samples: Samples) -> tuple[Experience, dict]:
        return self.sequence_experience(
            samples, partial(group_normalized, scale=self.cfg.scale_rewards), kl_in_reward=False
        )

    def minibatch_losses(self, exp: Experience, train_policy: bool, tokens: float):
        for e in self.micro_batches(exp):
            yield self.policy_terms(e, tokens, self.cfg.loss_aggregation, self.cfg.beta)


def run(cfg: GRPOConfig, model_cfg: ModelConfig, inputs: PolicyInputs, ctx: StageContext) -> dict:
    return run_method(GRPO, cfg, model_cfg, inputs, ctx)
