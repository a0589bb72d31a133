"""Cache keys: hash(stage's resolved config + upstream stages' keys + version of the code it runs).

So a sweep over ``algo.beta`` changes only the policy and eval keys (data, SFT and reward are re-used),
and editing the PPO code invalidates PPO and eval but not SFT. The code version is derived from the
import graph of the stage's module (:mod:`rlhf.code_version`): every project module it runs and the
versions of the packages they import.
"""

from __future__ import annotations

import hashlib
import json

from rlhf.algorithms import registry
from rlhf.code_version import code_version
from rlhf.config import JUDGE, PipelineConfig, RewardConfig, RolloutConfig, reward_member, stage_kind
from rlhf.data import source_fingerprint
from rlhf.settings import to_dict

# The module whose ``run`` each non-policy stage executes; a policy algorithm's is the module declaring it.
STAGE_MODULES = {
    "data": "rlhf.stages.prepare",
    "sft": "rlhf.stages.sft",
    "reward": "rlhf.stages.reward",
    "eval": "rlhf.stages.evaluate",
    # a campaign round's own stages (flows.campaign)
    "champion": "rlhf.champion",
    "pairs": "rlhf.stages.pairs",
    "labels": "rlhf.labellers",
    "preferences": "rlhf.stages.preferences",
    "gate": "rlhf.champion",
}


def entry_module(stage: str) -> str:
    """The module a stage runs (``reward.2``, an ensemble member, runs the reward stage's)."""
    kind = stage_kind(stage)
    return STAGE_MODULES[kind] if kind in STAGE_MODULES else registry()[kind].module


def stage_key(stage: str, config: dict, upstream: list[str]) -> str:
    payload = json.dumps(
        {"stage": stage, "config": config, "upstream": upstream, "code": code_version(entry_module(stage))},
        sort_keys=True,
        default=str,
    )
    return f"{stage}-{hashlib.sha256(payload.encode()).hexdigest()[:24]}"


def stage_configs(cfg: PipelineConfig) -> dict[str, dict]:
    """The part of the config each stage's result depends on."""
    m = cfg.model
    scoring = {"missing_eos_penalty": cfg.reward.missing_eos_penalty}  # how answers are scored, beside what was trained
    # the engine the answers come from (the stages that sample); not how much memory it may hold
    rollout = {"rollout": {k: v for k, v in to_dict(cfg.rollout).items() if k not in RolloutConfig.NOT_IN_KEY}}
    precision = {
        "max_length": m.max_length,
        "dtype": m.dtype,
        "autocast": m.autocast,
        "gradient_checkpointing": m.gradient_checkpointing,
        "lora": [m.lora_r, m.lora_alpha, m.lora_dropout, m.lora_target_modules],
    }
    return {
        "data": {
            "data": to_dict(cfg.data),
            "source": source_fingerprint(cfg.data),
        },  # the files' contents, the hub revision
        "sft": {"model": to_dict(cfg.model), "sft": to_dict(cfg.sft)},
        **{
            reward_member(i): {
                "reward": {k: v for k, v in to_dict(cfg.reward).items() if k not in RewardConfig.SCORING_ONLY},
                **precision,
                **({"member": i} if i else {}),
            }
            for i in range(cfg.reward.ensemble_size)
        },
        cfg.algo.algo: {
            "algo": to_dict(cfg.algo),
            **precision,
            **({**scoring, **rollout} if registry()[cfg.algo.algo].needs_reward else {}),
        },
        "eval": {"eval": to_dict(cfg.eval), "max_length": cfg.model.max_length, **scoring, **rollout},
    }


def round_stage_configs(cfg: PipelineConfig, round_no: int) -> dict[str, dict]:
    """The part of the config each of a campaign round's own stages depends on (:mod:`flows.campaign`; its training
    and eval stages use :func:`stage_configs`). The champion is resolved once per campaign and round; the labels of a
    folder are the campaign's inbox's."""
    c = cfg.campaign
    labeller = {"labeller": c.labeller, "round": round_no}
    if c.labeller == "synthetic":
        labeller |= {k: v for k, v in to_dict(cfg.data).items() if k.startswith("annotator_") or k == "seed"}
    elif c.labeller == "judge":  # the judge itself is an upstream key
        labeller |= {"max_length": cfg.model.max_length, "missing_eos_penalty": cfg.reward.missing_eos_penalty}
    else:
        labeller |= {"campaign": c.name, "inbox": c.inbox, "root": str(cfg.paths.root)}
    rollout = {k: v for k, v in to_dict(cfg.rollout).items() if k not in RolloutConfig.NOT_IN_KEY}
    return {
        "champion": {"campaign": c.name, "round": round_no, "model": cfg.tracking.policy_model_name},
        "pairs": {
            "round": round_no,
            "n": c.prompts_per_round,
            "seed": cfg.eval.seed,
            "sampling": to_dict(cfg.eval.sampling),
            "max_length": cfg.model.max_length,
            "rollout": rollout,
        },
        JUDGE: {**stage_configs(cfg)["reward"], "judge": True},  # the reward model's config, on the judge's splits
        "labels": labeller,
        "preferences": {},  # its content: the last version's key and the labels' digest
        "gate": {
            "campaign": c.name,
            "round": round_no,
            "z": c.gate_z,
            "kl_budget": c.kl_budget,
            "objective": cfg.objective_metric(),
            "model": cfg.tracking.policy_model_name,
        },
    }


def pipeline_keys(cfg: PipelineConfig) -> dict[str, str]:
    """Every stage's key, computed up front from the config alone."""
    sections = stage_configs(cfg)
    policy = cfg.algo.algo
    keys = {"data": stage_key("data", sections["data"], [])}
    keys["sft"] = stage_key("sft", sections["sft"], [keys["data"]])
    members = [reward_member(i) for i in range(cfg.reward.ensemble_size)]
    for name in members:
        keys[name] = stage_key("reward", sections[name], [keys["data"], keys["sft"]])
    rewards = [keys[m] for m in members]
    upstream = [k for s in registry()[policy].upstream for k in (rewards if s == "reward" else [keys[s]])]
    keys[policy] = stage_key(policy, sections[policy], upstream)
    keys["eval"] = stage_key("eval", sections["eval"], [keys["data"], keys["sft"], *rewards, keys[policy]])
    return keys


def refreshed_stages(keys: dict[str, str], refresh: list) -> set[str]:
    """The stages a run trains again although cached: the first of ``refresh`` in the pipeline's order and every stage
    after it (their inputs change)."""
    order = list(keys)
    first = min((order.index(s) for s in refresh if s in order), default=len(order))
    return set(order[first:])


def short_key(key: str) -> str:
    """The first hex digits of a stage key (``sft-3f9a...`` -> ``3f9a1c``): enough to tell runs apart in a name."""
    return key.rsplit("-", 1)[-1][:6]
