"""Shared fixtures: a micro config in a temporary root, and one Prefect test server per session."""

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
    from prefect.testing.utilities import prefect_test_harness

    import tasks  # noqa: F401  (offline defaults)

    with prefect_test_harness(server_startup_timeout=180):
        yield


def micro_overrides(root: Path, *extra: str) -> list[str]:
    return ["experiment=micro", f"paths.root={root}", f"tracking.uri=sqlite:///{root}/mlflow.db", *extra]


@pytest.fixture
def micro(tmp_path):
    from flows.compose import load_config

    return lambda *extra: load_config(micro_overrides(tmp_path, *extra))
