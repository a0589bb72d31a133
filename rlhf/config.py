"""Typed configuration: one dataclass per config group, with ranges checked before any training.

Hydra composes YAML from ``conf/``; :func:`validate` merges the result into these dataclasses, so
unknown keys and wrong types fail before any stage starts. Ranges are declared in each field's metadata and checked by :func:`validate`,
which names the offending key and the fix. Cross-field rules live in each class's ``check``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and how to fix it."""


def _f(default: Any, help: str, **bounds: Any) -> Any:
    """A field with a help text and optional bounds: gt, ge, lt, le, choices."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **bounds})
    return field(default=default, metadata={"help": help, **bounds})


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    name: str = _f("tiny", "Short name used in run names and cache keys.")
    # Either a local folder / hub id loaded with from_pretrained, or null to build the tiny model.
    pretrained: Optional[str] = _f(None, "Hub id or local folder of a causal LM; null builds the tiny model from `arch`.")
    tokenizer: Optional[str] = _f(None, "Tokenizer hub id or folder; null = same as `pretrained` (or trained locally for tiny).")
    arch: str = _f("gpt2", "transformers model_type for the tiny model built from a config.", choices=["gpt2", "llama"])
    n_layer: int = _f(4, "Layers of the tiny model.", ge=1)
    n_embd: int = _f(128, "Hidden size of the tiny model.", ge=8)
    n_head: int = _f(4, "Attention heads of the tiny model.", ge=1)
    max_length: int = _f(64, "Context length (prompt + response) in tokens.", ge=8)
    vocab_size: int = _f(512, "Vocabulary size of the locally trained tokenizer.", ge=64)
    dropout: float = _f(0.0, "Dropout of the tiny model during SFT / reward training (always 0 in DPO, PPO).", ge=0.0, lt=1.0)
    dtype: str = _f("float32", "Weights dtype for training.", choices=["float32", "bfloat16", "float16"])
    autocast: str = _f("none", "Mixed precision: forwards in bfloat16 under torch.autocast, weights and optimizer in `dtype` "
                               "(float16 would need a loss scaler: not offered).", choices=["none", "bfloat16"])
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward: less memory, ~30% more compute (large models).")
    lora_r: int = _f(0, "LoRA rank of the trained models (policy, reward, value) through peft; 0 = full fine-tuning.", ge=0)
    lora_alpha: float = _f(16.0, "LoRA scaling numerator (the update is scaled by alpha / r).", gt=0.0)
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input (off anyway in DPO and PPO).", ge=0.0, lt=1.0)
    lora_target_modules: Optional[list] = _f(None, "Modules to adapt, e.g. [q_proj, v_proj]; null = peft's default for the architecture.")

    def check(self, key: str) -> None:
        if self.pretrained is None and self.n_embd % self.n_head:
            raise ConfigError(
                f"{key}.n_embd={self.n_embd} is not divisible by {key}.n_head={self.n_head}. "
                f"Fix: choose n_head dividing n_embd (e.g. {key}.n_head=4)."
            )


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    source: str = _f("synthetic", "synthetic (known gold reward) or hub (a `datasets` id or local files).", choices=["synthetic", "hub"])
    seed: int = _f(0, "Seed of every random draw in the data stage.", ge=0)
    # Synthetic task sizes.
    n_sft: int = _f(4000, "SFT demonstrations.", ge=1)
    n_pref: int = _f(4000, "Preference pairs for reward modelling and DPO.", ge=1)
    n_eval_prompts: int = _f(256, "Held-out prompts for generation-based evaluation.", ge=1)
    n_eval_pref: int = _f(512, "Held-out preference pairs (reward-model accuracy).", ge=1)
    n_ppo_prompts: int = _f(2000, "Prompts for PPO rollouts.", ge=1)
    # Simulated annotators: P(a > b) = sigmoid((gold_a - gold_b + length_bias * (len_a - len_b)) / temperature)
    annotator_temperature: float = _f(0.3, "Annotator noise: Bradley-Terry temperature on the gold reward.", gt=0.0)
    annotator_length_bias: float = _f(0.1, "Annotator bias per extra word (favours longer answers).")
    demo_quality: float = _f(0.65, "Share of on-topic words in SFT demonstrations (decent, not optimal).", ge=0.0, le=1.0)
    # Hub datasets (source=hub).
    path: Optional[str] = _f(None, "Dataset id (e.g. Anthropic/hh-rlhf) or a builder name like json.")
    data_files: Optional[Any] = _f(None, "Local files for builders like json (str, list or split->files).")
    train_split: str = _f("train", "Split for training.")
    test_split: str = _f("test", "Split for held-out evaluation.")
    format: str = _f("hh", "Row format: hh (chosen/rejected dialogues sharing a prompt) or columns.", choices=["hh", "columns"])
    columns: dict = _f({"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}, "Column mapping for format=columns.")
    max_rows: Optional[int] = _f(None, "Keep at most this many training rows (null: all).", ge=1)
    max_prompt_chars: Optional[int] = _f(None, "Drop rows whose prompt is longer (characters; null: keep all). Prompts past the model's context fail loudly otherwise.", ge=1)

    def check(self, key: str) -> None:
        if self.source == "hub" and not self.path:
            raise ConfigError(f"{key}.path is required when {key}.source=hub. Fix: e.g. {key}.path=Anthropic/hh-rlhf.")
        if self.format == "columns":
            missing = {"prompt", "chosen", "rejected"} - set(self.columns)
            if missing:
                raise ConfigError(f"{key}.columns lacks {sorted(missing)}. Fix: map each of prompt, chosen, rejected to a column.")


# --------------------------------------------------------------------------------------------------
# Training stages
# --------------------------------------------------------------------------------------------------
@dataclass
class OptimConfig:
    """Optimiser and loop settings shared by every trainer (SFT, reward, DPO, PPO)."""

    lr: float = _f(1e-3, "Peak learning rate (AdamW).", gt=0.0)
    weight_decay: float = _f(0.0, "AdamW weight decay.", ge=0.0)
    warmup_ratio: float = _f(0.05, "Share of steps with linear warm-up.", ge=0.0, lt=1.0)
    schedule: str = _f("cosine", "Decay after warm-up.", choices=["cosine", "linear", "constant"])
    grad_accum: int = _f(1, "Micro-batches per optimizer step.", ge=1)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.", gt=0.0)
    log_every: int = _f(10, "Log metrics every N steps (the first step is always logged).", ge=1)
    eval_every: int = _f(50, "Evaluate every N steps.", ge=1)
    checkpoint_every: int = _f(200, "Write a resumable checkpoint every N steps.", ge=1)
    seed: int = _f(0, "Seed of initialisation, shuffling and sampling.", ge=0)


@dataclass
class SupervisedConfig(OptimConfig):
    """Epochs over a fixed dataset (SFT, reward, DPO)."""

    batch_size: int = _f(32, "Examples per optimizer step (across accumulation).", ge=1)
    epochs: float = _f(1.0, "Passes over the training data.", gt=0.0)

    def check(self, key: str) -> None:
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"{key}.batch_size={self.batch_size} is not divisible by {key}.grad_accum={self.grad_accum}. "
                f"Fix: choose grad_accum dividing batch_size."
            )


@dataclass
class SFTConfig(SupervisedConfig):
    pass


@dataclass
class RewardConfig(SupervisedConfig):
    center_rewards_coef: float = _f(0.0, "Penalty on the squared mean reward (keeps scores centred).", ge=0.0)


@dataclass
class SamplingConfig:
    temperature: float = _f(1.0, "Sampling temperature.", gt=0.0)
    top_k: int = _f(0, "Top-k filter (0: off).", ge=0)
    top_p: float = _f(1.0, "Nucleus filter (1.0: off).", gt=0.0, le=1.0)
    max_new_tokens: int = _f(24, "Longest answer in tokens.", ge=1)
    batch_size: int = _f(128, "Prompts per generation batch.", ge=1)


@dataclass
class DPOConfig(SupervisedConfig):
    algo: str = _f("dpo", "Algorithm name.", choices=["dpo"])
    beta: float = _f(0.1, "KL strength: the inverse temperature of the implicit reward.", gt=0.0)
    label_smoothing: float = _f(0.0, "Conservative DPO: assumed label-flip rate.", ge=0.0, lt=0.5)


@dataclass
class PPOConfig(OptimConfig):
    algo: str = _f("ppo", "Algorithm name.", choices=["ppo"])
    beta: float = _f(0.05, "KL strength: per-token reward -beta * (log pi - log pi_ref) (initial value if adaptive).", gt=0.0)
    clip_range: float = _f(0.2, "PPO ratio clip epsilon.", gt=0.0, lt=1.0)
    steps: int = _f(100, "PPO iterations (rollout + update); log/eval/checkpoint_every count these.", ge=1)
    rollout_batch_size: int = _f(64, "Prompts sampled per PPO iteration.", ge=1)
    minibatch_size: int = _f(16, "Rollouts per optimizer step; must divide rollout_batch_size.", ge=1)
    ppo_epochs: int = _f(4, "Passes over each rollout batch.", ge=1)
    gamma: float = _f(1.0, "Discount.", ge=0.0, le=1.0)
    lam: float = _f(0.95, "GAE lambda.", ge=0.0, le=1.0)
    vf_coef: float = _f(0.1, "Value-loss weight.", ge=0.0)
    value_clip_range: float = _f(0.2, "Value clipping around the rollout values.", gt=0.0)
    value_lr: Optional[float] = _f(None, "Value model learning rate (null: same as lr).", gt=0.0)
    whiten_advantages: bool = _f(True, "Normalise advantages per batch.")
    normalize_reward: bool = _f(False, "Scale scores by running std (see README: rescales beta).")
    score_norm: bool = _f(True, "Shift scores so SFT answers score mean 0 (measured before training).")
    missing_eos_penalty: float = _f(1.0, "Subtracted from the score of answers that never end.", ge=0.0)
    adaptive_kl: bool = _f(False, "Adaptive KL controller (Ziegler et al. 2019).")
    target_kl: float = _f(3.0, "Adaptive controller's target sequence KL (nats).", gt=0.0)
    kl_horizon: int = _f(10000, "Adaptive controller's horizon (samples).", ge=1)
    value_init: str = _f("reward", "Initialise the value model from the reward model or the SFT policy.", choices=["reward", "sft"])
    value_warmup_steps: int = _f(0, "Rollouts that train only the value model before the policy moves.", ge=0)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def check(self, key: str) -> None:
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
    n_prompts: int = _f(256, "Held-out prompts to generate on (at most the data's held-out set).", ge=1)
    n_samples_table: int = _f(32, "Rows in the logged sample table.", ge=0)
    seed: int = _f(1234, "Sampling seed (the same for the policy and the SFT baseline).", ge=0)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class TrackingConfig:
    uri: Optional[str] = _f(None, "MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else sqlite under paths.root.")
    experiment: str = _f("rlhf", "MLflow experiment name.")
    connect_timeout_s: float = _f(10.0, "Seconds to wait for the tracking server before failing.", gt=0.0)


@dataclass
class PathsConfig:
    root: str = _f(".rlhf", "Stage outputs, Prefect results and the default MLflow store (relative: to the launch folder).")


@dataclass
class RuntimeConfig:
    device: str = _f("auto", "auto, cpu, cuda or cuda:N.")
    threads: int = _f(0, "torch intra-op threads per process (0: the cores shared out, at most 4).", ge=0)
    num_processes: int = _f(1, "Processes per training stage; >1 launches sft, reward, dpo and ppo with `accelerate launch` "
                               "(DDP, one process per GPU, or gloo on CPU).", ge=1)


TRAINING_STAGES = ("sft", "reward", "dpo", "ppo")


@dataclass
class DispatchConfig:
    """Where stages run. ``local``: every stage in the flow's own process. ``deployments``: each training
    stage listed in ``stages`` runs as a flow run of ``deployment`` (a GPU work pool), the rest stays local.
    Placement never changes a stage's result, so it is not part of any cache key."""

    mode: str = _f("local", "local: all stages in this process; deployments: training stages on a work pool.",
                   choices=["local", "deployments"])
    deployment: str = _f("rlhf-stage/gpu", "'<flow name>/<deployment name>' that runs one training stage.")
    stages: list = _f(list(TRAINING_STAGES), "Training stages sent to the deployment; others run locally.")
    job_variables: dict = _f({}, "Job variables for the stage's flow run, e.g. {env: {CUDA_VISIBLE_DEVICES: '1'}}.")
    concurrency_tag: str = _f("gpu", "Tag on every training task run: a Prefect tag concurrency limit on it "
                                     "(prefect concurrency-limit create gpu 1) lets one stage train at a time.")
    timeout_s: Optional[float] = _f(None, "Seconds to wait for a dispatched stage (null: no limit).", gt=0.0)
    poll_s: float = _f(5.0, "Seconds between checks of a dispatched stage's state.", gt=0.0)

    def check(self, key: str) -> None:
        unknown = set(self.stages) - set(TRAINING_STAGES)
        if unknown:
            raise ConfigError(f"{key}.stages={self.stages} names {sorted(unknown)}, which are not training stages. "
                              f"Fix: choose among {list(TRAINING_STAGES)}.")
        if self.deployment.count("/") != 1:
            raise ConfigError(f"{key}.deployment={self.deployment!r} is not '<flow name>/<deployment name>'. "
                              f"Fix: pass {key}.deployment=rlhf-stage/gpu (see `prefect deployment ls`).")


ALGO_SCHEMAS = {"dpo": DPOConfig, "ppo": PPOConfig}


@dataclass
class PipelineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: Any = MISSING  # DPOConfig | PPOConfig, chosen by the algo group
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    refresh: list = _f([], "Stages to re-run even when cached, e.g. [dpo].")
    sweep_id: Optional[str] = _f(None, "Set by multirun: groups the parent runs of one sweep.")
    objective: str = _f("eval/gold_reward", "Metric the app returns to Hydra sweepers (maximised by hparams_search).")
    tags: dict = _f({}, "Extra tags for the parent MLflow run.")


STAGES = ("data", "sft", "reward", "dpo", "ppo", "eval")


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
                f"{path}={value!r} is not one of {meta['choices']} ({meta.get('help', '')}). Fix: pass {path}=<one of them>."
            )
    if hasattr(obj, "check"):
        obj.check(key)


def validate(config: Any) -> PipelineConfig:
    """Turn a composed config (DictConfig or plain dict) into a checked :class:`PipelineConfig`.

    Raises :class:`ConfigError` naming the key and the fix for unknown keys, wrong types and values out
    of range. Runs before any stage starts.
    """
    container = OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else dict(config)
    algo = (container.get("algo") or {}).get("algo")
    if algo not in ALGO_SCHEMAS:
        raise ConfigError(f"algo.algo={algo!r} is not one of {sorted(ALGO_SCHEMAS)}. Fix: pass algo=dpo or algo=ppo.")
    schema = OmegaConf.structured(PipelineConfig)
    with _errors_named():
        OmegaConf.set_struct(schema, False)
        schema.algo = OmegaConf.structured(ALGO_SCHEMAS[algo])
        OmegaConf.set_struct(schema, True)
        merged = OmegaConf.merge(schema, container)
        cfg: PipelineConfig = OmegaConf.to_object(merged)
    _check_bounds(cfg, "")
    _check_data_parallel(cfg)
    unknown = set(cfg.refresh) - set(STAGES)
    if unknown:
        raise ConfigError(f"refresh={cfg.refresh} names unknown stages {sorted(unknown)}. Fix: use stages among {list(STAGES)}.")
    return cfg


def _check_data_parallel(cfg: PipelineConfig) -> None:
    """Each of ``num_processes`` ranks takes an equal share of every batch, in ``grad_accum`` micro-batches."""
    n = cfg.runtime.num_processes
    batches = [("sft.batch_size", cfg.sft.batch_size, "sft.grad_accum", cfg.sft.grad_accum),
               ("reward.batch_size", cfg.reward.batch_size, "reward.grad_accum", cfg.reward.grad_accum)]
    if isinstance(cfg.algo, SupervisedConfig):
        batches.append(("algo.batch_size", cfg.algo.batch_size, "algo.grad_accum", cfg.algo.grad_accum))
    else:  # PPO: each process samples its share of the rollout batch and updates on its share of each minibatch
        batches.append(("algo.minibatch_size", cfg.algo.minibatch_size, "algo.grad_accum", cfg.algo.grad_accum))
    for key, size, accum_key, accum in batches:
        if size % (accum * n):
            raise ConfigError(
                f"{key}={size} does not split into runtime.num_processes={n} processes x {accum_key}={accum} equal "
                f"micro-batches. Fix: make {key} a multiple of {n * accum}."
            )


class _errors_named:
    """Re-raise OmegaConf's type / key errors as ConfigError with the full key and a fix."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        from omegaconf.errors import OmegaConfBaseException

        if exc is not None and isinstance(exc, OmegaConfBaseException):
            key = getattr(exc, "full_key", None) or "?"
            raise ConfigError(f"{key}: {exc.msg if hasattr(exc, 'msg') else exc}. Fix: check the key name and type in conf/.") from exc
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
