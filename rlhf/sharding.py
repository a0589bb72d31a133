"""FSDP2 (``runtime.strategy=fsdp``): a stage's models sharded across its processes, per transformer block.

Under ``ddp`` every process holds whole models (DDP averages the gradients). Under ``fsdp`` each process holds
1/N of every parameter, gradient and optimizer state: :meth:`Sharding.shard` applies
:func:`torch.distributed.fsdp.fully_shard` to each transformer block (the classes the architecture names in
``_no_split_modules``) and then to the model's root, so a block's parameters are gathered for its forward and
backward and freed after. Work that does not run in step on every process (sampling answers that end at
different lengths, the main process's held-out evaluation, saving) runs inside :meth:`Sharding.gathered`, which
gathers each model whole once and keeps it so until the block ends. In one process (a sharded checkpoint resumed
with ``runtime.num_processes=1``) nothing is sharded and only the checkpoint format differs.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .config import RuntimeConfig
from .settings import ConfigError

ROOT_FORWARD = "run_as_forward"  # the method a sharded model's root runs its stage's forwards through


@dataclass(frozen=True)
class Sharding:
    """How a stage's processes hold its models: ``strategy`` and FSDP2's settings (:class:`~rlhf.config.FSDPConfig`)."""

    strategy: str = "ddp"
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    mixed_precision: str = "auto"

    @classmethod
    def of(cls, rt: RuntimeConfig) -> Sharding:
        f = rt.fsdp
        return cls(rt.strategy, f.reshard_after_forward, f.cpu_offload, f.mixed_precision)

    @property
    def fsdp(self) -> bool:
        """Whether checkpoints are sharded (``torch.distributed.checkpoint``), in one process or several."""
        return self.strategy == "fsdp"

    @property
    def active(self) -> bool:
        """Whether models are sharded: FSDP with more than one process."""
        return self.fsdp and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def shard(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``model`` sharded in place (each block, then the root) with its shards on ``device`` when :attr:`active`
        and not sharded yet; returned either way. The whole model may sit in CPU memory: each process moves only its
        shards to the device."""
        if not self.active or fsdp_units(model):
            return model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            fully_shard,
            register_fsdp_forward_method,
        )

        if self.cpu_offload and device.type != "cuda":
            raise ConfigError(
                "runtime.fsdp.cpu_offload=true moves shards from GPU to CPU memory, and this stage runs on "
                f"{device.type}. Fix: runtime.fsdp.cpu_offload=false (the parameters already live in CPU memory)."
            )
        options: dict = {
            "mesh": init_device_mesh(device.type, (dist.get_world_size(),)),
            "reshard_after_forward": self.reshard_after_forward,
        }
        if self.mixed_precision == "bf16" or (self.mixed_precision == "auto" and device.type == "cuda"):
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if self.cpu_offload:
            options["offload_policy"] = CPUOffloadPolicy()
        for block in blocks_of(model):
            fully_shard(block, **options)
        fully_shard(model, **options)
        # the stage's forwards run the backbone and a head (rlhf.modeling.Logprobs, token_values), not the model's own
        # forward: they go through this method, which FSDP treats as a forward of the root (its embeddings, norms and
        # heads gathered for it, their gradients reduced after the backward)
        setattr(model, ROOT_FORWARD, types.MethodType(_call, model))
        register_fsdp_forward_method(model, ROOT_FORWARD)
        return model

    @contextlib.contextmanager
    def gathered(self, *models: torch.nn.Module | None) -> Iterator[None]:
        """Every process holds each of ``models`` whole inside the block (one all-gather per sharded unit on
        entry, which every process must make); forwards inside it communicate nothing, so the processes may
        run different numbers of them. A no-op for models that are not sharded."""
        units = list({id(u): u for m in models if m is not None for u in fsdp_units(m)}.values())
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(self.reshard_after_forward, recurse=False)


def _call(_model: torch.nn.Module, fn: Callable, *args: Any) -> Any:
    return fn(*args)


def as_root_forward(model: torch.nn.Module, fn: Callable, *args: Any) -> Any:
    """``fn(*args)``, a computation over ``model``'s weights: as a forward of its root when it is sharded."""
    through = getattr(model, ROOT_FORWARD, None)
    return through(fn, *args) if through is not None else fn(*args)


def full_state_dict(model: torch.nn.Module) -> dict | None:
    """A sharded model's whole state dict on the main process, in CPU memory (a collective: every process calls it;
    the others get an empty dict); None for a model that is not sharded (its own ``state_dict`` is whole)."""
    if not fsdp_units(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a tied weight (GPT-2's LM head is its embedding) once, under its first name, as the model's own state dict saves
    once = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in state.items() if k in once}


def fsdp_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def blocks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a transformers model: modules of the classes its ``_no_split_modules`` names."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(
            f"runtime.strategy=fsdp shards per transformer block, and {type(model).__name__} names no block class "
            "(_no_split_modules). Fix: runtime.strategy=ddp for this architecture."
        )
    return blocks


def full_tensor(x: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a reduced gradient norm is one), else ``x``."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x
