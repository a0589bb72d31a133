from prefect import task

from rlhf.config import DataConfig
from rlhf.lineage import SPLIT_CONTEXTS
from rlhf.settings import from_dict
from rlhf.stages import prepare

from .runner import Lineage, run_stage


@task(name="data")
def data_stage(key: str, data: dict, env: dict, fresh: bool = False) -> dict:
    """Build every split (synthetic task or hub dataset) and write them as JSON lines."""
    cfg = from_dict(DataConfig, data)
    return run_stage(
        "data", key, env, fresh, lambda ctx: prepare.run(cfg, ctx), seed=cfg.seed, lineage=Lineage(None, SPLIT_CONTEXTS)
    )
