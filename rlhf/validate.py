"""Validation: a composed config (a DictConfig or a plain dict) into a checked :class:`~rlhf.config.PipelineConfig`.

Unknown keys and wrong types fail while merging into the schema; every field's bounds come from its metadata
(:func:`rlhf.settings.setting`); each section's ``check`` holds its cross-field rules; what needs the algorithm
registry or the synthetic task (the algorithm's schema, stage names, the held-out prompts there are, how batches
split over processes) is checked here. Every error is a :class:`~rlhf.settings.ConfigError` naming the key and
the fix, raised before any stage starts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

from omegaconf import OmegaConf

from .algorithms import registry, training_stages
from .config import PipelineConfig, stage_kind
from .config_training import OnPolicyConfig, SupervisedConfig
from .settings import ConfigError


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
    _check_stage_names(cfg)
    _check_synthetic(cfg)
    _check_machines(cfg)
    _check_data_parallel(cfg)
    _check_sharding(cfg)
    _check_rollout(cfg)
    return cfg


def _check_stage_names(cfg: PipelineConfig) -> None:
    """``refresh`` and ``dispatch.stages`` name stages that exist."""
    unknown = {stage_kind(s) for s in cfg.refresh} - set(stages())
    if unknown:
        raise ConfigError(
            f"refresh={cfg.refresh} names unknown stages {sorted(unknown)}. Fix: use stages among {list(stages())}."
        )
    unknown = set(cfg.dispatch.stages or ()) - set(training_stages())
    if unknown:
        raise ConfigError(
            f"dispatch.stages={cfg.dispatch.stages} names {sorted(unknown)}, which are not training stages. "
            f"Fix: choose among {list(training_stages())}."
        )


def _check_synthetic(cfg: PipelineConfig) -> None:
    """The synthetic task holds so many distinct held-out prompts."""
    if cfg.data.source != "synthetic":
        return
    from .synthetic import all_specs

    held_out = len(all_specs(held_out=True))
    if cfg.data.n_eval_prompts > held_out:
        raise ConfigError(
            f"data.n_eval_prompts={cfg.data.n_eval_prompts}: the synthetic task has {held_out} distinct held-out "
            f"prompts. Fix: pass data.n_eval_prompts<={held_out} (eval.n_samples>1 for more answers per prompt)."
        )


def _check_machines(cfg: PipelineConfig) -> None:
    """Machine ranks, the rendezvous of several machines, and stages on several machines from a work pool."""
    rt = cfg.runtime
    if rt.node_rank >= rt.num_machines:
        raise ConfigError(
            f"runtime.node_rank={rt.node_rank} with runtime.num_machines={rt.num_machines}: node ranks run from 0 to "
            f"{rt.num_machines - 1}. Fix: give each machine its own rank below num_machines."
        )
    if rt.num_machines > 1 and ":" not in rt.rdzv_endpoint and rt.rdzv_endpoint != "auto":
        raise ConfigError(
            f"runtime.num_machines={rt.num_machines} needs runtime.rdzv_endpoint=<host>:<port> of machine 0 (got "
            f"{rt.rdzv_endpoint!r}), where every machine's processes meet. "
            f"Fix: e.g. runtime.rdzv_endpoint=node-0:29400 (or auto, where machine 0's host name resolves to an "
            f"address the others reach: a pod's)."
        )
    if rt.num_machines > 1 and cfg.dispatch.mode == "deployments" and rt.rdzv_endpoint != "auto":
        raise ConfigError(
            f"runtime.num_machines={rt.num_machines} with dispatch=pools: each training stage gets a Job of "
            f"{rt.num_machines} pods whose names are not known before it starts (got runtime.rdzv_endpoint="
            f"{rt.rdzv_endpoint!r}). Fix: runtime.rdzv_endpoint=auto (pod 0 hosts the rendezvous at its own address)."
        )
    dispatched = training_stages() if cfg.dispatch.stages is None else cfg.dispatch.stages
    local = {"sft", "reward", cfg.algo.algo} & set(training_stages()) - set(dispatched)
    if rt.num_machines > 1 and cfg.dispatch.mode == "deployments" and local:
        raise ConfigError(
            f"runtime.num_machines={rt.num_machines} with dispatch.stages={cfg.dispatch.stages}: {sorted(local)} would "
            f"train here, where no other machine joins it. Fix: dispatch every training stage (leave dispatch.stages "
            f"unset) or run on one machine."
        )


def _check_data_parallel(cfg: PipelineConfig) -> None:
    """Each of the ``num_processes x num_machines`` ranks takes an equal share of every batch, in ``grad_accum``
    micro-batches."""
    rt = cfg.runtime
    n = rt.num_processes * rt.num_machines
    world = f"runtime.num_processes={rt.num_processes} x runtime.num_machines={rt.num_machines} processes"
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
                f"{key}={size} does not split into {world} x {accum_key}={accum} equal "
                f"micro-batches. Fix: make {key} a multiple of {n * accum}."
            )
    group = getattr(cfg.algo, "samples_per_prompt", 1)
    if isinstance(cfg.algo, OnPolicyConfig) and (cfg.algo.rollout_batch_size // group) % n:
        # each process samples whole groups of prompts: unequal shares would give unequal optimizer steps and hang the
        # collectives
        per = f" (samples_per_prompt={group} answers per prompt)" if group > 1 else ""
        raise ConfigError(
            f"algo.rollout_batch_size={cfg.algo.rollout_batch_size} gives {cfg.algo.rollout_batch_size // group} "
            f"prompts an iteration{per}, which do not split evenly over {world}. Fix: make algo.rollout_batch_size a "
            f"multiple of {group * n} (and of algo.minibatch_size)."
        )


def _check_sharding(cfg: PipelineConfig) -> None:
    """FSDP shards plain models: a LoRA model's merge and its shared reference are built for whole models."""
    if cfg.runtime.strategy == "fsdp" and cfg.model.lora_r:
        raise ConfigError(
            f"runtime.strategy=fsdp with model.lora_r={cfg.model.lora_r}: LoRA models are trained whole in each "
            "process (their adapters are small; the base weights are frozen and shared with the reference). "
            "Fix: runtime.strategy=ddp with LoRA, or model.lora_r=0 to shard full fine-tuning."
        )


VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM 0.32's CPU attention kernels


def _check_rollout(cfg: PipelineConfig) -> None:
    """``rollout.engine=vllm``: vLLM is installed, the stage runs one process, and on CPU the tiny model's attention
    heads have a size vLLM's CPU kernels take."""
    if cfg.rollout.engine != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "rollout.engine=vllm: vLLM is not installed in this environment. Fix: bash scripts/install_vllm.sh (its "
            "CPU build; VLLM_PACKAGE=vllm==0.32.0 on a CUDA machine), or pass rollout.engine=hf."
        )
    processes = cfg.runtime.num_processes * cfg.runtime.num_machines
    if processes > 1:
        raise ConfigError(
            f"rollout.engine=vllm runs one engine in one training process; runtime.num_processes x num_machines is "
            f"{processes}. Fix: pass rollout.engine=hf for data-parallel stages, or runtime.num_processes=1."
        )
    head = cfg.model.n_embd // cfg.model.n_head
    on_cpu = cfg.runtime.device == "cpu" or (cfg.runtime.device == "auto" and not _has_cuda())
    if cfg.model.pretrained is None and on_cpu and head not in VLLM_CPU_HEAD_SIZES:
        raise ConfigError(
            f"rollout.engine=vllm on CPU: the tiny model's attention heads are model.n_embd / model.n_head = "
            f"{cfg.model.n_embd} / {cfg.model.n_head} = {head} wide; vLLM's CPU kernels take {VLLM_CPU_HEAD_SIZES}. "
            f"Fix: pass model.n_head={max(1, cfg.model.n_embd // 32)} (heads of 32), or rollout.engine=hf."
        )


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


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
