from prefect import task

from rlhf.algorithms import PolicyInputs, registry
from rlhf.config import ModelConfig, RolloutConfig, reward_member
from rlhf.lineage import EVALUATION, TRAINING
from rlhf.model_logging import GENERATION
from rlhf.settings import from_dict
from rlhf.synthetic import gold_reward

from .runner import Lineage, run_stage


@task(name="policy")
def policy_stage(
    algo: dict,
    key: str,
    model: dict,
    data: dict,
    sft: dict,
    env: dict,
    rewards: list[dict] | None = None,
    has_gold: bool = False,
    missing_eos_penalty: float = 0.0,
    fresh: bool = False,
    rollout: dict | None = None,
) -> dict:
    """Tune the SFT policy with the algorithm ``algo['algo']`` names (DPO, PPO, ...: rlhf.algorithms)."""
    algorithm = registry()[algo["algo"]]
    m, c = from_dict(ModelConfig, model), from_dict(algorithm.schema, algo)
    paths = [r["model_path"] for r in rewards or []]
    inputs = PolicyInputs(
        data["data_dir"],
        sft["model_path"],
        paths[0] if paths else None,
        gold_reward if has_gold else None,  # the task's true reward, handed to the loop's held-out evaluations
        missing_eos_penalty,
        tuple(paths[1:]),
        from_dict(RolloutConfig, rollout or {}),
    )
    # On-policy methods sample on prompts and are checked on held-out prompts; DPO learns from the pairs.
    contexts = (
        {"ppo_prompts": TRAINING, "eval_prompts": EVALUATION}
        if algorithm.needs_reward
        else {"pref": TRAINING, "eval_pref": EVALUATION}
    )
    parents = {"sft": sft, **{reward_member(i): r for i, r in enumerate(rewards or [])}}
    lineage = Lineage(data["datasets"], contexts, parents, GENERATION, "policy_model_name")
    return run_stage(
        algorithm.name,
        key,
        env,
        fresh,
        lambda ctx: algorithm.run(c, m, inputs, ctx),
        seed=getattr(c, "seed", 0),
        lineage=lineage,
    )
