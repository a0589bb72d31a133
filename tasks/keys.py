"""Cache keys: hash(stage's resolved config + upstream stages' keys + version of the code it runs).

So a sweep over ``algo.beta`` changes only the policy and eval keys (data, SFT and reward are re-used),
and editing the PPO code invalidates PPO and eval but not SFT.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
from functools import lru_cache

from rlhf.config import PipelineConfig, to_dict

# The core modules each stage executes; their source is part of the stage's key.
_SHARED = ["rlhf.config", "rlhf.data", "rlhf.modeling", "rlhf.checkpoint", "rlhf.stages.common"]
_TRAIN = _SHARED + ["rlhf.trainer", "rlhf.losses"]
STAGE_CODE = {
    "data": ["rlhf.config", "rlhf.data", "rlhf.synthetic", "rlhf.stages.prepare"],
    "sft": _TRAIN + ["rlhf.stages.sft"],
    "reward": _TRAIN + ["rlhf.stages.reward"],
    "dpo": _TRAIN + ["rlhf.stages.reward", "rlhf.stages.dpo"],
    "ppo": _TRAIN + ["rlhf.rollout", "rlhf.advantages", "rlhf.kl_control", "rlhf.synthetic", "rlhf.stages.ppo"],
    "eval": _SHARED + ["rlhf.rollout", "rlhf.synthetic", "rlhf.stages.reward", "rlhf.stages.evaluate"],
}


@lru_cache(maxsize=None)
def code_version(stage: str) -> str:
    h = hashlib.sha256()
    for name in STAGE_CODE[stage]:
        h.update(inspect.getsource(importlib.import_module(name)).encode())
    return h.hexdigest()[:16]


def stage_key(stage: str, config: dict, upstream: list[str]) -> str:
    payload = json.dumps({"stage": stage, "config": config, "upstream": upstream, "code": code_version(stage)}, sort_keys=True, default=str)
    return f"{stage}-{hashlib.sha256(payload.encode()).hexdigest()[:24]}"


def stage_configs(cfg: PipelineConfig) -> dict[str, dict]:
    """The part of the config each stage's result depends on."""
    m = cfg.model
    precision = {"max_length": m.max_length, "dtype": m.dtype, "autocast": m.autocast, "gradient_checkpointing": m.gradient_checkpointing,
                 "lora": [m.lora_r, m.lora_alpha, m.lora_dropout, m.lora_target_modules]}
    return {
        "data": {"data": to_dict(cfg.data)},
        "sft": {"model": to_dict(cfg.model), "sft": to_dict(cfg.sft)},
        "reward": {"reward": to_dict(cfg.reward), **precision},
        cfg.algo.algo: {"algo": to_dict(cfg.algo), **precision},
        "eval": {"eval": to_dict(cfg.eval), "max_length": cfg.model.max_length},
    }


def pipeline_keys(cfg: PipelineConfig) -> dict[str, str]:
    """Every stage's key, computed up front from the config alone."""
    sections = stage_configs(cfg)
    policy = cfg.algo.algo
    keys = {"data": stage_key("data", sections["data"], [])}
    keys["sft"] = stage_key("sft", sections["sft"], [keys["data"]])
    keys["reward"] = stage_key("reward", sections["reward"], [keys["data"], keys["sft"]])
    policy_upstream = [keys["data"], keys["sft"]] + ([keys["reward"]] if policy == "ppo" else [])
    keys[policy] = stage_key(policy, sections[policy], policy_upstream)
    keys["eval"] = stage_key("eval", sections["eval"], [keys["data"], keys["sft"], keys["reward"], keys[policy]])
    return keys
