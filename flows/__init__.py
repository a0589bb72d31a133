"""Prefect flows: the pipeline DAG and its entry points."""

import tasks  # noqa: F401  (sets Prefect's offline defaults before prefect is imported)
