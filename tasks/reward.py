from prefect import task

from rlhf.config import JUDGE, ModelConfig, RewardConfig, reward_member
from rlhf.lineage import EVALUATION, TRAINING
from rlhf.model_logging import SCORING
from rlhf.settings import from_dict
from rlhf.stages import reward

from .runner import Lineage, run_stage


@task(name="reward")
def reward_stage(
    key: str,
    model: dict,
    reward_cfg: dict,
    data: dict,
    sft: dict,
    env: dict,
    member: int = 0,
    judge: bool = False,
    fresh: bool = False,
) -> dict:
    """Train reward model ``member`` (0: the single one) on the preference pairs, from the SFT backbone.
    Member 0 is registered (tracking.reward_model_name); the other members of an ensemble are logged models. With
    ``judge``, a campaign's judge: trained on the held-out pairs, evaluated on the training pairs
    (:data:`rlhf.stages.reward.JUDGE_SPLITS`), logged but not registered."""
    m, c = from_dict(ModelConfig, model), from_dict(RewardConfig, reward_cfg)
    train, held_out = reward.JUDGE_SPLITS if judge else ("pref", "eval_pref")
    lineage = Lineage(
        data["datasets"],
        {train: TRAINING, held_out: EVALUATION},
        {"sft": sft},
        SCORING,
        "reward_model_name" if member == 0 and not judge else None,
    )
    body = lambda ctx: reward.run(c, m, data["data_dir"], sft["model_path"], ctx, member, (train, held_out))  # noqa: E731
    name = JUDGE if judge else reward_member(member)
    return run_stage(name, key, env, fresh, body, seed=c.seed + member, lineage=lineage)
