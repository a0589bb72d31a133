"""What a pipeline run says about itself: its name, its MLflow link, and the Prefect artifacts beside it."""

from __future__ import annotations

from rlhf.config import PipelineConfig
from tasks.keys import short_key


def run_name(cfg: PipelineConfig, keys: dict[str, str]) -> str:
    """What tells this run apart from its neighbours: algo, beta, clip range where there is one, and the
    sweep member's number or a short policy key (``ppo-b0.05-c0.2-m3``, ``dpo-b0.3-7c1e2a``)."""
    algo = cfg.algo
    parts = [algo.algo] + [
        f"{tag}{getattr(algo, f):g}" for tag, f in (("b", "beta"), ("c", "clip_range")) if hasattr(algo, f)
    ]
    parts.append(f"m{cfg.sweep_member}" if cfg.sweep_member is not None else short_key(keys[algo.algo]))
    return "-".join(parts)


# MLflow's UI shows every experiment in its GenAI mode (traces) until the browser switches to "Model
# training"; this query parameter switches it, so the links we print open on the runs table.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def _ui(tracking_uri: str) -> str:
    return tracking_uri.rstrip("/") if tracking_uri.startswith("http") else "http://127.0.0.1:5000"


def experiment_link(tracking_uri: str, exp_id: str) -> str:
    """The experiment's runs table: on the tracking server, or on `mlflow ui` over the local store (port 5000)."""
    return f"{_ui(tracking_uri)}/#/experiments/{exp_id}?{MODEL_TRAINING_VIEW}"


def mlflow_link(tracking_uri: str, exp_id: str, run_id: str) -> str:
    """The run's page (same host as :func:`experiment_link`)."""
    return f"{_ui(tracking_uri)}/#/experiments/{exp_id}/runs/{run_id}?{MODEL_TRAINING_VIEW}"


def ui_hint(tracking_uri: str) -> str:
    return "" if tracking_uri.startswith("http") else f" (start it with `mlflow ui --backend-store-uri {tracking_uri}`)"


def publish(
    cfg: PipelineConfig, name: str, metrics: dict, tracking_uri: str, exp_id: str, run_id: str, cached: dict
) -> None:
    """Prefect artifacts of the flow run: a markdown summary, a table of the eval metrics, a link to MLflow."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    link = mlflow_link(tracking_uri, exp_id, run_id)
    stages = ", ".join(f"{k}: {'Cached' if v else 'ran'}" for k, v in cached.items())
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()))
    create_markdown_artifact(
        key="rlhf-summary",
        description="Held-out evaluation of this pipeline run",
        markdown=f"# {name}\n\nMLflow run: {link}{ui_hint(tracking_uri)}\n\nStages: {stages}\n\n| metric | value "
        f"|\n|---|---|\n{rows}\n",
    )
    create_table_artifact(
        key="rlhf-eval",
        description=f"{name}: held-out evaluation",
        table=[{"metric": k, "value": round(float(v), 6)} for k, v in sorted(metrics.items())],
    )
    create_link_artifact(
        key="rlhf-mlflow",
        link=link,
        link_text=f"MLflow run {name}",
        description=f"The parent MLflow run{ui_hint(tracking_uri)}",
    )
