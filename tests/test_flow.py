"""The real flow on the micro config: MLflow contents, lineage tags, Cached re-runs, partial re-runs."""

import json
import math
import os
import re
import time
from pathlib import Path

import httpx
import mlflow
import pytest
from mlflow.tracking import MlflowClient

from flows.compose import load_config
from flows.dag import rlhf_pipeline

from .conftest import micro_overrides

pytestmark = pytest.mark.slow
STAGES = ("data", "sft", "reward", "dpo", "eval")
EVAL_METRICS = {
    "eval/gold_reward",
    "eval/sft_gold_reward",
    "eval/proxy_reward",
    "eval/kl",
    "eval/win_rate_gold",
    "eval/win_rate_proxy",
    "eval/response_length",
    "eval/eos_rate",
    "eval/distinct_2",
    "eval/rm_accuracy",
    "eval/gold_gain",
    "eval/proxy_gain",
    "eval/gold_reward_se",
    "eval/win_rate_gold_se",
    "eval/gold_gain_se",
    "eval/kl_se",
    "eval/win_rate_proxy_se",
}
STAGE_METRICS = {
    "sft": {"sft/loss", "sft/eval_loss", "sft/tokens_per_s", "sft/lr", "sft/grad_norm"},
    "reward": {"rm/loss", "rm/accuracy", "rm/eval_accuracy", "rm/margin", "rm/lr", "rm/grad_norm"},
    "dpo": {
        "dpo/loss",
        "dpo/rewards_chosen",
        "dpo/rewards_rejected",
        "dpo/margin",
        "dpo/accuracy",
        "dpo/kl",
        "dpo/lr",
        "dpo/grad_norm",
    },
}


def stage_runs(client, parent_id):
    runs = client.search_runs(
        [r.info.experiment_id for r in [client.get_run(parent_id)]], f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    return {r.data.tags["stage"]: r for r in runs}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, prefect_server):
    root = tmp_path_factory.mktemp("flow")
    cfg = load_config(micro_overrides(root))
    return root, cfg, rlhf_pipeline(cfg)


def test_first_run_trains_every_stage_and_logs_everything(first_run):
    root, cfg, result = first_run
    assert result["cached"] == {s: False for s in STAGES}
    client = MlflowClient(result["tracking_uri"])
    assert client.get_experiment(result["experiment_id"]).tags["mlflow.experimentKind"] == "custom_model_development"
    parent = client.get_run(result["run_id"])
    assert parent.info.status == "FINISHED" and re.fullmatch(r"dpo-b0\.3-[0-9a-f]{6}", parent.info.run_name)
    assert parent.data.params["algo.beta"] == str(cfg["algo"]["beta"]) and parent.data.params["model.n_layer"] == "2"
    assert len(parent.data.tags["git_commit"]) >= 7
    runs = stage_runs(client, result["run_id"])
    assert set(runs) == set(STAGES)
    for s in STAGES:
        assert parent.data.tags[f"stage.{s}.cache_key"] == result["keys"][s]
        assert parent.data.tags[f"stage.{s}.cached"] == "false"
        assert parent.data.tags[f"stage.{s}.run_id"] == runs[s].info.run_id
        assert runs[s].info.run_name == f"{s}-{result['keys'][s].rsplit('-', 1)[1][:6]}"
    for s, names in STAGE_METRICS.items():
        assert names <= set(runs[s].data.metrics), (s, names - set(runs[s].data.metrics))
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
            runs[s].data.metrics
        ), s
        assert (
            50 < runs[s].data.metrics[f"{s}/peak_memory_mb"] < 20_000
        )  # peak resident memory of the stage (CUDA's max allocated on a GPU)
    first_dpo = client.get_metric_history(runs["dpo"].info.run_id, "dpo/loss")[0]
    assert first_dpo.step == 1 and first_dpo.value == pytest.approx(math.log(2), abs=0.01)
    assert EVAL_METRICS <= set(runs["eval"].data.metrics) and EVAL_METRICS <= set(parent.data.metrics)
    assert parent.data.metrics["eval/win_rate_gold"] == runs["eval"].data.metrics["eval/win_rate_gold"]


def datasets_of(run) -> dict[str, tuple[str, str]]:
    """name -> (digest, context) of a run's dataset inputs."""
    return {
        d.dataset.name: (d.dataset.digest, {t.key: t.value for t in d.tags}["mlflow.data.context"])
        for d in run.inputs.dataset_inputs
    }


def test_every_run_records_the_datasets_it_read_by_digest(first_run):
    _, _, result = first_run
    client = MlflowClient(result["tracking_uri"])
    runs = stage_runs(client, result["run_id"])
    digest = {f["name"]: f["digest"] for f in result["records"]["data"]["datasets"].values()}
    assert datasets_of(runs["sft"]) == {"synthetic.sft": (digest["synthetic.sft"], "training")}
    assert datasets_of(runs["dpo"]) == {
        "synthetic.pref": (digest["synthetic.pref"], "training"),
        "synthetic.eval_pref": (digest["synthetic.eval_pref"], "evaluation"),
    }
    assert set(datasets_of(runs["eval"])) == {"synthetic.eval_prompts", "synthetic.eval_pref"}
    parent = client.get_run(result["run_id"])
    assert {k: v[0] for k, v in datasets_of(parent).items()} == digest  # the member row's Dataset cell
    assert json.loads(runs["sft"].inputs.dataset_inputs[0].dataset.profile)["num_rows"] == 96  # micro: n_sft=96


def test_final_models_are_mlflow_models_and_the_policy_and_reward_are_registered(first_run, monkeypatch):

    _, _, result = first_run
    client = MlflowClient(result["tracking_uri"])
    runs = stage_runs(client, result["run_id"])
    sft, reward, dpo = (result["records"][s] for s in ("sft", "reward", "dpo"))
    assert [o.model_id for o in runs["sft"].outputs.model_outputs] == [sft["model_id"]]
    assert [o.model_id for o in client.get_run(result["run_id"]).outputs.model_outputs] == [
        dpo["model_id"]
    ]  # the Model cell
    policy_version = client.get_model_version("rlhf-policy", dpo["version"])
    assert (
        policy_version.tags["pipeline_run_id"] == result["run_id"]
        and policy_version.tags["cache_key"] == result["keys"]["dpo"]
    )
    assert policy_version.tags["parent.sft"] == sft["model_uri"] and policy_version.tags["stage"] == "dpo"
    assert client.get_model_version("rlhf-reward", reward["version"]).tags["parent.sft"] == sft["model_uri"]
    monkeypatch.setenv(
        "MLFLOW_TRACKING_URI", result["tracking_uri"]
    )  # where models:/ URIs resolve, as a user would set it
    generator = mlflow.transformers.load_model(f"models:/rlhf-policy/{dpo['version']}")
    scorer = mlflow.transformers.load_model(f"models:/rlhf-reward/{reward['version']}")
    prompt = "topic: fruit. open: mango. avoid: plum. length: short. answer:"
    text = generator(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith(prompt) and len(text) > len(prompt)
    eos = scorer.tokenizer.eos_token
    good, bad = scorer([f"{prompt} mango apple cherry grape{eos}", f"{prompt} dog dog dog dog dog dog dog dog{eos}"])
    assert good["score"] != bad["score"]  # raw scores of the regression head, one per answer
    for run in runs.values():  # resumable checkpoints stay under paths.root (tracking.log_checkpoints=false)
        assert not client.list_artifacts(run.info.run_id, "checkpoints")


def test_prefect_shows_names_progress_logs_and_artifacts(first_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterName,
        LogFilter,
        LogFilterFlowRunId,
    )

    _, _, result = first_run
    with get_client(sync_client=True) as client:
        flow_runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[result["run_name"]]))
        )
        assert len(flow_runs) == 1  # the Prefect flow run carries the MLflow run's name
        task_runs = {t.name for t in client.read_task_runs() if t.flow_run_id == flow_runs[0].id}
        assert {f"{s}-{result['keys'][s].rsplit('-', 1)[1][:6]}" for s in STAGES} <= task_runs
        for _ in range(30):  # the API log handler sends in the background: the last lines may lag the flow's end
            logs = [
                entry.message
                for entry in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_runs[0].id])))
            ]
            if any(result["run_name"] + ": eval/" in line for line in logs):
                break
            time.sleep(0.5)
        artifacts = {
            a.key: a
            for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["rlhf-summary", "rlhf-eval", "rlhf-mlflow"]))
            )
            if a.flow_run_id == flow_runs[0].id
        }
    text = "\n".join(logs)
    assert result["run_id"] in text and "stage sft: ran in" in text
    assert re.search(r"sft step \d+/\d+ .*loss [\d.]+.*tok/s.*eta", text), text[
        :2000
    ]  # progress lines reach the flow run
    assert re.search(r"dpo step \d+/\d+ ", text)
    assert result["run_id"] in artifacts["rlhf-summary"].data and "eval/win_rate_gold" in artifacts["rlhf-summary"].data
    assert any(row["metric"] == "eval/win_rate_gold" for row in json.loads(artifacts["rlhf-eval"].data))
    assert f"/runs/{result['run_id']}" in artifacts["rlhf-mlflow"].data, artifacts["rlhf-mlflow"].data


def test_make_ui_serves_the_local_store_at_the_printed_link(first_run, tmp_path):
    """`make ui` (README) over this run's store: the experiment it names in its link is the run's."""
    from tests.servers import Processes, free_port

    root, _, result = first_run
    port, procs = free_port(), Processes(tmp_path / "logs")
    env = {**os.environ, "RLHF_HOME": str(root)}
    procs.start("ui", ["make", "-s", "ui", f"UI_PORT={port}"], env, cwd=Path(__file__).resolve().parents[1])
    try:
        procs.wait_healthy("ui", f"http://127.0.0.1:{port}/health", timeout=120)
        experiment = httpx.get(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": "rlhf"}
        ).json()
        assert experiment["experiment"]["experiment_id"] == result["experiment_id"] == "1"
        assert f"127.0.0.1:{port}/#/experiments/1?workflowType=machine_learning" in procs.tail("ui")
    finally:
        procs.stop_all()


def test_second_run_is_fully_cached_with_the_same_lineage(first_run):
    _, cfg, result = first_run
    again = rlhf_pipeline(cfg)
    assert again["cached"] == {s: True for s in STAGES}
    client = MlflowClient(again["tracking_uri"])
    tags = client.get_run(again["run_id"]).data.tags
    first_tags = client.get_run(result["run_id"]).data.tags
    for s in STAGES:
        assert tags[f"stage.{s}.run_id"] == first_tags[f"stage.{s}.run_id"]  # produced by the first run
    assert not stage_runs(client, again["run_id"])  # nothing trained, no stage runs
    assert again["metrics"] == result["metrics"]
    assert len(client.search_model_versions("name = 'rlhf-policy'")) == 1  # a Cached stage registers no second version
    assert [o.model_id for o in client.get_run(again["run_id"]).outputs.model_outputs] == [
        result["records"]["dpo"]["model_id"]
    ]


def test_changing_beta_reruns_only_dpo_and_eval(first_run):
    root, _, _ = first_run
    r = rlhf_pipeline(load_config(micro_overrides(root, "algo.beta=0.5")))
    assert r["cached"] == {"data": True, "sft": True, "reward": True, "dpo": False, "eval": False}


def test_refresh_reruns_the_stage_and_what_follows(first_run):
    root, _, _ = first_run
    r = rlhf_pipeline(load_config(micro_overrides(root, "refresh=[dpo]")))
    assert r["cached"] == {"data": True, "sft": True, "reward": True, "dpo": False, "eval": False}


def test_ppo_pipeline_logs_every_step_and_the_kl_curve(first_run):
    root, _, _ = first_run
    r = rlhf_pipeline(load_config(micro_overrides(root, "experiment=micro_ppo", "tracking.log_checkpoints=true")))
    assert r["cached"] == {"data": True, "sft": True, "reward": True, "ppo": False, "eval": False}
    client = MlflowClient(r["tracking_uri"])
    run = stage_runs(client, r["run_id"])["ppo"]
    names = {
        "ppo/kl",
        "ppo/kl_k3",
        "ppo/eos_rate",
        "ppo/kl_coef",
        "ppo/score",
        "ppo/reward",
        "ppo/policy_loss",
        "ppo/value_loss",
        "ppo/clipfrac",
        "ppo/approx_kl",
        "ppo/entropy",
        "ppo/response_length",
        "ppo/advantages_mean",
        "ppo/advantages_std",
        "ppo/explained_variance",
        "ppo/gen_tokens_per_s",
        "ppo/train_tokens_per_s",
        "ppo/lr",
        "ppo/grad_norm",
    }
    assert names <= set(run.data.metrics), names - set(run.data.metrics)
    kl = client.get_metric_history(run.info.run_id, "ppo/kl")
    assert [m.step for m in kl] == [1, 2, 3, 4] and abs(kl[0].value) < 1e-4
    assert "figures/kl_curve.png" in [f.path for f in client.list_artifacts(run.info.run_id, "figures")]
    uploaded = [
        f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")
    ]  # tracking.log_checkpoints=true brings them back
    assert uploaded and {"policy", "value", "trainer_state.pt"} <= {
        Path(f.path).name for f in client.list_artifacts(run.info.run_id, uploaded[-1])
    }


@pytest.mark.parametrize(
    "algo, extra",
    [("rloo", ["experiment=micro_onpolicy"]), ("grpo", ["experiment=micro_onpolicy"]), ("best_of_n", ["algo.n=4"])],
)
def test_every_algorithm_is_a_stage_on_the_same_cached_upstream(first_run, algo, extra):
    root, _, _ = first_run
    r = rlhf_pipeline(load_config(micro_overrides(root, f"algo={algo}", *extra)))
    assert r["cached"] == {"data": True, "sft": True, "reward": True, algo: False, "eval": False}
    client = MlflowClient(r["tracking_uri"])
    runs = stage_runs(client, r["run_id"])
    assert set(runs) == {algo, "eval"} and EVAL_METRICS <= set(r["metrics"])
    if (
        algo == "best_of_n"
    ):  # nothing trained: the eval samples 4 SFT answers per prompt and keeps the reward model's pick
        assert r["metrics"]["eval/kl_analytic"] == pytest.approx(math.log(4) - 0.75) and r["run_name"].startswith(
            "best_of_n-"
        )
        return
    assert re.fullmatch(rf"{algo}-b[\d.]+-c0\.2-[0-9a-f]{{6}}", r["run_name"])
    kl = client.get_metric_history(runs[algo].info.run_id, f"{algo}/kl")
    assert [m.step for m in kl] == [1, 2, 3, 4] and abs(kl[0].value) < 1e-4
    assert "figures/kl_curve.png" in [f.path for f in client.list_artifacts(runs[algo].info.run_id, "figures")]
    versions = client.search_model_versions("name = 'rlhf-policy'")
    assert any(v.tags.get("stage") == algo for v in versions)


def test_every_metric_of_the_runs_is_in_the_metric_reference(first_run):
    """What the module's flow runs logged (DPO, PPO, RLOO, GRPO, best-of-n, every stage run's tracking metrics), against
    docs/metrics.yaml: each has an entry, and the tracking entries are each logged (MLflow's own system/* aside)."""
    from tests.test_docs import TRACKING_GROUP, check_reference, reference, unmatched

    root, _, result = first_run
    client = MlflowClient(result["tracking_uri"])
    names = {m for r in client.search_runs([result["experiment_id"]], max_results=1000) for m in r.data.metrics}
    names = {m for m in names if not m.startswith("system/")}
    assert not unmatched(names, list(reference()))[0]  # every logged metric has an entry
    check_reference({m for m in names if m.endswith(("/compute_s", "/peak_memory_mb"))}, [TRACKING_GROUP])
