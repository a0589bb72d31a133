"""Where a stage's outputs live under ``paths.root`` and the record it hands back (no Prefect: the cached fast
path of the command line reads them too)."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf import checkpoint


def stage_dir(root: str | Path, stage: str, key: str) -> Path:
    return Path(root) / "stages" / stage / key


RUN_ID_FILE = "mlflow_run_id"
RECORD_FILE = "record.json"


def write_record(out_dir: Path, record: dict) -> None:
    """The finished stage's record beside its outputs (written last, atomically): a stage that ran in
    another process (a work pool's flow run) hands its result back through it."""
    checkpoint.atomic_write_json(out_dir / RECORD_FILE, record)


def read_record(root: str | Path, stage: str, key: str) -> dict:
    path = stage_dir(root, stage, key) / RECORD_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"stage {stage} finished without {path}. Fix: give the pipeline's and the stage's workers "
            f"the same paths.root (a shared volume); it is {root} here."
        )
    return json.loads(path.read_text())
