"""RLOO stage: REINFORCE with a leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024).

On the shared on-policy loop (:mod:`rlhf.onpolicy`), with no value model: each prompt gets k answers;
an answer's reward is its score minus beta times its sequence KL to the reference (k1,
``kl_penalty=reward``), and its advantage is that reward minus the mean reward of the prompt's other
k - 1 answers, on every token of the answer. The update is the clipped surrogate with ``clip_range``
over ``ppo_epochs`` passes (with one pass and no clipping active it is plain RLOO). With
``kl_penalty=loss`` the KL leaves the reward and enters the loss as beta times its k3 estimate.
"""

from __future__ import annotations

from ..advantages import leave_one_out, whiten
from ..algorithms import PolicyInputs
from ..config import ModelConfig
from ..config_algorithms import RLOOConfig
from ..context import StageContext
from ..experience import Experience
from ..onpolicy import OnPolicy
from ..onpolicy_loop import run_method
from ..rollout import Samples


class RLOO(OnPolicy):
    name = "rloo"

    def experience(self, samples: Samples) -> tuple[Experience, dict]:
        exp, stats = self.sequence_experience(samples, leave_one_out, kl_in_reward=self.cfg.kl_penalty == "reward")
        if self.cfg.whiten_advantages:
            exp.advantages = whiten(exp.advantages, exp.mask)
        return exp, stats

    def minibatch_losses(self, exp: Experience, train_policy: bool, tokens: float):
        kl_coef = self.cfg.beta if self.cfg.kl_penalty == "loss" else 0.0
        for e in self.micro_batches(exp):
            yield self.policy_terms(e, tokens, "token", kl_coef)


def run(cfg: RLOOConfig, model_cfg: ModelConfig, inputs: PolicyInputs, ctx: StageContext) -> dict:
    return run_method(RLOO, cfg, model_cfg, inputs, ctx)
