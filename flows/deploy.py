"""Create the pipeline's Prefect deployments: work pools, the tag concurrency limit, the pipeline deployment
(CPU pool, nightly cron) and the training-stage deployment (GPU pool). Idempotent: re-running updates them.

    python -m flows.deploy [hydra overrides of conf/deploy.yaml]       (make deploy)
    python -m flows.deploy --help                                      (this, and every setting with its default)

Needs PREFECT_API_URL pointing at a Prefect server (``prefect server start``); an ephemeral API forgets
everything when the process exits, so this refuses to run without one. Prefect is imported only to deploy.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from flows.compose import CONF_DIR, PROJECT_DIR
from rlhf.settings import ConfigError


def load_deploy_config(overrides: list[str] | None = None) -> dict:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="deploy", overrides=list(overrides or []))
    return OmegaConf.to_container(cfg, resolve=True)


def base_job_template(pool: dict, name: str) -> dict:
    if pool["base_job_template"]:
        path = Path(pool["base_job_template"])
        if not path.is_file():
            raise ConfigError(
                f"pools.{name}.base_job_template={path} does not exist. Fix: pass a JSON file "
                f"(e.g. deploy/kubernetes-gpu-job-template.json) or null for a process pool."
            )
        return json.loads(path.read_text())
    if pool["type"] != "process":
        raise ConfigError(
            f"pools.{name}.type={pool['type']} needs pools.{name}.base_job_template. Fix: pass its JSON "
            f"file (`prefect work-pool get-default-base-job-template --type {pool['type']}` prints a start)."
        )
    from prefect.workers.process import ProcessWorker

    return ProcessWorker.get_default_base_job_template()


def ensure_pools(client, pools: dict) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    for name, pool in pools.items():
        template = base_job_template(pool, name)
        try:
            client.read_work_pool(name)
            client.update_work_pool(
                name, WorkPoolUpdate(base_job_template=template, concurrency_limit=pool["concurrency_limit"])
            )
        except ObjectNotFound:
            client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type=pool["type"],
                    base_job_template=template,
                    concurrency_limit=pool["concurrency_limit"],
                )
            )


def deploy(cfg: dict) -> dict[str, str]:
    """Create or update everything; returns {deployment name: id}."""
    import tasks  # noqa: F401  (Prefect's defaults, set in tasks/__init__.py, before Prefect is imported)

    # isort: split
    from prefect.client.orchestration import get_client
    from prefect.schedules import Cron
    from prefect.settings import PREFECT_API_URL

    from flows.dag import rlhf_pipeline
    from flows.stage import rlhf_stage

    if not PREFECT_API_URL.value():
        raise ConfigError(
            "PREFECT_API_URL is not set: deployments need a Prefect server that outlives this process. "
            "Fix: `prefect server start` then `export PREFECT_API_URL=http://127.0.0.1:4200/api`."
        )
    flow_name, stage_name = cfg["dispatch"]["deployment"].split("/")
    if flow_name != rlhf_stage.name:
        raise ConfigError(
            f"dispatch.deployment={cfg['dispatch']['deployment']!r}: the stage flow is {rlhf_stage.name!r}. "
            f"Fix: pass dispatch.deployment={rlhf_stage.name}/{stage_name}."
        )
    source = cfg["source"] or str(PROJECT_DIR)
    with get_client(sync_client=True) as client:
        ensure_pools(client, cfg["pools"])
        conc = cfg["concurrency"]
        client.create_concurrency_limit(tag=conc["tag"], concurrency_limit=conc["limit"])
    stage, pipe, sched = cfg["stage"], cfg["pipeline"], cfg["pipeline"]["schedule"]
    common = dict(build=False, push=False, print_next_steps=False, ignore_warnings=True)
    stage_id = rlhf_stage.from_source(source, "flows/stage.py:rlhf_stage").deploy(
        name=stage_name,
        work_pool_name=stage["pool"],
        job_variables=stage["job_variables"],
        tags=stage["tags"],
        description="One training stage (SFT, a reward model or the policy stage); started by the pipeline with "
        "run_deployment.",
        **common,
    )
    cron = [Cron(sched["cron"], timezone=sched["timezone"], active=sched["active"])] if sched["cron"] else []
    pipeline_id = rlhf_pipeline.from_source(source, "flows/dag.py:rlhf_pipeline").deploy(
        name=pipe["name"],
        work_pool_name=pipe["pool"],
        job_variables=pipe["job_variables"],
        tags=pipe["tags"],
        parameters={"base_overrides": pipe["base_overrides"]},
        schedules=cron,
        description='The RLHF pipeline; its parameter `overrides` takes Hydra overrides: ["algo=ppo", ...].',
        **common,
    )
    campaign_id = deploy_campaign(cfg, source, common)
    return {
        cfg["dispatch"]["deployment"]: str(stage_id),
        f"{rlhf_pipeline.name}/{pipe['name']}": str(pipeline_id),
        f"rlhf-campaign/{cfg['campaign']['name']}": str(campaign_id),
    }


def deploy_campaign(cfg: dict, source: str, common: dict):
    """The campaign deployment: one round per flow run (the round after the last one done), on its cron schedule
    and whenever labels arrive for its campaign (the event :mod:`flows.labels` emits); one flow run at a time, the
    next one queued (a deployment concurrency limit of 1)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron

    from flows.campaign import rlhf_campaign
    from flows.compose import load_config
    from flows.labels import EVENT, resource_id

    camp, sched = cfg["campaign"], cfg["campaign"]["schedule"]
    name = load_config(camp["base_overrides"])["campaign"]["name"]  # the campaign the base overrides name
    parameters = {"base_overrides": camp["base_overrides"], "next_round": True}
    triggers = [
        DeploymentEventTrigger(
            name=f"labels arrived for campaign {name}",
            expect={EVENT},
            match={"prefect.resource.id": resource_id(name)},
            parameters=parameters,
        )
    ]
    cron = [Cron(sched["cron"], timezone=sched["timezone"], active=sched["active"])] if sched["cron"] else []
    return rlhf_campaign.from_source(source, "flows/campaign.py:rlhf_campaign").deploy(
        name=camp["name"],
        work_pool_name=camp["pool"],
        job_variables=camp["job_variables"],
        tags=camp["tags"],
        parameters=parameters,
        schedules=cron,
        triggers=triggers if camp["on_labels"] else [],
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        description=f"One round of the campaign {name!r} per run; never two at once (the next one waits).",
        **common,
    )


def main(argv: list[str]) -> None:
    if {"-h", "--help"} & set(argv):
        settings = OmegaConf.to_yaml(load_deploy_config())
        print(f"{__doc__.strip()}\n\nSettings (conf/deploy.yaml; override any with key=value):\n\n{settings}")
        return
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    cfg = load_deploy_config(argv)
    ids = deploy(cfg)
    for name, dep_id in ids.items():
        print(f"deployment {name}: {dep_id}")
    pools = " and ".join(f"`prefect worker start --pool {p}`" for p in cfg["pools"])
    pipeline = next(name for name in ids if name != cfg["dispatch"]["deployment"])
    print(
        f"tag limit: {cfg['concurrency']['tag']}={cfg['concurrency']['limit']}. Start {pools}, then "
        f"`prefect deployment run {pipeline}`."
    )


if __name__ == "__main__":
    main(sys.argv[1:])
