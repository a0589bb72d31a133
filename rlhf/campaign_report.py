"""A campaign across its rounds: the numbers each round logs on the campaign's row, and one figure of them.

Per round (step = round number): the challenger's held-out reward (gold where the task has one) and the
champion's on the same prompts and keys, their paired gain, the win rate, the proxy reward, the challenger's KL
to SFT, and whether the gate promoted it.
"""

from __future__ import annotations


def round_metrics(record: dict, kind: str) -> dict:
    m = record["metrics"]
    out = {
        f"campaign/challenger_{kind}_reward": m[f"eval/{kind}_reward"],
        f"campaign/champion_{kind}_reward": m[f"eval/{record['baseline']}_{kind}_reward"],
        f"campaign/{kind}_gain": m[f"eval/{kind}_gain"],
        f"campaign/{kind}_gain_se": m[f"eval/{kind}_gain_se"],
        f"campaign/win_rate_{kind}": m[f"eval/win_rate_{kind}"],
        "campaign/kl_to_sft": m["eval/kl"],
        "campaign/promoted": float(record["promoted"]),
        "campaign/n_labels": float(record["n_labels"]),
    }
    if "eval/proxy_reward" in m:
        out["campaign/proxy_reward"] = m["eval/proxy_reward"]
    return out


def campaign_figure(records: list[dict], kind: str):
    """Four panels over rounds: reward (challenger and champion), win rate, proxy reward, KL; promotions marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in records]
    series = [round_metrics(r, kind) for r in records]
    promoted = [r["round"] for r in records if r["promoted"]]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    panels = [
        (f"{kind} reward (held out)", [f"campaign/challenger_{kind}_reward", f"campaign/champion_{kind}_reward"]),
        (f"win rate vs champion ({kind})", [f"campaign/win_rate_{kind}"]),
        ("proxy reward", ["campaign/proxy_reward"]),
        ("KL to SFT (nats)", ["campaign/kl_to_sft"]),
    ]
    for ax, (title, names) in zip(axes, panels):
        for name in names:
            values = [s.get(name, float("nan")) for s in series]
            ax.plot(rounds, values, marker="o", label=name.split("/")[1].split("_")[0])
            ax.plot([r for r in promoted], [v for r, v in zip(rounds, values) if r in promoted], "g*", markersize=14)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_xticks(rounds)
    axes[0].legend(fontsize=8)
    fig.suptitle("campaign: green stars mark the rounds whose challenger was promoted")
    fig.tight_layout()
    return fig
