"""Run comparison from MLflow: the members of a sweep, their KL curves and the reward-vs-KL frontier.

Used by the sweep-summary callback and by notebooks/compare_runs.ipynb.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

MEMBER_COLUMNS = ("algo.algo", "algo.beta", "algo.clip_range", "algo.seed")
METRIC_COLUMNS = (
    "eval/kl",
    "eval/gold_reward",
    "eval/gold_reward_se",
    "eval/gold_gain",
    "eval/gold_gain_se",
    "eval/proxy_reward",
    "eval/proxy_gain",
    "eval/win_rate_gold",
    "eval/win_rate_gold_se",
    "eval/win_rate_proxy",
    "eval/response_length",
)


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
    return run.info.run_name or run.info.run_id[:8]


def kl_curves_figure(client: MlflowClient, runs, stage: str | None = None):
    """KL to the reference vs step of each member's policy stage (its own algorithm's, unless ``stage``), in one
    figure."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        algo = stage or r.data.tags.get("algo", "ppo")
        stage_run = r.data.tags.get(f"stage.{algo}.run_id")
        if not stage_run:
            continue
        history = client.get_metric_history(stage_run, f"{algo}/kl")
        if history:
            ax.plot([m.step for m in history], [m.value for m in history], label=label(r))
    ax.set_xlabel("iteration")
    ax.set_ylabel("KL to reference (nats)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def frontier_figure(runs):
    """Held-out reward (gold and proxy) against KL to the SFT policy, one point per member."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, marker in (("eval/gold_reward", "o"), ("eval/proxy_reward", "x")):
        points = [
            (r.data.metrics["eval/kl"], r.data.metrics[name], label(r))
            for r in runs
            if name in r.data.metrics and "eval/kl" in r.data.metrics
        ]
        if points:
            ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, label=name)
            for x, y, text in points:
                ax.annotate(text, (x, y), fontsize=6)
    ax.set_xlabel("KL(policy || SFT) on held-out prompts (nats)")
    ax.set_ylabel("held-out reward")
    ax.legend()
    fig.tight_layout()
    return fig


def sweep_frontier(runs) -> tuple[dict, object | None]:
    """Gao et al.'s forms fitted over a sweep's members: each member's held-out gain over SFT (gold, and
    proxy) against d = sqrt(eval/kl); the RL form over trained policies, the best-of-n form over
    best-of-n members (their d from the analytic KL). Metrics ``sweep/<gold|proxy>_<alpha|beta|r2|d_star>``
    (``sweep/bon_...`` for best-of-n) for the sweep's row, and the figure with the fitted curves."""
    from . import frontier

    points, fits, metrics = {}, {}, {}
    for family, form, kl_key in (("rl", "rl", "eval/kl"), ("bon", "bon", "eval/kl_analytic")):
        # best-of-n members are the ones whose KL has a closed form (eval/kl_analytic)
        members = [
            r for r in runs if ("eval/kl_analytic" in r.data.metrics) == (family == "bon") and kl_key in r.data.metrics
        ]
        for kind in ("gold", "proxy"):
            have = [r for r in members if f"eval/{kind}_gain" in r.data.metrics]
            if len(have) < 2:
                continue
            d = [0.0] + frontier.distance(
                [r.data.metrics[kl_key] for r in have]
            ).tolist()  # the SFT policy: no gain at d = 0
            gain = [0.0] + [r.data.metrics[f"eval/{kind}_gain"] for r in have]
            name = f"{kind} ({'best-of-n' if family == 'bon' else 'RL'})"
            points[name], fits[name] = (d, gain), frontier.fit(form, d, gain)
            metrics.update(fits[name].metrics(f"sweep/{'bon_' if family == 'bon' else ''}{kind}"))
    if not fits:
        return metrics, None
    return metrics, frontier.figure(
        points, fits, "held-out gain over SFT vs sqrt(KL): members and Gao et al.'s fitted forms"
    )
