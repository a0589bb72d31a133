from prefect import task

from rlhf.config import ModelConfig, RewardConfig, reward_member
from rlhf.lineage import EVALUATION, TRAINING
from rlhf.model_logging import SCORING
from rlhf.settings import from_dict
from rlhf.stages import reward

from .runner import Lineage, run_stage


@task(name="reward")
def reward_stage(
    key: str, model: dict, reward_cfg: dict, data: dict, sft: dict, env: dict, member: int = 0, fresh: bool = False
) -> dict:
    """Train reward model ``member`` (0: the single one) on the preference pairs, from the SFT backbone.
    Member 0 is registered (tracking.reward_model_name); the other members of an ensemble are logged models."""
    m, c = from_dict(ModelConfig, model), from_dict(RewardConfig, reward_cfg)
    lineage = Lineage(
        data["datasets"],
        {"pref": TRAINING, "eval_pref": EVALUATION},
        {"sft": sft},
        SCORING,
        "reward_model_name" if member == 0 else None,
    )
    body = lambda ctx: reward.run(c, m, data["data_dir"], sft["model_path"], ctx, member)  # noqa: E731
    return run_stage(reward_member(member), key, env, fresh, body, seed=c.seed + member, lineage=lineage)
