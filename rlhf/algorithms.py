"""The policy-training algorithms, each declared once: :data:`ALGORITHMS`.

An algorithm is its name (the ``algo`` config group's option and the stage's name), its config schema
(:mod:`rlhf.config_algorithms`, light: validation and ``--help`` read it without loading torch), the stage module
whose ``run`` trains (or picks) the policy, and whether it needs the reward model. The flow, the task wrapper,
the stage deployment, the data-parallel launcher, the cache keys (the stage module is the entry of its code
version, :mod:`rlhf.code_version`) and the config checks all read :func:`registry`. Adding an algorithm takes a
stage module, its config class, ``conf/algo/<name>.yaml`` and one line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from .config_algorithms import BestOfNConfig, DPOConfig, GRPOConfig, PPOConfig, RLOOConfig

if TYPE_CHECKING:
    from .config import RolloutConfig


@dataclass(frozen=True)
class PolicyInputs:
    """What a policy stage reads from the stages before it (paths in the shared ``paths.root``)."""

    data_dir: str
    sft_path: str
    reward_path: str | None = None  # only for algorithms with ``needs_reward``
    gold: Callable | None = None  # the task's true reward (prompt, answer, ended) -> float, where it has one
    missing_eos_penalty: float = 0.0  # the reward model's scoring rule (reward.missing_eos_penalty)
    extra_reward_paths: tuple[str, ...] = ()  # reward-model ensemble members 1.. (reward.ensemble_size > 1)
    rollout: RolloutConfig | None = None  # how on-policy stages sample (rollout.engine); None: the default

    @property
    def reward_paths(self) -> tuple[str, ...]:
        return (self.reward_path, *self.extra_reward_paths) if self.reward_path else ()


@dataclass(frozen=True)
class Algorithm:
    """A policy-training method.

    Its stage ``module`` has ``run(cfg, model_cfg, inputs, ctx) -> record``: ``cfg`` an instance of ``schema``,
    ``inputs`` a :class:`PolicyInputs`, ``ctx`` the stage context; the record holds ``model_path`` and ``metrics``.
    With ``samples``, the policy is not one model and the module's ``sample`` is how the eval stage samples it
    (:data:`rlhf.stages.evaluate.Sampler`).
    """

    name: str
    schema: type
    module: str  # the stage module: imported when the stage runs, not to read the config
    needs_reward: bool  # samples and scores with the reward model (on-policy) rather than learning from pairs
    samples: bool = False

    @property
    def run(self) -> Callable:
        return importlib.import_module(self.module).run

    @property
    def sampler(self) -> Callable | None:
        return importlib.import_module(self.module).sample if self.samples else None

    @property
    def upstream(self) -> tuple[str, ...]:
        return ("data", "sft", "reward") if self.needs_reward else ("data", "sft")


ALGORITHMS = (  # in the order --help lists them
    Algorithm("dpo", DPOConfig, "rlhf.stages.dpo", needs_reward=False),
    Algorithm("ppo", PPOConfig, "rlhf.stages.ppo", needs_reward=True),
    Algorithm("rloo", RLOOConfig, "rlhf.stages.rloo", needs_reward=True),
    Algorithm("grpo", GRPOConfig, "rlhf.stages.grpo", needs_reward=True),
    Algorithm("best_of_n", BestOfNConfig, "rlhf.stages.best_of_n", needs_reward=True, samples=True),
)


@cache
def registry() -> dict[str, Algorithm]:
    """Every algorithm by name."""
    return {a.name: a for a in ALGORITHMS}


SUPERVISED_STAGES = ("sft", "reward")  # the training stages before the policy's


def training_stages() -> tuple[str, ...]:
    """SFT, reward and every registered policy-training algorithm."""
    return SUPERVISED_STAGES + tuple(registry())
