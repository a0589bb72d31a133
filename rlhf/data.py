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
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from . import synthetic
from .config import DataConfig
from .config_data import FILE_BUILDERS

SPLITS = ("sft", "pref", "eval_prompts", "eval_pref", "ppo_prompts")
HH_SEPARATOR = "\n\nAssistant:"


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
    files = _local_files(data_files_list(cfg.data_files) or [cfg.path])
    if files:
        return {"files": {Path(f).name: _file_sha256(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files}}
    return {"dataset": cfg.path, "revision": _resolved_revision(cfg.path, cfg.revision)}


def _local_files(patterns: list[str]) -> list[str]:
    """The files that local paths, globs or folders name (remote URLs and hub ids name none)."""
    found = set()
    for pattern in patterns:
        for match in [] if "://" in pattern else glob.glob(pattern):
            path = Path(match)
            found.update(str(f) for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file())
    return sorted(found)


def build_splits(cfg: DataConfig) -> dict[str, list[dict]]:
    if cfg.source == "synthetic":
        return synthetic.make_splits(
            cfg.seed,
            cfg.n_sft,
            cfg.n_pref,
            cfg.n_eval_prompts,
            cfg.n_eval_pref,
            cfg.n_ppo_prompts,
            cfg.annotator_temperature,
            cfg.annotator_length_bias,
            cfg.demo_quality,
            tuple(cfg.pair_length_jitter),
        )
    return _hub_splits(cfg)


def split_hh(chosen: str, rejected: str) -> dict:
    """HH-RLHF rows hold two whole dialogues; the prompt is everything up to the last Assistant turn."""
    cut = chosen.rfind(HH_SEPARATOR) + len(HH_SEPARATOR)
    prompt = chosen[:cut]
    rejected_answer = (
        rejected[cut:] if rejected.startswith(prompt) else rejected[rejected.rfind(HH_SEPARATOR) + len(HH_SEPARATOR) :]
    )
    return {"prompt": prompt, "chosen": chosen[cut:], "rejected": rejected_answer}


def _first_bad_json_line(files: list[str]) -> str | None:
    """``<file> line <n>: <error>`` for the first line of the JSON-lines files that is not a JSON object, else None."""
    import gzip

    for name in files:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(name, "rt", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"{name} line {n}: {e.msg} at column {e.colno} ({line.strip()[:60]!r})"
                if not isinstance(row, dict):
                    kind = type(row).__name__
                    return f"{name} line {n}: a JSON {kind}, not an object of columns ({line.strip()[:60]!r})"
    return None


def _load_split(cfg: DataConfig, split: str):
    import datasets

    try:
        return datasets.load_dataset(cfg.path, data_files=cfg.data_files, split=split, revision=cfg.revision)
    except (
        Exception
    ) as e:  # datasets raises many types (missing files, empty files, offline hub); all mean the same here
        bad = _first_bad_json_line(_local_files(data_files_list(cfg.data_files))) if cfg.path == "json" else None
        if bad:  # datasets says only that "an error occurred while generating the dataset": say where
            raise DatasetError(
                f"data.data_files: {bad}. Fix: make every line of the file one JSON object (JSON lines), or "
                f"remove that line."
            ) from e
        raise DatasetError(
            f"data.path={cfg.path!r} split {split!r} could not be loaded ({type(e).__name__}: {e}). Fix: check "
            f"data.path / data.data_files "
            f"and data.train_split / data.test_split; offline, point data.path=json and data.data_files at local files."
        ) from e


ROLES = ("system", "user", "assistant", "tool")


def _messages(value, role: str, where: str) -> list[dict]:
    """A conversation (list of {role, content}); a plain string becomes one message of ``role``."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise DatasetError(
            f"{where} is {type(value).__name__} {value!r:.60}, not a list of messages. "
            f"Fix: give it as [{{role, content}}, ...] (data.format=conversational) or use data.format=columns for "
            f"text."
        )
    for j, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DatasetError(
                f"{where}: message {j} is {m!r:.80}, which lacks a role in {list(ROLES)} or a string content. "
                f"Fix: every message needs role and content."
            )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def conversation_pair(prompt, chosen, rejected, where: str) -> dict | None:
    """A preference row of message lists: the prompt (explicit, or the messages chosen and rejected
    share) and the two completions (what follows it, starting with the assistant's turn). None for a
    pair whose completions are the same."""
    chosen, rejected = (
        _messages(chosen, "assistant", f"{where} chosen"),
        _messages(rejected, "assistant", f"{where} rejected"),
    )
    if prompt is None:  # implicit prompt: the messages both sides share
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            raise DatasetError(
                f"{where}: chosen and rejected do not share their prompt (their first messages differ). "
                f"Fix: both must repeat the same conversation before the assistant's answer, or give a prompt column."
            )
    else:
        prompt = _messages(prompt, "user", f"{where} prompt")
        chosen = (
            chosen[len(prompt) :] if chosen[: len(prompt)] == prompt else chosen
        )  # full conversations beside a prompt column
        rejected = rejected[len(prompt) :] if rejected[: len(prompt)] == prompt else rejected
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        if not completion or completion[0]["role"] != "assistant" or not completion[0]["content"].strip():
            raise DatasetError(
                f"{where}: the {name} answer {completion!r:.80} is not a non-empty assistant turn after the prompt. "
                f"Fix: every pair needs an assistant message with content after the shared prompt."
            )
    return None if chosen == rejected else {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _prompt_chars(prompt) -> int:
    return sum(len(m["content"]) for m in prompt) if isinstance(prompt, list) else len(prompt)


def _rows(cfg: DataConfig, split: str) -> list[dict]:
    ds = _load_split(cfg, split)
    needed = {"chosen": "chosen", "rejected": "rejected"} if cfg.format == "hh" else dict(cfg.columns)
    if cfg.format == "conversational" and needed.get("prompt") not in ds.column_names:
        needed.pop("prompt", None)  # an implicit prompt: the messages chosen and rejected share
    missing = {role: col for role, col in needed.items() if col not in ds.column_names}
    if missing:
        raise DatasetError(
            f"dataset {cfg.path!r} split {split!r} has no column(s) {sorted(missing.values())} "
            f"(mapped by data.columns / data.format={cfg.format}); it has {ds.column_names}. "
            f"Fix: set data.columns.<role>=<column> for each of {sorted(missing)}."
        )
    if len(ds) == 0:
        raise DatasetError(
            f"dataset {cfg.path!r} split {split!r} is empty. Fix: point data.path / data.data_files at non-empty data."
        )
    where = f"dataset {cfg.path!r} split {split!r}"
    dropped = {
        "the same answer as chosen and rejected": 0,
        "an empty prompt or answer": 0,
        "a prompt past data.max_prompt_chars": 0,
    }
    if cfg.format == "conversational":
        prompts = ds[needed["prompt"]] if "prompt" in needed else [None] * len(ds)
        pairs = [
            conversation_pair(p, ch, rj, f"{where} row {i}")
            for i, (p, ch, rj) in enumerate(zip(prompts, ds[needed["chosen"]], ds[needed["rejected"]]))
        ]
        rows = [r for r in pairs if r]
        dropped["the same answer as chosen and rejected"] = len(pairs) - len(rows)
    else:
        texts = [ds[needed[role]] for role in ("chosen", "rejected")] + (
            [ds[needed["prompt"]]] if cfg.format == "columns" else []
        )
        for column, role in zip(texts, ("chosen", "rejected", "prompt")):
            _check_text(column, where, needed[role], cfg.format)
        if cfg.format == "hh":
            rows = [split_hh(c, r) for c, r in zip(ds["chosen"], ds["rejected"])]
        else:
            c = cfg.columns
            rows = [
                {"prompt": p, "chosen": ch, "rejected": rj}
                for p, ch, rj in zip(ds[c["prompt"]], ds[c["chosen"]], ds[c["rejected"]])
            ]
        kept = [r for r in rows if r["prompt"] and r["chosen"].strip() and r["rejected"].strip()]
        dropped["an empty prompt or answer"] = len(rows) - len(kept)
        rows = [r for r in kept if r["chosen"] != r["rejected"]]
        dropped["the same answer as chosen and rejected"] = len(kept) - len(rows)
    if cfg.max_prompt_chars:
        short = [r for r in rows if _prompt_chars(r["prompt"]) <= cfg.max_prompt_chars]
        dropped["a prompt past data.max_prompt_chars"] = len(rows) - len(short)
        rows = short
    if not rows:
        reasons = "; ".join(f"{n} with {why}" for why, n in dropped.items() if n)
        fixes = {
            "the same answer as chosen and rejected": "pairs need two different answers, the preferred one as chosen",
            "an empty prompt or answer": "every row needs a prompt and two non-empty answers",
            "a prompt past data.max_prompt_chars": f"raise data.max_prompt_chars (now {cfg.max_prompt_chars}) or set "
            f"it to null",
        }
        raise DatasetError(
            f"{where} has no usable rows: all {len(ds)} were dropped ({reasons}). "
            f"Fix: {'; '.join(fixes[why] for why, n in dropped.items() if n)}."
        )
    return rows


def _check_text(values: list, where: str, column: str, data_format: str) -> None:
    """Every value of a text column is a string; a message list names its row and the format that reads it."""
    for i, value in enumerate(values):
        if not isinstance(value, str):
            kind = "a list of messages" if isinstance(value, list) else f"a {type(value).__name__}"
            fix = (
                "pass data.format=conversational, which reads message lists"
                if isinstance(value, list)
                else f"give column {column!r} text in every row"
            )
            raise DatasetError(
                f"{where} row {i}: column {column!r} holds {kind} ({value!r:.60}), and data.format={data_format} reads "
                f"text. Fix: {fix}."
            )


def _hub_splits(cfg: DataConfig) -> dict[str, list[dict]]:
    """Train split -> sft (prompt + chosen), pref, ppo prompts; test split -> eval prompts and pairs."""
    train = _rows(cfg, cfg.train_split)
    test = _rows(cfg, cfg.test_split) if cfg.test_split != cfg.train_split else None
    rng = random.Random(cfg.seed)
    rng.shuffle(train)
    if test is None:  # one split only: hold out a slice of it
        n_test = max(1, min(len(train) // 10, cfg.n_eval_pref))
        test, train = train[:n_test], train[n_test:]
    if cfg.max_rows:
        train = train[: cfg.max_rows]
    if not train:
        raise DatasetError(
            f"dataset {cfg.path!r} has no usable training rows. Fix: check data.path and data.train_split."
        )
    return {
        "sft": [{"prompt": r["prompt"], "response": r["chosen"]} for r in train[: cfg.n_sft]],
        "pref": train[: cfg.n_pref],
        "eval_prompts": [{"prompt": r["prompt"]} for r in test[: cfg.n_eval_prompts]],
        "eval_pref": test[: cfg.n_eval_pref],
        "ppo_prompts": [{"prompt": r["prompt"]} for r in train[: cfg.n_ppo_prompts]],
    }


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
