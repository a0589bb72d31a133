"""Run comparison from MLflow: the members of a sweep, their KL curves and the reward-vs-KL frontier.

Used by the sweep-summary callback and by notebooks/compare_runs.ipynb.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

MEMBER_COLUMNS = ("algo.beta", "algo.clip_range")
METRIC_COLUMNS = ("eval/kl", "eval/gold_reward", "eval/proxy_reward", "eval/win_rate_gold", "eval/win_rate_proxy", "eval/response_length")


def sweep_members(client: MlflowClient, experiment_id: str, sweep_id: str) -> list:
    """Finished parent runs of a sweep, oldest first."""
    query = f"tags.sweep_id = '{sweep_id}' and tags.pipeline = 'rlhf' and attributes.status = 'FINISHED'"
    return client.search_runs([experiment_id], query, order_by=["attributes.start_time ASC"], max_results=1000)


def member_table(runs) -> dict[str, list]:
    """Columns: run id, name, swept params, eval metrics (None where absent)."""
    table: dict[str, list] = {"run_id": [], "run_name": []}
    for col in MEMBER_COLUMNS + METRIC_COLUMNS:
        table[col] = []
    for r in runs:
        table["run_id"].append(r.info.run_id)
        table["run_name"].append(r.info.run_name)
        for col in MEMBER_COLUMNS:
            table[col].append(r.data.params.get(col))
        for col in METRIC_COLUMNS:
            table[col].append(r.data.metrics.get(col))
    return table


def label(run) -> str:
    p = run.data.params
    parts = [f"beta={p.get('algo.beta')}"] + ([f"clip={p['algo.clip_range']}"] if p.get("algo.clip_range", "None") != "None" else [])
    return ", ".join(parts)


def kl_curves_figure(client: MlflowClient, runs, stage: str = "ppo"):
    """KL to the reference vs step for each member's policy stage, in one figure."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        stage_run = r.data.tags.get(f"stage.{stage}.run_id")
        if not stage_run:
            continue
        history = client.get_metric_history(stage_run, f"{stage}/kl")
        if history:
            ax.plot([m.step for m in history], [m.value for m in history], label=label(r))
    ax.set_xlabel(f"{stage} step")
    ax.set_ylabel("KL to reference (nats)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def frontier_figure(runs):
    """Held-out reward (gold and proxy) against KL to the SFT policy, one point per member."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, marker in (("eval/gold_reward", "o"), ("eval/proxy_reward", "x")):
        points = [(r.data.metrics["eval/kl"], r.data.metrics[name], label(r)) for r in runs if name in r.data.metrics and "eval/kl" in r.data.metrics]
        if points:
            ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, label=name)
            for x, y, text in points:
                ax.annotate(text, (x, y), fontsize=6)
    ax.set_xlabel("KL(policy || SFT) on held-out prompts (nats)")
    ax.set_ylabel("held-out reward")
    ax.legend()
    fig.tight_layout()
    return fig
