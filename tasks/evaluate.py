from prefect import task

from rlhf.algorithms import registry
from rlhf.config import EvalConfig, ModelConfig, RolloutConfig
from rlhf.lineage import EVALUATION
from rlhf.settings import from_dict
from rlhf.stages import evaluate
from rlhf.synthetic import gold_reward

from .runner import Lineage, run_stage


@task(name="eval")
def eval_stage(
    key: str,
    model: dict,
    eval_cfg: dict,
    has_gold: bool,
    data: dict,
    sft: dict,
    rewards: list[dict],
    policy: dict,
    env: dict,
    missing_eos_penalty: float = 0.0,
    fresh: bool = False,
    rollout: dict | None = None,
    baseline: dict | None = None,
) -> dict:
    """Generate on held-out prompts with the tuned and the SFT policy (or ``baseline``'s: a campaign's champion);
    score, compare, log a sample table."""
    m, c = from_dict(ModelConfig, model), from_dict(EvalConfig, eval_cfg)
    sampler = registry()[policy["stage"]].sampler

    def body(ctx):
        out = evaluate.run(
            c,
            m.max_length,
            gold_reward if has_gold else None,  # the task's true reward, where it has one
            data["data_dir"],
            policy["model_path"],
            sft["model_path"],
            [r["model_path"] for r in rewards],
            ctx,
            missing_eos_penalty,
            sampler,
            policy.get("sampler_args"),
            from_dict(RolloutConfig, rollout or {}),
            ("champion", baseline["model_path"]) if baseline else None,
        )
        ctx.sink.log_table(out.pop("table"), "eval/samples.json")
        return out

    lineage = Lineage(
        data["datasets"],
        {"eval_prompts": EVALUATION, "eval_pref": EVALUATION},
        {"policy": policy, "sft": sft, "reward": rewards[0], **({"champion": baseline} if baseline else {})},
    )
    return run_stage("eval", key, env, fresh, body, seed=c.seed, lineage=lineage)
