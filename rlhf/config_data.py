"""The data config group: the synthetic task's sizes and annotators, or a hub / local dataset and its format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .settings import ConfigError, setting

PAIR_LENGTH_JITTER = (-3, 6)  # the synthetic pairs' answers: 3 words short of the target length to 6 past it

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
            jitter = self.pair_length_jitter
            if len(jitter) != 2 or not all(isinstance(j, int) for j in jitter) or jitter[0] > jitter[1]:
                raise ConfigError(
                    f"{key}.pair_length_jitter={list(jitter)} must be two whole numbers of words, the first not above "
                    f"the second. Fix: e.g. {key}.pair_length_jitter=[-4,4]."
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
