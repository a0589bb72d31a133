"""Preferences stage of a campaign round: the preference store's next version.

The store is the data stage's splits with ``pref.jsonl`` holding every label so far: the data's own pairs,
then each round's labelled pairs in round order. Each version is a folder of its own (the reward model and
the challenger read it as they read the data stage's), fingerprinted by content, so MLflow shows every
round's preference data as a dataset input with its digest.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..context import StageContext
from ..data import fingerprint_splits, load_split

STORE = "splits"


def run(previous_dir: str, labels_path: str, label: str, ctx: StageContext) -> dict:
    """``previous_dir``: the store's last version (round 1: the data stage's splits); ``labels_path``: the round's
    labelled pairs (JSON lines)."""
    out = ctx.out_dir / STORE
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(previous_dir, out)
    new = Path(labels_path).read_text()
    with open(out / "pref.jsonl", "a") as f:
        f.write(new)
    rows = load_split(out, "pref")
    metrics = {"preferences/n_pairs": len(rows), "preferences/n_new": len(new.splitlines())}
    if rows and "gold_chosen" in rows[-1]:
        golds = [r for r in rows if "gold_chosen" in r]
        metrics["preferences/gold_agreement"] = sum(r["gold_chosen"] > r["gold_rejected"] for r in golds) / len(golds)
    ctx.sink.log_metrics(metrics, 0)
    datasets = fingerprint_splits(out, label, {"previous": previous_dir, "labels": labels_path})
    return {"data_dir": str(out), "metrics": metrics, "datasets": datasets}
