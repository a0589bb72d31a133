"""Whether a configured model or tokenizer path can be loaded, checked from the file system alone (no torch, no
transformers: the command line runs it before anything starts, also on a fully cached run)."""

from __future__ import annotations

import os
from pathlib import Path


class ModelPathError(FileNotFoundError):
    """A model path or hub id cannot be loaded; the message names the config key and the fix."""


TOKENIZER_FILES = (  # any one of them: a tokenizer is there (fast, BPE vocabularies, WordPiece, SentencePiece)
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
)


def check_model_source(name_or_path: str, key: str, needs: str = "model") -> None:
    """Fail early, naming the key, if a local path does not exist or is a folder without a model (``needs="model"``:
    its config.json) or a tokenizer (``needs="tokenizer"``); hub ids pass through."""
    path = Path(name_or_path).expanduser()
    looks_local = (
        name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 1)[-1] or path.is_dir()
    )
    if not looks_local:
        return
    if not path.exists():
        raise ModelPathError(
            f"{key}={name_or_path!r} does not exist. Fix: point {key} at a folder saved with save_pretrained, "
            f"a hub id (e.g. gpt2), or null for the tiny model."
        )
    wanted = ("config.json",) if needs == "model" else TOKENIZER_FILES
    if path.is_dir() and not any((path / f).is_file() for f in wanted):
        raise ModelPathError(
            f"{key}={name_or_path!r} is a folder without a {needs} (no {' / '.join(wanted)} in it). Fix: point {key} "
            f"at the "
            f"folder a model was saved to with save_pretrained (a {needs} saves {wanted[0]} there), a hub id, or null "
            f"for the tiny model."
        )
