"""PPO stage (Ziegler et al. 2019; Stiennon et al. 2020; Huang et al. 2024, "The N+ implementation details").

On the shared on-policy loop (:mod:`rlhf.onpolicy`: rollout, scoring, update, evaluation), PPO adds a
critic. Each iteration, after the experience pass (old / reference log-probs, values, scores):
  1. per-token reward  r_t = -beta * (log pi_old - log pi_ref)_t, plus the score at the EOS token
  2. GAE advantages (whitened) and returns
  3. ``ppo_epochs`` passes of clipped policy + clipped value updates over minibatches

The value model starts from the reward model (or from SFT with a zeroed head). Scores are shifted so
SFT answers score mean 0 (and, with ``normalize_reward``, divided by a running std); a value model
that starts from the reward model predicts raw scores, so its outputs get the same shift and scale.

With several processes, each samples and scores its share of the rollouts; the advantages are computed and
whitened over the whole batch (every process's rows), so they do not depend on how many processes there are.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..advantages import RunningMoments, gae, whiten
from ..algorithms import PolicyInputs
from ..config import ModelConfig
from ..config_algorithms import PPOConfig
from ..context import StageContext
from ..experience import Experience
from ..kl_control import make_controller
from ..losses import masked_mean, masked_var, value_loss
from ..modeling import TokenValues
from ..onpolicy import OnPolicy
from ..onpolicy_loop import run_method
from ..onpolicy_models import OnPolicyModels
from ..rollout import Samples


class PPO(OnPolicy):
    """PPO with a critic on the shared on-policy loop."""

    name = "ppo"

    def __init__(
        self, cfg: PPOConfig, models: OnPolicyModels, prompts: list[list[int]], ctx: StageContext, inputs: PolicyInputs
    ) -> None:
        super().__init__(cfg, models, prompts, ctx, inputs)
        self.kl_ctl = make_controller(cfg.beta, cfg.adaptive_kl, cfg.target_kl, cfg.kl_horizon)
        self.score_moments = RunningMoments()
        self.value_train = self.trainer.wrap(self.compiled(TokenValues(models.value)))

    def param_groups(self) -> list[dict]:
        value = [p for p in self.m.value.parameters() if p.requires_grad]
        return super().param_groups() + [{"params": value, "lr": self.cfg.value_lr or self.cfg.lr}]

    def state(self) -> dict:
        return {**super().state(), "score_moments": self.score_moments.state_dict()}

    def load(self, ckpt: Path) -> dict:
        extra = super().load(ckpt)
        self.score_moments.load_state_dict(extra["score_moments"])
        return extra

    def trains_policy(self) -> bool:
        return self.iteration > self.cfg.value_warmup_steps

    def value_scale(self) -> tuple[float, float]:
        """(shift, scale) that put a value model started from the reward model on the scores' scale. The value
        model starts from member 0 and predicts its scores; an ensemble's score of the same answers differs by
        ``ensemble_gap`` on average (a worst-case ensemble lies below member 0), so the shift takes that off too:
        on SFT answers the critic starts as unbiased as the scores are centred."""
        if self.cfg.value_init != "reward":
            return 0.0, 1.0
        shift = self.score_offset - self.ensemble_gap
        return shift, (self.score_moments.std if self.cfg.normalize_reward else 1.0)

    @torch.no_grad()
    def experience(self, samples: Samples) -> tuple[Experience, dict]:
        samples, f = self.forwards(samples)  # every process's rows
        cfg, mask = self.cfg, samples.response_mask
        old_logp, ref_logp, raw = f["old_logp"], f["ref_logp"], f["raw"]
        scores = self.scores(raw)
        if cfg.normalize_reward:
            self.score_moments.update(scores)
            scores = scores / self.score_moments.std
        shift, scale = self.value_scale()
        values = (f["values"] - shift) / scale * mask  # (B, R)
        kl = (old_logp - ref_logp) * mask  # (B, R) k1
        beta = self.kl_ctl.value
        last = (mask.sum(1).long() - 1).clamp(min=0)  # (B,) column of EOS (or the last token)
        rewards = (-beta * kl).scatter_add(1, last[:, None], scores[:, None])
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        raw_adv = advantages
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)
        stats = {
            **self.batch_stats(samples, f, scores, scores - beta * kl.sum(1)),
            "advantages_mean": masked_mean(raw_adv, mask),
            "advantages_std": masked_var(raw_adv, mask).sqrt(),
            "explained_variance": 1 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8),
        }
        exp = Experience(
            samples, mask, old_logp, ref_logp, scores, advantages, values, returns, engine_logp=f.get("engine_logp")
        )
        return exp, stats

    def minibatch_losses(self, exp: Experience, train_policy: bool, tokens: float):
        """Yield (loss, metrics) per micro-batch of a minibatch: clipped policy loss + vf_coef * clipped value loss."""
        cfg = self.cfg
        shift, scale = self.value_scale()
        for e in self.micro_batches(exp):
            s = e.samples
            values = (s.response_slice(self.value_train(s.input_ids, s.attention_mask)[:, :-1]) - shift) / scale
            vf_loss, metrics = value_loss(values, e.old_values, e.returns, e.mask, cfg.value_clip_range, tokens)
            loss = cfg.vf_coef * vf_loss
            if train_policy:
                pg_loss, pg_metrics = self.policy_terms(e, tokens)
                loss = loss + pg_loss
                metrics = {**metrics, **pg_metrics}
            yield loss, metrics


def run(cfg: PPOConfig, model_cfg: ModelConfig, inputs: PolicyInputs, ctx: StageContext) -> dict:
    return run_method(PPO, cfg, model_cfg, inputs, ctx, value_init=cfg.value_init)
