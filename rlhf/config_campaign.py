"""The campaign config group: iterated alignment in rounds, each promoting a new policy only on held-out evidence.

A round samples the current champion on fresh prompts, has pairs of its answers labelled, retrains the reward
model on every label so far, trains a challenger and promotes it (the registry alias) when the gate passes
(:mod:`rlhf.gate`, :mod:`flows.campaign`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .settings import ConfigError, setting

LABELLERS = ("synthetic", "folder", "judge")


@dataclass
class CampaignConfig:
    name: str = setting(
        "default", "The campaign: its MLflow row, its rounds' records under paths.root/campaigns/<name>, its inbox."
    )
    rounds: int = setting(
        3, "Rounds the campaign holds when this command ends: the rounds already done come back Cached.", ge=1
    )
    prompts_per_round: int = setting(
        64, "Fresh training prompts the champion answers each round (two answers each: one pair to label).", ge=1
    )
    labeller: str = setting(
        "synthetic",
        "Who labels the round's pairs: synthetic (the task's simulated annotators: data.annotator_*), folder "
        "(people: JSONL files dropped in campaign.inbox) or judge (a reward model trained with the reward config on "
        "the data's held-out pairs, which no reward model of the campaign learns from, prefers the answer it scores "
        "higher).",
        choices=list(LABELLERS),
    )
    inbox: Optional[str] = setting(
        None,
        "labeller=folder: the folder people drop labelled JSONL files into (the conversational schema: chosen and "
        "rejected message lists) and where each round writes the pairs it asks for (requests/); null: "
        "paths.root/campaigns/<name>/inbox.",
    )
    reward_init: str = setting(
        "scratch",
        "Each round's reward model starts from the SFT backbone (scratch) or the previous round's reward model "
        "(warm); either way it trains on every label so far.",
        choices=["scratch", "warm"],
    )
    challenger_init: str = setting(
        "champion",
        "The challenger starts from (and is kept near: its reference model) the champion, or SFT.",
        choices=["champion", "sft"],
    )
    gate_z: float = setting(
        2.0,
        "Promote only when the challenger's paired gain over the champion on held-out prompts exceeds this many "
        "standard errors (the objective's reward: gold where the task has one, else proxy).",
        ge=0.0,
    )
    kl_budget: float = setting(
        5.0, "Promote only when the challenger's KL to SFT on its held-out answers (nats) stays within this.", gt=0.0
    )

    def check(self, key: str) -> None:
        if not self.name or any(c in self.name for c in "/\\ "):
            raise ConfigError(
                f"{key}.name={self.name!r} names folders and MLflow rows: no slashes or spaces. Fix: e.g. "
                f"{key}.name=nightly."
            )
