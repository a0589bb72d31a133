"""The models of an on-policy stage: the policy and the value model (trained), the reference and the reward
model(s) (frozen), and whether the sampler's log-probs stand for a forward's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from . import checkpoint
from .algorithms import PolicyInputs
from .config import ModelConfig
from .modeling import (
    FrozenModel,
    autocast,
    disable_dropout,
    load_policy,
    load_scalar_model,
    load_tokenizer,
    load_trainable,
    torch_dtype,
)


class OnPolicyModels:
    """The policy (trained), the reference and the reward model(s) (frozen: ``rewards``, one per ensemble
    member) and, with ``value_init``, a value model (trained); dropout off in all of them.

    Under LoRA (``model.lora_shared_reference``) the reference is the policy with its adapters off, and
    the reward model is the value model with its adapters (and trained head) off when the value model
    starts from it: one copy of each base's weights instead of two.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        inputs: PolicyInputs,
        resume: Path | None,
        device,
        value_init: str | None = None,
        place: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    ) -> None:
        """``place``: how each model reaches the device as it is loaded (StageContext.placed: sharded under FSDP,
        one model at a time); default: moved whole."""
        place = place or (lambda model: model.to(device))
        dtype, sft_path, reward_path = model_cfg.dtype, inputs.sft_path, inputs.reward_path
        self.tokenizer = tok = load_tokenizer(sft_path)
        self.policy = place(load_trainable("policy", sft_path, checkpoint.hf_model(resume, "policy"), tok, model_cfg))
        self.value = None
        if value_init:
            start = reward_path if value_init == "reward" else sft_path
            zero = value_init == "sft"
            self.value = place(
                load_trainable("scalar", start, checkpoint.hf_model(resume, "value"), tok, model_cfg, zero_head=zero)
            )
        share = model_cfg.lora_r > 0 and model_cfg.lora_shared_reference
        self.reference = (
            FrozenModel(adapters_of=self.policy) if share else FrozenModel(place(load_policy(sft_path, tok, dtype)))
        )
        first = (
            FrozenModel(adapters_of=self.value)
            if share and value_init == "reward"
            else FrozenModel(place(load_scalar_model(reward_path, tok, dtype, zero_head=False)))
        )
        self.rewards = [first] + [
            FrozenModel(place(load_scalar_model(p, tok, dtype, zero_head=False))) for p in inputs.extra_reward_paths
        ]
        for m in (self.policy, self.value, self.reference.model, *(r.model for r in self.rewards)):
            if m is not None:
                disable_dropout(m)
        self.amp = autocast(model_cfg, device)
        self.max_length = model_cfg.max_length
        weights = next(self.policy.parameters()).dtype  # what a rollout engine holds: the forwards' precision
        self.dtype = weights if model_cfg.autocast == "none" else torch_dtype(model_cfg.autocast)
        self.sampler_logprobs = sampler_logprobs_exact(model_cfg)  # old log-probs from the sampler, not a forward

    def trained(self) -> dict[str, torch.nn.Module]:
        return {"policy": self.policy, **({"value": self.value} if self.value is not None else {})}


def sampler_logprobs_exact(model_cfg: ModelConfig) -> bool:
    """Whether the sampler's log-probs stand for the old log-probs of the experience pass (and the held-out KL).
    In fp32 (weights and forwards) the KV-cached sampler and a full forward agree to float rounding (at most
    1.4e-6 nats per token on the default task), so recomputing them is a forward of the policy over the batch
    that the algorithm does not need; TRL's PPOTrainer takes them from the sampler's logits too. Under bf16 the
    cached decode and the full forward round differently (more so on GPUs, whose prefill and decode kernels
    differ), so there a forward recomputes them and the ratio compares like with like."""
    return model_cfg.autocast == "none" and model_cfg.dtype == "float32"
