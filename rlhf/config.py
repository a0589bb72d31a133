"""Typed configuration: one dataclass per config group, the one place that holds every default.

Each field declares its default, its help text and its bounds. Hydra composes ``conf/`` on top of these
schemas (registered in its ConfigStore by :mod:`flows.schema`), so a YAML option holds only what it
changes. :func:`validate` merges a composed config into the dataclasses, so unknown keys and wrong types
fail before any stage starts; ranges are checked from each field's metadata and cross-field rules live
in each class's ``check``, naming the offending key and the fix.

The policy-training algorithms' own schemas (DPO, PPO, ...) live beside their stages and are found
through :mod:`rlhf.algorithms`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf

from .synthetic import PAIR_LENGTH_JITTER, all_specs


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and how to fix it."""


def setting(default: Any, help: str, **bounds: Any) -> Any:
    """A field with a help text and optional bounds: gt, ge, lt, le, choices."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **bounds})
    return field(default=default, metadata={"help": help, **bounds})


def default(cls: type, name: str, value: Any) -> Any:
    """Field ``name`` of the dataclass ``cls`` with another default, keeping its help text and bounds
    (a stage's schema that differs from the shared one only in its defaults)."""
    return setting(value, **cls.__dataclass_fields__[name].metadata)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class ModelConfig:
    name: str = setting("tiny", "Short name used in run names and cache keys.")
    # Either a local folder / hub id loaded with from_pretrained, or null to build the tiny model.
    pretrained: Optional[str] = setting(
        None, "Hub id or local folder of a causal LM; null builds the tiny model from `arch`."
    )
    tokenizer: Optional[str] = setting(
        None, "Tokenizer hub id or folder; null = same as `pretrained` (or trained locally for tiny)."
    )
    arch: str = setting(
        "gpt2",
        "Architecture of the model built from a config (pretrained=null): a transformers model_type.",
        choices=["gpt2", "llama", "qwen2"],
    )
    n_layer: int = setting(4, "Layers of the tiny model.", ge=1)
    n_embd: int = setting(128, "Hidden size of the tiny model.", ge=8)
    n_head: int = setting(4, "Attention heads of the tiny model.", ge=1)
    max_length: int = setting(64, "Context length (prompt + response) in tokens.", ge=8)
    vocab_size: int = setting(512, "Vocabulary size of the locally trained tokenizer.", ge=64)
    dropout: float = setting(
        0.0,
        "Every dropout of a model built from a config (attention dropout included), in SFT and reward "
        "training; DPO and the on-policy methods switch every form of it off.",
        ge=0.0,
        lt=1.0,
    )
    dtype: str = setting("float32", "Weights dtype for training.", choices=["float32", "bfloat16", "float16"])
    autocast: str = setting(
        "none",
        "Mixed precision: forwards in bfloat16 under torch.autocast, weights and optimizer in `dtype` "
        "(float16 would need a loss scaler: not offered).",
        choices=["none", "bfloat16"],
    )
    gradient_checkpointing: bool = setting(
        False, "Recompute activations in backward: less memory, ~30% more compute (large models)."
    )
    lora_r: int = setting(
        0, "LoRA rank of the trained models (policy, reward, value) through peft; 0 = full fine-tuning.", ge=0
    )
    lora_alpha: float = setting(16.0, "LoRA scaling numerator (the update is scaled by alpha / r).", gt=0.0)
    lora_dropout: float = setting(0.0, "Dropout on the LoRA input (off anyway in DPO and PPO).", ge=0.0, lt=1.0)
    lora_target_modules: Optional[list] = setting(
        None, "Modules to adapt, e.g. [q_proj, v_proj]; null = peft's default for the architecture."
    )
    lora_shared_reference: bool = setting(
        True,
        "Under LoRA, the frozen reference (and the reward model, when the value model starts from "
        "it) is the trained model with its adapters off: one copy of the base weights. false: "
        "separate frozen copies (more memory, the same numbers).",
    )
    default_chat_template: str = setting(
        CHATML,
        "Jinja chat template for conversational data when the tokenizer has none (ChatML; "
        "its <|im_start|>/<|im_end|> markers are added as special tokens).",
    )

    def check(self, key: str) -> None:
        if self.pretrained is None and self.n_embd % self.n_head:
            raise ConfigError(
                f"{key}.n_embd={self.n_embd} is not divisible by {key}.n_head={self.n_head}. "
                f"Fix: choose n_head dividing n_embd (e.g. {key}.n_head=4)."
            )


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
FILE_BUILDERS = ("json", "csv", "parquet", "text")  # `datasets` builders that read data.data_files


@dataclass
class DataConfig:
    source: str = setting(
        "synthetic",
        "synthetic (known gold reward) or hub (a `datasets` id or local files).",
        choices=["synthetic", "hub"],
    )
    seed: int = setting(0, "Seed of every random draw in the data stage.", ge=0)
    # Synthetic task sizes.
    n_sft: int = setting(4000, "SFT demonstrations.", ge=1)
    n_pref: int = setting(4000, "Preference pairs for reward modelling and DPO.", ge=1)
    n_eval_prompts: int = setting(256, "Held-out prompts for generation-based evaluation.", ge=1)
    n_eval_pref: int = setting(512, "Held-out preference pairs (reward-model accuracy).", ge=1)
    n_ppo_prompts: int = setting(2000, "Prompts for PPO rollouts.", ge=1)
    # Simulated annotators: P(a > b) = sigmoid((gold_a - gold_b + length_bias * (len_a - len_b)) / temperature)
    annotator_temperature: float = setting(
        0.3, "Annotator noise: Bradley-Terry temperature on the gold reward.", gt=0.0
    )
    annotator_length_bias: float = setting(0.1, "Annotator bias per extra word (favours longer answers).")
    demo_quality: float = setting(
        0.65, "Share of on-topic words in SFT demonstrations (decent, not optimal).", ge=0.0, le=1.0
    )
    pair_length_jitter: list = setting(
        list(PAIR_LENGTH_JITTER),
        "Words short of (negative) and past the prompt's target length that the answers of "
        "the preference pairs span, uniformly: [-3, 6] leans long, so that across the pairs "
        "shorter is better; a symmetric span such as [-4, 4] takes that correlation away.",
    )
    # Hub datasets (source=hub).
    path: Optional[str] = setting(None, "Dataset id (e.g. Anthropic/hh-rlhf) or a builder name like json.")
    data_files: Optional[Any] = setting(None, "Local files for builders like json (str, list or split->files).")
    train_split: str = setting("train", "Split for training.")
    test_split: str = setting("test", "Split for held-out evaluation.")
    format: str = setting(
        "hh",
        "Row format: hh (chosen/rejected dialogues sharing a prompt), columns (prompt/chosen/rejected text), "
        "or conversational (chosen/rejected message lists, the prompt explicit or the messages they share).",
        choices=["hh", "columns", "conversational"],
    )
    columns: dict = setting(
        {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"},
        "Column mapping for format=columns|conversational (conversational: a prompt column is optional).",
    )
    revision: Optional[str] = setting(
        None,
        "Hub dataset revision (a commit, tag or branch) to pin; null: the newest, resolved at "
        "start-up and part of the data stage's key.",
    )
    max_rows: Optional[int] = setting(None, "Keep at most this many training rows (null: all).", ge=1)
    max_prompt_chars: Optional[int] = setting(
        None,
        "Drop rows whose prompt is longer (characters; null: keep all). Prompts past the model's context fail loudly "
        "otherwise.",
        ge=1,
    )

    def check(self, key: str) -> None:
        if self.source == "hub" and not self.path:
            raise ConfigError(f"{key}.path is required when {key}.source=hub. Fix: e.g. {key}.path=Anthropic/hh-rlhf.")
        if self.source == "hub" and self.path in FILE_BUILDERS and not self.data_files:
            raise ConfigError(
                f"{key}.path={self.path} reads local files, and {key}.data_files is not set. "
                f"Fix: pass {key}.data_files=<file> (or a list, or {{train: ..., test: ...}})."
            )
        if self.source == "synthetic":
            held_out = len(all_specs(held_out=True))
            if self.n_eval_prompts > held_out:
                raise ConfigError(
                    f"{key}.n_eval_prompts={self.n_eval_prompts}: the synthetic task has {held_out} distinct held-out "
                    f"prompts. Fix: pass {key}.n_eval_prompts<={held_out} (eval.n_samples>1 for more answers per "
                    f"prompt)."
                )
            jitter = self.pair_length_jitter
            if len(jitter) != 2 or not all(isinstance(j, int) for j in jitter) or jitter[0] > jitter[1]:
                raise ConfigError(
                    f"{key}.pair_length_jitter={list(jitter)} must be two whole numbers of words, the first not above "
                    f"the "
                    f"second. Fix: e.g. {key}.pair_length_jitter=[-4,4]."
                )
        if self.format != "hh" and self.source == "synthetic":
            raise ConfigError(
                f"{key}.format={self.format} applies to hub / local datasets, not the synthetic task. "
                f"Fix: pass {key}=hh_rlhf_local (or {key}.source=hub with {key}.path) or drop {key}.format."
            )
        if self.format in ("columns", "conversational"):
            required = {"prompt", "chosen", "rejected"} if self.format == "columns" else {"chosen", "rejected"}
            missing = required - set(self.columns)
            if missing:
                raise ConfigError(
                    f"{key}.columns lacks {sorted(missing)}. Fix: map each of prompt, chosen, rejected to a column."
                )


# --------------------------------------------------------------------------------------------------
# Training stages
# --------------------------------------------------------------------------------------------------
@dataclass
class OptimConfig:
    """Optimiser and loop settings shared by every trainer (SFT, reward, DPO, PPO)."""

    lr: float = setting(1e-3, "Peak learning rate (AdamW).", gt=0.0)
    weight_decay: float = setting(0.0, "AdamW weight decay.", ge=0.0)
    warmup_ratio: float = setting(0.05, "Share of steps with linear warm-up.", ge=0.0, lt=1.0)
    schedule: str = setting("cosine", "Decay after warm-up.", choices=["cosine", "linear", "constant"])
    grad_accum: int = setting(1, "Micro-batches per optimizer step.", ge=1)
    max_grad_norm: float = setting(1.0, "Gradient clipping norm.", gt=0.0)
    log_every: int = setting(10, "Log metrics every N steps (the first step is always logged).", ge=1)
    eval_every: int = setting(50, "Evaluate every N steps.", ge=1)
    checkpoint_every: int = setting(200, "Write a resumable checkpoint every N steps.", ge=1)
    seed: int = setting(0, "Seed of initialisation, shuffling and sampling.", ge=0)


@dataclass
class SupervisedConfig(OptimConfig):
    """Epochs over a fixed dataset (SFT, reward, DPO)."""

    batch_size: int = setting(32, "Examples per optimizer step (across accumulation).", ge=1)
    epochs: float = setting(1.0, "Passes over the training data.", gt=0.0)

    def check(self, key: str) -> None:
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"{key}.batch_size={self.batch_size} is not divisible by {key}.grad_accum={self.grad_accum}. "
                f"Fix: choose grad_accum dividing batch_size."
            )


@dataclass
class SFTConfig(SupervisedConfig):
    """Supervised fine-tuning on the demonstrations."""

    lr: float = default(SupervisedConfig, "lr", 2e-3)
    epochs: float = default(SupervisedConfig, "epochs", 2.0)
    checkpoint_every: int = default(SupervisedConfig, "checkpoint_every", 100)


@dataclass
class RewardConfig(SupervisedConfig):
    """Bradley-Terry reward model on the preference pairs, from the SFT backbone with a zeroed head."""

    epochs: float = default(SupervisedConfig, "epochs", 2.0)
    checkpoint_every: int = default(SupervisedConfig, "checkpoint_every", 100)
    center_rewards_coef: float = setting(0.0, "Penalty on the squared mean reward (keeps scores centred).", ge=0.0)
    missing_eos_penalty: float = setting(
        1.0,
        "The reward model's scoring rule wherever it scores sampled answers (on-policy training, "
        "evaluation): subtracted from answers that never end. Not part of the reward model's "
        "training, so not of its cache key.",
        ge=0.0,
    )
    ensemble_size: int = setting(
        1,
        "Reward models trained (Coste et al. 2023): member i uses seed + i (its data order) and, with "
        "bootstrap, its own resample of the pairs; each member is a cached stage (reward, reward.1, ...), "
        "so a larger ensemble re-uses the smaller one's members.",
        ge=1,
    )
    bootstrap: bool = setting(
        False,
        "Train each ensemble member on a bootstrap resample of the pairs (members > 0 when the ensemble "
        "has one member: member 0 is always the single reward model).",
    )

    SCORING_ONLY = ("missing_eos_penalty", "ensemble_size")  # fields that do not change what a member trains


@dataclass
class SamplingConfig:
    temperature: float = setting(1.0, "Sampling temperature.", gt=0.0)
    top_k: int = setting(0, "Top-k filter (0: off).", ge=0)
    top_p: float = setting(1.0, "Nucleus filter (1.0: off).", gt=0.0, le=1.0)
    max_new_tokens: int = setting(24, "Longest answer in tokens.", ge=1)
    batch_size: int = setting(128, "Prompts per generation batch.", ge=1)


@dataclass
class OnPolicyConfig(OptimConfig):
    """What every on-policy method shares (PPO and the critic-free ones): sample answers for a batch of
    prompts, score them, take ``ppo_epochs`` passes of clipped updates over minibatches, KL to the SFT
    reference with strength ``beta``. ``steps``, ``log_every``, ``eval_every`` and ``checkpoint_every``
    count iterations (rollout + update)."""

    beta: float = setting(
        0.05, "KL strength: per-token reward -beta * (log pi - log pi_ref) (initial value if adaptive).", gt=0.0
    )
    clip_range: float = setting(0.2, "Ratio clip epsilon of the surrogate objective.", gt=0.0, lt=1.0)
    steps: int = setting(60, "Iterations (rollout + update); log/eval/checkpoint_every count these.", ge=1)
    rollout_batch_size: int = setting(64, "Prompts sampled per iteration.", ge=1)
    minibatch_size: int = setting(16, "Rollouts per optimizer step; must divide rollout_batch_size.", ge=1)
    ppo_epochs: int = setting(4, "Passes over each rollout batch.", ge=1)
    score_norm: bool = setting(True, "Shift scores so SFT answers score mean 0 (measured before training).")
    reward_ensemble: str = setting(
        "mean",
        "How a reward-model ensemble (reward.ensemble_size > 1) scores an answer, each member "
        "first standardised on SFT answers: mean, worst (the minimum, WCO) or uncertainty "
        "(mean - uncertainty_coef * variance, UWO; Coste et al. 2023).",
        choices=["mean", "worst", "uncertainty"],
    )
    uncertainty_coef: float = setting(0.5, "lambda of reward_ensemble=uncertainty.", ge=0.0)
    guard: str = setting(
        "none",
        "Over-optimisation guard (never sees gold): keep the held-out checkpoint with the best guard_score "
        "(conservative), the latest within guard_kl_budget (kl), or the best within the budget (both); the "
        "stage returns that checkpoint, and may stop early (guard_patience). none: the last iteration.",
        choices=["none", "conservative", "kl", "both"],
    )
    guard_score: str = setting(
        "worst",
        "The guard's held-out score: the reward ensemble aggregated this way (mean, worst, "
        "uncertainty); with one reward model, its score.",
        choices=["mean", "worst", "uncertainty"],
    )
    guard_kl_budget: Optional[float] = setting(
        None,
        "Largest held-out KL to the reference (nats per answer) a kept checkpoint may have. Required by guard=kl|both.",
        gt=0.0,
    )
    guard_patience: int = setting(
        3,
        "Evaluations without a better eligible checkpoint (one past the KL budget counts as none) "
        "before training stops; 0: train to the end and keep the guard's checkpoint.",
        ge=0,
    )
    forward_batch_size: int = setting(
        64,
        "Rollouts per forward in the experience pass (old / reference log-probs, values, scores): "
        "bounds its activation memory.",
        ge=1,
    )
    lr: float = default(OptimConfig, "lr", 1e-4)
    warmup_ratio: float = default(OptimConfig, "warmup_ratio", 0.0)
    schedule: str = default(OptimConfig, "schedule", "constant")
    log_every: int = default(OptimConfig, "log_every", 1)
    eval_every: int = default(OptimConfig, "eval_every", 10)
    checkpoint_every: int = default(OptimConfig, "checkpoint_every", 20)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(batch_size=64))

    def check(self, key: str) -> None:
        if self.guard in ("kl", "both") and self.guard_kl_budget is None:
            raise ConfigError(
                f"{key}.guard={self.guard} keeps checkpoints within a KL budget, and {key}.guard_kl_budget is not set. "
                f"Fix: pass {key}.guard_kl_budget=<nats>, e.g. 2.0, or {key}.guard=conservative."
            )
        if self.sampling.top_k or self.sampling.top_p < 1.0:
            raise ConfigError(
                f"{key}.sampling.top_k={self.sampling.top_k} / top_p={self.sampling.top_p}: the rollouts would come "
                f"from the truncated "
                f"distribution while the ratios, the KL penalty and the advantages use the policy's full "
                f"(temperature-scaled) "
                f"softmax, so the update would refer to a policy that did not sample the data. Fix: pass "
                f"{key}.sampling.top_k=0 {key}.sampling.top_p=1.0 (lower {key}.sampling.temperature for more focused "
                f"samples)."
            )
        if self.rollout_batch_size % self.minibatch_size:
            raise ConfigError(
                f"{key}.rollout_batch_size={self.rollout_batch_size} is not divisible by "
                f"{key}.minibatch_size={self.minibatch_size}. Fix: choose minibatch_size dividing rollout_batch_size."
            )
        if self.minibatch_size % self.grad_accum:
            raise ConfigError(
                f"{key}.minibatch_size={self.minibatch_size} is not divisible by {key}.grad_accum={self.grad_accum}. "
                f"Fix: choose grad_accum dividing minibatch_size."
            )


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
        if self.sampling.top_k or self.sampling.top_p < 1.0:
            raise ConfigError(
                f"{key}.sampling.top_k={self.sampling.top_k} / top_p={self.sampling.top_p}: eval/kl is the mean of "
                f"log pi - log pi_SFT "
                f"over the policy's answers, at the sampling temperature; answers drawn from a truncated distribution "
                f"are not the "
                f"policy's, and the estimate would be biased. Fix: pass {key}.sampling.top_k=0 "
                f"{key}.sampling.top_p=1.0 "
                f"(the temperature is used on both sides)."
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
    progress: str = setting(
        "auto",
        "Training progress: a bar on a terminal, log lines otherwise (auto), always log lines (log), or nothing (off).",
        choices=["auto", "bar", "log", "off"],
    )
    progress_every_s: float = setting(5.0, "Seconds between progress log lines (when not drawing a bar).", gt=0.0)
    compile: bool = setting(
        False,
        "torch.compile the forwards of an on-policy stage's update (PPO, RLOO, GRPO: the policy's log-probs "
        "and the value model's values, backbone and head; dynamic shapes), where its time goes; sampling and the "
        "experience pass stay eager. The first iteration pays the compilation: benchmarks/results/compile_cpu.md "
        "measures both. Needs a C++ compiler (CPU) or Triton (CUDA).",
    )


SUPERVISED_STAGES = ("sft", "reward")


def training_stages() -> tuple[str, ...]:
    """SFT, reward and every registered policy-training algorithm."""
    from .algorithms import registry

    return SUPERVISED_STAGES + tuple(registry())


def stage_kind(name: str) -> str:
    """What a stage is: a reward-model ensemble's member ``reward.2`` is a ``reward`` stage."""
    return name.split(".", 1)[0]


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

    def dispatched(self, stage: str) -> bool:
        """Does ``stage`` run on the work pool?"""
        return self.mode == "deployments" and stage_kind(stage) in (
            self.stages if self.stages is not None else training_stages()
        )

    def check(self, key: str) -> None:
        unknown = set(self.stages or ()) - set(training_stages())
        if unknown:
            raise ConfigError(
                f"{key}.stages={self.stages} names {sorted(unknown)}, which are not training stages. "
                f"Fix: choose among {list(training_stages())}."
            )
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
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
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


def stages() -> tuple[str, ...]:
    """Every stage name a config may refer to (refresh=[...])."""
    return ("data", *training_stages(), "eval")


def _check_bounds(obj: Any, key: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{key}.{f.name}" if key else f.name
        if dataclasses.is_dataclass(value):
            _check_bounds(value, path)
            continue
        meta = f.metadata
        if value is None:
            continue
        rules = [
            ("gt", lambda v, b: v > b, ">"),
            ("ge", lambda v, b: v >= b, ">="),
            ("lt", lambda v, b: v < b, "<"),
            ("le", lambda v, b: v <= b, "<="),
        ]
        broken = [(sym, meta[name]) for name, ok, sym in rules if name in meta and not ok(value, meta[name])]
        if broken:
            allowed = " and ".join(f"{sym} {meta[name]}" for name, _, sym in rules if name in meta)
            raise ConfigError(
                f"{path}={value!r} is out of range: must be {allowed} ({meta.get('help', '')}). "
                f"Fix: pass {path}=<value {allowed}>."
            )
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(
                f"{path}={value!r} is not one of {meta['choices']} ({meta.get('help', '')}). Fix: pass {path}=<one of "
                f"them>."
            )
    if hasattr(obj, "check"):
        obj.check(key)


def validate(config: Any) -> PipelineConfig:
    """Turn a composed config (DictConfig or plain dict) into a checked :class:`PipelineConfig`.

    Raises :class:`ConfigError` naming the key and the fix for unknown keys, wrong types and values out
    of range. Runs before any stage starts.
    """
    from .algorithms import registry

    container = OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else dict(config)
    algo = (container.get("algo") or {}).get("algo")
    algorithms = registry()
    if algo not in algorithms:
        raise ConfigError(
            f"algo.algo={algo!r} is not one of {sorted(algorithms)}. Fix: pass algo=<one of them>, e.g. algo=dpo."
        )
    schema = OmegaConf.structured(PipelineConfig)
    with _errors_named():
        OmegaConf.set_struct(schema, False)
        schema.algo = OmegaConf.structured(algorithms[algo].schema)
        OmegaConf.set_struct(schema, True)
        merged = OmegaConf.merge(schema, container)
        cfg: PipelineConfig = OmegaConf.to_object(merged)
    _check_bounds(cfg, "")
    _check_data_parallel(cfg)
    unknown = {stage_kind(s) for s in cfg.refresh} - set(stages())
    if unknown:
        raise ConfigError(
            f"refresh={cfg.refresh} names unknown stages {sorted(unknown)}. Fix: use stages among {list(stages())}."
        )
    return cfg


def _check_data_parallel(cfg: PipelineConfig) -> None:
    """Each of ``num_processes`` ranks takes an equal share of every batch, in ``grad_accum`` micro-batches."""
    n = cfg.runtime.num_processes
    batches = [
        ("sft.batch_size", cfg.sft.batch_size, "sft.grad_accum", cfg.sft.grad_accum),
        ("reward.batch_size", cfg.reward.batch_size, "reward.grad_accum", cfg.reward.grad_accum),
    ]
    if isinstance(cfg.algo, SupervisedConfig):
        batches.append(("algo.batch_size", cfg.algo.batch_size, "algo.grad_accum", cfg.algo.grad_accum))
    elif isinstance(
        cfg.algo, OnPolicyConfig
    ):  # each process samples its share of the rollout batch, updates on its share of each minibatch
        batches.append(("algo.minibatch_size", cfg.algo.minibatch_size, "algo.grad_accum", cfg.algo.grad_accum))
    for key, size, accum_key, accum in batches:
        if size % (accum * n):
            raise ConfigError(
                f"{key}={size} does not split into runtime.num_processes={n} processes x {accum_key}={accum} equal "
                f"micro-batches. Fix: make {key} a multiple of {n * accum}."
            )
    group = getattr(cfg.algo, "samples_per_prompt", 1)
    if isinstance(cfg.algo, OnPolicyConfig) and (cfg.algo.rollout_batch_size // group) % n:
        # each process samples whole groups of prompts: unequal shares would give unequal optimizer steps and hang the
        # collectives
        per = f" (samples_per_prompt={group} answers per prompt)" if group > 1 else ""
        raise ConfigError(
            f"algo.rollout_batch_size={cfg.algo.rollout_batch_size} gives {cfg.algo.rollout_batch_size // group} "
            f"prompts an iteration"
            f"{per}, which do not split evenly over runtime.num_processes={n} processes. Fix: make "
            f"algo.rollout_batch_size a "
            f"multiple of {group * n} (and of algo.minibatch_size)."
        )


class _errors_named:
    """Re-raise OmegaConf's type / key errors as ConfigError with the full key and a fix."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        from omegaconf.errors import OmegaConfBaseException

        if exc is not None and isinstance(exc, OmegaConfBaseException):
            key = getattr(exc, "full_key", None) or "?"
            raise ConfigError(
                f"{key}: {exc.msg if hasattr(exc, 'msg') else exc}. Fix: check the key name and type in conf/."
            ) from exc
        return False


def to_dict(cfg: Any) -> dict:
    """A dataclass config (or a part of it) as a plain, JSON-serialisable dict."""
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def from_dict(cls: type, data: dict) -> Any:
    """Rebuild a typed section from a plain dict (tasks receive plain dicts)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), data))


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}: for MLflow params."""
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
