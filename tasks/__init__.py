"""Prefect tasks, one module per stage: cache keys, MLflow runs, checkpoints. No training math here."""

import os

# Defaults that make a new user's first run work offline on a fresh PREFECT_HOME (docs: Troubleshooting).
for _name, _value in {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_UI_ENABLED": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "GIT_PYTHON_REFRESH": "quiet",
    # Training progress and stage logs (loggers under `rlhf`) go to the flow run's logs in Prefect too.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "rlhf",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",  # the same loggers outside a flow run (a stage run alone)
}.items():
    os.environ.setdefault(_name, _value)

import logging  # noqa: E402

logging.getLogger("rlhf").setLevel(logging.INFO)  # progress lines are INFO records
for _quiet in ("mlflow.system_metrics", "mlflow.transformers"):  # start/stop notices, model-card and licence lookups
    logging.getLogger(_quiet).setLevel(logging.ERROR)
