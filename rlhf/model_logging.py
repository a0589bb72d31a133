"""A stage's final model as an MLflow model, and in the Model Registry.

Policies (SFT, DPO, PPO, ...) are logged as ``text-generation`` and the reward model as
``text-classification`` (a regression head: the pipeline returns the raw score) with MLflow's
transformers flavour, tokenizer included, so ``mlflow.transformers.load_model("models:/<name>/<version>")``
gives back a pipeline in one call. The logged model belongs to the stage's run (the runs table's Models
column); a registered version carries tags that say where it came from: the pipeline run, the stage and
its cache key, and the models it was trained from.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from pathlib import Path

from mlflow.tracking import MlflowClient

GENERATION, SCORING = "text-generation", "text-classification"
log = logging.getLogger(__name__)


def _requirements() -> list[str]:
    """What loading the model needs, pinned to this environment (MLflow would otherwise infer them by
    importing the model in a subprocess, which costs seconds per model)."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in ("torch", "transformers", "tokenizers", "safetensors")]


def _load(path: Path, task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    cls = AutoModelForSequenceClassification if task == SCORING else AutoModelForCausalLM
    model = cls.from_pretrained(path)
    if task == SCORING:
        model.config.problem_type = "regression"  # one raw score per text, not a sigmoid "probability"
    return model, AutoTokenizer.from_pretrained(path)


def log_final_model(client: MlflowClient, tracking_uri: str, experiment_id: str, run_id: str, path: Path, name: str, task: str,
                    registered_name: str | None = None, version_tags: dict[str, str] | None = None) -> dict:
    """Log the HF folder ``path`` as the MLflow model ``name`` of run ``run_id``; register it under
    ``registered_name`` when given. Returns ``model_id``, ``model_uri`` and, when registered,
    ``registered_model`` and ``version``."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    model, tokenizer = _load(Path(path), task)
    logged = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, tags={"task": task})
    with _use_tracking_uri(tracking_uri):
        info = mlflow.transformers.log_model(
            {"model": model, "tokenizer": tokenizer}, name=name, task=task, model_id=logged.model_id, run_id=run_id,
            pip_requirements=_requirements(), registered_model_name=registered_name, await_registration_for=0,
        )
    out = {"model_id": logged.model_id, "model_uri": f"models:/{logged.model_id}"}
    if registered_name:
        version = str(info.registered_model_version)
        for key, value in (version_tags or {}).items():
            client.set_model_version_tag(registered_name, version, key, str(value))
        out.update(registered_model=registered_name, version=version)
        log.info("registered %s version %s (%s)", registered_name, version, json.dumps(version_tags or {}))
    return out
