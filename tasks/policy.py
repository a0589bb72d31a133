from prefect import task

from rlhf.algorithms import PolicyInputs, registry
from rlhf.config import ModelConfig, from_dict

from .runner import run_stage


@task(name="policy")
def policy_stage(algo: dict, key: str, model: dict, data: dict, sft: dict, env: dict, reward: dict | None = None, has_gold: bool = False,
                 fresh: bool = False) -> dict:
    """Tune the SFT policy with the algorithm ``algo['algo']`` names (DPO, PPO, ...: rlhf.algorithms)."""
    algorithm = registry()[algo["algo"]]
    m, c = from_dict(ModelConfig, model), from_dict(algorithm.schema, algo)
    inputs = PolicyInputs(data["data_dir"], sft["model_path"], reward["model_path"] if reward else None, has_gold)
    return run_stage(algorithm.name, key, env, fresh, lambda ctx: algorithm.run(c, m, inputs, ctx), seed=c.seed)
