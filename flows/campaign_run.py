"""A campaign's MLflow rows and records (no Prefect here): one parent row per campaign, one child per round, each
round's record under ``paths.root/campaigns/<name>/round-<r>.json`` (what later rounds, the deployments and the
figure read), and the campaign's figure across rounds."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from rlhf import checkpoint
from rlhf.config import PipelineConfig
from rlhf.settings import flatten, to_dict
from rlhf.tracking import RunLogger, experiment_id, process_tags

KIND_TAG, CAMPAIGN_TAG, ROUND_TAG = "rlhf.kind", "campaign", "campaign.round"


def campaign_dir(cfg: PipelineConfig) -> Path:
    return Path(cfg.paths.root) / "campaigns" / cfg.campaign.name


def round_records(cfg: PipelineConfig) -> list[dict]:
    """The records of the rounds done, in order (round 1, 2, ... up to the first one missing)."""
    records = []
    while (path := campaign_dir(cfg) / f"round-{len(records) + 1}.json").is_file():
        records.append(json.loads(path.read_text()))
    return records


def write_round_record(cfg: PipelineConfig, record: dict) -> None:
    campaign_dir(cfg).mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_json(campaign_dir(cfg) / f"round-{record['round']}.json", record)


def _find_or_create(
    client: MlflowClient, exp_id: str, query: str, name: str, tags: dict, parent: str | None, params: dict | None = None
):
    """The run ``query`` finds (reopened and owned by this process), else a new one with ``params``."""
    found = client.search_runs([exp_id], query, max_results=1, order_by=["attributes.start_time ASC"])
    if not found:
        run = RunLogger.create(client, exp_id, name, tags, parent)
        run.log_params(params or {})
        return run
    run = RunLogger(client, found[0].info.run_id)
    client.update_run(run.run_id, status="RUNNING")
    run.set_tags(process_tags())
    return run


@dataclass
class CampaignRun:
    """The campaign's parent row in MLflow; its rounds are its children."""

    cfg: PipelineConfig
    uri: str
    client: MlflowClient
    exp_id: str
    run: RunLogger

    @classmethod
    def open(cls, cfg: PipelineConfig, uri: str) -> CampaignRun:
        client = MlflowClient(uri)
        exp_id = experiment_id(client, cfg.tracking.experiment, Path(cfg.paths.root), uri)
        name = cfg.campaign.name
        query = f"tags.`{KIND_TAG}` = 'campaign' and tags.`{CAMPAIGN_TAG}` = '{name}'"
        tags = {KIND_TAG: "campaign", CAMPAIGN_TAG: name, "algo": cfg.algo.algo, **cfg.tags}
        run = _find_or_create(client, exp_id, query, f"campaign-{name}", tags, None)
        return cls(cfg, uri, client, exp_id, run)

    def round_run(self, round_no: int, flow_run_id: str | None) -> RunLogger:
        """Round ``round_no``'s row under the campaign's (a round run again reuses its row)."""
        name = self.cfg.campaign.name
        query = (
            f"tags.`{KIND_TAG}` = 'round' and tags.`{CAMPAIGN_TAG}` = '{name}' and tags.`{ROUND_TAG}` = '{round_no}'"
        )
        tags = {KIND_TAG: "round", CAMPAIGN_TAG: name, ROUND_TAG: str(round_no), "algo": self.cfg.algo.algo}
        params = flatten(to_dict(self.cfg))  # the first attempt's (a failed round may run again with fixes)
        run = _find_or_create(
            self.client, self.exp_id, query, f"{name}-round-{round_no}", tags, self.run.run_id, params
        )
        if flow_run_id:
            run.set_tags({"prefect.flow_run_id": flow_run_id})
        return run

    def env(self, round_run: RunLogger) -> dict:
        """What every stage task of a round is handed (as :meth:`flows.parent.PipelineRun.env`)."""
        return {
            "root": self.cfg.paths.root,
            "tracking_uri": self.uri,
            "experiment_id": self.exp_id,
            "parent_run_id": round_run.run_id,
            "run_name": f"{self.cfg.campaign.name}-round",
            "runtime": to_dict(self.cfg.runtime),
            "tracking": to_dict(self.cfg.tracking),
        }

    def summarise(self, records: list[dict], kind: str, champion: str | None, new: set[int]) -> None:
        """The numbers of the rounds this command ran (``new``) on the campaign row (step = round; a round without a
        challenger has none), the champion as the alias names it, and the figure over every round."""
        from rlhf.campaign_report import campaign_figure, round_metrics

        compared = [r for r in records if r["metrics"]]
        for record in compared:
            if record["round"] in new:
                self.run.log_metrics(round_metrics(record, kind), step=record["round"])
        self.run.set_tags({"campaign.rounds": str(len(records)), "campaign.champion_version": str(champion)})
        if compared:
            fig = campaign_figure(compared, kind)
            self.run.log_figure(fig, "campaign.png")
            import matplotlib.pyplot as plt

            plt.close(fig)
        self.run.finish()
