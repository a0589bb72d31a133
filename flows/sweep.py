"""Hydra multirun: one MLflow row per sweep, its members nested under it, its summary on that row
(members table, KL curves, reward-vs-KL frontier, and Gao et al.'s forms fitted to it: alpha, beta, R^2, d*).

Every member of one multirun derives the same sweep id from the sweep folder. The sweep's run is made
once (by the callback when the multirun starts, or by the first member to need it: a file lock in
``paths.root`` keeps parallel members, joblib's or separate processes', from making two); each member's
parent run is its child, and each member's stage runs are children of that. When the multirun ends the
callback logs the members' table, their KL curves and the reward-vs-KL frontier on the sweep's run.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

from filelock import FileLock
from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
SWEEP_ROW_TAG = "rlhf.sweep"


def sweep_id_for(sweep_dir: str) -> str:
    """All members of one multirun share its sweep folder, so they derive the same id from it."""
    resolved = str(Path(sweep_dir).resolve())
    return f"sweep-{Path(resolved).name}-{hashlib.sha1(resolved.encode()).hexdigest()[:8]}"


def sweep_run(client: MlflowClient, experiment_id: str, sweep_id: str, root: Path, name: str) -> str:
    """The id of the sweep's MLflow run, made by the first caller (``name``, RUNNING until the summary)."""
    from rlhf.tracking import RunLogger

    query = f"tags.sweep_id = '{sweep_id}' and tags.`{SWEEP_ROW_TAG}` = 'true'"
    (root / "locks").mkdir(parents=True, exist_ok=True)
    with FileLock(root / "locks" / f"{sweep_id}.lock"):
        found = client.search_runs([experiment_id], query, max_results=1)
        if found:
            return found[0].info.run_id
        return RunLogger.create(client, experiment_id, name, {"sweep_id": sweep_id, SWEEP_ROW_TAG: "true"}).run_id


def swept_keys(config: DictConfig) -> list[str]:
    """The keys a multirun varies: comma lists / sweep functions on the command line, or the sweeper's params."""
    overrides = [
        o.split("=", 1) for o in OmegaConf.select(config, "hydra.overrides.task", default=[]) or [] if "=" in o
    ]
    keys = [k for k, v in overrides if "," in v or v.startswith(("range(", "choice(", "interval(", "glob("))]
    return keys + [k for k in (OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}) if k not in keys]


class _Sweep:
    """The sweep's tracking context, from the multirun's config."""

    def __init__(self, config: DictConfig) -> None:
        from rlhf.config import TrackingConfig
        from rlhf.settings import from_dict
        from rlhf.tracking import experiment_id, resolve_uri

        self.sweep_id = sweep_id_for(config.hydra.sweep.dir)
        self.root = Path(OmegaConf.select(config, "paths.root")).expanduser().resolve()
        tracking = from_dict(TrackingConfig, OmegaConf.to_container(config.tracking, resolve=True))
        uri = resolve_uri(tracking, self.root)
        self.client = MlflowClient(uri)
        self.experiment_id = experiment_id(self.client, tracking.experiment, self.root, uri)
        algo = OmegaConf.select(config, "algo.algo", default="policy")
        varied = "x".join(k.rsplit(".", 1)[-1] for k in swept_keys(config)) or "members"
        self.name = f"sweep-{algo}-{varied}-{time.strftime('%m%d-%H%M%S')}"

    def run_id(self) -> str:
        return sweep_run(self.client, self.experiment_id, self.sweep_id, self.root, self.name)


class SweepSummary(Callback):
    """Opens the sweep's MLflow run when a multirun starts; logs its summary and closes it when it ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep = _Sweep(config)
        log.info("sweep %s: MLflow run %s", sweep.sweep_id, sweep.run_id())

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from rlhf.reports import frontier_figure, kl_curves_figure, member_table, sweep_frontier, sweep_members
        from rlhf.tracking import RunLogger

        sweep = _Sweep(config)
        summary = RunLogger(sweep.client, sweep.run_id())
        runs = sweep_members(sweep.client, sweep.experiment_id, sweep.sweep_id)
        if not runs:
            log.warning("sweep %s: no finished member runs to summarise", sweep.sweep_id)
            summary.finish("FAILED")
            return
        summary.log_table(member_table(runs), "sweep/members.json")
        summary.log_figure(kl_curves_figure(sweep.client, runs), "sweep/kl_curves.png")
        summary.log_figure(frontier_figure(runs), "sweep/reward_vs_kl.png")
        fitted, figure = sweep_frontier(runs)
        if figure is not None:
            summary.log_figure(figure, "sweep/frontier_fit.png")
            summary.log_metrics(fitted, step=0)
        summary.log_params({"n_members": len(runs), "swept": ",".join(swept_keys(config))})
        summary.set_tags({"sweep_summary": "true"})
        summary.finish()
        log.info("sweep %s: summary on run %s over %d members", sweep.sweep_id, summary.run_id, len(runs))
