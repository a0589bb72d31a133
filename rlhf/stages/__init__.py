"""The ML of each pipeline stage: ``run(...) -> summary dict``, importable without Prefect."""
