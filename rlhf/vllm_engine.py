"""vLLM as the rollout engine, colocated: one engine in this process, started once per stage, sampling from the
trainer's current weights.

Weight sync: before each rollout the engine compares the weights it holds with those asked for (a label such as
``("policy", optimizer steps)``) and, where they differ, streams the trainer's tensors into vLLM's in-place reload
(``collective_rpc("reload_weights")``) one parameter at a time: LoRA adapters merged into their base weights on the
fly, an FSDP2 parameter gathered whole as it is sent; then drops vLLM's prefix cache (computed with the old
weights) and checks the push: the engine's log-probs of a fixed sequence against the trainer's forward. A push
that raises, or fails the check (``rollout.sync_check_tol``), raises :class:`WeightSyncError` and leaves the engine
marked as holding nothing, so nothing is sampled from it until a push succeeds.

Sampling follows :func:`rlhf.rollout.generate`: the same temperature, top-k, top-p and answer length, PAD never
drawn (its logit lowered by vLLM's largest bias, 100), the tokenizer's EOS ends an answer and is kept, each answer
seeded by its key (the same answer in any batch). The engine's log-probs are of the temperature-scaled softmax
(``logprobs_mode=processed_logprobs``), what the trainer's :class:`~rlhf.modeling.Logprobs` computes, and are
returned beside the answers.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterator

import torch

from .config import RolloutConfig, SamplingConfig
from .modeling import unwrapped
from .rollout import Samples

PROBE_TOKENS = 16  # the fixed sequence a push is checked on: the vocabulary's first ids (PAD left out)
KV_CACHE_MARGIN = 2  # CPU: the KV cache holds this many largest batches of max_length-token sequences


class WeightSyncError(RuntimeError):
    """The trainer's weights did not reach the engine; sampling would use stale weights."""


def trainer_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of ``model``'s weights under its transformers checkpoint names, one at a time: a LoRA model's
    base weights with its active adapters merged in (none where they are switched off: the reference), a sharded
    (FSDP2) model's parameters gathered one by one."""
    lm = unwrapped(model)
    lora_layers = {name: m for name, m in lm.named_modules() if hasattr(m, "get_delta_weight")}
    for name, tensor in lm.state_dict().items():
        if ".lora_" in name:
            continue
        module, _, leaf = name.rpartition(".")
        owner = module.removesuffix(".base_layer")
        if owner != module and owner in lora_layers:
            name = f"{owner}.{leaf}"
            layer = lora_layers[owner]
            if leaf == "weight" and not layer.merged and not layer.disable_adapters:  # off: the reference's weights
                tensor = tensor + sum(layer.get_delta_weight(a) for a in layer.active_adapters)
        if hasattr(tensor, "full_tensor"):  # a DTensor shard (FSDP2): this parameter whole, on every process
            tensor = tensor.full_tensor()
        yield name, tensor.detach()


class VLLMEngine:
    """A vLLM engine in this process (:mod:`module docstring <rlhf.vllm_engine>`)."""

    def __init__(
        self,
        model_dir: str,
        cfg: RolloutConfig,
        max_length: int,
        device: torch.device,
        seed: int,
        batch: int,
        dtype: torch.dtype,
    ) -> None:
        """``batch``: the most answers one call samples; ``dtype``: the trainer's weights' (the engine's too)."""
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: weights pushed in place
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # leave the trainer's threads where they are
        from transformers import AutoConfig
        from vllm import LLM

        config = AutoConfig.from_pretrained(model_dir)
        self.sleeps = cfg.sleep and device.type == "cuda"
        memory = {"gpu_memory_utilization": cfg.gpu_memory_utilization}
        if device.type == "cpu":  # there the setting is a share of the machine's memory: ask for what rollouts need
            memory = {"kv_cache_memory_bytes": _kv_bytes(config, max_length, batch, dtype)}
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        try:
            self.llm = LLM(
                model=model_dir,
                dtype=str(dtype).removeprefix("torch."),
                max_num_seqs=batch,
                max_model_len=max_length,
                enforce_eager=device.type == "cpu",
                logprobs_mode="processed_logprobs",  # after temperature and PAD's mask: the trainer's distribution
                seed=seed,
                enable_sleep_mode=self.sleeps,
                **memory,
            )
        finally:  # vLLM's CPU worker replaces torch.set_num_threads and lowers the thread count "for serving"
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
        self.cfg = cfg
        self.holds: Hashable | None = None  # the label of the weights in the engine (None: not the trainer's)
        self.probe = [i for i in range(PROBE_TOKENS + 1) if i != config.pad_token_id][
            :PROBE_TOKENS
        ]  # each push's check
        self.sync_gap = 0.0  # the last sync's check (rlhf.vllm_engine.VLLMEngine.load)

    # ---- weights ----------------------------------------------------------------------------------
    def load(self, model: torch.nn.Module, weights: Hashable) -> None:
        """Push ``model``'s weights unless the engine holds ``weights`` already, then check them: the engine's
        log-probs of a fixed sequence (``probe``) against ``model``'s forward, the largest gap
        kept in ``sync_gap`` and refused above ``rollout.sync_check_tol``."""
        if self.holds == weights:
            return
        self.holds = None
        try:
            if self.sleeps:
                self.llm.wake_up()
            self._push(model)
        except Exception as e:
            raise WeightSyncError(
                f"pushing the weights {weights!r} to the vLLM engine failed ({type(e).__name__}: {e}); the stage "
                "stops rather than sample from stale weights. Its last checkpoint is intact: run the same command "
                "again, or pass rollout.engine=hf."
            ) from e
        self.sync_gap = self._probe_gap(model)
        if self.sync_gap > self.cfg.sync_check_tol:
            raise WeightSyncError(
                f"after pushing the weights {weights!r}, the vLLM engine's log-probs of a fixed sequence differ from "
                f"the trainer's by up to {self.sync_gap:.3g} nats (rollout.sync_check_tol={self.cfg.sync_check_tol}): "
                "it does not hold the trainer's weights, and the stage stops rather than sample from them. Fix: check "
                "that the model's parameter names are the ones vLLM loads, or pass rollout.engine=hf."
            )
        self.holds = weights

    def _push(self, model: torch.nn.Module) -> None:
        """Stream ``model``'s weights into vLLM's in-place reload, one tensor at a time, and drop the prefix cache:
        its prompts' keys and values were computed with the old weights."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": trainer_weights(model)})
        self.llm.reset_prefix_cache()

    @torch.no_grad()
    def _probe_gap(self, model: torch.nn.Module) -> float:
        """The largest |log p_engine - log p_trainer| over the probe sequence's tokens (raw softmax, temperature 1:
        what vLLM's prompt log-probs are)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=self.probe)], params, use_tqdm=False)[0]
        engine = torch.tensor([lp[t].logprob for lp, t in zip(out.prompt_logprobs[1:], self.probe[1:])])
        ids = torch.tensor([self.probe], device=next(model.parameters()).device)
        logits = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)  # (P - 1, V)
        trainer = logits.gather(1, ids[0, 1:, None])[:, 0].cpu()
        return float((engine - trainer).abs().max())

    def release(self) -> None:
        """Free the engine's GPU memory until the next rollout (sleep level 2: weights and KV cache dropped; the
        next :meth:`load` pushes the weights again)."""
        if self.sleeps:
            self.llm.sleep(level=2)
            self.holds = None

    # ---- sampling ---------------------------------------------------------------------------------
    @torch.no_grad()
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
        """Answers to left-padded prompts (B, P) from ``model``'s weights (pushed first where needed), as
        :func:`rlhf.rollout.generate` lays them out, with the engine's log-probs in ``engine_logprobs``."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=ids[m.bool()].tolist()) for ids, m in zip(prompt_ids, prompt_mask)]
        params = [
            SamplingParams(
                temperature=sampling.temperature,
                top_k=sampling.top_k,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                seed=int(key) & (2**63 - 1),
                logprobs=0,
                logit_bias={pad_id: -100.0},  # PAD never drawn (vLLM's floor; a list of allowed ids costs per request)
                ignore_eos=True,  # stop at the tokenizer's EOS alone, as generate() does, not the generation config's
                stop_token_ids=[eos_id],
                detokenize=False,
            )
            for key in keys.tolist()
        ]
        self.load(model, weights)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        answers = [o.outputs[0] for o in outputs]
        return _samples(prompt_ids, prompt_mask, answers, eos_id, pad_id)


def _samples(prompt_ids, prompt_mask, answers, eos_id: int, pad_id: int) -> Samples:
    """vLLM's completions as :class:`Samples`: answers right-padded with PAD, the mask 1 up to and including EOS, the
    engine's log-probs of the sampled tokens (0 after EOS)."""
    width = max(1, max(len(a.token_ids) for a in answers))
    response = torch.full((len(answers), width), pad_id, dtype=torch.long)
    engine_logp = torch.zeros(len(answers), width)
    for i, a in enumerate(answers):
        ids = list(a.token_ids)
        response[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        engine_logp[i, : len(ids)] = torch.tensor([lp[t].logprob for lp, t in zip(a.logprobs, ids)])
    lengths = torch.tensor([len(a.token_ids) for a in answers])
    mask = torch.arange(width) < lengths[:, None]  # vLLM stops at EOS and keeps it: the answer is its tokens
    device = prompt_ids.device
    return Samples(
        prompt_ids,
        prompt_mask,
        response.to(device),
        mask.float().to(device),
        (response == eos_id).any(1).to(device),
        engine_logprobs=(engine_logp * mask).to(device),
    )


def _kv_bytes(config, max_length: int, batch: int, dtype: torch.dtype) -> int:
    """A CPU KV cache for ``KV_CACHE_MARGIN`` batches of ``batch`` sequences of ``max_length`` tokens (K and V of every
    layer)."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * heads * head_dim * dtype.itemsize
    return KV_CACHE_MARGIN * batch * max_length * per_token
