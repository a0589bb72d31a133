from prefect import task

from rlhf.config import ModelConfig, SFTConfig
from rlhf.lineage import TRAINING
from rlhf.model_logging import GENERATION
from rlhf.settings import from_dict
from rlhf.stages import sft

from .runner import Lineage, run_stage


@task(name="sft")
def sft_stage(key: str, model: dict, sft_cfg: dict, data: dict, env: dict, fresh: bool = False) -> dict:
    """Supervised fine-tuning of the base model on the demonstrations."""
    m, c = from_dict(ModelConfig, model), from_dict(SFTConfig, sft_cfg)
    lineage = Lineage(data["datasets"], {"sft": TRAINING}, model_task=GENERATION)
    return run_stage(
        "sft", key, env, fresh, lambda ctx: sft.run(m, c, data["data_dir"], ctx), seed=c.seed, lineage=lineage
    )
