"""Hydra multirun support: one sweep id for all members, and a summary run when the sweep ends."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def sweep_id_for(sweep_dir: str) -> str:
    """All members of one multirun share its sweep folder, so they derive the same id from it."""
    resolved = str(Path(sweep_dir).resolve())
    return f"sweep-{Path(resolved).name}-{hashlib.sha1(resolved.encode()).hexdigest()[:8]}"


class SweepSummary(Callback):
    """At the end of a multirun, log the members' table, KL curves and reward-vs-KL frontier to a summary run."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from mlflow.tracking import MlflowClient

        from rlhf.config import TrackingConfig, from_dict
        from rlhf.reports import frontier_figure, kl_curves_figure, member_table, sweep_members
        from rlhf.tracking import RunLogger, resolve_uri

        sweep_id = sweep_id_for(config.hydra.sweep.dir)
        root = Path(OmegaConf.select(config, "paths.root")).expanduser().resolve()
        tracking = from_dict(TrackingConfig, OmegaConf.to_container(config.tracking, resolve=True))
        client = MlflowClient(resolve_uri(tracking, root))
        experiment = client.get_experiment_by_name(tracking.experiment)
        runs = sweep_members(client, experiment.experiment_id, sweep_id) if experiment else []
        if not runs:
            log.warning("sweep %s: no finished member runs to summarise", sweep_id)
            return
        summary = RunLogger.create(client, experiment.experiment_id, f"{sweep_id}-summary", {"sweep_id": sweep_id, "sweep_summary": "true"})
        stage = runs[0].data.tags.get("algo", "ppo")
        summary.log_table(member_table(runs), "sweep/members.json")
        summary.log_figure(kl_curves_figure(client, runs, stage), "sweep/kl_curves.png")
        summary.log_figure(frontier_figure(runs), "sweep/reward_vs_kl.png")
        summary.log_params({"n_members": len(runs)})
        summary.finish()
        log.info("sweep %s: summary run %s over %d members", sweep_id, summary.run_id, len(runs))
