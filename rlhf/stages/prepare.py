"""Data stage: build every split (synthetic task or hub dataset) and write them as JSON lines."""

from __future__ import annotations

from ..config import DataConfig
from ..context import StageContext
from ..data import dataset_label, fingerprint_splits, save_splits, source_fingerprint
from ..sources import build_splits


def run(cfg: DataConfig, ctx: StageContext) -> dict:
    splits = build_splits(cfg)
    for name, rows in splits.items():
        if not rows:
            from ..data import DatasetError

            raise DatasetError(
                f"split {name!r} is empty. Fix: raise data.n_{name} (or check the dataset's {name} rows)."
            )
    sizes = save_splits(splits, ctx.out_dir / "splits")
    summary = {f"data/n_{k}": v for k, v in sizes.items()}
    if cfg.source == "synthetic":
        pairs = splits["pref"]
        summary["data/label_gold_agreement"] = sum(r["gold_chosen"] > r["gold_rejected"] for r in pairs) / len(pairs)
        from ..synthetic import gold_reward

        demos = splits["sft"]
        summary["data/sft_gold_reward"] = sum(gold_reward(r["prompt"], r["response"]) for r in demos) / len(demos)
    ctx.sink.log_metrics(summary, 0)
    datasets = fingerprint_splits(ctx.out_dir / "splits", dataset_label(cfg), source_fingerprint(cfg))
    return {"data_dir": str(ctx.out_dir / "splits"), "metrics": summary, "datasets": datasets}
