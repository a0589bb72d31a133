"""Data parallelism through `accelerate launch`: two gloo processes on CPU train what one process trains.

The reward loss is a mean over pairs, so two processes each taking half of every batch (and averaging
their gradients) must end at the weights one process reaches on the whole batch; the main process alone
logs each step once, to the stage's MLflow run, and writes the checkpoints.
"""

import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoModelForSequenceClassification

from rlhf.config import ConfigError, DataConfig, RewardConfig, RuntimeConfig, SFTConfig, validate
from rlhf.launch import StageLaunchError, run_data_parallel
from rlhf.stages import prepare, reward, sft
from tests.test_stages import TINY_MODEL, ctx

TWO = RuntimeConfig(device="cpu", threads=1, num_processes=2)


def weights(path):
    return torch.cat([p.flatten() for p in AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).parameters()])


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.create_experiment("ddp", artifact_location=str(root / "artifacts"))
    return root, client, lambda name: client.create_run(exp, run_name=name).info.run_id


def test_two_processes_reach_the_weights_of_one_and_log_each_step_once(mlflow_run):
    root, client, new_run = mlflow_run
    data = prepare.run(DataConfig(n_sft=32, n_pref=64, n_eval_prompts=8, n_eval_pref=16, n_ppo_prompts=8), ctx(root, "data"))["data_dir"]
    sft_path = sft.run(TINY_MODEL, SFTConfig(lr=3e-3, batch_size=16), data, ctx(root, "sft"))["model_path"]
    cfg = RewardConfig(lr=3e-3, batch_size=16, grad_accum=2, log_every=1, eval_every=100, checkpoint_every=2)

    one = ctx(root, "rm-one")
    single = reward.run(cfg, TINY_MODEL, data, sft_path, one)
    run_id = new_run("rm-two")
    body = lambda c: reward.run(cfg, TINY_MODEL, data, sft_path, c)  # noqa: E731
    double = run_data_parallel(body, root / "rm-two", TWO, cfg.seed, client.tracking_uri, run_id)

    assert double["steps"] == single["steps"] == 4
    w1, w2, start = weights(single["model_path"]), weights(double["model_path"]), weights(sft_path)
    assert (w2 - w1).abs().max() < 1e-4 < 1e-2 < (w1 - start).abs().max()  # same training up to float summation order
    history = client.get_metric_history(run_id, "rm/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]  # once per step: only the main process logs
    assert [m.value for m in history] == pytest.approx([v for _, v in one.sink.metrics["rm/loss"]], abs=1e-5)
    tokens = dict(one.sink.metrics["rm/tokens_per_s"])
    assert len(client.get_metric_history(run_id, "rm/tokens_per_s")) == len(tokens)
    assert sorted(p.name for p in (root / "rm-two" / "ckpt").iterdir()) == ["step-000002", "step-000004"]
    assert double["metrics"]["rm/eval_accuracy"] == pytest.approx(single["metrics"]["rm/eval_accuracy"])


def test_a_failing_process_fails_the_stage_with_its_output(mlflow_run, tmp_path):
    root, client, new_run = mlflow_run

    def body(c):
        raise ValueError(f"rank {c.accelerator.process_index} of {c.accelerator.num_processes} refuses")

    with pytest.raises(StageLaunchError, match=r"2 processes failed(.|\n)*rank \d of 2 refuses"):
        run_data_parallel(body, tmp_path / "stage", TWO, 0, client.tracking_uri, new_run("fails"))


def test_batches_that_do_not_split_over_the_processes_are_refused_before_training(micro):
    with pytest.raises(ConfigError, match=r"reward.batch_size=16 does not split into runtime.num_processes=3.*multiple of 6"):
        validate(micro("runtime.num_processes=3", "reward.grad_accum=2", "sft.batch_size=12"))
