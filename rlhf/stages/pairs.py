"""Pairs stage of a campaign round: the champion answers fresh training prompts twice each, for labelling.

Round ``r`` takes the next ``n`` prompts of the data's ``ppo_prompts`` split in one fixed shuffled order
(rounds 1, 2, ... take consecutive blocks, wrapping around), so no two rounds ask about the same prompts
while the split lasts. Both answers come from the champion with the eval's sampling settings, each from its
own answer key (:mod:`rlhf.answer_keys`), so the round's pairs are the same on any batch size. A pair whose
two answers are the same text says nothing about preference and is dropped.
"""

from __future__ import annotations

import random

import torch

from ..answer_keys import AnswerStream
from ..chat import is_conversation, render_prompt
from ..config import EvalConfig, RolloutConfig
from ..context import StageContext
from ..data import encode_prompts, load_split, save_splits
from ..engines import open_engine
from ..modeling import load_policy, load_tokenizer
from ..rollout import decode_responses
from .evaluate import EvalEnv

ANSWERS_PER_PROMPT = 2


def round_prompts(rows: list[dict], round_no: int, n: int, seed: int) -> list:
    """Round ``round_no``'s ``n`` prompts (raw: text or messages): the round's block of one seeded shuffle."""
    order = list(range(len(rows)))
    random.Random(f"{seed}/rounds").shuffle(order)
    start = (round_no - 1) * n
    return [rows[order[(start + i) % len(rows)]]["prompt"] for i in range(n)]


def as_answer(prompt, text: str):
    """An answer in the prompt's schema: a message list for a conversation, else text."""
    return [{"role": "assistant", "content": text}] if is_conversation(prompt) else text


@torch.no_grad()
def run(
    data_dir: str,
    policy_path: str,
    round_no: int,
    n_prompts: int,
    eval_cfg: EvalConfig,
    max_length: int,
    rollout: RolloutConfig,
    ctx: StageContext,
) -> dict:
    """Write ``pairs/requests.jsonl``: rows {id, prompt, answer_a, answer_b, ended_a, ended_b}."""
    tokenizer = load_tokenizer(policy_path)
    prompts = round_prompts(load_split(data_dir, "ppo_prompts"), round_no, n_prompts, eval_cfg.seed)
    rendered = [render_prompt(tokenizer, p) for p in prompts for _ in range(ANSWERS_PER_PROMPT)]
    ids = encode_prompts(tokenizer, rendered, max_length - eval_cfg.sampling.max_new_tokens)
    policy = load_policy(policy_path, tokenizer).to(ctx.device).eval()
    engine = open_engine(rollout, policy_path, max_length, ctx.device, eval_cfg.seed, eval_cfg.sampling.batch_size)
    env = EvalEnv(policy, None, eval_cfg, tokenizer, ctx.device, AnswerStream(eval_cfg.seed, round_no), engine)
    batches = env.sample(policy, ids)
    texts = [t for b in batches for t in decode_responses(tokenizer, b)]
    ended = torch.cat([b.ended.cpu() for b in batches]).tolist()
    rows = []
    for i, prompt in enumerate(prompts):
        (a, b), (ea, eb) = texts[2 * i : 2 * i + 2], ended[2 * i : 2 * i + 2]
        if a.strip() != b.strip():
            row = {"prompt": prompt, "answer_a": as_answer(prompt, a), "answer_b": as_answer(prompt, b)}
            rows.append({"id": f"r{round_no}-{i}", **row, "ended_a": bool(ea), "ended_b": bool(eb)})
    save_splits({"requests": rows}, ctx.out_dir / "pairs")
    metrics = {"pairs/n_prompts": len(prompts), "pairs/n_pairs": len(rows), "pairs/n_ties": len(prompts) - len(rows)}
    ctx.sink.log_metrics(metrics, 0)
    return {"requests": str(ctx.out_dir / "pairs" / "requests.jsonl"), "metrics": metrics}
