"""The command line of the pipeline, and its config.

    python -m flows.pipeline [hydra overrides]      (also the console script ``rlhf-pipeline``)
    rlhf_pipeline(load_config([...overrides]))     (tests, benchmarks: the Prefect flow, flows/dag.py)

A run whose every stage is already cached is answered here, from the stage keys and the persisted results,
without starting Prefect or loading a model (:mod:`flows.cached`); the rest goes to the Prefect flow.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from flows import schema
from rlhf.config import ConfigError, validate

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
PROJECT_DIR = CONF_DIR.parent
schema.register(CONF_DIR)


def __getattr__(name: str):
    """``rlhf_pipeline`` (the Prefect flow) is imported when asked for: the command line needs Prefect only
    when something is left to run."""
    if name == "rlhf_pipeline":
        from flows.dag import rlhf_pipeline

        return rlhf_pipeline
    raise AttributeError(name)


def load_config(overrides: list[str] | None = None) -> dict:
    """Compose ``conf/`` with Hydra overrides into a plain dict with an absolute ``paths.root``."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides or []))
    except HydraException as e:  # a wrong type or an unknown key, found against the schema while composing
        cause = f": {e.__cause__}" if e.__cause__ else ""
        raise ConfigError(
            f"{e}{cause}. Fix: check the key and its type (`python -m flows.pipeline --help` lists every field)."
        ) from e
    return to_container(cfg)


def to_container(cfg: DictConfig) -> dict:
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    container["paths"]["root"] = str(Path(container["paths"]["root"]).expanduser().resolve())
    return container


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Hydra app: compose, validate (fails before any training), run the flow; returns the objective."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from flows.sweep import sweep_id_for

    logging.getLogger("httpx").setLevel(logging.WARNING)
    container = to_container(cfg)
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        container["sweep_id"] = container.get("sweep_id") or sweep_id_for(hydra_cfg.sweep.dir)
        container["sweep_member"] = hydra_cfg.job.num
    cfg = validate(container)
    objective = cfg.objective_metric()  # a wrong objective fails here, before any training
    from flows.cached import cached_run

    result = cached_run(cfg)
    if result is None:
        from flows.dag import rlhf_pipeline
        from rlhf.preemption import Preempted

        try:
            result = rlhf_pipeline(container)
        except Preempted as stopped:  # a stop signal mid-stage: say so and exit as a signalled process does
            print(stopped, flush=True)
            sys.exit(stopped.exit_code)
    m = result["metrics"]
    print("\n".join(f"{k:28s} {v:.4f}" for k, v in sorted(m.items())))
    return float(m[objective])


if __name__ == "__main__":
    main()
