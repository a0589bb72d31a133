"""Held-out evaluation: the tuned policy against the SFT policy on prompts never trained on.

Both policies sample with the same settings and seed. Metrics: gold reward (when the task has one),
proxy reward (the reward model), KL(policy || SFT) estimated on the policy's samples, win rates,
length, EOS rate, distinct-2 and the reward model's held-out pair accuracy.
"""

from __future__ import annotations

import torch

from .. import synthetic
from ..config import EvalConfig
from ..data import encode_prompts, left_pad, load_rows
from ..modeling import load_policy, load_scalar_model, load_tokenizer, sequence_scores, token_logprobs
from ..rollout import Samples, decode_responses, generate
from .common import StageContext
from .reward import pair_accuracy


def sample_all(model, prompt_ids: list[list[int]], cfg: EvalConfig, tokenizer, device) -> list[Samples]:
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    out = []
    for i in range(0, len(prompt_ids), cfg.sampling.batch_size):
        ids, mask = left_pad(prompt_ids[i : i + cfg.sampling.batch_size], tokenizer.pad_token_id)
        out.append(generate(model, ids.to(device), mask.to(device), cfg.sampling, tokenizer.eos_token_id, tokenizer.pad_token_id, generator))
    return out


@torch.no_grad()
def sequence_logp(model, samples: Samples, temperature: float) -> torch.Tensor:
    """Sum of answer-token log-probs under ``model``: (B,)."""
    lp = samples.response_slice(token_logprobs(model, samples.input_ids, samples.attention_mask, temperature, samples.first_target))
    return (lp * samples.response_mask).sum(1)


def distinct_n(texts: list[str], n: int = 2) -> float:
    grams = [tuple(w[i : i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def win_rate(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of prompts where a beats b; ties count one half."""
    return float(((a > b).float() + 0.5 * (a == b).float()).mean())


@torch.no_grad()
def run(cfg: EvalConfig, max_length: int, has_gold: bool, data_dir: str, policy_path: str, sft_path: str, reward_path: str | None, ctx: StageContext) -> dict:
    tokenizer = load_tokenizer(sft_path)
    prompts = [r["prompt"] for r in load_rows(data_dir, "eval_prompts", tokenizer)][: cfg.n_prompts]
    prompt_ids = encode_prompts(tokenizer, prompts, max_length - cfg.sampling.max_new_tokens)
    policy = load_policy(policy_path, tokenizer).to(ctx.device).eval()
    sft = load_policy(sft_path, tokenizer).to(ctx.device).eval()
    reward = load_scalar_model(reward_path, tokenizer, zero_head=False).to(ctx.device).eval() if reward_path else None

    answers, texts, ended, scores, kl = {}, {}, {}, {}, []
    for name, model in (("policy", policy), ("sft", sft)):
        batches = sample_all(model, prompt_ids, cfg, tokenizer, ctx.device)
        texts[name] = [t for b in batches for t in decode_responses(tokenizer, b)]
        ended[name] = torch.cat([b.ended.cpu() for b in batches])
        answers[name] = batches
        if reward is not None:
            scores[name] = torch.cat([sequence_scores(reward, b.input_ids, b.attention_mask, b.last_index).cpu() for b in batches])
    t = cfg.sampling.temperature
    kl = torch.cat([(sequence_logp(policy, b, t) - sequence_logp(sft, b, t)).cpu() for b in answers["policy"]])
    lengths = torch.cat([b.lengths().cpu() for b in answers["policy"]])

    metrics = {
        "eval/kl": float(kl.mean()),
        "eval/response_length": float(lengths.mean()),
        "eval/sft_response_length": float(torch.cat([b.lengths().cpu() for b in answers["sft"]]).mean()),
        "eval/eos_rate": float(ended["policy"].float().mean()),
        "eval/distinct_2": distinct_n(texts["policy"]),
        "eval/n_prompts": len(prompts),
    }
    gold = {}
    if has_gold:
        for name in ("policy", "sft"):
            gold[name] = torch.tensor([synthetic.gold_reward(p, a, bool(e)) for p, a, e in zip(prompts, texts[name], ended[name])])
        metrics.update({"eval/gold_reward": float(gold["policy"].mean()), "eval/sft_gold_reward": float(gold["sft"].mean()),
                        "eval/win_rate_gold": win_rate(gold["policy"], gold["sft"])})
    if reward is not None:
        metrics.update({"eval/proxy_reward": float(scores["policy"].mean()), "eval/sft_proxy_reward": float(scores["sft"].mean()),
                        "eval/win_rate_proxy": win_rate(scores["policy"], scores["sft"])})
        held = load_rows(data_dir, "eval_pref", tokenizer)
        acc = pair_accuracy(reward, held, tokenizer, max_length, ctx.device)
        metrics["eval/rm_accuracy"] = acc["eval_accuracy"]
        if "eval_gold_accuracy" in acc:
            metrics["eval/rm_gold_accuracy"] = acc["eval_gold_accuracy"]

    n = min(cfg.n_samples_table, len(prompts))
    table = {"prompt": prompts[:n], "sft_answer": texts["sft"][:n], "policy_answer": texts["policy"][:n]}
    for name, values in (("gold", gold), ("proxy", scores)):
        for who in values:
            table[f"{who}_{name}_reward"] = [round(float(x), 4) for x in values[who][:n]]
    ctx.sink.log_metrics(metrics, 0)
    return {"metrics": metrics, "table": table}
