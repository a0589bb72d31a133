"""The tiny default model: a byte-level BPE tokenizer trained on the task's corpus and a small causal LM of a
transformers architecture built from its config, saved with ``save_pretrained`` and loaded back like any other."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from .config import ModelConfig
from .modeling import EOS_TOKEN, PAD_TOKEN

CHAT_MARKERS = ("<|im_start|>", "<|im_end|>")  # the default (ChatML) template's, special tokens of a chat tokenizer


def train_tokenizer(
    corpus: Iterable[str], vocab_size: int, chat_template: str | None = None
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``corpus`` with PAD distinct from EOS; with ``chat_template``
    it also has the ChatML markers as special tokens and the template (for conversational data)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [PAD_TOKEN, EOS_TOKEN] + (list(CHAT_MARKERS) if chat_template else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, additional_special_tokens=specials[2:] or None
    )
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def model_config(cfg: ModelConfig, vocab_size: int, pad_id: int, eos_id: int):
    """A transformers config of ``cfg.arch`` at the tiny sizes, every dropout at ``cfg.dropout``."""
    common = dict(vocab_size=vocab_size, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=eos_id)
    if cfg.arch == "gpt2":
        return AutoConfig.for_model(
            "gpt2",
            n_layer=cfg.n_layer,
            n_embd=cfg.n_embd,
            n_head=cfg.n_head,
            n_positions=cfg.max_length,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            **common,
        )
    # llama, qwen2: attention dropout is their only dropout
    return AutoConfig.for_model(
        cfg.arch,
        num_hidden_layers=cfg.n_layer,
        hidden_size=cfg.n_embd,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head,
        intermediate_size=4 * cfg.n_embd,
        max_position_embeddings=cfg.max_length,
        attention_dropout=cfg.dropout,
        tie_word_embeddings=True,
        **common,
    )


def build_tiny(cfg: ModelConfig, corpus: Iterable[str], out_dir: Path, chat: bool = False) -> Path:
    """Train the tokenizer (with a chat template for conversational data), build the tiny causal LM of
    ``cfg.arch`` from its config, and save both to ``out_dir``."""
    tokenizer = train_tokenizer(corpus, cfg.vocab_size, cfg.default_chat_template if chat else None)
    model = AutoModelForCausalLM.from_config(
        model_config(cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
