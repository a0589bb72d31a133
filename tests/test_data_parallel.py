"""Data parallelism through `accelerate launch`: two gloo processes on CPU train what one process trains.

The reward loss is a mean over pairs, so two processes each taking half of every batch (and averaging
their gradients) must end at the weights one process reaches on the whole batch; the main process alone
logs each step once, to the stage's MLflow run, and writes the checkpoints.
"""

import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoModelForSequenceClassification

from rlhf.algorithms import PolicyInputs
from rlhf.config import DataConfig, RewardConfig, RuntimeConfig, SFTConfig
from rlhf.launch import StageLaunchError, run_data_parallel
from rlhf.settings import ConfigError
from rlhf.stages import ppo, prepare, reward, sft
from rlhf.synthetic import gold_reward
from rlhf.validate import validate
from tests.tiny import TINY_MODEL, ctx, on_policy, params_of, stages_in_one_launch, values

TWO = RuntimeConfig(device="cpu", threads=1, num_processes=2)
REWARD = RewardConfig(lr=3e-3, epochs=1, batch_size=16, grad_accum=2, log_every=1, eval_every=100, checkpoint_every=2)


def scalar_weights(path):
    return torch.cat(
        [p.flatten() for p in AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).parameters()]
    )


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """Data, SFT and a reward model trained in this process; an MLflow store for the launched stages."""
    root = tmp_path_factory.mktemp("ddp")
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.create_experiment("ddp", artifact_location=str(root / "artifacts"))
    data = prepare.run(
        DataConfig(n_sft=32, n_pref=64, n_eval_prompts=8, n_eval_pref=16, n_ppo_prompts=16), ctx(root, "data")
    )["data_dir"]
    sft_path = sft.run(TINY_MODEL, SFTConfig(lr=3e-3, epochs=1, batch_size=16), data, ctx(root, "sft"))["model_path"]
    one = ctx(root, "rm-one")
    rm = reward.run(REWARD, TINY_MODEL, data, sft_path, one)
    return {
        "root": root,
        "client": client,
        "new_run": lambda name: client.create_run(exp, run_name=name).info.run_id,
        "data": data,
        "sft": sft_path,
        "rm": rm,
        "rm_sink": one.sink,
    }


@pytest.fixture(scope="module")
def two(upstream):
    """The reward model, then two PPO iterations, in one launch of two processes (their metric names differ)."""
    root, client, data, sft_path = upstream["root"], upstream["client"], upstream["data"], upstream["sft"]
    inputs = PolicyInputs(data, sft_path, upstream["rm"]["model_path"], gold_reward)
    body = stages_in_one_launch(
        reward=lambda c: reward.run(REWARD, TINY_MODEL, data, sft_path, c),
        ppo=lambda c: ppo.run(PPO, TINY_MODEL, inputs, c),
    )
    run_id = upstream["new_run"]("two")
    out = run_data_parallel(body, root / "two", TWO, REWARD.seed, client.tracking_uri, run_id)
    return out, lambda name: [(m.step, m.value) for m in client.get_metric_history(run_id, name)]


PPO = on_policy(steps=2)


def test_two_processes_reach_the_weights_of_one_and_log_each_step_once(upstream, two):
    root, sft_path, single = upstream["root"], upstream["sft"], upstream["rm"]
    out, metric = two
    double = out["reward"]
    assert double["steps"] == single["steps"] == 4
    w1, w2, start = scalar_weights(single["model_path"]), scalar_weights(double["model_path"]), scalar_weights(sft_path)
    assert (w2 - w1).abs().max() < 1e-4 < 1e-2 < (w1 - start).abs().max()  # same training up to float summation order
    history = metric("rm/loss")
    assert [s for s, _ in history] == [1, 2, 3, 4]  # once per step: only the main process logs
    assert values(history) == pytest.approx(values(upstream["rm_sink"].metrics["rm/loss"]), abs=1e-5)
    assert sorted(p.name for p in (root / "two" / "reward" / "ckpt").iterdir()) == ["step-000002", "step-000004"]
    assert double["metrics"]["rm/eval_accuracy"] == pytest.approx(single["metrics"]["rm/eval_accuracy"])


def test_ppo_in_two_processes_starts_at_zero_kl_and_logs_each_iteration_once(upstream, two):
    root = upstream["root"]
    out, metric = two
    assert [s for s, _ in metric("ppo/kl")] == [1, 2]
    assert abs(metric("ppo/kl")[0][1]) < 1e-4  # policy = reference at the first rollout, in both processes
    assert (
        metric("ppo/clipfrac_first_minibatch")[0][1] == 0 and abs(metric("ppo/approx_kl_first_minibatch")[0][1]) < 1e-6
    )
    assert [s for s, _ in metric("ppo/eval_gold_reward")] == [0, 1, 2]  # 0: the policy before training (SFT)
    assert not torch.allclose(params_of(upstream["sft"]), params_of(out["ppo"]["model_path"]))
    ckpt = root / "two" / "ppo" / "ckpt" / "step-000008" / "COMPLETE"
    assert ckpt.exists()  # 2 iterations x 2 epochs x 2 minibatches
    assert (root / "two" / "ppo" / "figures" / "kl_curve.png").exists()


def test_a_failing_process_fails_the_stage_with_its_output(upstream, tmp_path):
    def body(c):
        raise ValueError(f"rank {c.accelerator.process_index} of {c.accelerator.num_processes} refuses")

    with pytest.raises(StageLaunchError, match=r"2 processes failed(.|\n)*rank \d of 2 refuses"):
        run_data_parallel(
            body, tmp_path / "stage", TWO, 0, upstream["client"].tracking_uri, upstream["new_run"]("fails")
        )


def test_batches_that_do_not_split_over_the_processes_are_refused_before_training(micro):
    with pytest.raises(
        ConfigError,
        match=r"reward.batch_size=16 does not split into runtime.num_processes=3.*Fix: make reward.batch_size a "
        r"multiple of 6",
    ):
        validate(micro("runtime.num_processes=3", "reward.grad_accum=2", "sft.batch_size=12"))
    with pytest.raises(ConfigError, match=r"algo.minibatch_size=16 does not split into runtime.num_processes=3"):
        validate(micro("algo=ppo", "runtime.num_processes=3", "sft.batch_size=12", "reward.batch_size=12"))


@pytest.mark.parametrize("algo, extra, prompts", [("grpo", [], 6), ("rloo", ["algo.rollout_batch_size=40"], 10)])
def test_prompts_that_do_not_split_over_the_processes_are_refused_with_the_fix(micro, algo, extra, prompts):
    """Each process samples whole prompts (a group of answers stays in one process): 24 answers in groups of 4 are
    6 prompts, which 4 processes would take as 2, 2, 1, 1, with unequal optimizer steps and hung collectives (PPO's
    minibatch check already implies an even split: one answer per prompt)."""
    base = [
        f"algo={algo}",
        "runtime.num_processes=4",
        "algo.rollout_batch_size=24",
        "algo.minibatch_size=8",
        "sft.batch_size=16",
        "reward.batch_size=16",
    ]
    with pytest.raises(ConfigError) as e:
        validate(micro(*base, *extra))
    assert f"gives {prompts} prompts an iteration" in str(e.value) and "runtime.num_processes=4" in str(e.value)
    assert "Fix: make algo.rollout_batch_size a multiple of" in str(e.value)
    validate(micro(*base, *extra, "algo.rollout_batch_size=32"))  # 8 prompts: 2 per process


def test_each_process_saves_its_own_random_state_and_gets_it_back_on_resume(upstream, tmp_path):
    """Two processes seed their own streams (seed + rank), the checkpoint holds both states, and a trainer that resumes
    from it hands each process its own: the draws after the resume are the ones each process drew after the save.
    (One launch: the saving trainer, a few draws, then a new trainer resuming in the same processes.)"""
    import json

    def body(c):
        from pathlib import Path

        from rlhf.config_training import OptimConfig
        from rlhf.trainer import Trainer

        def trainer():  # no model to write: the checkpoint is the trainer state
            groups = [{"params": [torch.nn.Parameter(torch.zeros(1))]}]
            return Trainer({}, None, OptimConfig(), 4, "t", c.sink, c.ckpt_dir, groups, accelerator=c.accelerator)

        trainer().save({})
        after_save = torch.rand(4).tolist()
        trainer().load(c.resume_point())
        after_resume = torch.rand(4).tolist()
        Path(c.out_dir, f"draws-{c.accelerator.process_index}.json").write_text(json.dumps([after_save, after_resume]))
        return {}

    client, out = upstream["client"], tmp_path / "rng"
    run_data_parallel(body, out, TWO, 7, client.tracking_uri, upstream["new_run"]("rng"))
    saved = torch.load(out / "ckpt" / "step-000000" / "trainer_state.pt", weights_only=True)["rng"]
    assert len(saved) == 2 and not torch.equal(saved[0]["torch"], saved[1]["torch"])  # one state per process
    draws = [json.loads((out / f"draws-{rank}.json").read_text()) for rank in (0, 1)]
    assert all(after_save == after_resume for after_save, after_resume in draws)  # each process restored its own
    assert draws[0][0] != draws[1][0]


@pytest.mark.slow
def test_a_stop_signal_stops_every_process_after_the_same_step_and_the_rerun_finishes(upstream, tmp_path):
    """SIGTERM to the launching process mid-stage: the processes learn it from the stop file (the launcher never sees
    a signal), finish their step, checkpoint it and stop; the launching process raises Preempted. Run again, the
    stage resumes there and ends at the configured steps, every step logged once."""
    import os
    import signal
    import threading
    import time

    from rlhf.preemption import Preempted, StopSignals

    client, out = upstream["client"], tmp_path / "rm-stopped"
    cfg = RewardConfig(
        lr=1e-3, epochs=20, batch_size=16, grad_accum=2, log_every=1, eval_every=1000, checkpoint_every=1000
    )
    body = lambda c: reward.run(cfg, TINY_MODEL, upstream["data"], upstream["sft"], c)  # noqa: E731
    run_id = upstream["new_run"]("rm-stopped")

    def stop_when_training():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not client.get_metric_history(run_id, "rm/loss"):
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_training, daemon=True).start()
    with pytest.raises(Preempted) as stopped, StopSignals() as signals:
        run_data_parallel(body, out, TWO, cfg.seed, client.tracking_uri, run_id, signals)
    assert stopped.value.signum == signal.SIGTERM and stopped.value.at.startswith("step ")
    step = int(stopped.value.at.split()[1])
    checkpoints = sorted((out / "ckpt").glob("step-*"))
    assert [c.name for c in checkpoints] == [f"step-{step:06d}"] and 0 < step < 80  # the signal's own checkpoint

    done = run_data_parallel(body, out, TWO, cfg.seed, client.tracking_uri, run_id)
    steps = [m.step for m in client.get_metric_history(run_id, "rm/loss")]
    assert done["steps"] == 80 and steps == list(range(1, 81))  # resumed at the stopped step, each step once
