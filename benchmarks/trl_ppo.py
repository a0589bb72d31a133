"""TRL's PPOTrainer on our PPO work, timed the way ``benchmarks/throughput.py`` times ours.

TRL deleted PPOTrainer in 2026; 1.12 is its last release that has it (``trl.experimental.ppo``). This
script runs in its own virtual environment (``benchmarks/.venv-trl-ppo``, made by
``python -m benchmarks.throughput``; never the project's) and imports nothing of ours: the parent gives
it the models' folders, the prompts' token ids and our PPO settings as a JSON spec:

    benchmarks/.venv-trl-ppo/bin/python benchmarks/trl_ppo.py SPEC.json

It prints ``RESULT {...}``: seconds per step (wall between the ends of consecutive steps, split into
generation, scoring and update), tokens/s, peak memory, and the folder of the trained policy (the parent
evaluates it on held-out gold with our eval stage).

Settings mapped onto TRL's: one optimizer step per minibatch (TRL steps once per
``gradient_accumulation_steps`` micro-batches, so: batch = rollout, accumulation 1, ``num_mini_batches`` =
rollout / minibatch), the k1 KL estimator in the reward (ours), EOS as the stop token, the missing-EOS
penalty, whitened advantages, AdamW betas (0.9, 0.95) and the schedule per iteration. What TRL cannot
be told: it clips no gradients and does not shift scores by the SFT answers' mean (our ``score_norm``).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    import trl.experimental.ppo.ppo_trainer as ppo_module
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    p, out = spec["ppo"], Path(spec["out_dir"])
    tok = AutoTokenizer.from_pretrained(spec["sft_path"])
    tok.padding_side = "left"  # TRL's rollout expects left-padded queries
    assert tok.pad_token_id != tok.eos_token_id, "TRL's PPO masks by pad != eos"
    eos, pad = tok.eos_token_id, tok.pad_token_id

    def scalar(path: str):
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        model.config.pad_token_id = pad
        return model

    n_minibatches = p["rollout_batch_size"] // p["minibatch_size"]
    args = PPOConfig(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=p["rollout_batch_size"],
        gradient_accumulation_steps=1,
        num_mini_batches=n_minibatches,
        num_ppo_epochs=p["ppo_epochs"],
        total_episodes=spec["steps"] * p["rollout_batch_size"],
        local_rollout_forward_batch_size=p["forward_batch_size"],
        learning_rate=p["lr"],
        lr_scheduler_type=p["schedule"],
        warmup_steps=p["warmup_ratio"],
        weight_decay=p["weight_decay"],
        adam_beta2=0.95,
        response_length=p["sampling"]["max_new_tokens"],
        temperature=p["sampling"]["temperature"],
        kl_coef=p["beta"],
        kl_estimator="k1",
        cliprange=p["clip_range"],
        cliprange_value=p["value_clip_range"],
        vf_coef=p["vf_coef"],
        gamma=p["gamma"],
        lam=p["lam"],
        whiten_rewards=False,
        missing_eos_penalty=spec["missing_eos_penalty"],
        stop_token="eos",
        num_sample_generations=0,
        seed=p["seed"],
        save_strategy="no",
        report_to="none",
        logging_steps=10**6,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
    )
    prompts = Dataset.from_dict({"input_ids": spec["prompt_ids"]})
    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=AutoModelForCausalLM.from_pretrained(spec["sft_path"]),
        ref_model=AutoModelForCausalLM.from_pretrained(spec["sft_path"]),
        reward_model=scalar(spec["reward_path"]),
        value_model=scalar(spec["value_path"]),
        train_dataset=prompts,
        eval_dataset=prompts.select(range(8)),
    )

    # ---- instruments: when each phase of an iteration starts and ends, and the tokens it holds ------
    steps: list[dict] = []
    now: dict = {}
    generation = ppo_module.batch_generation

    def timed_generation(model, queries, *a, **k):
        now.clear()
        now["t_gen"] = time.perf_counter()
        query_responses, logits = generation(model, queries, *a, **k)
        now["t_scoring"] = time.perf_counter()
        answers = query_responses[:, queries.shape[1] :]
        is_eos = answers == eos
        first = torch.where(
            is_eos.any(1),
            is_eos.float().argmax(1) + 1,
            torch.full_like(is_eos[:, 0], answers.shape[1], dtype=torch.long),
        )
        now["gen_tokens"] = int(first.sum())  # answer tokens up to and including the first EOS
        now["prompt_tokens"] = int((queries != pad).sum())
        return query_responses, logits

    ppo_module.batch_generation = timed_generation
    wrapper_forward = ppo_module.PolicyAndValueWrapper.forward

    def update_starts(self, **kwargs):
        now.setdefault("t_update", time.perf_counter())  # the first policy + value forward of the update
        return wrapper_forward(self, **kwargs)

    ppo_module.PolicyAndValueWrapper.forward = update_starts

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append({**now, "t_end": time.perf_counter()})

    trainer.add_callback(StepEnd())
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started

    rows = []
    for prev, s in zip(steps, steps[1:]):  # the first step warms up
        tokens = s["prompt_tokens"] + s["gen_tokens"]
        rows.append(
            {
                "step_s": s["t_end"] - prev["t_end"],
                "generation_s": s["t_scoring"] - s["t_gen"],
                "scoring_s": s["t_update"] - s["t_scoring"],
                "update_s": s["t_end"] - s["t_update"],
                "gen_tokens_per_s": s["gen_tokens"] / (s["t_scoring"] - s["t_gen"]),
                "train_tokens_per_s": tokens * p["ppo_epochs"] / (s["t_end"] - s["t_update"]),
                "tokens_per_s": tokens / (s["t_end"] - prev["t_end"]),
            }
        )
    policy_dir = out / "policy"
    trainer.policy_model.save_pretrained(policy_dir)
    tok.save_pretrained(policy_dir)
    print(
        "RESULT "
        + json.dumps(
            {
                "steps": rows,
                "wall_s": wall,
                "policy_dir": str(policy_dir),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "trl": __import__("trl").__version__,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
