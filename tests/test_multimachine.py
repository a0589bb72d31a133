"""The multi-machine launch recipes: the Kubernetes manifests render and compose the run they promise, and the Slurm
script gives each machine the pipeline command with its own node rank and machine 0's rendezvous."""

import contextlib
import io
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from flows.compose import load_config
from flows.multinode import main as render_main
from rlhf.settings import ConfigError
from rlhf.validate import validate

PROJECT = Path(__file__).resolve().parents[1]


def rendered(*argv: str) -> list[dict]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        render_main(list(argv))
    return list(yaml.safe_load_all(out.getvalue()))


def composed(args: list[str], **env: str) -> object:
    """The config a machine composes from a pod's or task's pipeline arguments, with its environment."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return validate(load_config(args))
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_kubernetes_manifests_give_each_machine_a_pod_its_rank_and_pod_0s_rendezvous():
    service, job = rendered(
        "--name", "rlhf-7b", "--nodes", "2", "--gpus-per-node", "8", "--image", "rlhf:1", "--",
        "algo=ppo", "runtime.strategy=fsdp",
    )  # fmt: skip
    assert (service["kind"], job["kind"]) == ("Service", "Job")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["ports"][0]["port"] == 29400
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 2
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert pod["subdomain"] == service["metadata"]["name"] == "rlhf-7b"  # pod 0 is rlhf-7b-0.rlhf-7b
    (term,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"  # one pod per machine
    (container,) = pod["containers"]
    assert (
        container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"] == 8
    )
    env = {e["name"]: e["value"] for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    assert mounts["rlhf-home"] == env["RLHF_HOME"] == "/rlhf" and claims["rlhf-home"] == "rlhf-home"
    assert container["command"] == ["python", "-m", "flows.pipeline"]
    for index in (0, 1):
        cfg = composed(container["args"], JOB_COMPLETION_INDEX=str(index), RLHF_HOME=env["RLHF_HOME"])
        assert cfg.runtime.node_rank == index and cfg.runtime.num_machines == 2 and cfg.runtime.num_processes == 8
        assert cfg.runtime.rdzv_endpoint == "rlhf-7b-0.rlhf-7b:29400" and cfg.runtime.strategy == "fsdp"
        assert cfg.paths.root == "/rlhf" and cfg.algo.algo == "ppo"


def test_a_bad_override_fails_before_any_manifest_is_printed(capsys):
    with pytest.raises(ConfigError, match="runtime.strategy"):
        rendered("--name", "r", "--nodes", "2", "--gpus-per-node", "8", "--image", "i", "--", "runtime.strategy=zero3")
    assert capsys.readouterr().out == ""


def test_slurm_script_gives_each_task_its_node_rank_and_the_first_machines_rendezvous(tmp_path):
    """``scontrol`` and ``srun`` stand in for Slurm's (``srun`` runs its command once per machine with that machine's
    SLURM_NODEID), ``python`` for the pipeline (it prints its arguments)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {
        "scontrol": 'printf "gpu-a\\ngpu-b\\n"',
        "srun": 'while [[ "$1" == --* ]]; do shift; done\n'
        'for i in 0 1; do SLURM_NODEID=$i "$@" > "$OUT/task-$i.json"; done',
        "python": 'printf "%s\\n" "$@" | python3 -c "import json,sys; print(json.dumps(sys.stdin.read().split()))"',
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "OUT": str(tmp_path),
        "RLHF_HOME": str(tmp_path / "home"),
        "SLURM_JOB_NODELIST": "gpu-[a-b]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_GPUS_ON_NODE": "8",
    }
    script = PROJECT / "deploy" / "slurm-multinode.sbatch"
    subprocess.run(["bash", str(script), "algo=dpo", "runtime.strategy=fsdp"], env=env, check=True, timeout=60)
    for rank in (0, 1):
        args = json.loads((tmp_path / f"task-{rank}.json").read_text())
        assert args[:2] == ["-m", "flows.pipeline"]
        cfg = composed(args[2:], RLHF_HOME=env["RLHF_HOME"])
        assert cfg.runtime.node_rank == rank and cfg.runtime.num_machines == 2 and cfg.runtime.num_processes == 8
        assert cfg.runtime.rdzv_endpoint == "gpu-a:29400" and cfg.algo.algo == "dpo"


def test_the_gpu_pool_gives_a_stage_an_indexed_job_of_its_machines(monkeypatch):
    """The work pool's job template makes a stage's Job one pod per machine (the ``machines`` variable, 1 unless
    set), each pod entering through flows.stage_pod with the worker's command; the dispatcher sets ``machines`` from
    runtime.num_machines, and only on several machines (a process pool knows no such variable)."""
    import types

    import tasks.dispatch as dispatch

    template = json.loads((PROJECT / "deploy" / "kubernetes-gpu-job-template.json").read_text())
    job = template["job_configuration"]["job_manifest"]["spec"]
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"] == "{{ machines }}"
    container = job["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "flows.stage_pod"] and container["args"] == "{{ command }}"
    assert template["variables"]["properties"]["machines"]["default"] == 1

    asked = []
    done = types.SimpleNamespace(state=types.SimpleNamespace(is_completed=lambda: True), name="r", id="1")
    monkeypatch.setattr(dispatch, "run_deployment", lambda *a, **kw: asked.append(kw["job_variables"]) or done)
    monkeypatch.setattr(dispatch, "read_record", lambda *a: {})
    pool = {"deployment": "rlhf-stage/gpu", "concurrency_tag": "gpu", "timeout_s": 1, "poll_s": 1}
    for machines, job_variables in ((1, {}), (1, {"gpus": 8}), (4, {"gpus": 8})):
        env = {"root": "/rlhf", "runtime": {"num_machines": machines}}
        dispatch.dispatch_stage.fn("sft", "k", env, {}, {**pool, "job_variables": job_variables}, "sft-k")
    assert asked == [None, {"gpus": 8}, {"gpus": 8, "machines": 4}]


def test_a_stage_on_several_machines_from_a_pool_is_checked_before_it_starts():
    pools = ["dispatch=pools", "runtime.num_machines=2"]
    with pytest.raises(ConfigError, match="runtime.rdzv_endpoint=auto"):
        validate(load_config([*pools, "runtime.rdzv_endpoint=node-0:29400"]))
    with pytest.raises(ConfigError, match=r"\['reward'\] would train here"):
        validate(load_config([*pools, "algo=ppo", "runtime.rdzv_endpoint=auto", "dispatch.stages=[sft,ppo]"]))
    with pytest.raises(ConfigError, match=r"\['dpo', 'reward', 'sft'\] would train here"):
        validate(load_config([*pools, "runtime.rdzv_endpoint=auto", "dispatch.stages=[]"]))
    validate(load_config([*pools, "runtime.rdzv_endpoint=auto"]))


def test_auto_rendezvous_is_machine_0s_address_and_never_loopback(monkeypatch):
    import socket

    from rlhf.config import RuntimeConfig
    from rlhf.launch import StageLaunchError, rendezvous_endpoint

    rt = RuntimeConfig(num_machines=2, rdzv_endpoint="auto")
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "10.4.0.7")
    host, port = rendezvous_endpoint(rt).split(":")
    assert host == "10.4.0.7" and int(port) > 0
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "127.0.1.1")
    with pytest.raises(StageLaunchError, match="runtime.rdzv_endpoint=<address of machine 0>"):
        rendezvous_endpoint(rt)


def test_a_joining_machine_takes_only_its_launch_and_gives_up_when_machine_0_ended(tmp_path, monkeypatch):
    """A spec left by a killed machine 0 is not joined (another launch id); a newer one of the expected launch is;
    and a machine 0 whose run ended without launching stops the wait at the next question, not after an hour."""
    import threading
    import time

    import cloudpickle

    import rlhf.launch as launch
    from rlhf.checkpoint import atomic_write_bytes
    from rlhf.config import RuntimeConfig

    spec = tmp_path / "spec.pkl"
    spec.write_bytes(cloudpickle.dumps({"rdzv_endpoint": "10.0.0.1:1", "launch_id": "old"}))
    newer = cloudpickle.dumps({"rdzv_endpoint": "h:2", "launch_id": "new"})
    writer = threading.Timer(1.0, lambda: atomic_write_bytes(spec, newer))  # as machine 0 writes it: never torn
    writer.start()
    assert launch._wait_for_spec(spec, 1, 30.0, "new", None)["rdzv_endpoint"] == "h:2"
    monkeypatch.setattr(launch, "RUNNING_POLL_S", 0.2)
    started = time.monotonic()
    with pytest.raises(launch.StageLaunchError, match="ended before it launched"):
        launch.join_launch(tmp_path / "stage", RuntimeConfig(num_machines=2, node_rank=1), 60.0, "x", lambda: False)
    assert time.monotonic() - started < 10
