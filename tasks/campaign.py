"""The campaign round's own stages, each a cached, tracked step as every stage is (:func:`tasks.runner.run_stage`):
the champion it starts from, the pairs it asks about, their labels, the preference store's next version, and
the gate's decision. Training and evaluation are the pipeline's own tasks."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import task

from rlhf import champion as registry_alias
from rlhf.config import EvalConfig, RolloutConfig
from rlhf.config_campaign import CampaignConfig
from rlhf.data import load_split, save_splits
from rlhf.gate import decide
from rlhf.labellers import FolderLabeller, JudgeLabeller, SyntheticLabeller, digest
from rlhf.lineage import EVALUATION, TRAINING
from rlhf.settings import from_dict
from rlhf.stages import pairs, preferences
from rlhf.synthetic import gold_reward

from .records import read_record
from .runner import Lineage, run_stage


@task(name="champion")
def champion_stage(key: str, env: dict, sft: dict, model_name: str, campaign: str, fresh: bool = False) -> dict:
    """The policy this round starts from: the version the registry alias names, else SFT. Cached per round, so a
    round re-run starts from the champion it started from, whatever the alias says now."""

    def body(ctx):
        version = registry_alias.campaign_champion(MlflowClient(env["tracking_uri"]), model_name, campaign)
        if version is None:
            return {**_model_fields(sft), "version": None, "model_key": sft["cache_key"], "metrics": {}}
        made = read_record(env["root"], version.tags["stage"], version.tags["cache_key"])
        ctx.sink.log_metrics({"champion/version": float(version.version)}, 0)
        return {**_model_fields(made), "version": str(version.version), "model_key": made["cache_key"], "metrics": {}}

    return run_stage("champion", key, env, fresh, body)


def _model_fields(record: dict) -> dict:
    return {k: record[k] for k in ("model_path", "model_uri") if k in record}


@task(name="pairs")
def pairs_stage(
    key: str,
    env: dict,
    data: dict,
    champion: dict,
    round_no: int,
    campaign: dict,
    eval_cfg: dict,
    max_length: int,
    rollout: dict,
    fresh: bool = False,
) -> dict:
    """The champion's two answers to each of the round's fresh prompts."""
    c, e = from_dict(CampaignConfig, campaign), from_dict(EvalConfig, eval_cfg)
    body = lambda ctx: pairs.run(  # noqa: E731
        data["data_dir"],
        champion["model_path"],
        round_no,
        c.prompts_per_round,
        e,
        max_length,
        from_dict(RolloutConfig, rollout),
        ctx,
    )
    lineage = Lineage(data["datasets"], {"ppo_prompts": TRAINING}, {"champion": champion})
    return run_stage("pairs", key, env, fresh, body, seed=e.seed, lineage=lineage)


def labeller_for(
    c: CampaignConfig, data_cfg: dict, round_no: int, conversational: bool, root: str, judge: dict | None, device
):
    if c.labeller == "synthetic":
        return SyntheticLabeller(
            data_cfg["annotator_temperature"], data_cfg["annotator_length_bias"], data_cfg["seed"], round_no
        )
    if c.labeller == "judge":
        gold = gold_reward if data_cfg["source"] == "synthetic" else None
        return JudgeLabeller(judge["model_path"], judge["max_length"], device, judge["missing_eos_penalty"], gold)
    return FolderLabeller(inbox_dir(c, root), round_no, conversational)


def inbox_dir(c: CampaignConfig, root: str) -> Path:
    """Where people drop labelled JSONL files for campaign ``c`` (``campaign.inbox``)."""
    return Path(c.inbox) if c.inbox else Path(root) / "campaigns" / c.name / "inbox"


@task(name="labels")
def labels_stage(
    key: str,
    env: dict,
    pairs: dict,
    round_no: int,
    campaign: dict,
    data_cfg: dict,
    conversational: bool,
    judge: dict | None = None,
    fresh: bool = False,
) -> dict:
    """The round's pairs labelled by ``campaign.labeller`` (``judge``: the judge's record and how it scores, with
    labeller=judge)."""
    c = from_dict(CampaignConfig, campaign)

    def body(ctx):
        labeller = labeller_for(c, data_cfg, round_no, conversational, env["root"], judge, ctx.device)
        rows, metrics = labeller.label(load_split(Path(pairs["requests"]).parent, "requests"))
        files = metrics.pop("files", {})
        save_splits({"labels": rows}, ctx.out_dir)
        ctx.sink.log_metrics(metrics, 0)
        path = ctx.out_dir / "labels.jsonl"
        return {"labels": str(path), "digest": digest(path.read_bytes()), "files": files, "metrics": metrics}

    return run_stage("labels", key, env, fresh, body)


@task(name="preferences")
def preferences_stage(key: str, env: dict, previous: dict, labels: dict, label: str, fresh: bool = False) -> dict:
    """The preference store's next version: ``previous``'s pairs and this round's labels."""
    body = lambda ctx: preferences.run(previous["data_dir"], labels["labels"], label, ctx)  # noqa: E731
    lineage = Lineage(None, {"pref": TRAINING, "eval_pref": EVALUATION})
    return run_stage("preferences", key, env, fresh, body, lineage=lineage)


@task(name="gate")
def gate_stage(
    key: str,
    env: dict,
    comparison: dict,
    challenger: dict,
    champion: dict,
    campaign: dict,
    kind: str,
    model_name: str,
    round_no: int,
    fresh: bool = False,
) -> dict:
    """Promote the challenger (the alias ``champion``) or reject it, with the evidence on its registry version."""
    c = from_dict(CampaignConfig, campaign)

    def body(ctx):
        decision = decide(comparison["metrics"], kind, c.gate_z, c.kl_budget)
        context = {
            "campaign": c.name,
            "campaign.round": round_no,
            "gate.champion_version": champion["version"] or "sft",
        }
        decision = registry_alias.record_decision(
            MlflowClient(env["tracking_uri"]), model_name, challenger["version"], decision, context, champion["version"]
        )
        ctx.sink.log_metrics({"gate/promoted": float(decision.promote)}, 0)
        ctx.sink.set_tags(
            {"gate.decision": "promoted" if decision.promote else "rejected", "gate.reason": decision.reason}
        )
        winner = challenger if decision.promote else champion
        new_champion = {
            **_model_fields(winner),
            "version": challenger["version"] if decision.promote else champion["version"],
        }
        return {
            "promoted": decision.promote,
            "reason": decision.reason,
            "evidence": decision.evidence,
            "champion": new_champion,
            "metrics": {"gate/promoted": float(decision.promote)},
        }

    return run_stage("gate", key, env, fresh, body)
