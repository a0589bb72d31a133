"""Datasets as MLflow dataset inputs: what a stage trained or evaluated on, by content digest.

The data stage fingerprints each split it writes (:func:`rlhf.data.fingerprint_splits`: a sha256 of
the file, its columns and row count) and keeps the fingerprints in its record; every stage run logs the splits it
reads, with a context (training / evaluation), and the pipeline's parent run logs them all. The runs
table's Dataset column shows them, and a Cached stage's run carries the same digests as a fresh one.
"""

from __future__ import annotations

import json

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.tracking import MlflowClient

CONTEXT_TAG = "mlflow.data.context"  # the key MLflow's UI reads the context from
TRAINING, EVALUATION = "training", "evaluation"
SPLIT_CONTEXTS = {
    "sft": TRAINING,
    "pref": TRAINING,
    "ppo_prompts": TRAINING,
    "eval_prompts": EVALUATION,
    "eval_pref": EVALUATION,
}


def _entity(fp: dict) -> Dataset:
    schema = {"mlflow_colspec": [{"type": "string", "name": c, "required": True} for c in fp["columns"]]}
    source = {"uri": fp["source"], **({"origin": fp["origin"]} if fp.get("origin") else {})}
    return Dataset(
        name=fp["name"],
        digest=fp["digest"],
        source_type="local",
        source=json.dumps(source),
        schema=json.dumps(schema),
        profile=json.dumps({"num_rows": fp["n_rows"]}),
    )


def log_datasets(client: MlflowClient, run_id: str, fingerprints: dict[str, dict], contexts: dict[str, str]) -> None:
    """Log the splits named in ``contexts`` (split -> context) as dataset inputs of ``run_id``."""
    inputs = [
        DatasetInput(_entity(fingerprints[split]), [InputTag(CONTEXT_TAG, context)])
        for split, context in contexts.items()
        if split in fingerprints
    ]
    if inputs:
        client.log_inputs(run_id, datasets=inputs)
