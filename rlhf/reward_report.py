"""How far to trust a reward model, from its held-out pairs: calibration, accuracy by margin, length bias.

- Calibration: a reward model predicts P(a preferred to b) = sigmoid(r_a - r_b). Each held-out pair is
  counted in both orders (chosen first: outcome 1; rejected first: outcome 0), and the expected
  calibration error (:func:`rlhf.stats.expected_calibration_error`) compares predicted probabilities
  with observed frequencies in 10 bins: the reliability diagram.
- Accuracy by margin: the share of pairs ranked as the annotators did, in quartiles of the true margin
  (the gold reward's, where the task has one) or else of the predicted margin: a model that only gets
  the easy pairs right has a steep curve.
- The bias detector: the correlation of the score with answer length, beside the gold reward's (where
  known) on the same answers. A proxy that likes length much more than the truth does will be
  exploited by lengthening answers.
"""

from __future__ import annotations

import torch

from .stats import correlation, expected_calibration_error


def report(
    chosen: torch.Tensor, rejected: torch.Tensor, lengths: torch.Tensor, gold: torch.Tensor | None = None
) -> tuple[dict, dict]:
    """Metrics and plot data from the scores of held-out pairs.

    chosen, rejected: (N,) scores; lengths: (N, 2) answer lengths in words (chosen, rejected); gold: (N, 2)
    gold rewards of the same answers, where known. Returns (metrics named without prefix, plot data).
    """
    margins = chosen - rejected
    p = torch.sigmoid(torch.cat([margins, -margins]))
    y = torch.cat([torch.ones_like(margins), torch.zeros_like(margins)])
    ece, reliability = expected_calibration_error(p, y)
    by = (gold[:, 0] - gold[:, 1]).abs() if gold is not None else margins.abs()
    edges = torch.quantile(by.float(), torch.tensor([0.25, 0.5, 0.75]))
    bucket = torch.bucketize(by.float(), edges)
    correct = (margins > 0).float()
    accuracy = [float(correct[bucket == b].mean()) if (bucket == b).any() else float("nan") for b in range(4)]
    scores, words = torch.cat([chosen, rejected]), torch.cat([lengths[:, 0], lengths[:, 1]]).float()
    metrics = {
        "eval_ece": ece,
        "eval_length_corr": correlation(scores, words),
        **{f"eval_accuracy_q{b + 1}": a for b, a in enumerate(accuracy)},
    }
    if gold is not None:
        metrics["eval_gold_length_corr"] = correlation(torch.cat([gold[:, 0], gold[:, 1]]), words)
    plot = {
        "reliability": reliability,
        "accuracy": accuracy,
        "margin_by": "gold margin" if gold is not None else "predicted margin",
        "scores": scores,
        "words": words,
        "gold": torch.cat([gold[:, 0], gold[:, 1]]) if gold is not None else None,
    }
    return metrics, plot


def figure(metrics: dict, plot: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    rel = plot["reliability"]
    used = rel[:, 2] > 0
    axes[0].plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    axes[0].plot(rel[used, 0], rel[used, 1], marker="o")
    axes[0].set(
        xlabel="predicted P(a preferred)",
        ylabel="observed frequency",
        title=f"reliability (ECE {metrics['eval_ece']:.3f})",
    )
    axes[1].bar(["q1", "q2", "q3", "q4"], plot["accuracy"])
    axes[1].axhline(0.5, color="grey", lw=0.8)
    axes[1].set(ylim=(0, 1), xlabel=f"quartile of |{plot['margin_by']}|", ylabel="accuracy", title="accuracy by margin")
    axes[2].scatter(
        plot["words"], plot["scores"], s=4, alpha=0.4, label=f"reward model (r={metrics['eval_length_corr']:.2f})"
    )
    if plot["gold"] is not None:
        twin = axes[2].twinx()
        twin.scatter(
            plot["words"],
            plot["gold"],
            s=4,
            alpha=0.4,
            color="C1",
            label=f"gold (r={metrics['eval_gold_length_corr']:.2f})",
        )
        twin.set_ylabel("gold reward")
        twin.legend(loc="lower right", fontsize=7)
    axes[2].legend(loc="upper left", fontsize=7)
    axes[2].set(xlabel="answer length (words)", ylabel="score", title="the bias detector: score vs length")
    fig.tight_layout()
    return fig
