"""A training stage placed on a work pool: this task holds the stage's cache key, a flow run of the stage
deployment (a worker on the GPU pool) does the training. Cached keys never reach this body, so a cached
stage is never dispatched."""

from __future__ import annotations

from prefect import task
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL

from rlhf.algorithms import training_stages
from rlhf.config import DispatchConfig, stage_kind
from rlhf.settings import ConfigError

from .records import read_record


class StageDispatchError(RuntimeError):
    """The stage's flow run on the work pool did not complete."""


def dispatched(dispatch: DispatchConfig, stage: str) -> bool:
    """Does ``stage`` run on the work pool (``dispatch.mode=deployments`` and a training stage it lists)?"""
    chosen = dispatch.stages if dispatch.stages is not None else training_stages()
    return dispatch.mode == "deployments" and stage_kind(stage) in chosen


def check_stage_deployment(dispatch: DispatchConfig) -> None:
    """Before any stage: the stage deployment exists on a Prefect server that outlives this process."""
    url = PREFECT_API_URL.value()
    if not url:
        raise ConfigError(
            "dispatch=pools sends training stages to a work pool, which needs a Prefect server: PREFECT_API_URL "
            "is not set. Fix: `prefect server start`, export PREFECT_API_URL=http://127.0.0.1:4200/api, "
            "`make deploy`; or run with dispatch=local."
        )
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(dispatch.deployment)
        except ObjectNotFound:
            raise ConfigError(
                f"dispatch.deployment={dispatch.deployment!r} does not exist on {url}. Fix: run `make deploy` "
                f"(python -m flows.deploy) against that server, or pass dispatch=local."
            ) from None


@task(name="dispatch")
def dispatch_stage(
    stage: str, key: str, env: dict, inputs: dict, dispatch: dict, flow_run_name: str, fresh: bool = False
) -> dict:
    """Run ``stage`` as a flow run ``flow_run_name`` of ``dispatch['deployment']``, wait for it, return its record.
    A stage on several machines asks the pool's job template for that many pods (its ``machines`` variable)."""
    machines = env["runtime"]["num_machines"]
    job_variables = {**(dispatch["job_variables"] or {}), **({"machines": machines} if machines > 1 else {})}
    flow_run = run_deployment(
        dispatch["deployment"],
        flow_run_name=flow_run_name,
        parameters={
            "stage": stage,
            "key": key,
            "env": env,
            "inputs": inputs,
            "fresh": fresh,
            "concurrency_tag": dispatch["concurrency_tag"],
        },
        job_variables=job_variables or None,
        timeout=dispatch["timeout_s"],
        poll_interval=dispatch["poll_s"],
        tags=[f"stage:{stage}"],
    )
    state = flow_run.state
    if state is None or not state.is_completed():
        raise StageDispatchError(
            f"stage {stage} ran as flow run {flow_run.name} ({flow_run.id}) of {dispatch['deployment']} and ended "
            f"{state.name if state else 'without a state'}: {state.message if state else ''}. Fix: read that flow "
            f"run's "
            f"logs (prefect flow-run logs {flow_run.id}); is a worker polling its pool (prefect worker start --pool "
            f"...)?"
        )
    return read_record(env["root"], stage, key)
