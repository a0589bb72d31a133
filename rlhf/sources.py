"""Where the splits come from: the synthetic task, or a hub / local dataset read with `datasets` in one of three
row formats (hh, columns, conversational), every malformed row or line named with its fix."""

from __future__ import annotations

import json
import random

from . import synthetic
from .config import DataConfig
from .data import DatasetError, data_files_list, local_files

HH_SEPARATOR = "\n\nAssistant:"
ROLES = ("system", "user", "assistant", "tool")


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
    """``<file> line <n>: <error>`` for the first line of the JSON-lines files that is not a JSON object, else None.
    Files that do not start with ``{`` are not JSON lines (a JSON array, CSV) and are left to `datasets`' own error."""
    import gzip

    for name in files:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(name, "rt", errors="replace") as f:
            numbered = ((n, line) for n, line in enumerate(f, 1) if line.strip())  # numbers as an editor shows them
            first = next(numbered, (0, ""))
            if not first[1].lstrip().startswith("{"):
                continue
            for n, line in (first, *numbered):
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
    except Exception as e:  # datasets raises many types (missing or empty files, offline hub): all mean the same here
        said = f"{type(e).__name__}: {e}"
        bad = _first_bad_json_line(local_files(data_files_list(cfg.data_files))) if cfg.path == "json" else None
        if bad:  # datasets says only that "an error occurred while generating the dataset": say where
            raise DatasetError(
                f"data.data_files: {bad} (datasets said: {said}). Fix: make every line of the file one "
                f"JSON object (JSON lines), or remove that line."
            ) from e
        raise DatasetError(
            f"data.path={cfg.path!r} split {split!r} could not be loaded ({said}). Fix: check data.path / "
            f"data.data_files and data.train_split / data.test_split; offline, point data.path=json and "
            f"data.data_files at local files."
        ) from e


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


SAME, EMPTY, LONG = (
    "the same answer as chosen and rejected",
    "an empty prompt or answer",
    "a prompt past data.max_prompt_chars",
)


def _rows(cfg: DataConfig, split: str) -> list[dict]:
    """A split's preference rows (prompt, chosen, rejected) in ``data.format``, the unusable ones dropped, counted."""
    ds = _load_split(cfg, split)
    where = f"dataset {cfg.path!r} split {split!r}"
    columns = _columns(cfg, ds, where)
    dropped = dict.fromkeys((SAME, EMPTY, LONG), 0)
    if cfg.format == "conversational":
        prompts = ds[columns["prompt"]] if "prompt" in columns else [None] * len(ds)
        triples = zip(prompts, ds[columns["chosen"]], ds[columns["rejected"]])
        pairs = [conversation_pair(p, ch, rj, f"{where} row {i}") for i, (p, ch, rj) in enumerate(triples)]
        rows = [r for r in pairs if r]
        dropped[SAME] = len(pairs) - len(rows)
    else:
        rows = _text_rows(cfg, ds, columns, where, dropped)
    if cfg.max_prompt_chars:
        short = [r for r in rows if _prompt_chars(r["prompt"]) <= cfg.max_prompt_chars]
        dropped[LONG] = len(rows) - len(short)
        rows = short
    if not rows:
        fixes = {
            SAME: "pairs need two different answers, the preferred one as chosen",
            EMPTY: "every row needs a prompt and two non-empty answers",
            LONG: f"raise data.max_prompt_chars (now {cfg.max_prompt_chars}) or set it to null",
        }
        reasons = "; ".join(f"{n} with {why}" for why, n in dropped.items() if n)
        raise DatasetError(
            f"{where} has no usable rows: all {len(ds)} were dropped ({reasons}). "
            f"Fix: {'; '.join(fixes[why] for why, n in dropped.items() if n)}."
        )
    return rows


def _columns(cfg: DataConfig, ds, where: str) -> dict[str, str]:
    """Role (prompt, chosen, rejected) -> the split's column for it, each checked to be there, the split non-empty."""
    needed = {"chosen": "chosen", "rejected": "rejected"} if cfg.format == "hh" else dict(cfg.columns)
    if cfg.format == "conversational" and needed.get("prompt") not in ds.column_names:
        needed.pop("prompt", None)  # an implicit prompt: the messages chosen and rejected share
    missing = {role: col for role, col in needed.items() if col not in ds.column_names}
    if missing:
        raise DatasetError(
            f"{where} has no column(s) {sorted(missing.values())} (mapped by data.columns / data.format={cfg.format}); "
            f"it has {ds.column_names}. Fix: set data.columns.<role>=<column> for each of {sorted(missing)}."
        )
    if len(ds) == 0:
        raise DatasetError(f"{where} is empty. Fix: point data.path / data.data_files at non-empty data.")
    return needed


def _text_rows(cfg: DataConfig, ds, columns: dict, where: str, dropped: dict) -> list[dict]:
    """Rows of text (format hh or columns), without those with an empty part or two equal answers (counted)."""
    for role in ("chosen", "rejected", *(("prompt",) if cfg.format == "columns" else ())):
        _check_text(ds[columns[role]], where, columns[role], cfg.format)
    if cfg.format == "hh":
        rows = [split_hh(c, r) for c, r in zip(ds["chosen"], ds["rejected"])]
    else:
        parts = zip(ds[columns["prompt"]], ds[columns["chosen"]], ds[columns["rejected"]])
        rows = [{"prompt": p, "chosen": ch, "rejected": rj} for p, ch, rj in parts]
    kept = [r for r in rows if r["prompt"] and r["chosen"].strip() and r["rejected"].strip()]
    dropped[EMPTY] = len(rows) - len(kept)
    rows = [r for r in kept if r["chosen"] != r["rejected"]]
    dropped[SAME] = len(kept) - len(rows)
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
