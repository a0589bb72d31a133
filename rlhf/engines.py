"""Rollout engines: what samples a stage's answers (``rollout.engine``).

Every stage that samples (on-policy, the eval stage, best-of-n) asks its engine for answers with
``engine.sample(model, weights, prompt_ids, prompt_mask, sampling, eos_id, pad_id, keys)``:

- :class:`HFEngine` runs the model it is handed (:func:`rlhf.rollout.generate`: batched forwards, KV cache).
- :class:`~rlhf.vllm_engine.VLLMEngine` holds a vLLM engine in this process and samples with it; ``weights`` names
  the weights the answers must come from (the policy after a given number of updates, the reference, a frozen
  model), and the engine pushes ``model``'s weights to vLLM before sampling whenever they are not what it holds.

Both return :class:`~rlhf.rollout.Samples` laid out alike (prompts left-padded, answers right-padded after EOS,
PAD never sampled); a vLLM rollout also carries the engine's log-probs of its tokens (``engine_logprobs``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Hashable

import torch

from .config import RolloutConfig, SamplingConfig
from .rollout import Samples, generate


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve(cfg: RolloutConfig, device: torch.device | str, num_processes: int = 1) -> str:
    """The engine ``rollout.engine`` picks: auto is vllm where it is installed, ``device`` is a GPU and the stage runs
    one process (:func:`rlhf.validate.validate` refuses an explicit vllm otherwise), else hf."""
    if cfg.engine != "auto":
        return cfg.engine
    one_gpu_process = torch.device(device).type == "cuda" and num_processes == 1
    return "vllm" if one_gpu_process and vllm_installed() else "hf"


class HFEngine:
    """Samples with the model it is handed (``weights`` is ignored: the model is what it samples)."""

    def sample(
        self,
        model,
        weights: Hashable,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        sampling: SamplingConfig,
        eos_id: int,
        pad_id: int,
        keys: torch.Tensor,
        logprobs: bool = False,
    ) -> Samples:
        return generate(model, prompt_ids, prompt_mask, sampling, eos_id, pad_id, keys, logprobs)

    def release(self) -> None:
        """Nothing held between rollouts."""


def open_engine(
    cfg: RolloutConfig | None,
    model_dir: str,
    max_length: int,
    device,
    seed: int,
    batch: int,
    dtype: torch.dtype = torch.float32,
    num_processes: int = 1,
):
    """The stage's engine, started once and kept for the stage (``model_dir``: a saved model of the architecture
    it samples, whose weights are replaced before the first rollout; ``batch``: the most answers one call samples;
    ``dtype``: the sampled models' weights')."""
    cfg = cfg or RolloutConfig()
    if resolve(cfg, device, num_processes) == "hf":
        return HFEngine()
    from .vllm_engine import VLLMEngine

    return VLLMEngine(model_dir, cfg, max_length, torch.device(device), seed, batch, dtype)
