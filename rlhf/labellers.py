"""Who labels a campaign round's pairs: one interface, three kinds (``campaign.labeller``).

A labeller takes the round's requests (rows ``{id, prompt, answer_a, answer_b, ended_a, ended_b}``, from
:mod:`rlhf.stages.pairs`) and returns preference rows in the data's ``pref`` schema (``prompt``, ``chosen``,
``rejected``: text, or message lists for conversational data) with its metrics.

- :class:`SyntheticLabeller`: the synthetic task's simulated annotators (Bradley-Terry on the gold reward with
  the configured noise and length bias), so what the loop gains is measured against gold.
- :class:`FolderLabeller`: people. The round writes its requests to ``<inbox>/requests/round-<r>.jsonl``;
  labelled comparisons dropped into ``<inbox>`` as ``*.jsonl`` files are taken by the next round that runs,
  each file once (moved to ``<inbox>/taken/round-<r>/``).
- :class:`JudgeLabeller`: a judge reward model (the campaign's ``reward.judge`` stage, trained on pairs no reward
  model of the campaign learns from) prefers the answer it scores higher.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from .chat import is_conversation
from .data import DatasetError
from .sources import conversation_pair
from .synthetic import annotator_prob, gold_reward


def _text(answer) -> str:
    return answer[0]["content"] if is_conversation(answer) else answer


class SyntheticLabeller:
    """P(a preferred) = sigmoid((gold_a - gold_b + length_bias * (len_a - len_b)) / temperature)."""

    def __init__(self, temperature: float, length_bias: float, seed: int, round_no: int) -> None:
        self.temperature, self.length_bias = temperature, length_bias
        self.rng = random.Random(f"{seed}/labels/{round_no}")

    def label(self, requests: list[dict]) -> tuple[list[dict], dict]:
        rows = []
        for r in requests:
            a, b = _text(r["answer_a"]), _text(r["answer_b"])
            ga, gb = gold_reward(r["prompt"], a, r["ended_a"]), gold_reward(r["prompt"], b, r["ended_b"])
            p = annotator_prob(ga, gb, len(a.split()), len(b.split()), self.temperature, self.length_bias)
            first = self.rng.random() < p
            chosen, rejected = (r["answer_a"], r["answer_b"]) if first else (r["answer_b"], r["answer_a"])
            gc, gr = (ga, gb) if first else (gb, ga)
            rows.append(
                {"prompt": r["prompt"], "chosen": chosen, "rejected": rejected, "gold_chosen": gc, "gold_rejected": gr}
            )
        agree = sum(r["gold_chosen"] > r["gold_rejected"] for r in rows) / max(1, len(rows))
        return rows, {"labels/n": len(rows), "labels/gold_agreement": agree}


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def read_labelled(path: Path, conversational: bool, text: str | None = None) -> list[dict]:
    """The preference rows of one dropped file (``text``: its contents, already read); a malformed line fails naming
    the file, the line and the fix."""
    rows = []
    for n, line in enumerate((path.read_text() if text is None else text).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{where} is not JSON ({err.msg}). Fix: one JSON object per line.") from None
        if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
            raise DatasetError(
                f'{where} lacks chosen or rejected. Fix: each line is {{"prompt": ..., "chosen": ..., '
                f'"rejected": ...}} (a request of <inbox>/requests/ with its answer_a, answer_b put in order).'
            )
        if conversational:
            pair = conversation_pair(row.get("prompt"), row["chosen"], row["rejected"], where)
        elif all(isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected")):
            pair = {k: row[k] for k in ("prompt", "chosen", "rejected")} if row["chosen"] != row["rejected"] else None
        else:
            raise DatasetError(
                f"{where}: this campaign's data is text, so prompt, chosen and rejected must be strings. "
                f"Fix: write them as the requests show them."
            )
        if pair:
            rows.append(pair)
    return rows


class FolderLabeller:
    """Labels that people drop into ``inbox`` (``*.jsonl``). A round takes a file by moving it to
    ``<inbox>/taken/round-<r>/`` (one rename: taken once, by one round, whole); a round that failed and runs again
    reads what it had moved."""

    def __init__(self, inbox: Path, round_no: int, conversational: bool) -> None:
        self.inbox, self.round_no, self.conversational = Path(inbox), round_no, conversational

    def take(self) -> list[Path]:
        mine = self.inbox / "taken" / f"round-{self.round_no}"
        mine.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.inbox.glob("*.jsonl")):
            target, n = mine / path.name, 1
            while target.exists():
                target, n = mine / f"{path.stem}-{n}{path.suffix}", n + 1
            path.rename(target)
        return sorted(mine.glob("*.jsonl"))

    def label(self, requests: list[dict]) -> tuple[list[dict], dict]:
        asked = self.inbox / "requests" / f"round-{self.round_no}.jsonl"
        asked.parent.mkdir(parents=True, exist_ok=True)
        fields = ("id", "prompt", "answer_a", "answer_b")
        asked.write_text("".join(json.dumps({k: r[k] for k in fields}) + "\n" for r in requests))
        rows, files = [], {}
        for path in self.take():
            data = path.read_bytes()  # read once: the rows and the digest are of the same bytes
            files[path.name] = digest(data)
            rows += read_labelled(path, self.conversational, data.decode())
        metrics = {"labels/n": len(rows), "labels/n_files": len(files), "labels/n_requested": len(requests)}
        return rows, {**metrics, "files": files}


class JudgeLabeller:
    """A judge reward model orders each pair: the answer it scores higher is chosen, under the scoring rule of
    on-policy training (an answer that never ends loses ``missing_eos_penalty``); a pair it scores alike is
    dropped. ``gold``: the task's gold reward where it has one, to measure how often the judge agrees with it."""

    def __init__(self, judge_path: str, max_length: int, device, missing_eos_penalty: float, gold=None) -> None:
        self.path, self.max_length, self.device = judge_path, max_length, device
        self.penalty, self.gold = missing_eos_penalty, gold

    def scores(self, requests: list[dict]):
        """(N, 2) judge scores of answer_a and answer_b of each request, the penalty of unended answers taken off."""
        import torch

        from .chat import render_row
        from .modeling import load_scalar_model, load_tokenizer
        from .stages.reward import held_out_scores

        tokenizer = load_tokenizer(self.path)
        judge = load_scalar_model(self.path, tokenizer, zero_head=False).to(self.device)
        rows = [
            render_row(tokenizer, {"prompt": r["prompt"], "chosen": r["answer_a"], "rejected": r["answer_b"]})
            for r in requests
        ]
        ended = torch.tensor([[r["ended_a"], r["ended_b"]] for r in requests], dtype=torch.float32)
        return held_out_scores(judge, rows, tokenizer, self.max_length, self.device) - self.penalty * (1 - ended)

    def label(self, requests: list[dict]) -> tuple[list[dict], dict]:
        scores = self.scores(requests)  # (N, 2)
        rows, margins = [], (scores[:, 0] - scores[:, 1]).tolist()
        for r, margin in zip(requests, margins):
            if margin == 0:
                continue
            first = margin > 0
            row = {
                "prompt": r["prompt"],
                "chosen": r["answer_a"] if first else r["answer_b"],
                "rejected": r["answer_b"] if first else r["answer_a"],
            }
            if self.gold is not None:
                ga = self.gold(r["prompt"], _text(r["answer_a"]), r["ended_a"])
                gb = self.gold(r["prompt"], _text(r["answer_b"]), r["ended_b"])
                row["gold_chosen"], row["gold_rejected"] = (ga, gb) if first else (gb, ga)
            rows.append(row)
        metrics = {"labels/n": len(rows), "labels/judge_margin": sum(map(abs, margins)) / max(1, len(margins))}
        if self.gold is not None:
            metrics["labels/gold_agreement"] = sum(r["gold_chosen"] > r["gold_rejected"] for r in rows) / max(
                1, len(rows)
            )
        return rows, metrics
