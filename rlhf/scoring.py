"""How answers are scored: the reward model(s) under the scoring rule every stage shares, ensembles, and gold.

The scoring rule: a reward model's raw score at the answer's last token (its EOS, or the last token of an answer
that never ended), minus ``reward.missing_eos_penalty`` for answers that never end. An ensemble's members are
each standardised on SFT answers (their mean and std there, measured before training) and aggregated
(:func:`ensemble_score`); the eval stage's proxy is the members' mean raw score under the same rule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .modeling import FrozenModel, sequence_scores
from .rollout import Samples

GoldReward = Callable[[str, str, bool], float]  # (prompt, answer text, ended) -> the task's true reward


def ensemble_score(z: torch.Tensor, how: str, coef: float = 0.5) -> torch.Tensor:
    """A reward-model ensemble's score from its K members' standardised scores z (K, B) (Coste et al. 2023):

    mean:         mean_k z_k
    worst:        min_k z_k                            (worst-case optimisation, WCO)
    uncertainty:  mean_k z_k - coef * var_k z_k        (uncertainty-weighted optimisation, UWO)
    """
    if how == "worst":
        return z.min(0).values
    if how == "uncertainty":
        return z.mean(0) - coef * z.var(0)
    return z.mean(0)


class Scorer:
    """The reward model(s) under the scoring rule. ``member_stats`` (K, 2): each member's mean and std on SFT
    answers (set by the on-policy loop before training; an ensemble is standardised with them)."""

    def __init__(self, rewards: list[FrozenModel], missing_eos_penalty: float) -> None:
        self.rewards, self.missing_eos_penalty = rewards, missing_eos_penalty
        self.member_stats = torch.zeros(len(rewards), 2)

    @torch.no_grad()
    def members(self, samples: Samples) -> torch.Tensor:
        """Each reward model's raw score at the last answer token: (K, B)."""
        out = []
        for reward in self.rewards:
            with reward.use() as model:
                out.append(sequence_scores(model, samples.input_ids, samples.attention_mask, samples.last_index))
        return torch.stack(out)

    def penalty(self, samples: Samples) -> torch.Tensor:
        """The missing-EOS penalty of each answer: (B,)."""
        return self.missing_eos_penalty * (~samples.ended).float()

    def proxy(self, members: torch.Tensor, samples: Samples) -> torch.Tensor:
        """The eval stage's proxy reward: the members' mean raw score, penalised: (B,)."""
        return members.mean(0) - self.penalty(samples)

    def standardised(self, members: torch.Tensor) -> torch.Tensor:
        """Members' scores (K, B) in units of their spread on SFT answers."""
        stats = self.member_stats.to(members.device)  # (K, 2) mean, std
        return (members - stats[:, :1]) / stats[:, 1:]

    def ensemble(self, members: torch.Tensor, how: str, coef: float) -> torch.Tensor:
        """The score an on-policy method optimises from its members' raw scores (K, B): the single model's score, or
        the ensemble's aggregation ``how`` of the standardised members, put on the scale of member 0 (the single
        reward model of ``reward.ensemble_size=1``), so that beta means what it means with that model alone and an
        ensemble differs from it in the aggregation only (bootstrapped members can spread their scores wider than
        member 0: on their mean scale an ensemble would run at a weaker effective beta)."""
        if len(members) == 1:
            return members[0]
        stats = self.member_stats.to(members.device)
        return ensemble_score(self.standardised(members), how, coef) * stats[0, 1] + stats[0, 0]


def gold_rewards(gold: GoldReward, prompts: list[str], texts: list[str], ended: torch.Tensor) -> torch.Tensor:
    """The task's true reward of each answer: (B,)."""
    return torch.tensor([gold(p, a, bool(e)) for p, a, e in zip(prompts, texts, ended)])
