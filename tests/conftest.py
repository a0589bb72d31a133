"""Shared fixtures: a micro config in a temporary root, one Prefect test server per session (pytest-xdist: per
worker), and the environment a pipeline started as a subprocess runs with."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

SHARED_HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


@pytest.fixture(scope="session")
def prefect_server():
    import tasks  # noqa: F401  (Prefect's defaults, set in tasks/__init__.py, before Prefect is imported)

    # isort: split
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


def pytest_collection_modifyitems(items):
    """Files with a slow test first (a stable sort): the two workers take whole files in this order, so the last files
    to start are the quick ones and neither worker idles while the other runs a long file to the end."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


def pipeline_env(home: Path, api_url: str) -> dict:
    """The environment of a pipeline run as a subprocess: its own PREFECT_HOME, offline, no tracking URI of ours, its
    flow runs reported to ``api_url`` (the worker's server: ``prefect_server``) rather than to an ephemeral server of
    its own (about 20 s to start here; the CLI first-run test starts one, as on a new user's machine)."""
    env = {**os.environ, "PREFECT_HOME": str(home), "HF_HUB_OFFLINE": "1", "PREFECT_API_URL": api_url}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def micro_overrides(root: Path, *extra: str) -> list[str]:
    return ["experiment=micro", f"paths.root={root}", f"tracking.uri=sqlite:///{root}/mlflow.db", *extra]


@pytest.fixture
def micro(tmp_path):
    from flows.compose import load_config

    return lambda *extra: load_config(micro_overrides(tmp_path, *extra))


@pytest.fixture(scope="session")
def upstream(tmp_path_factory):
    """Data, SFT and a reward model on tiny sizes, trained once per worker for every stage test."""
    from rlhf.config import DataConfig, RewardConfig, SFTConfig
    from rlhf.stages import prepare, reward, sft

    from .tiny import LOOP, TINY_MODEL, ctx

    root = tmp_path_factory.mktemp("stages")
    torch.manual_seed(0)  # the tiny model's initialisation: the same upstream whichever tests ran before
    data = prepare.run(
        DataConfig(n_sft=64, n_pref=64, n_eval_prompts=16, n_eval_pref=16, n_ppo_prompts=32), ctx(root, "data")
    )
    c = ctx(root, "sft")
    s = sft.run(TINY_MODEL, SFTConfig(lr=3e-3, epochs=2, **LOOP), data["data_dir"], c)
    rc = ctx(root, "rm")
    r = reward.run(RewardConfig(lr=1e-3, epochs=1, **LOOP), TINY_MODEL, data["data_dir"], s["model_path"], rc)
    return {"root": root, "data": data["data_dir"], "sft": s, "sft_sink": c.sink, "rm": r, "rm_sink": rc.sink}
