from prefect import task

from rlhf.config import DPOConfig, ModelConfig, from_dict
from rlhf.stages import dpo

from .runner import run_stage


@task(name="dpo")
def dpo_stage(key: str, model: dict, algo: dict, data: dict, sft: dict, env: dict, fresh: bool = False) -> dict:
    """Direct preference optimisation of the SFT policy."""
    m, c = from_dict(ModelConfig, model), from_dict(DPOConfig, algo)
    body = lambda ctx: dpo.run(c, m, data["data_dir"], sft["model_path"], ctx)  # noqa: E731
    return run_stage("dpo", key, env, fresh, body, seed=c.seed)
