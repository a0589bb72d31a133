"""Comparing runs as a person does: a micro beta x clip sweep logged to a real `mlflow server`, then the
MLflow UI in Debian's Chromium (headless, driven by Playwright; no browser is downloaded).

One sweep serves every test here: the sweep is one row whose children are its members (and theirs the
stage runs), data, SFT and the reward model are trained once, the summary figures are on the sweep's row,
the comparison notebook runs against the same server, and the browser sees all of it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import pipeline_env
from tests.servers import Processes, start_mlflow_server

pytestmark = [pytest.mark.slow, pytest.mark.integration]
PROJECT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("RLHF_TEST_ARTIFACTS", PROJECT / "tests" / "artifacts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MEMBERS = {("0.02", "0.1"), ("0.02", "0.2"), ("0.1", "0.1"), ("0.1", "0.2")}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, prefect_server):
    tmp = tmp_path_factory.mktemp("ui")
    procs = Processes(tmp / "logs")
    env = pipeline_env(tmp / "prefect", prefect_server)
    uri = start_mlflow_server(procs, tmp / "mlflow", env)
    try:
        procs.wait_healthy("mlflow-server", f"{uri}/health")
        cmd = [
            sys.executable,
            "-m",
            "flows.pipeline",
            "-m",
            "experiment=micro_ppo",
            f"paths.root={tmp / 'root'}",
            "algo.beta=0.02,0.1",
            "algo.clip_range=0.1,0.2",
            "algo.lr=0.01",  # enough for the members' policies to move apart: their eval metrics differ on the pages
        ]
        out = subprocess.run(
            cmd, cwd=PROJECT, env={**env, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True, timeout=900
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:] + procs.tail("mlflow-server")
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("rlhf")
        yield {"uri": uri, "client": client, "experiment": experiment, "tmp": tmp}
    finally:
        procs.stop_all()


def runs(sweep, query: str):
    return sweep["client"].search_runs([sweep["experiment"].experiment_id], query, max_results=1000)


def test_a_sweep_is_one_row_with_its_members_nested_and_the_summary_on_it(sweep):
    client = sweep["client"]
    (row,) = runs(sweep, "tags.`rlhf.sweep` = 'true'")
    assert row.info.status == "FINISHED" and row.data.tags["sweep_summary"] == "true"
    assert row.info.run_name.startswith("sweep-ppo-betaxclip_range-")
    members = runs(sweep, f"tags.mlflow.parentRunId = '{row.info.run_id}'")
    assert {(m.data.params["algo.beta"], m.data.params["algo.clip_range"]) for m in members} == MEMBERS
    assert sorted(m.info.run_name for m in members) == [
        "ppo-b0.02-c0.1-m0",
        "ppo-b0.02-c0.2-m1",
        "ppo-b0.1-c0.1-m2",
        "ppo-b0.1-c0.2-m3",
    ]
    assert all(m.data.tags["sweep_id"] == row.data.tags["sweep_id"] for m in members)
    for m in members:  # each member's stage runs are its children
        children = {r.data.tags["stage"] for r in runs(sweep, f"tags.mlflow.parentRunId = '{m.info.run_id}'")}
        assert {"ppo", "eval"} <= children
    for stage, n in (("sft", 1), ("reward", 1), ("ppo", 4), ("eval", 4)):  # upstream stages trained once
        assert len(runs(sweep, f"tags.stage = '{stage}'")) == n, stage
    files = {f.path for f in client.list_artifacts(row.info.run_id, "sweep")}
    assert {"sweep/kl_curves.png", "sweep/reward_vs_kl.png", "sweep/members.json"} <= files
    assert len({round(m.data.metrics["eval/gold_reward"], 6) for m in members}) >= 3  # the comparison shows something


def test_the_sweep_rows_metrics_are_in_the_metric_reference(sweep):
    from tests.test_docs import SWEEP_GROUP, check_reference

    (row,) = runs(sweep, "tags.`rlhf.sweep` = 'true'")
    check_reference(set(row.data.metrics), [SWEEP_GROUP])


def test_the_comparison_notebook_reads_the_sweep_from_the_server(sweep):
    import nbformat
    from nbclient import NotebookClient

    figures = sweep["tmp"] / "figures"
    nb = nbformat.read(PROJECT / "notebooks" / "compare_runs.ipynb", as_version=4)
    env = {"MLFLOW_TRACKING_URI": sweep["uri"], "RLHF_FIGURES_DIR": str(figures)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits the environment
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(PROJECT)}}).execute()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert "4 finished members" in "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert (figures / "kl_curves.png").stat().st_size > 1000 and (figures / "reward_vs_kl.png").stat().st_size > 1000


def cells(page, run_name: str) -> dict[str, str]:
    """The texts of a run's row in the runs table by column id (ag-grid splits a row into its pinned and
    scrolled parts; both carry the row's index)."""
    index = page.get_by_role("row").filter(has_text=run_name).first.get_attribute("row-index")
    out = {}
    for part in page.locator(f"[role=row][row-index='{index}']").all():
        for cell in part.locator("[role=gridcell]").all():
            out[cell.get_attribute("col-id")] = cell.inner_text()
    return out


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium on this machine: `apt-get install chromium` (make test does it where apt and root are "
    "available)",
)
def test_the_mlflow_ui_shows_the_sweep_its_members_datasets_models_and_charts(sweep):
    from playwright.sync_api import sync_playwright

    from flows.report import experiment_link

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (row,) = runs(sweep, "tags.`rlhf.sweep` = 'true'")
    members = ["ppo-b0.02-c0.1-m0", "ppo-b0.02-c0.2-m1", "ppo-b0.1-c0.1-m2", "ppo-b0.1-c0.2-m3"]
    args = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        page = browser.new_page(viewport={"width": 1700, "height": 950})
        try:
            page.goto(
                experiment_link(sweep["uri"], sweep["experiment"].experiment_id)
            )  # the link the README and every run print
            page.get_by_role("columnheader", name="Run Name").first.wait_for(
                timeout=60_000
            )  # the runs table, not GenAI's traces
            for header in ("Dataset", "Models"):
                assert page.get_by_role("columnheader", name=header).first.is_visible()
            assistant = page.get_by_role("button", name="Close")
            if assistant.count():
                assistant.first.click()  # the assistant panel hides half the table
            sweep_row = page.get_by_role("row").filter(has_text=row.info.run_name)
            assert (
                sweep_row.count() == 1 and page.get_by_text(members[0]).count() == 0
            )  # members folded under the sweep
            sweep_row.locator("button[data-component-id*='runnamecellrenderer']").click()  # expand the sweep
            page.get_by_text(members[-1]).wait_for(timeout=20_000)
            page.wait_for_timeout(1500)  # the Models cells fill in from a second request
            for name in members:
                row_cells = cells(page, name)
                assert "synthetic.ppo_prompts" in row_cells["attributes.`Dataset`"], row_cells
                assert "rlhf-policy" in row_cells["attributes.`Models`"], row_cells
            page.screenshot(path=str(ARTIFACTS / "mlflow_ui_runs.png"))
            page.locator("label:has(input[name=runs-view-mode][value=CHART])").click()  # the chart view
            title = page.get_by_text("eval/gold_reward", exact=True).first
            title.wait_for(timeout=30_000)
            card = page.locator("[data-testid='draggable-chart-cards-grid'] > div").filter(has=title).first
            page.wait_for_timeout(1500)
            legend = card.inner_text()
            assert sum(name in legend for name in members) >= 2, legend  # a bar per member, named in the legend
            assert card.locator("svg, canvas").count() > 0
            page.screenshot(path=str(ARTIFACTS / "mlflow_ui_charts.png"))
        finally:
            browser.close()
    assert (ARTIFACTS / "mlflow_ui_runs.png").stat().st_size > 20_000 and (
        ARTIFACTS / "mlflow_ui_charts.png"
    ).stat().st_size > 20_000
