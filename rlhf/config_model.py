"""The model config group: which causal LM (built tiny from a config, or loaded), its precision and LoRA."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .settings import require_multiple, setting

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
        if self.pretrained is None:
            require_multiple(self, key, "n_embd", "n_head")
