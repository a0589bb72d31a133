"""The policy-training algorithms, each declared once.

A stage module under ``rlhf/stages/`` that trains (or picks) the policy ends with an
:class:`Algorithm`: its name (the ``algo`` config group's option and the stage's name), its config
schema, its ``run`` and the upstream stages it needs; its cache key hashes the module and everything it
imports (:mod:`rlhf.code_version`). The
flow, the task wrapper, the stage deployment, the data-parallel launcher, the cache keys and the config
check all read :func:`registry`; adding an algorithm takes a stage module, ``conf/algo/<name>.yaml``
and one line in :data:`MODULES`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

# The stage modules that declare an ALGORITHM, in the order `--help` lists them.
MODULES = ("rlhf.stages.dpo", "rlhf.stages.ppo", "rlhf.stages.rloo", "rlhf.stages.grpo", "rlhf.stages.best_of_n")


@dataclass(frozen=True)
class PolicyInputs:
    """What a policy stage reads from the stages before it (paths in the shared ``paths.root``)."""

    data_dir: str
    sft_path: str
    reward_path: str | None = None  # only for algorithms with ``needs_reward``
    has_gold: bool = False  # the data has a known gold reward (the synthetic task): held-out gold during training
    missing_eos_penalty: float = 0.0  # the reward model's scoring rule (reward.missing_eos_penalty)
    extra_reward_paths: tuple[str, ...] = ()  # reward-model ensemble members 1.. (reward.ensemble_size > 1)

    @property
    def reward_paths(self) -> tuple[str, ...]:
        return (self.reward_path, *self.extra_reward_paths) if self.reward_path else ()


@dataclass(frozen=True)
class Algorithm:
    """A policy-training method.

    ``run(cfg, model_cfg, inputs, ctx) -> record``: ``cfg`` an instance of ``schema``, ``inputs`` a
    :class:`PolicyInputs`, ``ctx`` the stage context; the record holds ``model_path`` and ``metrics``.
    """

    name: str
    schema: type
    run: Callable
    needs_reward: bool  # samples and scores with the reward model (on-policy) rather than learning from pairs
    sampler: Callable | None = (
        None  # how the eval stage samples "the policy" when it is not one model (rlhf.stages.evaluate.Sampler)
    )
    module: str = ""  # filled by registry(): the declaring module, the entry of the stage's code version

    @property
    def upstream(self) -> tuple[str, ...]:
        return ("data", "sft", "reward") if self.needs_reward else ("data", "sft")


@cache
def registry() -> dict[str, Algorithm]:
    """Every algorithm by name, imported from :data:`MODULES`."""
    out: dict[str, Algorithm] = {}
    for name in MODULES:
        algorithm: Algorithm = importlib.import_module(name).ALGORITHM
        out[algorithm.name] = dataclasses.replace(algorithm, module=name)
    return out
