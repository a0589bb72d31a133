"""A training stage placed on a work pool: this task holds the stage's cache key, a flow run of the stage
deployment (a worker on the GPU pool) does the training. Cached keys never reach this body, so a cached
stage is never dispatched."""

from __future__ import annotations

from prefect import task
from prefect.deployments import run_deployment

from .runner import read_record


class StageDispatchError(RuntimeError):
    """The stage's flow run on the work pool did not complete."""


@task(name="dispatch")
def dispatch_stage(stage: str, key: str, env: dict, inputs: dict, dispatch: dict, fresh: bool = False) -> dict:
    """Run ``stage`` as a flow run of ``dispatch['deployment']``, wait for it, return its record."""
    flow_run = run_deployment(
        dispatch["deployment"],
        parameters={"stage": stage, "key": key, "env": env, "inputs": inputs, "fresh": fresh,
                    "concurrency_tag": dispatch["concurrency_tag"]},
        job_variables=dispatch["job_variables"] or None,
        timeout=dispatch["timeout_s"],
        poll_interval=dispatch["poll_s"],
        tags=[f"stage:{stage}"],
    )
    state = flow_run.state
    if state is None or not state.is_completed():
        raise StageDispatchError(
            f"stage {stage} ran as flow run {flow_run.name} ({flow_run.id}) of {dispatch['deployment']} and ended "
            f"{state.name if state else 'without a state'}: {state.message if state else ''}. Fix: read that flow run's "
            f"logs (prefect flow-run logs {flow_run.id}); is a worker polling its pool (prefect worker start --pool ...)?"
        )
    return read_record(env["root"], stage, key)
