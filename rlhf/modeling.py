"""Models: the tiny default built from a config, loading by path or hub id, and the forwards we need.

Every stage loads its models with ``from_pretrained`` (a local folder or a hub id), the same code path
for the tiny default and for GPT-2 or Qwen2.5. The tiny default is *built* once (a byte-level BPE
tokenizer trained with ``tokenizers`` on the task corpus, a model from a small transformers config),
saved with ``save_pretrained`` and then loaded back like any other checkpoint.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)

from .model_paths import ModelPathError, check_model_source
from .sharding import as_root_forward

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"


def load_tokenizer(path: str, key: str = "model.pretrained") -> PreTrainedTokenizerFast:
    check_model_source(path, key, needs="tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ModelPathError(
            f"{key}={path!r} could not be loaded as a tokenizer ({e}). Fix: check the path or hub id; offline, use a "
            f"local folder."
        ) from e
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        # Reference implementations found PAD == EOS hides the EOS from masks and scores.
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    tok.padding_side = "right"
    return tok


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def autocast(model_cfg, device: torch.device):
    """A context factory for the forwards of a stage: bf16 autocast when ``model.autocast=bfloat16``.

    Weights, gradients and AdamW state stay in ``model.dtype`` (float32 by default): mixed precision.
    """
    if model_cfg.autocast == "none":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch_dtype(model_cfg.autocast))


def prepare_trainable(model: torch.nn.Module, model_cfg) -> torch.nn.Module:
    """Switch on what a trained model needs from the model config (gradient checkpointing)."""
    if model_cfg.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated there
            model.activation_checkpointing_enable(kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def load_trainable(
    kind: str, start: str, resume: Path | None, tokenizer, model_cfg, zero_head: bool = False
) -> torch.nn.Module:
    """The model a stage trains (``kind``: policy or scalar), from ``start`` or the checkpoint folder ``resume``,
    with gradient checkpointing and, when ``model.lora_r > 0``, LoRA adapters (peft) over ``start``'s weights.

    With LoRA only the adapters (and a scalar model's head) train and a checkpoint holds only them:
    resuming loads ``start`` and then the adapters. :func:`save_pretrained_atomic` merges them, so the
    next stage loads a plain model.
    """

    def load(path: str, zero: bool):
        if kind == "policy":
            return load_policy(path, tokenizer, model_cfg.dtype)
        return load_scalar_model(path, tokenizer, model_cfg.dtype, zero_head=zero)

    if not model_cfg.lora_r:
        return prepare_trainable(load(str(resume) if resume else start, zero_head and resume is None), model_cfg)
    from peft import LoraConfig, PeftModel, get_peft_model

    base = load(start, zero_head and resume is None)
    if resume:
        model = PeftModel.from_pretrained(base, str(resume), is_trainable=True)
    else:
        lora = LoraConfig(
            r=model_cfg.lora_r,
            lora_alpha=model_cfg.lora_alpha,
            lora_dropout=model_cfg.lora_dropout,
            target_modules=model_cfg.lora_target_modules,
            task_type="CAUSAL_LM" if kind == "policy" else "SEQ_CLS",
        )
        model = get_peft_model(base, lora)
    return prepare_trainable(model, model_cfg)


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (its LoRA layers are injected in place), else ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


FUSED_ACTIVATIONS = {
    "gelu_new": "gelu_pytorch_tanh"
}  # GPT-2's tanh GELU as ~8 Python-level ops -> PyTorch's one kernel, same formula


def fast_config(path: str, **overrides):
    """The transformers config at ``path`` with its activation swapped for a fused kernel of the same
    formula (:data:`FUSED_ACTIVATIONS`: 12 % of a tiny GPT-2's training step on CPU); saved models keep
    the swap, which every transformers version reads."""
    config = AutoConfig.from_pretrained(path, **overrides)
    act = getattr(config, "activation_function", None)
    if act in FUSED_ACTIVATIONS:
        config.activation_function = FUSED_ACTIVATIONS[act]
    return config


def load_policy(path: str, tokenizer, dtype: str = "float32", key: str = "model.pretrained") -> torch.nn.Module:
    """A causal LM from a folder or hub id, its embeddings resized to the tokenizer if needed."""
    check_model_source(path, key)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=fast_config(path), dtype=torch_dtype(dtype))
    except OSError as e:
        raise ModelPathError(
            f"{key}={path!r} could not be loaded ({e}). Fix: check the path or hub id; offline, use a local folder."
        ) from e
    _align_vocab(model, tokenizer)
    return model


def load_scalar_model(path: str, tokenizer, dtype: str = "float32", zero_head: bool = True) -> torch.nn.Module:
    """A reward / value model: the backbone at ``path`` with a scalar head (``score``).

    Loading a causal LM folder adds a fresh head; we zero it so every answer starts at score 0.
    """
    model = AutoModelForSequenceClassification.from_pretrained(
        path, config=fast_config(path, num_labels=1), dtype=torch_dtype(dtype)
    )
    _align_vocab(model, tokenizer)
    if zero_head:
        torch.nn.init.zeros_(model.score.weight)
        if getattr(model.score, "bias", None) is not None:
            torch.nn.init.zeros_(model.score.bias)
    return model


def _align_vocab(model, tokenizer) -> None:
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id


class FrozenModel:
    """A model scored with and never trained: its own weights, or (``adapters_of``) a LoRA-trained model
    with its adapters switched off, so the base weights are held once (a LoRA policy's reference, a LoRA
    value model's reward model). ``with frozen.use() as model:`` gives the model to call."""

    def __init__(self, model: torch.nn.Module | None = None, adapters_of: torch.nn.Module | None = None) -> None:
        if (model is None) == (adapters_of is None):
            raise ValueError("FrozenModel takes a model or adapters_of, one of them")
        self.model = adapters_of if adapters_of is not None else model.eval().requires_grad_(False)
        self.shared = adapters_of is not None

    @contextlib.contextmanager
    def use(self):
        if not self.shared:
            yield self.model
            return
        with self.model.disable_adapter():
            yield self.model


def disable_dropout(model: torch.nn.Module) -> None:
    """Every form of dropout off: DPO and the on-policy methods compare log-probs of two forwards, which
    dropout would make noisy. Besides ``nn.Dropout`` modules, Llama / Qwen2 attention applies the float
    ``attention_dropout`` in train mode, and configs carry dropout rates that new modules would read."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
        config = getattr(m, "config", None)
        for name in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout", "dropout"):
            if isinstance(getattr(config, name, None), float):
                setattr(config, name, 0.0)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: (B, T) -> (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def fp32_projection(hidden: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    """``layer`` (the LM head or a scalar head) applied in fp32, outside autocast: bf16 logits carry
    0.1-0.25 nats of rounding per token, which shows up as spurious clipping and a noisy KL."""
    with torch.autocast(hidden.device.type, enabled=False):
        bias = layer.bias.float() if getattr(layer, "bias", None) is not None else None
        return F.linear(hidden.float(), layer.weight.float(), bias)


class Logprobs(torch.nn.Module):
    """log p(x_t | x_<t) of a causal LM, the LM head applied only where it is asked for.

    ``forward(input_ids, attention_mask, first=0, temperature=1.0) -> (B, T-1)``: position t-1 of the
    output scores token t (left or right padding: positions come from the mask). The backbone runs on the
    whole sequence; the vocabulary projection (the largest activation, B x T x V) runs in fp32 only on
    targets ``first`` onwards (the answers), and the earlier positions are 0. A module, so that a
    data-parallel wrapper (DDP) owns the forward whose gradients it averages.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        first: int = 0,
        temperature: float = 1.0,
        entropy: bool = False,
    ):
        lm = unwrapped(self.model)
        return as_root_forward(lm, _logprobs, lm, input_ids, attention_mask, first, temperature, entropy)


def _logprobs(lm, input_ids, attention_mask, first: int, temperature: float, entropy: bool):
    """:class:`Logprobs`' forward."""
    hidden = lm.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask)
    ).last_hidden_state
    logits = fp32_projection(hidden[:, first:-1], lm.get_output_embeddings()) / temperature  # (B, T-1-first, V)
    pad = lm.config.pad_token_id
    if pad is not None:  # PAD is never sampled (rollout.generate): the policy is the softmax without it. A finite
        # floor, not -inf: padded targets (masked out downstream) and the entropy's p * logit stay finite
        logits = logits.index_fill(-1, torch.tensor([pad], device=logits.device), torch.finfo(logits.dtype).min)
    lse = logits.logsumexp(-1)  # (B, T-1-first)
    logp = logits.gather(-1, input_ids[:, first + 1 :].unsqueeze(-1)).squeeze(-1) - lse
    logp = F.pad(logp, (first, 0))  # (B, T-1), zeros where nothing was asked
    if not entropy:
        return logp
    with torch.no_grad():  # a metric: H = logsumexp(l) - sum_v softmax(l)_v l_v, without a graph
        ent = F.pad(lse.detach() - (logits.detach().softmax(-1) * logits.detach()).sum(-1), (first, 0))
    return logp, ent


def token_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0, first: int = 0
) -> torch.Tensor:
    """:class:`Logprobs` of ``model`` (a causal LM, or a module that already is a :class:`Logprobs`): (B, T-1)."""
    scorer = model if isinstance(getattr(model, "module", model), Logprobs) else Logprobs(model)
    return scorer(input_ids, attention_mask, first, temperature)


def token_logprobs_and_entropy(
    model, input_ids, attention_mask, temperature: float = 1.0, first: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`token_logprobs`, plus the entropy of each next-token distribution, both (B, T-1); the
    entropy costs no backward."""
    scorer = model if isinstance(getattr(model, "module", model), Logprobs) else Logprobs(model)
    return scorer(input_ids, attention_mask, first, temperature, entropy=True)


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head on every position: (B, T). Used as the critic and, at one index, as the reward."""
    model = unwrapped(model)
    return as_root_forward(model, _token_values, model, input_ids, attention_mask)


def _token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask)
    ).last_hidden_state
    return fp32_projection(hidden, model.score).squeeze(-1)  # (B, T)


class TokenValues(torch.nn.Module):
    """:func:`token_values` of a scalar model as a module's forward, ``(input_ids, attention_mask) -> (B, T)``,
    so that a data-parallel wrapper (DDP) owns the forward whose gradients it averages."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return token_values(self.model, input_ids, attention_mask)


def sequence_scores(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, last_index: torch.Tensor
) -> torch.Tensor:
    """Reward-model score read at ``last_index`` (the EOS, or the last real token): (B,)."""
    values = token_values(model, input_ids, attention_mask)  # (B, T)
    return values.gather(1, last_index.unsqueeze(1)).squeeze(1)


def is_lora(model: torch.nn.Module) -> bool:
    """Is ``model`` a peft (LoRA) model?"""
    return hasattr(model, "merge_and_unload")


def save_pretrained_atomic(
    model, tokenizer, out_dir: Path, extra: dict | None = None, merge: bool = True, state_dict: dict | None = None
) -> Path:
    """Save a HF folder atomically: write ``<out_dir>.tmp-<pid>``, then rename onto ``out_dir``.

    A LoRA (peft) model is saved with its adapters merged into the weights (``merge``: the next stage loads a
    plain model; merging unloads the adapters from ``model``, so only a stage's final save does it) or as
    its adapters alone (``merge=False``: ``model`` is left as it is, e.g. mid-training). ``state_dict``: the weights
    to write instead of the model's own (a sharded model's, gathered whole).
    """
    from .checkpoint import atomic_dir

    if merge and is_lora(model):
        model = model.merge_and_unload()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if extra:
            import json

            (tmp / "rlhf_meta.json").write_text(json.dumps(extra, indent=2, default=str))
    return out_dir


def load_adapters(model: torch.nn.Module, folder: Path) -> None:
    """Put the LoRA adapters saved in ``folder`` (``save_pretrained_atomic(..., merge=False)``) back into ``model``."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    set_peft_model_state_dict(model, load_peft_weights(str(folder), device=str(next(model.parameters()).device)))
