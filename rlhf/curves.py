"""An on-policy run's figures and fits: the KL curve, and Gao et al.'s RL form fitted over its evaluations."""

from __future__ import annotations

from pathlib import Path

import torch

from . import frontier

CURVES = ("kl", "kl_k3", "score", "eval_proxy_reward", "eval_gold_reward", "eval_guard_score")  # the KL curve's lines


def kl_curve_figure(history: dict[str, list[tuple[int, float]]], name: str, out_file: Path) -> Path:
    """KL (k1, k3) on the left, scores and held-out rewards on the right, against the iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, keys in zip(axes, (CURVES[:2], CURVES[2:])):
        for k in (f"{name}/{c}" for c in keys):
            if history.get(k):
                steps, values = zip(*history[k])
                ax.plot(steps, values, label=k, marker="." if len(steps) < 30 else None)
        ax.set_xlabel(f"{name} iteration")
        ax.legend()
    axes[0].set_ylabel("nats")
    fig.tight_layout()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_file, dpi=100)
    plt.close(fig)
    return out_file


def frontier_fit(history: dict, name: str, has_gold: bool) -> tuple[dict, object]:
    """Gao et al.'s RL form fitted over a run's evaluations (d = sqrt(held-out KL), the reward gain over the
    evaluation before training): metrics ``<name>/frontier_<gold|proxy>_<alpha|beta|r2|d_star>`` and the figure."""
    kl = dict(history.get(f"{name}/eval_kl", []))
    points, fits = {}, {}
    for kind in ("gold", "proxy") if has_gold else ("proxy",):
        series = dict(history.get(f"{name}/eval_{kind}_reward", []))
        steps = sorted(set(series) & set(kl))
        if len(steps) < 3 or steps[0] != 0:
            continue
        d = frontier.distance([kl[s] for s in steps])
        gain = torch.tensor([series[s] - series[0] for s in steps], dtype=torch.float64)
        points[kind], fits[kind] = (d.tolist(), gain.tolist()), frontier.fit("rl", d, gain)
    metrics = {k: v for kind, f in fits.items() for k, v in f.metrics(f"{name}/frontier_{kind}").items()}
    title = f"{name}: reward gain vs sqrt(KL) over its evaluations"
    return metrics, (frontier.figure(points, fits, title) if fits else None)


def save_figures(history: dict, name: str, figures: Path, has_gold: bool) -> dict:
    """``kl_curve.png`` and, where there are evaluations enough, ``frontier.png`` in ``figures``; the fit's metrics."""
    kl_curve_figure(history, name, figures / "kl_curve.png")
    fitted, fig = frontier_fit(history, name, has_gold)
    if fig is not None:
        import matplotlib.pyplot as plt

        fig.savefig(figures / "frontier.png", dpi=100)
        plt.close(fig)
    return fitted
