"""The pipeline as it runs in production: Prefect server, MLflow server, work pools, workers, deployments.

Everything on loopback and started here: `prefect server start` (SQLite), `mlflow server` (SQLite and an
artifact root), `python -m flows.deploy` (pools, tag limit, deployments), a process worker on the cpu
pool and one on the gpu pool. The policy stage runs as a flow run of the stage deployment on the gpu pool; SFT and
the reward model stay in the pipeline's flow run (``dispatch.stages=[dpo]``: each dispatched stage is a process
start, 20 s here, and every training stage goes through the same dispatch).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests.servers import BIN, PrefectAPI, Processes, start_mlflow_server, start_prefect_server

pytestmark = pytest.mark.slow
PROJECT = Path(__file__).resolve().parents[1]
PIPELINE, STAGE = "rlhf-pipeline/nightly", "rlhf-stage/gpu"
MICRO = ["experiment=micro", "dispatch.poll_s=1", "dispatch.stages=[dpo]"]
RUN_TIMEOUT = 420
CAMPAIGN_DEPLOYMENT = "rlhf-campaign/rounds"
CAMPAIGN = ["experiment=micro_campaign", "campaign.name=arrivals", "campaign.labeller=folder"]


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp, self.procs = tmp, Processes(tmp / "logs")
        self.root, self.store = tmp / "root", tmp / "mlflow"
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "RLHF_HOME": str(self.root),
            "PREFECT_LOGGING_LEVEL": "INFO",
        }
        self.env.pop("MLFLOW_TRACKING_URI", None)

    def start(self) -> None:
        self.api_url = start_prefect_server(self.procs, self.tmp / "prefect", self.env)
        self.mlflow_url = start_mlflow_server(self.procs, self.store, self.env)
        self.env["MLFLOW_TRACKING_URI"] = self.mlflow_url
        self.procs.wait_healthy("prefect-server", f"{self.api_url}/health")
        self.procs.wait_healthy("mlflow-server", f"{self.mlflow_url}/health")
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "flows.deploy",
                "campaign.base_overrides=[" + ",".join(f"'{o}'" for o in CAMPAIGN) + "]",
            ],
            cwd=PROJECT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        for pool in ("cpu", "gpu"):
            self.procs.start(
                f"worker-{pool}",
                [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
                self.env,
                cwd=PROJECT,
            )
        self.prefect = PrefectAPI(self.api_url)
        self.mlflow = httpx.Client(base_url=f"{self.mlflow_url}/api/2.0/mlflow", timeout=30)

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{self.procs.tail(name)}" for name in self.procs.procs)

    def completed(self, run_id: str) -> dict:
        run = self.prefect.wait(run_id, RUN_TIMEOUT)
        assert run["state_type"] == "COMPLETED", f"{run['state_name']}: {run['state']['message']}\n{self.logs()}"
        return run

    def stage_runs(self) -> dict[str, dict]:
        dep = self.prefect.deployment(STAGE)["id"]
        return {r["id"]: r for r in self.prefect.flow_runs(deployment_id={"any_": [dep]})}

    def mlflow_get(self, endpoint: str, **params) -> dict:
        r = self.mlflow.get(endpoint, params=params)
        r.raise_for_status()
        return r.json()

    def parent_run(self, flow_run_id: str) -> dict:
        exp = self.mlflow_get("/experiments/get-by-name", experiment_name="rlhf")["experiment"]["experiment_id"]
        r = self.mlflow.post(
            "/runs/search", json={"experiment_ids": [exp], "filter": "tags.pipeline = 'rlhf'", "max_results": 100}
        )
        r.raise_for_status()
        runs = [run for run in r.json()["runs"] if _tags(run).get("prefect.flow_run_id") == flow_run_id]
        assert len(runs) == 1, f"expected one parent MLflow run for flow run {flow_run_id}, got {len(runs)}"
        return runs[0]


def _tags(run: dict) -> dict:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start()
        yield c
    finally:
        c.procs.stop_all()


@pytest.fixture(scope="module")
def first(cluster):
    before = set(cluster.stage_runs())
    run = cluster.completed(cluster.prefect.trigger(PIPELINE, {"overrides": MICRO}))
    return run, {k: v for k, v in cluster.stage_runs().items() if k not in before}


def test_triggered_pipeline_trains_on_the_gpu_pool_and_logs_to_the_tracking_server(cluster, first):
    run, stage_runs = first
    # The policy stage ran as its own flow run of the stage deployment (gpu pool); data, SFT, reward and eval did not.
    assert [r["parameters"]["stage"] for r in stage_runs.values()] == ["dpo"]
    for r in stage_runs.values():  # named after the stage, its key and the pipeline run, not at random
        assert re.fullmatch(rf"{r['parameters']['stage']}-[0-9a-f]{{6}} of {re.escape(run['name'])}", r["name"]), r[
            "name"
        ]
    assert re.fullmatch(r"dpo-b0\.3-[0-9a-f]{6}", run["name"])
    assert all(r["state_type"] == "COMPLETED" and r["work_pool_name"] == "gpu" for r in stage_runs.values())
    assert run["work_pool_name"] == "cpu"
    local = {t["name"].rsplit("-", 1)[0] for t in cluster.prefect.task_runs([run["id"]])}
    assert {"data", "sft", "reward", "eval"} <= local

    parent = cluster.parent_run(run["id"])
    metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert 0.0 <= metrics["eval/win_rate_gold"] <= 1.0 and "eval/kl" in metrics
    dpo_run = _tags(parent)["stage.dpo.run_id"]
    history = cluster.mlflow_get("/metrics/get-history", run_id=dpo_run, metric_key="dpo/loss")["metrics"]
    first_loss = min(history, key=lambda m: m["step"])
    assert first_loss["step"] == 1 and first_loss["value"] == pytest.approx(math.log(2), abs=0.01)

    versions = cluster.mlflow_get("/model-versions/search", filter="name='rlhf-policy'")["model_versions"]
    assert len(versions) == 1 and {t["key"]: t["value"] for t in versions[0]["tags"]}["stage_run_id"] == dpo_run
    # The model went through the server into its artifact root, not beside the worker.
    assert list((cluster.store / "artifacts").rglob("model.safetensors"))
    assert not cluster.mlflow_get("/artifacts/list", run_id=dpo_run, path="checkpoints").get(
        "files"
    )  # checkpoints stay local


def test_a_scheduled_run_starts_without_a_trigger_and_is_fully_cached_dispatching_nothing(cluster, first):
    """The scheduler starts a run of the first run's config: every stage Cached, no stage flow run dispatched."""
    before = set(cluster.stage_runs())
    dep = cluster.prefect.deployment(PIPELINE)
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 2 * * *"]  # the nightly run
    soon = datetime.now(UTC) + timedelta(seconds=5)
    cluster.prefect.add_schedule(PIPELINE, {"interval": 86400, "anchor_date": soon.isoformat()}, {"overrides": MICRO})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        due = [
            r
            for r in cluster.prefect.flow_runs(deployment_id={"any_": [dep["id"]]})
            if r["auto_scheduled"]
            and abs(datetime.fromisoformat(r["expected_start_time"]) - soon) < timedelta(seconds=2)
        ]
        if due:
            break
        time.sleep(1)
    assert due, f"the scheduler created no run for {soon}\n{cluster.logs()}"
    run = cluster.completed(due[0]["id"])
    assert run["parameters"]["overrides"] == MICRO and run["parameters"]["base_overrides"] == ["dispatch=pools"]
    states = {t["name"].rsplit("-", 1)[0]: t["state_name"] for t in cluster.prefect.task_runs([run["id"]])}
    assert states == {s: "Cached" for s in ("data", "sft", "reward", "dpo", "eval")}
    assert set(cluster.stage_runs()) == before
    assert _tags(cluster.parent_run(run["id"]))["stage.dpo.cached"] == "true"


def test_two_runs_never_train_at_once_on_one_gpu_slot(cluster, first):
    before = set(cluster.stage_runs())
    # DPO trains long enough (algo.epochs) that the second run's stage flow is up while the first trains,
    # however far apart the two pipelines' own start-ups land on 2 cores: the start-ups were seen up to 3 s apart
    # (6 epochs were not enough); 30 epochs trained in 6 s beside another test file, the second stage flow up 3 s
    # after the first: 40 leave a margin without the minute that 60 cost in the whole suite
    ids = [
        cluster.prefect.trigger(PIPELINE, {"overrides": [*MICRO, f"algo.beta={b}", "algo.epochs=40"]})
        for b in (0.5, 0.7)
    ]
    for run_id in ids:
        cluster.completed(run_id)
    new = [r for k, r in cluster.stage_runs().items() if k not in before]
    assert sorted(r["parameters"]["stage"] for r in new) == ["dpo", "dpo"]
    trains = sorted(
        (t for t in cluster.prefect.task_runs([r["id"] for r in new]) if "gpu" in t["tags"]),
        key=lambda t: t["start_time"],
    )
    assert len(trains) == 2
    t = lambda s: datetime.fromisoformat(s)  # noqa: E731
    first_end, second_start = t(trains[0]["end_time"]), t(trains[1]["start_time"])
    assert second_start >= first_end, "two training stages held the gpu slot at the same time"
    # Both stage flow runs were up while the first trained: the second waited for the slot, not for a worker.
    last_up = max(t(r["start_time"]) for r in new)
    assert last_up < first_end, (
        f"second stage flow run started {last_up}, after the first trained ({first_end}): nothing to serialise"
    )


def labels_file(path: Path, n: int, seed: int) -> Path:
    """``n`` labelled comparisons of the synthetic task, as a person would drop them."""
    import json
    import random

    from rlhf.synthetic import preference_pair, random_spec

    rng = random.Random(seed)
    rows = [preference_pair(rng, random_spec(rng, held_out=False), 0.3, 0.0) for _ in range(n)]
    path.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for r in rows))
    return path


def test_labels_arriving_start_rounds_of_the_campaign_deployment_one_at_a_time(cluster):
    """`flows.labels` puts a file in the campaign's inbox and emits the labels-arrived event; the deployment's trigger
    starts a round; a second file while that round runs starts another, which waits for the first to end."""
    dep = cluster.prefect.deployment(CAMPAIGN_DEPLOYMENT)
    assert (
        dep["global_concurrency_limit"]["limit"] == 1 and dep["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    )
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 3 * * 1"]
    files = [labels_file(cluster.tmp / f"batch-{i}.jsonl", 6, i) for i in (1, 2)]
    for f in files:
        out = subprocess.run(
            [sys.executable, "-m", "flows.labels", str(f), *CAMPAIGN],
            cwd=PROJECT,
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0 and "event rlhf.labels.arrived sent" in out.stdout, out.stdout + out.stderr
    deadline, runs = time.monotonic() + 60, []
    while time.monotonic() < deadline and len(runs) < 2:
        runs = [r for r in cluster.prefect.flow_runs(deployment_id={"any_": [dep["id"]]}) if not r["auto_scheduled"]]
        time.sleep(1)  # (the cron schedule's own runs, weeks ahead, are auto-scheduled)
    assert len(runs) == 2, f"{len(runs)} flow runs of {CAMPAIGN_DEPLOYMENT} after two events\n{cluster.logs()}"
    done = sorted((cluster.completed(r["id"]) for r in runs), key=lambda r: r["start_time"])
    t = datetime.fromisoformat
    assert t(done[1]["start_time"]) >= t(done[0]["end_time"]), "two rounds of one campaign ran at once"
    rounds = [json.loads(p.read_text()) for p in sorted((cluster.root / "campaigns" / "arrivals").glob("round-*.json"))]
    assert [r["round"] for r in rounds] == [1, 2]
    taken = [name for r in rounds for name in r["label_files"]]
    assert sorted(taken) == ["batch-1.jsonl", "batch-2.jsonl"]  # each file taken once, by the round that ran after it
