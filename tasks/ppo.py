from prefect import task

from rlhf.config import ModelConfig, PPOConfig, from_dict
from rlhf.stages import ppo

from .runner import run_stage


@task(name="ppo")
def ppo_stage(key: str, model: dict, algo: dict, has_gold: bool, data: dict, sft: dict, reward: dict, env: dict, fresh: bool = False) -> dict:
    """PPO of the SFT policy against the reward model, with a KL penalty to the SFT reference."""
    m, c = from_dict(ModelConfig, model), from_dict(PPOConfig, algo)

    def body(ctx):
        return ppo.run(c, m, has_gold, data["data_dir"], sft["model_path"], reward["model_path"], ctx)

    return run_stage("ppo", key, env, fresh, body, seed=c.seed)
