"""FSDP2 (``runtime.strategy=fsdp``): two gloo processes on CPU train what DDP trains, from sharded checkpoints
that resume on another number of processes, and a stage killed mid-run resumes from its shards.

The supervised stages split every batch over the processes and average the gradients, so under either strategy
two processes take the same steps as one (up to float summation order): their losses agree step for step, and
a checkpoint written by two processes continues in one (and the other way round) with the losses of the run that
was never interrupted. The on-policy stages draw each answer with its own key and normalise the update over the
whole minibatch, so a PPO checkpoint of two processes continues on one with the two-process run's metrics.
"""

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import cloudpickle
import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from rlhf.algorithms import PolicyInputs
from rlhf.config import DataConfig, RewardConfig, RuntimeConfig, SFTConfig
from rlhf.launch import run_data_parallel
from rlhf.settings import ConfigError
from rlhf.sharding import Sharding
from rlhf.stages import dpo, grpo, ppo, prepare, reward, rloo, sft
from rlhf.synthetic import gold_reward
from rlhf.validate import validate
from tests.conftest import micro_overrides, pipeline_env
from tests.test_resilience import PROJECT, pipeline_cmd, runs_of
from tests.tiny import TINY_MODEL, ctx, on_policy, stages_in_one_launch, values

pytestmark = pytest.mark.slow

FSDP, DDP = (RuntimeConfig(device="cpu", threads=1, num_processes=2, strategy=s) for s in ("fsdp", "ddp"))
STEPS = dict(log_every=1, eval_every=100, checkpoint_every=2)
SFT = SFTConfig(lr=3e-3, epochs=1, batch_size=16, **STEPS)  # 20 steps over the 320 demonstrations
REWARD = RewardConfig(lr=3e-3, epochs=1, batch_size=16, grad_accum=2, **STEPS)
DPO = dpo.DPOConfig(lr=1e-3, epochs=1, batch_size=16, **STEPS)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """Data, and SFT and a reward model trained in this process; an MLflow store for the launched stages."""
    root = tmp_path_factory.mktemp("fsdp")
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.create_experiment("fsdp", artifact_location=str(root / "artifacts"))
    sizes = DataConfig(n_sft=336, n_pref=64, n_eval_prompts=8, n_eval_pref=16, n_ppo_prompts=16)
    data = prepare.run(sizes, ctx(root, "data"))["data_dir"]
    sft_path = sft.run(TINY_MODEL, SFTConfig(lr=3e-3, epochs=1, batch_size=16), data, ctx(root, "sft"))["model_path"]
    rm_path = reward.run(REWARD, TINY_MODEL, data, sft_path, ctx(root, "rm"))["model_path"]

    def launch(body, name: str, rt: RuntimeConfig) -> tuple[dict, dict]:
        """``body`` in two processes; its record and every logged metric's history [(step, value)]."""
        run_id = client.create_run(exp, run_name=name).info.run_id
        out = run_data_parallel(body, root / name, rt, 0, client.tracking_uri, run_id)
        metrics = client.get_run(run_id).data.metrics
        return out, {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in metrics}

    return {"root": root, "data": data, "sft": sft_path, "rm": rm_path, "launch": launch}


PPO = on_policy(steps=3, checkpoint_every=2, eval_every=3)
ON_POLICY = {"rloo": on_policy(rloo.RLOOConfig, steps=2), "grpo": on_policy(grpo.GRPOConfig, steps=2)}


@pytest.fixture(scope="module")
def launched(upstream):
    """Every stage in one FSDP launch (SFT, reward, DPO, RLOO, GRPO, PPO), and SFT and reward in one DDP launch:
    each stage's record and metric histories, under its name."""
    data, sft_path = upstream["data"], upstream["sft"]
    inputs = PolicyInputs(upstream["data"], upstream["sft"], upstream["rm"], gold_reward)
    supervised = {
        "sft": lambda c: sft.run(TINY_MODEL, SFT, data, c),
        "reward": lambda c: reward.run(REWARD, TINY_MODEL, data, sft_path, c),
    }
    policies = {
        "dpo": lambda c: dpo.run(DPO, TINY_MODEL, inputs, c),
        "rloo": lambda c: rloo.run(ON_POLICY["rloo"], TINY_MODEL, inputs, c),
        "grpo": lambda c: grpo.run(ON_POLICY["grpo"], TINY_MODEL, inputs, c),
        "ppo": lambda c: ppo.run(PPO, TINY_MODEL, inputs, c),
    }
    out = {}
    for strategy, rt, bodies in (("fsdp", FSDP, {**supervised, **policies}), ("ddp", DDP, supervised)):
        records, metrics = upstream["launch"](stages_in_one_launch(**bodies), f"launch-{strategy}", rt)
        out[strategy] = {name: (records[name], metrics) for name in bodies}  # the stages' metric names differ
    return out


@pytest.mark.parametrize("stage, prefix", [("sft", "sft"), ("reward", "rm")])
def test_fsdp_takes_the_steps_ddp_takes(upstream, launched, stage, prefix):
    (sharded, m_sharded), (whole, m_whole) = launched["fsdp"][stage], launched["ddp"][stage]
    losses = values(m_sharded[f"{prefix}/loss"])
    assert len(losses) >= 4 and losses == pytest.approx(values(m_whole[f"{prefix}/loss"]), abs=1e-4)
    if stage == "sft":
        assert len(losses) == 20
    step = sorted((upstream["root"] / "launch-fsdp" / stage / "ckpt").glob("step-*"))[-1]
    assert (step / ".metadata").exists() and {"rng-0.pt", "rng-1.pt"} <= {p.name for p in step.iterdir()}
    a, b = (load_file(Path(r["model_path"]) / "model.safetensors") for r in (sharded, whole))
    assert sorted(a) == sorted(b)  # one consolidated model, the tied LM head saved once as DDP's is
    assert max((a[k] - b[k]).abs().max() for k in a) < 1e-4


def test_fsdp_rloo_and_grpo_start_at_ratio_one(launched):
    """(DPO's first loss under FSDP: the resume test's uninterrupted two-process run.)"""
    for name in ON_POLICY:
        out, m = launched["fsdp"][name]
        assert abs(m[f"{name}/kl"][0][1]) < 1e-4  # sampled from the gathered policy, which is the reference
        assert m[f"{name}/clipfrac_first_minibatch"][0][1] == 0
        assert abs(m[f"{name}/approx_kl_first_minibatch"][0][1]) < 1e-6
        assert [s for s, _ in m[f"{name}/eval_gold_reward"]] == [0, 1, 2]
        assert (Path(out["model_path"]) / "model.safetensors").exists()


@pytest.mark.parametrize("processes", [(2, 1), (1, 2)])
def test_a_sharded_checkpoint_resumes_on_another_number_of_processes(upstream, launched, processes):
    """DPO stopped after step 2 on ``before`` processes continues on ``after`` with the losses of the run that was
    never interrupted (on two processes: ``launched``'s)."""
    before, after = processes
    inputs = PolicyInputs(upstream["data"], upstream["sft"], upstream["rm"], gold_reward)
    root, name = upstream["root"], f"dpo-{before}to{after}"
    body = lambda c: dpo.run(DPO, TINY_MODEL, inputs, c)  # noqa: E731

    def in_this_process(folder: str) -> dict:
        c = ctx(root, folder, sharding=Sharding("fsdp"))
        body(c)
        return {k: [(s, v) for s, v in pts] for k, pts in c.sink.metrics.items()}

    if before == 2:
        straight, straight_dir = launched["fsdp"]["dpo"][1], root / "launch-fsdp" / "dpo"
    else:
        straight, straight_dir = in_this_process(f"{name}-straight"), root / f"{name}-straight"
    assert straight["dpo/loss"][0] == (1, pytest.approx(0.6931, abs=0.01))  # policy = reference: ln 2
    (root / name / "ckpt").mkdir(parents=True)
    shutil.copytree(straight_dir / "ckpt" / "step-000002", root / name / "ckpt" / "step-000002")
    resumed = upstream["launch"](body, name, FSDP)[1] if after == 2 else in_this_process(name)
    expected = [(s, v) for s, v in straight["dpo/loss"] if s > 2]
    assert [s for s, _ in resumed["dpo/loss"]] == [s for s, _ in expected]
    assert values(resumed["dpo/loss"]) == pytest.approx(values(expected), abs=1e-4)


def test_ppo_resumed_on_one_process_continues_as_the_two_would_have(upstream, launched):
    """PPO stopped after iteration 2 of 3 on two processes, continued on one: iteration 3's every metric (rollout
    statistics, the update's losses, the held-out evaluation; clip fractions up to one token) as the two-process
    run's. Each answer is drawn with its own key and the update normalises over the whole minibatch, so the number
    of processes changes only the order of float sums."""
    inputs = PolicyInputs(upstream["data"], upstream["sft"], upstream["rm"], gold_reward)
    root, cfg = upstream["root"], PPO
    straight = {k: h for k, h in launched["fsdp"]["ppo"][1].items() if k.startswith("ppo/")}
    first = sorted((root / "launch-fsdp" / "ppo" / "ckpt").glob("step-*"))[0]
    shutil.copytree(first, root / "ppo-2to1" / "ckpt" / first.name)
    c = ctx(root, "ppo-2to1", sharding=Sharding("fsdp"))
    ppo.run(cfg, TINY_MODEL, inputs, c)
    assert all(k.startswith("ppo/") for k in c.sink.metrics)  # what the launch logged for PPO is all of PPO's
    # not compared: timings, and the frontier fit over the KL curve logged at the end (three points fit into an
    # ill-conditioned d*: 2.35e7 in one run, moved 1e-3 relatively by float-order noise); the curve's points are
    timing = ("time_", "_per_s", "/frontier_")
    expected = {k: v for k, h in straight.items() for s, v in h if s == 3 and not any(t in k for t in timing)}
    resumed = {k: v for k, h in c.sink.metrics.items() for s, v in h if s == 3 and k in expected}
    assert {"ppo/policy_loss", "ppo/clipfrac", "ppo/value_loss", "ppo/kl", "ppo/eval_gold_reward"} <= set(expected)
    assert sorted(resumed) == sorted(expected) and all(s >= 3 for h in c.sink.metrics.values() for s, _ in h)
    # a clip fraction counts tokens past a clip boundary: float-order noise may move one token across it (seen: value
    # clipfrac 1/128 against 0). One token moves the iteration's mean by at most 1 / (tokens of a minibatch x
    # minibatches), a minibatch holding at least minibatch_size tokens; every other metric agrees within 1e-4
    one_token = 1 / (cfg.minibatch_size * cfg.ppo_epochs * cfg.rollout_batch_size // cfg.minibatch_size)
    fractions = {k for k in expected if k.endswith("clipfrac")}
    assert {k: resumed[k] for k in fractions} == pytest.approx({k: expected[k] for k in fractions}, abs=one_token)
    continuous = {k: v for k, v in expected.items() if k not in fractions}
    assert {k: resumed[k] for k in continuous} == pytest.approx(continuous, abs=1e-4)


def test_two_machines_on_loopback_train_one_stage_together(upstream, launched):
    """Two torchrun agents (--nnodes 2, one process each) meet through the c10d rendezvous on 127.0.0.1 and train
    SFT together: the model two processes on one machine train (``launched``'s FSDP SFT)."""
    from rlhf.launch import _free_port, join_launch

    data, root = upstream["data"], upstream["root"]
    body = lambda c: sft.run(TINY_MODEL, SFT, data, c)  # noqa: E731
    machine = dict(device="cpu", threads=1, num_processes=1, num_machines=2, strategy="fsdp")
    endpoint = f"127.0.0.1:{_free_port()}"
    first, second = (RuntimeConfig(**machine, node_rank=r, rdzv_endpoint=endpoint) for r in (0, 1))
    joiner = threading.Thread(target=join_launch, args=(root / "sft-two-machines", second, 300.0))
    joiner.start()
    together, m_together = upstream["launch"](body, "sft-two-machines", first)
    joiner.join()
    one, m_one = launched["fsdp"]["sft"]

    assert (root / "sft-two-machines" / "launch" / "log-node1.txt").exists()
    assert values(m_together["sft/loss"]) == pytest.approx(values(m_one["sft/loss"]), abs=1e-5)
    a, b = (load_file(Path(r["model_path"]) / "model.safetensors") for r in (together, one))
    assert max((a[k] - b[k]).abs().max() for k in a) < 1e-5


def test_pod_1_of_a_stage_job_joins_the_stage_its_flow_run_trains(upstream, prefect_server, monkeypatch):
    """A stage's Indexed Job from the GPU pool (flows.stage_pod): pod 1 reads the stage, key and root from the flow
    run's parameters in the Prefect API, and the rendezvous from the spec machine 0 writes (its own settings say
    ``auto``), and trains its share of the stage that pod 0 launches."""
    from prefect.client.orchestration import get_client

    import rlhf.launch
    from flows import stage_pod
    from flows.stage import rlhf_stage
    from rlhf.launch import _free_port
    from rlhf.settings import to_dict
    from tasks.records import stage_dir

    data, root = upstream["data"], upstream["root"]
    monkeypatch.setattr(rlhf.launch, "RDZV_WAIT_S", 60)  # a pod 1 that never comes fails the test in 90 s, not 40 min
    machine = dict(device="cpu", threads=1, num_processes=1, num_machines=2, strategy="fsdp", stop_grace_s=30)
    pool_runtime = RuntimeConfig(**machine, rdzv_endpoint="auto")  # what the pipeline sends with the stage
    env = {"root": str(root / "pool"), "runtime": to_dict(pool_runtime)}
    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run(
            rlhf_stage, parameters={"stage": "sft", "key": "k1", "env": env, "inputs": {}}
        )
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", str(flow_run.id))
    monkeypatch.setenv("RLHF_LAUNCH_ID", str(flow_run.id))  # what flows.stage_pod sets on pod 0 before the flow run
    folder = stage_dir(root / "pool", "sft", "k1")
    stale = folder / "launch" / "spec.pkl"  # a killed earlier pod 0's: pod 1 must not join its dead rendezvous
    stale.parent.mkdir(parents=True)
    stale.write_bytes(cloudpickle.dumps({"rdzv_endpoint": "127.0.0.1:1", "launch_id": "an earlier flow run"}))
    pod_1 = threading.Thread(target=stage_pod.main, args=([],))
    pod_1.start()
    pod_0 = RuntimeConfig(**machine, rdzv_endpoint=f"127.0.0.1:{_free_port()}")  # here: auto would be loopback
    out, m = upstream["launch"](lambda c: sft.run(TINY_MODEL, SFT, data, c), str(folder.relative_to(root)), pod_0)
    pod_1.join(timeout=60)
    assert not pod_1.is_alive() and (folder / "launch" / "log-node1.txt").exists()
    assert len(m["sft/loss"]) == 20 and (Path(out["model_path"]) / "model.safetensors").exists()


def test_lora_with_fsdp_is_refused_with_the_fix(micro):
    with pytest.raises(ConfigError, match=r"runtime.strategy=fsdp with model.lora_r=4.*Fix: runtime.strategy=ddp"):
        validate(micro("runtime.strategy=fsdp", "model.lora_r=4"))


def processes_under(root: Path) -> list[psutil.Process]:
    """The processes whose command line names ``root``: a pipeline, a stage's launcher and its workers."""
    return [p for p in psutil.process_iter(["cmdline"]) if any(str(root) in a for a in p.info["cmdline"] or [])]


def running_until_a_ppo_checkpoint(cmd: list[str], env: dict, root: Path, wait_s: float = 600) -> subprocess.Popen:
    """The pipeline started in a process group of its own (the stage's launcher is in a session of its own and must die
    with the pipeline, as on a lost machine), returned once PPO has written a checkpoint and is still running."""
    proc = subprocess.Popen(
        cmd, cwd=PROJECT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and proc.poll() is None:
        if list(root.glob("stages/ppo/*/ckpt/step-*/COMPLETE")):
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before a PPO checkpoint could be interrupted"
    return proc


def test_kill_9_mid_ppo_under_fsdp_resumes_from_the_shards_in_the_same_run(tmp_path, prefect_server):
    """kill -9 to a pipeline mid-PPO (two FSDP processes): nothing it started outlives it; run again, the killed
    parent run is marked KILLED and names its successor, the cached stages stay cached, and PPO continues in its own
    MLflow run from its last sharded checkpoint to exactly the configured steps, each iteration logged once.

    Data, SFT and the reward model are trained first in this process by a DPO pipeline (their keys depend neither on
    the algorithm nor on the runtime): the killed pipeline finds them Cached and launches PPO alone. The pipelines
    report to the worker's Prefect server, which outlives the kill (a kill that takes an ephemeral server with it is
    not tested: two more server starts)."""
    from flows.compose import load_config
    from flows.dag import rlhf_pipeline

    root, steps = tmp_path / "root", 4
    rlhf_pipeline(load_config(micro_overrides(root)))  # DPO on micro: the upstream micro_ppo shares
    ppo = ["experiment=micro_ppo", f"algo.steps={steps}", "algo.checkpoint_every=2", "algo.eval_every=100"]
    cmd = pipeline_cmd(root, *ppo, "runtime.num_processes=2", "runtime.strategy=fsdp")
    env = pipeline_env(tmp_path / "home", prefect_server)
    proc = running_until_a_ppo_checkpoint(cmd, env, root)
    os.killpg(proc.pid, signal.SIGKILL)  # the pipeline's process group, as a lost machine or the OOM killer
    proc.wait()
    deadline = time.monotonic() + 20  # the launcher (a session of its own) and its workers die with the pipeline
    while processes_under(root) and time.monotonic() < deadline:
        time.sleep(0.2)
    orphans = processes_under(root)
    for p in orphans:
        p.kill()
    assert not orphans, [p.info["cmdline"] for p in orphans]
    done = sorted(root.glob("stages/ppo/*/ckpt/step-*/COMPLETE"))
    killed_at = int(done[-1].parent.name.split("-")[1])
    assert (done[-1].parent / ".metadata").exists()  # a sharded checkpoint

    out = subprocess.run(cmd, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client, parents = runs_of(root, "tags.pipeline = 'rlhf'")  # the DPO run's, the killed and the rerun's
    (killed,) = [p for p in parents if p.info.status != "FINISHED"]
    (rerun,) = [p for p in parents if p.info.status == "FINISHED" and "stage.ppo.run_id" in p.data.tags]
    assert killed.info.status == "KILLED" and killed.data.tags["rlhf.taken_over_by"] == rerun.info.run_id
    assert not runs_of(root, "attributes.status = 'RUNNING'")[1]  # no phantom RUNNING run beside the new ones
    assert all(p.data.tags[f"stage.{s}.cached"] == "true" for p in (killed, rerun) for s in ("data", "sft", "reward"))
    ppo_run = client.get_run(rerun.data.tags["stage.ppo.run_id"])
    assert ppo_run.data.tags.get("resumed") == "true" and ppo_run.info.status == "FINISHED"
    logged = [m.step for m in client.get_metric_history(ppo_run.info.run_id, "ppo/kl")]
    assert sorted(logged) == list(range(1, steps + 1))  # every iteration once: none lost, none logged twice
    final = sorted(root.glob("stages/ppo/*/ckpt/step-*/COMPLETE"))[-1]
    assert int(final.parent.name.split("-")[1]) == steps * 2 * (16 // 8) > killed_at  # epochs x minibatches
    (model,) = root.glob("stages/ppo/*/model/model.safetensors")
    assert all(torch.isfinite(w).all() for w in load_file(model).values())
