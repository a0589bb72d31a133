"""Typed configuration: one dataclass per config group, the one place that holds every default.

Each field declares its default, its help text and its bounds (:mod:`rlhf.settings`). Hydra composes ``conf/``
on top of these schemas (registered in its ConfigStore by :mod:`flows.schema`), so a YAML option holds only
what it changes. :func:`rlhf.validate.validate` merges a composed config into the dataclasses, so unknown keys
and wrong types fail before any stage starts; ranges are checked from each field's metadata and cross-field
rules live in each class's ``check``, naming the offending key and the fix.

The groups' schemas are in ``rlhf/config_model.py``, ``config_data.py`` and ``config_training.py``; the
policy-training algorithms' (DPO, PPO, ...) in ``config_algorithms.py``, found through :mod:`rlhf.algorithms`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from .config_campaign import CampaignConfig
from .config_data import DataConfig
from .config_model import ModelConfig
from .config_training import RewardConfig, SamplingConfig, SFTConfig
from .settings import ConfigError, setting


@dataclass
class EvalConfig:
    n_prompts: int = setting(256, "Held-out prompts to generate on (at most the data's held-out set).", ge=1)
    n_samples: int = setting(
        1, "Answers per prompt from the policy and from SFT (standard errors are over prompts).", ge=1
    )
    n_samples_table: int = setting(32, "Rows in the logged sample table.", ge=0)
    seed: int = setting(1234, "Sampling seed (the same for the policy and the SFT baseline).", ge=0)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def check(self, key: str) -> None:
        self.sampling.refuse_truncation(
            key,
            "eval/kl is the mean of log pi - log pi_SFT over the policy's answers, at the sampling temperature; "
            "answers drawn from a truncated distribution are not the policy's, and the estimate would be biased",
            " (the temperature is used on both sides)",
        )


@dataclass
class RolloutConfig:
    """How the stages that sample (on-policy, the eval stage, best-of-n) generate answers (docs: Rollout engines)."""

    # where the engine's memory goes and how strictly a push is checked, not which answers it gives
    NOT_IN_KEY = ("gpu_memory_utilization", "sleep", "sync_check_tol")

    engine: str = setting(
        "auto",
        "hf: batched forwards of the trained model with a KV cache; vllm: a vLLM engine in the training process, the "
        "trainer's weights pushed to it before every rollout (bash scripts/install_vllm.sh); auto: vllm where it is "
        "installed and the stage runs on one GPU, else hf.",
        choices=["auto", "hf", "vllm"],
    )
    gpu_memory_utilization: float = setting(
        0.3, "vLLM: the share of the GPU's memory its engine may hold (weights and KV cache).", gt=0.0, le=1.0
    )
    sync_check_tol: float = setting(
        0.5,
        "vLLM: after each weight push, the engine's and the trainer's log-probs of a fixed sequence are compared "
        "(logged as rollout/sync_logprob_abs_diff_max); a gap above this many nats stops the stage (the weights did "
        "not arrive). fp32 engines agree within 1e-5; bf16 ones within a few hundredths.",
        gt=0.0,
    )
    sleep: bool = setting(
        True,
        "vLLM on a GPU: release the engine's memory (sleep mode, level 2) while the experience pass and the update "
        "run; the next rollout wakes it and pushes the weights. Ignored on CPU, where vLLM has no sleep mode.",
    )


@dataclass
class TrackingConfig:
    uri: Optional[str] = setting(None, "MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else sqlite under paths.root.")
    experiment: str = setting("rlhf", "MLflow experiment name (created, or adopted, as a model-training experiment).")
    connect_timeout_s: float = setting(10.0, "Seconds to wait for the tracking server before failing.", gt=0.0)
    log_checkpoints: bool = setting(
        False,
        "Upload every resumable checkpoint (optimizer state included) as artifacts; false: they stay under paths.root.",
    )
    log_models: bool = setting(
        True, "Log each stage's final model (SFT, reward, tuned policy) as an MLflow transformers model."
    )
    policy_model_name: Optional[str] = setting(
        "rlhf-policy", "Model Registry name of the tuned policy (null: not registered)."
    )
    reward_model_name: Optional[str] = setting(
        "rlhf-reward", "Model Registry name of the reward model (null: not registered)."
    )
    system_metrics: bool = setting(True, "CPU, memory (and GPU) utilisation of every training stage run.")
    system_metrics_interval_s: float = setting(5.0, "Seconds between system-metric samples.", gt=0.0)


@dataclass
class PathsConfig:
    root: str = setting(
        "${oc.env:RLHF_HOME,.rlhf}",
        "Stage outputs, Prefect results and the default MLflow store ($RLHF_HOME, "
        "else .rlhf; relative: to the launch folder).",
    )


@dataclass
class FSDPConfig:
    """FSDP2's settings (``runtime.strategy=fsdp``)."""

    reshard_after_forward: bool = setting(
        True,
        "Free each block's gathered parameters after its forward and gather them again for the backward (ZeRO-3); "
        "false keeps them to the backward (ZeRO-2: less communication, more memory).",
    )
    cpu_offload: bool = setting(
        False, "Keep the sharded parameters, gradients and optimizer state in CPU memory between uses (GPUs only)."
    )
    mixed_precision: str = setting(
        "auto",
        "Parameters gathered in bf16 with gradients reduced in fp32 (bf16), or fp32 throughout (no); auto: bf16 on "
        "GPUs, no on CPU.",
        choices=["auto", "bf16", "no"],
    )


@dataclass
class RuntimeConfig:
    device: str = setting("auto", "auto, cpu, cuda or cuda:N.")
    threads: int = setting(
        0, "torch intra-op threads per process (0: the cores shared out, at most 4; 1 when sharing the machine).", ge=0
    )
    num_processes: int = setting(
        1,
        "Processes per training stage; >1 launches every training stage with `accelerate launch` "
        "(DDP, one process per GPU, or gloo on CPU).",
        ge=1,
    )
    num_machines: int = setting(
        1,
        "Machines one training stage spans (torchrun's --nnodes), each running runtime.num_processes processes; "
        "every machine starts the same command with its own runtime.node_rank (docs: Several machines).",
        ge=1,
    )
    node_rank: int = setting(
        0,
        "This machine's place among runtime.num_machines: 0 runs the pipeline and tracks every stage; the others "
        "join its training stages' launches (a platform sets it per node, e.g. from JOB_COMPLETION_INDEX).",
        ge=0,
    )
    rdzv_endpoint: str = setting(
        "",
        "host:port of torchrun's c10d rendezvous on machine 0 (needed with num_machines > 1; empty on one machine: a "
        "free local port); auto: machine 0's address as its host name resolves (a pod's IP) and a free port, which "
        "the other machines read from the stage folder.",
    )
    strategy: str = setting(
        "ddp",
        "How the processes of a training stage share the work: ddp, each a full copy of every model (DDP); fsdp, "
        "every model sharded across them per transformer block (FSDP2), checkpoints sharded "
        "(torch.distributed.checkpoint) and resumable on another number of processes.",
        choices=["ddp", "fsdp"],
    )
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    progress: str = setting(
        "auto",
        "Training progress: a bar on a terminal, log lines otherwise (auto), always log lines (log), or nothing (off).",
        choices=["auto", "bar", "log", "off"],
    )
    progress_every_s: float = setting(5.0, "Seconds between progress log lines (when not drawing a bar).", gt=0.0)
    stop_grace_s: float = setting(
        600.0,
        "Seconds a data-parallel stage's processes get, after a stop signal, to finish their step and checkpoint "
        "before the launcher kills them (the step itself may be long on a large model).",
        gt=0.0,
    )
    compile: bool = setting(
        False,
        "torch.compile the forwards of an on-policy stage's update (PPO, RLOO, GRPO: the policy's log-probs "
        "and the value model's values, backbone and head; dynamic shapes), where its time goes; sampling and the "
        "experience pass stay eager. The first iteration pays the compilation: benchmarks/results/compile_cpu.md "
        "measures both. Needs a C++ compiler (CPU) or Triton (CUDA).",
    )


def stage_kind(name: str) -> str:
    """What a stage is: a reward-model ensemble's member ``reward.2`` is a ``reward`` stage."""
    return name.split(".", 1)[0]


JUDGE = "reward.judge"  # the stage of a campaign's judge (campaign.labeller=judge): a reward model on other pairs


def reward_member(i: int) -> str:
    """The stage name of reward-model ensemble member ``i`` (member 0 is the single reward model)."""
    return "reward" if i == 0 else f"reward.{i}"


@dataclass
class DispatchConfig:
    """Where stages run. ``local``: every stage in the flow's own process. ``deployments``: each training
    stage listed in ``stages`` runs as a flow run of ``deployment`` (a GPU work pool), the rest stays local.
    Placement never changes a stage's result, so it is not part of any cache key."""

    mode: str = setting(
        "local",
        "local: all stages in this process; deployments: training stages on a work pool.",
        choices=["local", "deployments"],
    )
    deployment: str = setting("rlhf-stage/gpu", "'<flow name>/<deployment name>' that runs one training stage.")
    stages: Optional[list] = setting(
        None, "Training stages sent to the deployment, e.g. [ppo]; null: every training stage."
    )
    job_variables: dict = setting(
        {}, "Job variables for the stage's flow run, e.g. {env: {CUDA_VISIBLE_DEVICES: '1'}}."
    )
    concurrency_tag: str = setting(
        "gpu",
        "Tag on every training task run: a Prefect tag concurrency limit on it "
        "(prefect concurrency-limit create gpu 1) lets one stage train at a time.",
    )
    timeout_s: Optional[float] = setting(None, "Seconds to wait for a dispatched stage (null: no limit).", gt=0.0)
    poll_s: float = setting(5.0, "Seconds between checks of a dispatched stage's state.", gt=0.0)

    def check(self, key: str) -> None:
        if self.deployment.count("/") != 1:
            raise ConfigError(
                f"{key}.deployment={self.deployment!r} is not '<flow name>/<deployment name>'. "
                f"Fix: pass {key}.deployment=rlhf-stage/gpu (see `prefect deployment ls`)."
            )


# Metrics an objective may name, and whether they need a gold reward (the synthetic task).
OBJECTIVES = {
    "eval/gold_reward": True,
    "eval/win_rate_gold": True,
    "eval/proxy_reward": False,
    "eval/win_rate_proxy": False,
}


@dataclass
class PipelineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: Any = MISSING  # the schema of the algorithm the algo group picks (rlhf.algorithms)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    campaign: CampaignConfig = field(default_factory=CampaignConfig)
    refresh: list = setting([], "Stages to re-run even when cached, e.g. [dpo] (and every stage after them).")
    sweep_id: Optional[str] = setting(None, "Set by multirun: groups the parent runs of one sweep under one sweep run.")
    sweep_member: Optional[int] = setting(None, "Set by multirun: this run's number in its sweep (run names).")
    objective: Optional[str] = setting(
        None,
        "Eval metric the app returns to Hydra sweepers (maximised by hparams_search); null: "
        "eval/gold_reward where the data has a gold reward (the synthetic task), else eval/proxy_reward.",
        choices=[None, *OBJECTIVES],
    )
    tags: dict = setting({}, "Extra tags for the parent MLflow run.")

    def objective_metric(self) -> str:
        """The metric sweeps maximise: ``objective``, or the data's natural one."""
        return self.objective or ("eval/gold_reward" if self.data.source == "synthetic" else "eval/proxy_reward")

    def check(self, key: str) -> None:
        if self.objective and OBJECTIVES[self.objective] and self.data.source != "synthetic":
            raise ConfigError(
                f"objective={self.objective} needs a gold reward, which only the synthetic task has (data.source="
                f"{self.data.source}). Fix: pass objective=eval/proxy_reward (or leave objective unset)."
            )
