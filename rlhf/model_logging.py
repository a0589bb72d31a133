"""A stage's final model as an MLflow model, and in the Model Registry.

Policies (SFT, DPO, PPO, ...) are logged as ``text-generation`` and the reward model as
``text-classification`` (a regression head: the pipeline returns the raw score) with MLflow's
transformers flavour, tokenizer included, so ``mlflow.transformers.load_model("models:/<name>/<version>")``
gives back a pipeline in one call. The logged model belongs to the stage's run (the runs table's Models
column); a registered version carries tags that say where it came from: the pipeline run, the stage and
its cache key, and the models it was trained from.

Each model also serves (``mlflow models serve``, or ``mlflow.pyfunc.load_model``) as the stages use it:
- a policy on plain text takes prompts and answers with the answer alone (``return_full_text=False``);
  its signature's params schema (:func:`serving_params`) lets a request set ``max_new_tokens``,
  ``do_sample``, ``temperature``, ``top_p``, ``top_k``, each defaulting to how the stages sample;
- a policy whose tokenizer has a chat template (conversational data) is logged as MLflow's
  ``llm/v1/chat`` task: OpenAI-style ``messages`` in, the template applied as in training, a
  ``chat.completion`` out (``max_tokens``, ``temperature``, ``top_p``, ``top_k`` are fields of the request);
- the reward model takes texts and gives one raw score per text (``label``, ``score``).
Generation stops at the tokenizer's EOS, as in the stages (the end of turn for chat models).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

GENERATION, SCORING = "text-generation", "text-classification"
CHAT = "llm/v1/chat"  # MLflow's OpenAI-compatible chat task over a text-generation pipeline
log = logging.getLogger(__name__)


def logged_model_name(stage: str) -> str:
    """The MLflow logged-model name of ``stage``: MLflow refuses ``/ : . % " '`` in one, and ensemble
    members are stages ``reward.1``, ``reward.2``, ... (they become ``reward-1``, ...)."""
    return re.sub(r"[/:.%\"']", "-", stage)


def _requirements() -> list[str]:
    """What loading the model needs, pinned to this environment (MLflow would otherwise infer them by
    importing the model in a subprocess, which costs seconds per model)."""
    return [
        f"{name}=={importlib.metadata.version(name)}" for name in ("torch", "transformers", "tokenizers", "safetensors")
    ]


def _load(path: Path, task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    cls = AutoModelForSequenceClassification if task == SCORING else AutoModelForCausalLM
    model = cls.from_pretrained(path)
    if task == SCORING:
        model.config.problem_type = "regression"  # one raw score per text, not a sigmoid "probability"
    tokenizer = AutoTokenizer.from_pretrained(path)
    if task == GENERATION:  # served generation stops where the stages' sampling stops
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def serving_params() -> dict:
    """What a request to a served policy may set, and the defaults: how the stages sample (SamplingConfig's)."""
    from .config_training import SamplingConfig

    s = SamplingConfig()
    return {
        "max_new_tokens": s.max_new_tokens,
        "do_sample": True,  # the policy's own distribution, as RLHF trained it; false: greedy
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,  # 0: off, as in the stages (a pretrained generation_config.json may set one)
    }


def flavour_options(task: str, tokenizer) -> dict:
    """``save_model``'s task, signature and model_config (the pyfunc's fixed pipeline arguments) for a model
    of ``task``: see the module's docstring for what each serves."""
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import ColSpec, Schema

    if task == SCORING:
        scores = Schema([ColSpec("string", "label"), ColSpec("double", "score")])
        return {"task": task, "signature": ModelSignature(Schema([ColSpec("string")]), scores)}
    if tokenizer.chat_template:  # MLflow sets the chat signature itself; these are the defaults under it
        return {"task": CHAT, "model_config": serving_params()}
    signature = infer_signature(["prompt"], ["answer"], params=serving_params())
    return {"task": task, "signature": signature, "model_config": {"return_full_text": False}}


def log_final_model(
    client: MlflowClient,
    experiment_id: str,
    run_id: str,
    pipeline_run_id: str,
    path: Path,
    name: str,
    task: str,
    registered_name: str | None = None,
    version_tags: dict[str, str] | None = None,
) -> dict:
    """Log the HF folder ``path`` as the MLflow model ``name``, made by stage run ``run_id`` of the pipeline
    run ``pipeline_run_id``; register it under ``registered_name`` when given. Returns ``model_id``,
    ``model_uri`` and, when registered, ``registered_model`` and ``version``.

    The runs table's Models column lists a logged model on the run it names as its source and a
    registered version on its run: the model's source is the pipeline run (the row people compare), the
    version's run is the stage run that trained it.

    Everything goes through ``client`` (no fluent API): the fluent calls read and reset the process's
    global tracking URI, which is not ours to touch (several pipelines with different stores share a process).
    """
    import mlflow
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    model, tokenizer = _load(Path(path), task)
    logged = client.create_logged_model(
        experiment_id,
        name=logged_model_name(name),
        source_run_id=pipeline_run_id,
        tags={"task": task, "stage_run_id": run_id},
    )
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "model"
        meta = Model(artifact_path=logged.artifact_location, run_id=pipeline_run_id, model_id=logged.model_id)
        mlflow.transformers.save_model(
            {"model": model, "tokenizer": tokenizer},
            str(local),
            mlflow_model=meta,
            pip_requirements=_requirements(),
            **flavour_options(task, tokenizer),
        )
        client.log_model_artifacts(logged.model_id, str(local))
    client.finalize_logged_model(logged.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    out = {"model_id": logged.model_id, "model_uri": f"models:/{logged.model_id}"}
    if registered_name:
        out.update(register(client, registered_name, logged, run_id, version_tags or {}))
    return out


def register(client: MlflowClient, registered_name: str, logged, run_id: str, version_tags: dict) -> dict:
    """A new version of ``registered_name`` (created if need be) for the logged model, made by stage run ``run_id``."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(registered_name)
    except MlflowException:  # it exists (or another run made it just now)
        pass
    # The source is the artifact location: a models:/ source would be resolved against the global tracking URI.
    tags = {k: str(v) for k, v in version_tags.items()}
    version = client.create_model_version(
        registered_name,
        logged.artifact_location,
        run_id=run_id,
        model_id=logged.model_id,
        tags=tags,
        await_creation_for=0,
    )
    log.info("registered %s version %s (%s)", registered_name, version.version, json.dumps(version_tags))
    return {"registered_model": registered_name, "version": str(version.version)}
