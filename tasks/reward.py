from prefect import task

from rlhf.config import ModelConfig, RewardConfig, from_dict
from rlhf.lineage import EVALUATION, TRAINING
from rlhf.model_logging import SCORING
from rlhf.stages import reward

from .runner import Lineage, run_stage


@task(name="reward")
def reward_stage(key: str, model: dict, reward_cfg: dict, data: dict, sft: dict, env: dict, fresh: bool = False) -> dict:
    """Train the reward model on the preference pairs, starting from the SFT backbone."""
    m, c = from_dict(ModelConfig, model), from_dict(RewardConfig, reward_cfg)
    lineage = Lineage(data["datasets"], {"pref": TRAINING, "eval_pref": EVALUATION}, {"sft": sft}, SCORING, "reward_model_name")
    body = lambda ctx: reward.run(c, m, data["data_dir"], sft["model_path"], ctx)  # noqa: E731
    return run_stage("reward", key, env, fresh, body, seed=c.seed, lineage=lineage)
