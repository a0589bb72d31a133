"""What each pod of a training stage's Kubernetes Job runs (``deploy/kubernetes-gpu-job-template.json``).

    python -m flows.stage_pod <the worker's command>

The GPU pool's job template makes a stage's Job an Indexed Job of ``machines`` pods (the job variable the
pipeline sets from ``runtime.num_machines``). Pod 0 runs the worker's command, the stage's flow run: it is machine
0 of the stage and hosts the rendezvous. Pods 1 to N-1 read the flow run's parameters (the stage, its cache key,
the pipeline's ``env``) from the Prefect API and join the launch machine 0 starts in the stage's folder on the
shared ``paths.root`` (:func:`rlhf.launch.join_launch`), as machine ``JOB_COMPLETION_INDEX``: only the launch of
their flow run (its id is the launch's id), and none once the flow run has ended without launching. One machine:
pod 0 alone, the worker's command as before.
"""

from __future__ import annotations

import os
import sys


def flow_run_parameters(flow_run_id: str) -> dict:
    """The parameters of the stage's flow run (stage, key, env, ...), from the Prefect API."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).parameters


def still_running(flow_run_id: str) -> bool:
    """Is the stage's flow run (machine 0) not yet in a final state?"""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
    return state is None or not state.is_final()


def join_stage(flow_run_id: str, parameters: dict, node_rank: int) -> None:
    """Machine ``node_rank``'s processes of the stage the flow run trains (machine 0 runs the flow run): only the
    launch of this flow run, and none once the flow run has ended without one."""
    import dataclasses

    from rlhf.config import RuntimeConfig
    from rlhf.launch import join_launch
    from rlhf.settings import from_dict
    from tasks.records import stage_dir

    env = parameters["env"]
    runtime = dataclasses.replace(from_dict(RuntimeConfig, env["runtime"]), node_rank=node_rank)
    folder = stage_dir(env["root"], parameters["stage"], parameters["key"])
    print(f"machine {node_rank} of {runtime.num_machines}: {parameters['stage']} ({folder})", flush=True)
    join_launch(folder, runtime, launch_id=flow_run_id, running=lambda: still_running(flow_run_id))


def main(argv: list[str]) -> None:
    from rlhf.launch import LAUNCH_ID_ENV

    index = int(os.environ.get("JOB_COMPLETION_INDEX", "0"))
    flow_run_id = os.environ.get("PREFECT__FLOW_RUN_ID")
    if index == 0:
        if not argv:
            raise SystemExit("usage: python -m flows.stage_pod <the worker's command>")
        if flow_run_id:  # the other pods join the launch of this flow run only
            os.environ[LAUNCH_ID_ENV] = flow_run_id
        os.execvp(argv[0], argv)  # the flow run itself
    if not flow_run_id:
        raise SystemExit(
            f"pod {index} of a stage's Job needs PREFECT__FLOW_RUN_ID (the Prefect worker sets it in the Job). "
            f"Fix: start the Job from the work pool's template (deploy/kubernetes-gpu-job-template.json)."
        )
    join_stage(flow_run_id, flow_run_parameters(flow_run_id), index)


if __name__ == "__main__":
    main(sys.argv[1:])
