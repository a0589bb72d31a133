"""Continuous alignment: a campaign of rounds, each one flow run of ``rlhf-round``, every step a cached stage.

    python -m flows.campaign [hydra overrides]        e.g. campaign.rounds=3 experiment=micro
    python -m flows.rollback VERSION --reason TEXT    move the alias champion back (flows.rollback)

A round: the champion (the registry alias ``champion``, SFT before any promotion) answers the round's fresh
prompts twice; the labeller orders each pair; the preference store gains them (a new dataset version); the
reward model retrains on every label so far; a challenger trains (``algo``) from the champion or SFT; it is
compared with the champion on held-out prompts (paired, with standard errors); the gate promotes it or rejects
it with the reason (:mod:`rlhf.gate`, :mod:`rlhf.champion`). Keys after the labels are the labels' content: the
same labels give the same reward model and challenger, new ones new; a round without new labels trains nothing.
A round done is never run again (its promotions are made); a failed one re-runs from its failed stage.
"""

from __future__ import annotations

import tasks  # noqa: F401  (Prefect's defaults, set in tasks/__init__.py, before Prefect is imported)

# isort: split

import logging

import hydra
from omegaconf import DictConfig
from prefect import flow, get_run_logger
from prefect.runtime import flow_run as prefect_run

from flows.campaign_run import CampaignRun, round_records, write_round_record
from flows.compose import CONF_DIR, to_container
from flows.dag import Stages
from flows.stage import training_task
from rlhf.algorithms import registry
from rlhf.champion import champion_version
from rlhf.config import JUDGE, PipelineConfig
from rlhf.data import dataset_label, is_conversational
from rlhf.gate import gain_kind
from rlhf.preflight import preflight
from rlhf.settings import ConfigError, to_dict
from rlhf.validate import validate
from tasks.campaign import champion_stage, gate_stage, labels_stage, pairs_stage, preferences_stage
from tasks.data import data_stage
from tasks.evaluate import eval_stage
from tasks.keys import pipeline_keys, round_stage_configs, stage_configs, stage_key


def check_campaign(cfg: PipelineConfig) -> None:
    """What a campaign needs beyond a pipeline's config, before any stage starts."""
    c, t = cfg.campaign, cfg.tracking
    if not (t.policy_model_name and t.log_models):
        raise ConfigError(
            "a campaign promotes registered policy versions: tracking.policy_model_name is null or "
            "tracking.log_models=false. Fix: leave both at their defaults (rlhf-policy, true)."
        )
    if registry()[cfg.algo.algo].sampler is not None:
        raise ConfigError(
            f"algo={cfg.algo.algo} is a way of sampling SFT, not a trained policy: there is no version to promote. "
            f"Fix: a training algorithm (dpo, ppo, rloo, grpo)."
        )
    if c.labeller == "synthetic" and cfg.data.source != "synthetic":
        raise ConfigError(
            f"campaign.labeller=synthetic simulates the synthetic task's annotators; data.source={cfg.data.source}. "
            f"Fix: campaign.labeller=folder (people drop labels into campaign.inbox) or campaign.labeller=judge (a "
            f"reward model trained on the data's held-out pairs labels them)."
        )


class Round:
    """One round's stages in order, each key derived from the config and its upstream keys or contents."""

    def __init__(self, cfg: PipelineConfig, stage: Stages, round_no: int, previous: dict | None) -> None:
        self.cfg, self.stage, self.round_no, self.previous = cfg, stage, round_no, previous
        self.sections = {**stage_configs(cfg), **round_stage_configs(cfg, round_no)}
        self.kind = gain_kind(cfg.objective_metric())

    def call(self, name: str, upstream: list[str], task, **inputs) -> dict:
        """Stage ``name`` under its key: its part of the config (:func:`tasks.keys.round_stage_configs`) and the
        keys (or contents) upstream."""
        self.stage.keys[name] = stage_key(name, self.sections[name], upstream)
        return self.stage(name, task, **inputs)

    def run(self) -> dict:
        cfg, c, r = self.cfg, self.cfg.campaign, self.round_no
        base = pipeline_keys(cfg)
        self.stage.keys.update(data=base["data"], sft=base["sft"])
        data = self.stage("data", data_stage, data=to_dict(cfg.data))
        sft = self.stage("sft", training_task("sft"), model=to_dict(cfg.model), sft_cfg=to_dict(cfg.sft), data=data)
        name = cfg.tracking.policy_model_name
        champion = self.call("champion", [sft["cache_key"]], champion_stage, sft=sft, model_name=name, campaign=c.name)
        labels = self.labelled(data, sft, champion)
        if not labels["metrics"]["labels/n"]:  # nothing new to learn from: no challenger, nothing to gate
            return self.record(champion, labels, self.previous or {"store": data, "reward": None}, None)
        store = self.store(data, labels)
        reward, challenger = self.train(sft, champion, store)
        comparison = self.compare(sft, store, reward, challenger, champion)
        gate = self.call(
            "gate",
            [comparison["cache_key"]],
            gate_stage,
            comparison=comparison,
            challenger=challenger,
            champion=champion,
            campaign=to_dict(c),
            kind=self.kind,
            model_name=name,
            round_no=r,
        )
        return self.record(champion, labels, {"store": store, "reward": reward}, (challenger, comparison, gate))

    def labelled(self, data: dict, sft: dict, champion: dict) -> dict:
        cfg, c, r = self.cfg, self.cfg.campaign, self.round_no
        pairs = self.call(
            "pairs",
            [data["cache_key"], champion["model_key"]],
            pairs_stage,
            data=data,
            champion=champion,
            round_no=r,
            campaign=to_dict(c),
            eval_cfg=to_dict(cfg.eval),
            max_length=cfg.model.max_length,
            rollout=to_dict(cfg.rollout),
        )
        judge = self.judge(data, sft) if c.labeller == "judge" else None
        return self.call(
            "labels",
            [pairs["cache_key"], *([judge["cache_key"]] if judge else [])],
            labels_stage,
            pairs=pairs,
            round_no=r,
            campaign=to_dict(c),
            data_cfg=to_dict(cfg.data),
            conversational=is_conversational(data["data_dir"]),
            judge=judge
            and {
                "model_path": judge["model_path"],
                "max_length": cfg.model.max_length,
                "missing_eos_penalty": cfg.reward.missing_eos_penalty,
            },
        )

    def judge(self, data: dict, sft: dict) -> dict:
        """The campaign's judge (``campaign.labeller=judge``): a reward model from SFT with the reward config, trained
        on the data's held-out pairs, which no round's reward model learns from; the same in every round (Cached)."""
        return self.call(
            JUDGE,
            [data["cache_key"], sft["cache_key"]],
            training_task("reward"),
            model=to_dict(self.cfg.model),
            reward_cfg=to_dict(self.cfg.reward),
            data=data,
            sft=sft,
            judge=True,
        )

    def store(self, data: dict, labels: dict) -> dict:
        """The preference store's version for this round: the last one plus the labels (the same when none came)."""
        previous = self.previous["store"] if self.previous else data
        if not labels["metrics"]["labels/n"]:
            return previous
        return self.call(
            "preferences",
            [previous["cache_key"], labels["digest"]],
            preferences_stage,
            previous=previous,
            labels=labels,
            label=dataset_label(self.cfg.data),
        )

    def train(self, sft: dict, champion: dict, store: dict) -> tuple[dict, dict]:
        cfg, c, algo = self.cfg, self.cfg.campaign, self.cfg.algo.algo
        warm = c.reward_init == "warm" and self.previous and self.previous["reward"]
        init = self.previous["reward"] if warm else sft
        reward = self.call(
            "reward",
            [store["cache_key"], init["cache_key"]],
            training_task("reward"),
            model=to_dict(cfg.model),
            reward_cfg=to_dict(cfg.reward),
            data=store,
            sft=init,
        )
        start = {**champion, "cache_key": champion["model_key"]} if c.challenger_init == "champion" else sft
        scoring = {"has_gold": cfg.data.source == "synthetic", "missing_eos_penalty": cfg.reward.missing_eos_penalty}
        uses_reward = registry()[algo].needs_reward
        inputs = {"rewards": [reward], "rollout": to_dict(cfg.rollout), **scoring} if uses_reward else {}
        upstream = [start["cache_key"], store["cache_key"], *([reward["cache_key"]] if uses_reward else [])]
        challenger = self.call(
            algo,
            upstream,
            training_task(algo),
            model=to_dict(cfg.model),
            algo=to_dict(cfg.algo),
            data=store,
            sft=start,
            **inputs,
        )
        return reward, challenger

    def compare(self, sft: dict, store: dict, reward: dict, challenger: dict, champion: dict) -> dict:
        """The challenger against the champion on held-out prompts (round 1: against SFT, the champion then)."""
        cfg = self.cfg
        baseline = None if champion["version"] is None else champion
        upstream = [
            store["cache_key"],
            sft["cache_key"],
            reward["cache_key"],
            challenger["cache_key"],
            champion["model_key"],
        ]
        return self.call(
            "eval",
            upstream,
            eval_stage,
            model=to_dict(cfg.model),
            eval_cfg=to_dict(cfg.eval),
            data=store,
            sft=sft,
            rewards=[reward],
            policy=challenger,
            has_gold=cfg.data.source == "synthetic",
            missing_eos_penalty=cfg.reward.missing_eos_penalty,
            rollout=to_dict(cfg.rollout),
            baseline=baseline,
        )

    def record(self, champion: dict, labels: dict, learnt: dict, outcome: tuple | None) -> dict:
        """The round's record: what later rounds, the campaign's row and its figure read. ``learnt``: the store and
        reward model it leaves; ``outcome``: its challenger, comparison and gate (None: no new labels)."""
        store, reward = learnt["store"], learnt["reward"]
        challenger, comparison, gate = outcome or ({"version": None}, {"metrics": {}}, None)
        return {
            "round": self.round_no,
            "champion_before": champion["version"],
            "champion_after": gate["champion"]["version"] if gate else champion["version"],
            "champion_path": gate["champion"]["model_path"] if gate else champion["model_path"],
            "challenger_version": challenger["version"],
            "promoted": bool(gate and gate["promoted"]),
            "reason": gate["reason"] if gate else "no new labels: no challenger this round",
            "baseline": "sft" if champion["version"] is None else "champion",
            "n_labels": labels["metrics"]["labels/n"],
            "label_files": labels["files"],
            "store": {k: store[k] for k in ("cache_key", "run_id", "data_dir", "datasets")},
            "reward": reward and {k: reward[k] for k in ("cache_key", "model_path")},
            "metrics": comparison["metrics"],
            "keys": dict(self.stage.keys),
        }


@flow(name="rlhf-round", log_prints=True)
def rlhf_round(config: dict, round_no: int) -> dict:
    """Round ``round_no`` of the campaign ``config`` names (its earlier rounds must be done)."""
    logger = get_run_logger()
    cfg = validate(config)
    uri = preflight(cfg)
    campaign = CampaignRun.open(cfg, uri)
    run = campaign.round_run(round_no, prefect_run.id)
    previous = round_records(cfg)[round_no - 2] if round_no > 1 else None
    stage = Stages(cfg, {}, campaign.env(run), run, logger)
    try:
        record = Round(cfg, stage, round_no, previous).run()
    except BaseException:
        run.finish("FAILED")
        raise
    run.log_metrics(record["metrics"], step=0)
    run.set_tags({"gate.decision": "promoted" if record["promoted"] else "rejected", "gate.reason": record["reason"]})
    run.finish()
    write_round_record(cfg, record)
    word = "promoted" if record["promoted"] else "rejected"
    logger.info(
        "round %d: challenger version %s %s: %s", round_no, record["challenger_version"], word, record["reason"]
    )
    return record


@flow(name="rlhf-campaign", log_prints=True)
def rlhf_campaign(
    config: dict | None = None,
    overrides: list[str] | None = None,
    base_overrides: list[str] | None = None,
    next_round: bool = False,
) -> dict:
    """Rounds 1 .. ``campaign.rounds``, or, with ``next_round``, the round after the last one done (the deployments'
    runs). A round done is history: its record is returned, nothing of it runs again."""
    if config is None:
        from flows.compose import load_config

        config = load_config([*(base_overrides or []), *(overrides or [])])
    cfg = validate(config)
    check_campaign(cfg)
    uri = preflight(cfg)
    done = round_records(cfg)
    last = len(done) + 1 if next_round else cfg.campaign.rounds
    campaign = CampaignRun.open(cfg, uri)
    for record in done[:last]:  # history: a round done is never run again (its registry moves are made)
        get_run_logger().info("round %d: done (%s)", record["round"], record["reason"])
    try:
        records = done[:last] + [rlhf_round(config, r) for r in range(len(done) + 1, last + 1)]
    except BaseException:
        campaign.run.finish("FAILED")  # the rounds done keep their records; the same command continues
        raise
    version = champion_version(campaign.client, cfg.tracking.policy_model_name)  # the alias (a rollback counts)
    champion = str(version.version) if version else None
    campaign.summarise(records, gain_kind(cfg.objective_metric()), champion, set(range(len(done) + 1, last + 1)))
    return {"rounds": records, "champion": champion, "campaign_run_id": campaign.run.run_id}


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    config = to_container(cfg)
    valid = validate(config)
    done = round_records(valid)
    if len(done) >= cfg.campaign.rounds:  # every round asked for is done: their records, without starting Prefect
        from mlflow.tracking import MlflowClient

        version = champion_version(MlflowClient(preflight(valid)), valid.tracking.policy_model_name)
        result = {"rounds": done[: cfg.campaign.rounds], "champion": version and str(version.version)}
    else:
        result = rlhf_campaign(config)
    for r in result["rounds"]:
        word = "promoted" if r["promoted"] else "rejected"
        said = f"challenger v{r['challenger_version']} {word}: " if r["challenger_version"] else ""
        print(f"round {r['round']}: {r['n_labels']} labels, {said}{r['reason']}")
    print(f"champion: {result['champion'] or 'SFT (nothing promoted)'}")


if __name__ == "__main__":
    main()
