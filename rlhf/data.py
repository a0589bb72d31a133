"""Datasets: the synthetic task or a hub dataset, as plain rows; tokenised into padded tensors.

Every split is a list of dict rows with a fixed schema:

- ``sft``:           prompt, response
- ``pref``:          prompt, chosen, rejected            (+ gold_chosen, gold_rejected when known)
- ``eval_prompts``:  prompt
- ``eval_pref``:     prompt, chosen, rejected
- ``ppo_prompts``:   prompt
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .config import DataConfig
from .config_data import FILE_BUILDERS


class DatasetError(ValueError):
    """A dataset is empty or lacks a mapped column; the message names the key and the fix."""


def data_files_list(data_files) -> list[str]:
    """``data.data_files`` (a str, a list, or split -> str | list) as a flat list."""
    if data_files is None:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [f for v in data_files.values() for f in data_files_list(v)]
    return [str(f) for f in data_files]


def dataset_label(cfg: DataConfig) -> str:
    """A short name of the data source for dataset names: synthetic, hh-rlhf, or a local file's stem."""
    if cfg.source == "synthetic":
        return "synthetic"
    files = data_files_list(cfg.data_files)
    return (
        Path(files[0]).name.split(".")[0]
        if files and cfg.path in FILE_BUILDERS
        else str(cfg.path).rstrip("/").rsplit("/", 1)[-1]
    )


# --------------------------------------------------------------------------------------------------
# Building the splits
# --------------------------------------------------------------------------------------------------
@lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _resolved_revision(path: str, revision: str | None) -> str:
    """The commit a hub dataset's revision points at now; offline, the configured revision as given."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return revision or "unresolved: offline (pin data.revision)"
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(path, revision=revision).sha
    except Exception as e:  # no network, no such dataset: the data stage's own load will say which
        return revision or f"unresolved: {type(e).__name__}"


def source_fingerprint(cfg: DataConfig) -> dict | None:
    """What the data stage reads, by content: the sha256 of every local file (``data.data_files``, globs
    expanded, or the files of a local dataset folder), else the hub dataset's resolved revision. Part of
    the data stage's cache key, so changed rows re-run data and everything after it; None for the
    synthetic task, whose config is its content."""
    if cfg.source == "synthetic":
        return None
    files = local_files(data_files_list(cfg.data_files) or [cfg.path])
    if files:
        return {"files": {Path(f).name: _file_sha256(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files}}
    return {"dataset": cfg.path, "revision": _resolved_revision(cfg.path, cfg.revision)}


def local_files(patterns: list[str]) -> list[str]:
    """The files that local paths, globs or folders name (remote URLs and hub ids name none)."""
    found = set()
    for pattern in patterns:
        for match in [] if "://" in pattern else glob.glob(pattern):
            path = Path(match)
            found.update(str(f) for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file())
    return sorted(found)


def save_splits(splits: dict[str, list[dict]], out_dir: Path) -> dict[str, int]:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        with open(out_dir / f"{name}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return {name: len(rows) for name, rows in splits.items()}


def fingerprint_splits(splits_dir: Path, label: str, origin: dict | None = None) -> dict[str, dict]:
    """Per split file ``<name>.jsonl``: dataset name, content digest, source (the split file, and the
    ``origin`` it was made from: :func:`source_fingerprint`), columns and row count."""
    out = {}
    for path in sorted(Path(splits_dir).glob("*.jsonl")):
        data = path.read_bytes()
        lines = data.splitlines()
        columns = list(json.loads(lines[0])) if lines else []
        out[path.stem] = {
            "name": f"{label}.{path.stem}",
            "digest": hashlib.sha256(data).hexdigest()[:16],
            "source": path.resolve().as_uri(),
            "origin": origin,
            "columns": columns,
            "n_rows": len(lines),
        }
    return out


def load_rows(data_dir: str | Path, name: str, tokenizer) -> list[dict]:
    """A split's rows as the model reads them: conversations rendered with ``tokenizer``'s chat template,
    plain answers after one space (:mod:`rlhf.chat`)."""
    from .chat import render_row

    return [render_row(tokenizer, r) for r in load_split(data_dir, name)]


def is_conversational(data_dir: str | Path) -> bool:
    """Do the splits hold message lists (data.format=conversational) rather than text?"""
    return isinstance(load_split(data_dir, "eval_prompts")[0]["prompt"], list)


def load_split(data_dir: str | Path, name: str) -> list[dict]:
    with open(Path(data_dir) / f"{name}.jsonl") as f:
        rows = [json.loads(line) for line in f]
    if not rows:
        raise DatasetError(
            f"split {name!r} in {data_dir} is empty. Fix: raise the data.n_* size for it, or check the dataset."
        )
    return rows


# --------------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """Prompt + answer sequences, right-padded.

    input_ids, attention_mask: (N, T); loss_mask: (N, T-1), aligned with ``token_logprobs`` output
    (1 where the *target* token is an answer token or the closing EOS); last_index: (N,) the EOS.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    last_index: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def first_target(self) -> int:
        """The first target position any row scores (the earliest answer token): log-probs start there."""
        return int((self.loss_mask.cumsum(1) == 0).sum(1).min())

    def batch(self, idx: torch.Tensor) -> Encoded:
        """Rows ``idx``, trimmed to their longest sequence (no compute spent on all-pad columns)."""
        width = int(self.last_index[idx].max()) + 1
        return Encoded(
            self.input_ids[idx, :width],
            self.attention_mask[idx, :width],
            self.loss_mask[idx, : width - 1],
            self.last_index[idx],
        )

    @staticmethod
    def stack(a: Encoded, b: Encoded) -> Encoded:
        """Rows of ``a`` then rows of ``b`` in one batch (one forward for chosen and rejected)."""
        width = max(a.input_ids.shape[1], b.input_ids.shape[1])

        def pad(x: torch.Tensor, to: int) -> torch.Tensor:
            # Right padding is never attended to (causal) nor scored (loss mask), so its id is irrelevant.
            return torch.nn.functional.pad(x, (0, to - x.shape[1]))

        return Encoded(
            torch.cat([pad(a.input_ids, width), pad(b.input_ids, width)]),
            torch.cat([pad(a.attention_mask, width), pad(b.attention_mask, width)]),
            torch.cat([pad(a.loss_mask, width - 1), pad(b.loss_mask, width - 1)]),
            torch.cat([a.last_index, b.last_index]),
        )

    def to(self, device) -> Encoded:
        return Encoded(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.loss_mask, self.last_index)))


def encode_prompts(tokenizer, prompts: list[str], max_prompt_len: int) -> list[list[int]]:
    """Token ids of each prompt; a prompt past ``max_prompt_len`` raises (it would not fit the context)."""
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    too_long = [i for i, x in enumerate(ids) if len(x) > max_prompt_len]
    if too_long:
        n = len(ids[too_long[0]])
        raise DatasetError(
            f"{len(too_long)} prompt(s) are longer than the context allows ({n} > {max_prompt_len} tokens; "
            f"first: {prompts[too_long[0]][:80]!r}). Fix: raise model.max_length, lower the generation's "
            f"max_new_tokens, or filter long prompts from the dataset."
        )
    return ids


def encode_pairs(tokenizer, prompts: list[str], responses: list[str], max_length: int) -> Encoded:
    """Tokenise prompt + answer + EOS (texts as :func:`load_rows` renders them); answers are cut to fit
    ``max_length`` (the EOS always kept)."""
    prompt_ids = encode_prompts(tokenizer, prompts, max_length - 2)
    answer_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    n = len(prompts)
    seqs, starts = [], []
    for p, a in zip(prompt_ids, answer_ids):
        a = a[: max_length - len(p) - 1] + [tokenizer.eos_token_id]
        seqs.append(p + a)
        starts.append(len(p))
    width = max(len(s) for s in seqs)
    input_ids = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in seqs])
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
    cols = torch.arange(width)
    attention_mask = (cols[None, :] < lengths[:, None]).long()
    start = torch.tensor(starts)
    # target position j (0-based in the shifted view) scores token j+1: an answer token when start <= j+1 < len
    target = cols[1:][None, :]
    loss_mask = ((target >= start[:, None]) & (target < lengths[:, None])).float()
    return Encoded(input_ids, attention_mask, loss_mask, lengths - 1)


def left_pad(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists for generation: (B, P) ids and mask."""
    width = max(len(x) for x in ids)
    out = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, width - len(x) :] = torch.tensor(x, dtype=torch.long)
        mask[i, width - len(x) :] = 1
    return out, mask
