"""MLflow bookkeeping on a local store: experiment kind, orphaned runs, the sweep row, datasets, system metrics."""

import json
import multiprocessing
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from flows.sweep import sweep_run
from rlhf.data import fingerprint_splits
from rlhf.lineage import log_datasets
from rlhf.system_metrics import StageSystemMetrics
from rlhf.tracking import EXPERIMENT_KIND_TAG, PID_TAG, TAKEN_OVER_TAG, RunLogger, close_orphaned_runs, experiment_id


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    return tmp_path, uri, client, experiment_id(client, "rlhf", tmp_path, uri)


def test_experiments_are_created_or_adopted_as_model_training(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    adopted = client.create_experiment("theirs")  # made elsewhere, without a kind: the UI would open it as GenAI
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(adopted).tags
    assert experiment_id(client, "theirs", tmp_path, uri) == adopted
    for name in ("theirs", "ours"):
        exp = client.get_experiment(experiment_id(client, name, tmp_path, uri))
        assert exp.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_runs_of_a_dead_process_are_killed_and_name_their_successor(store):
    _, _, client, exp = store
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    orphan = RunLogger.create(client, exp, "killed-9", {"pipeline": "rlhf"})
    client.set_tag(orphan.run_id, PID_TAG, dead)  # as if that process had made it and died
    alive = RunLogger.create(client, exp, "still-training", {"pipeline": "rlhf"})  # this process: alive
    successor = RunLogger.create(client, exp, "new", {"pipeline": "rlhf"})
    assert close_orphaned_runs(client, exp, successor.run_id) == [orphan.run_id]
    killed = client.get_run(orphan.run_id)
    assert killed.info.status == "KILLED" and killed.data.tags[TAKEN_OVER_TAG] == successor.run_id
    assert (
        client.get_run(alive.run_id).info.status == "RUNNING"
        and client.get_run(successor.run_id).info.status == "RUNNING"
    )


def _make_sweep_row(args) -> str:
    root, uri, exp = args
    return sweep_run(MlflowClient(uri), exp, "sweep-x", root, name="sweep-x")


def test_parallel_members_find_one_sweep_row(store):
    root, uri, client, exp = store
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        ids = pool.map(_make_sweep_row, [(root, uri, exp)] * 6)
    assert len(set(ids)) == 1
    assert len(client.search_runs([exp], "tags.`rlhf.sweep` = 'true'")) == 1


def test_splits_are_dataset_inputs_with_digest_schema_and_rows(store, tmp_path):
    _, _, client, exp = store
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "pref.jsonl").write_text(
        "".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(7))
    )
    (splits / "eval_pref.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    fingerprints = fingerprint_splits(splits, "toy")
    run = RunLogger.create(client, exp, "reward-x", {})
    log_datasets(client, run.run_id, fingerprints, {"pref": "training", "eval_pref": "evaluation", "sft": "training"})
    inputs = {d.dataset.name: d for d in client.get_run(run.run_id).inputs.dataset_inputs}
    assert set(inputs) == {"toy.pref", "toy.eval_pref"}  # a split the data does not have is skipped
    pref = inputs["toy.pref"]
    assert pref.dataset.digest == fingerprints["pref"]["digest"] and len(pref.dataset.digest) == 16
    assert json.loads(pref.dataset.profile) == {"num_rows": 7}
    assert [c["name"] for c in json.loads(pref.dataset.schema)["mlflow_colspec"]] == ["prompt", "chosen", "rejected"]
    assert {t.key: t.value for t in pref.tags}["mlflow.data.context"] == "training"
    (splits / "pref.jsonl").write_text(
        (splits / "pref.jsonl").read_text() + json.dumps({"prompt": "new", "chosen": "a", "rejected": "b"}) + "\n"
    )
    assert fingerprint_splits(splits, "toy")["pref"]["digest"] != pref.dataset.digest  # the digest is the content's


def test_a_stage_shorter_than_the_sampling_interval_still_has_system_metrics(store):
    _, uri, client, exp = store
    run = RunLogger.create(client, exp, "sft-x", {})
    with StageSystemMetrics(run.run_id, uri, interval_s=30.0):
        time.sleep(0.3)
    metrics = client.get_run(run.run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)


def test_every_stage_name_is_a_model_name_mlflow_accepts(store):
    from rlhf.config import reward_member
    from rlhf.model_logging import logged_model_name

    _, _, client, exp = store
    names = [logged_model_name(s) for s in ("sft", "ppo", reward_member(0), reward_member(1), reward_member(3))]
    assert names[2:] == ["reward", "reward-1", "reward-3"]
    for name in names:  # the store's own validation, as a stage run hits it
        assert client.create_logged_model(exp, name=name).name == name
