"""The pipeline's config composed from ``conf/`` with Hydra overrides, as the command line, the deployments, the tests
and the benchmarks all compose it (``load_config([...overrides])``)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from flows import schema
from rlhf.settings import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
PROJECT_DIR = CONF_DIR.parent
schema.register(CONF_DIR)


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
