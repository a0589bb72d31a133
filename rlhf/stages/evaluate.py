"""Held-out evaluation: the tuned policy against the SFT policy on prompts never trained on.

Each of ``eval.n_prompts`` held-out prompts gets ``eval.n_samples`` answers from the policy and as many
from SFT, with the same sampling settings and seed. Metrics, each with its standard error over prompts
(``<metric>_se``; paired where it compares with SFT: the per-prompt difference, or the per-prompt win
share): gold reward (when the task has one), proxy reward (the reward model under the on-policy stages'
scoring rule: raw score minus ``reward.missing_eos_penalty`` for answers that never end), their gains
over SFT, win rates (ties count one half), KL(policy || SFT) on the policy's answers, length, EOS rate,
distinct-2, and the reward model's held-out pair accuracy.

A policy that is not one model (best-of-n: SFT samples picked by the reward model) brings its own
sampler through its algorithm's declaration (:attr:`rlhf.algorithms.Algorithm.sampler`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..answer_keys import AnswerStream
from ..config import EvalConfig, RolloutConfig
from ..context import StageContext
from ..data import encode_prompts, left_pad, load_rows
from ..engines import HFEngine, open_engine
from ..modeling import FrozenModel, load_policy, load_scalar_model, load_tokenizer, token_logprobs
from ..rollout import Samples, decode_responses
from ..scoring import GoldReward, Scorer, gold_rewards
from ..stats import mean_se, per_prompt, wins
from .reward import pair_accuracy


@dataclass
class EvalEnv:
    """What a sampler may use: the SFT model, the reward model's score, the settings, one stream of answer keys."""

    sft: torch.nn.Module
    score: Callable[
        [Samples], torch.Tensor
    ]  # (B,) the scoring rule: raw reward-model score minus the missing-EOS penalty
    cfg: EvalConfig
    tokenizer: object
    device: torch.device
    stream: AnswerStream  # answer i's random numbers (rlhf.answer_keys): the same answers in any batch size
    engine: object = None  # what samples (rlhf.engines: HF forwards or vLLM); None: HF

    def sample(self, model, prompt_ids: list[list[int]]) -> list[Samples]:
        """Answers of ``model`` to ``prompt_ids``, in batches of ``eval.sampling.batch_size``."""
        size = self.cfg.sampling.batch_size
        return [self.sample_batch(model, prompt_ids[i : i + size]) for i in range(0, len(prompt_ids), size)]

    def sample_batch(self, model, prompt_ids: list[list[int]]) -> Samples:
        """Answers of ``model`` to ``prompt_ids`` in one batch."""
        tok = self.tokenizer
        ids, mask = left_pad(prompt_ids, tok.pad_token_id)
        return (self.engine or HFEngine()).sample(
            model,
            ("frozen", id(model)),  # the eval stage's models never change: each is pushed to vLLM once per switch
            ids.to(self.device),
            mask.to(self.device),
            self.cfg.sampling,
            tok.eos_token_id,
            tok.pad_token_id,
            self.stream.take(len(prompt_ids), self.device),
        )


# A sampler: (env, prompt ids (one per answer), its args) -> (answers, per-answer KL to SFT (N,) or None, extra metrics)
Sampler = Callable[[EvalEnv, list[list[int]], dict], tuple[list[Samples], torch.Tensor | None, dict]]


@torch.no_grad()
def sequence_logp(model, samples: Samples, temperature: float) -> torch.Tensor:
    """Sum of answer-token log-probs under ``model``: (B,)."""
    lp = samples.response_slice(
        token_logprobs(model, samples.input_ids, samples.attention_mask, temperature, samples.first_target)
    )
    return (lp * samples.response_mask).sum(1)


def distinct_n(texts: list[str], n: int = 2) -> float:
    grams = [tuple(w[i : i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def _answers(batches: list[Samples], tokenizer, score) -> dict:
    return {
        "texts": [t for b in batches for t in decode_responses(tokenizer, b)],
        "ended": torch.cat([b.ended.cpu() for b in batches]),
        "length": torch.cat([b.lengths().cpu() for b in batches]),
        "proxy": torch.cat([score(b).cpu() for b in batches]) if score else None,
    }


def _with_se(metrics: dict, name: str, values: torch.Tensor, n_samples: int) -> None:
    """``name`` and ``name_se`` from per-answer values (prompt-major), the SE over prompts."""
    metrics[name], metrics[f"{name}_se"] = mean_se(per_prompt(values.float(), n_samples))


def comparison_metrics(
    kind: str, policy: torch.Tensor, base: torch.Tensor, n_samples: int, base_name: str = "sft"
) -> dict:
    """Policy and baseline (SFT, or a campaign's champion) values of a reward (gold or proxy) per answer: means, the
    paired gain and the win rate, with SEs."""
    out: dict = {}
    _with_se(out, f"eval/{kind}_reward", policy, n_samples)
    _with_se(out, f"eval/{base_name}_{kind}_reward", base, n_samples)
    _with_se(out, f"eval/{kind}_gain", policy - base, n_samples)  # paired: the same prompt, the same sample index
    _with_se(out, f"eval/win_rate_{kind}", wins(policy, base), n_samples)
    return out


@torch.no_grad()
def run(
    cfg: EvalConfig,
    max_length: int,
    gold: GoldReward | None,
    data_dir: str,
    policy_path: str,
    sft_path: str,
    reward_paths: list[str] | str | None,
    ctx: StageContext,
    missing_eos_penalty: float = 0.0,
    sampler: Sampler | None = None,
    sampler_args: dict | None = None,
    rollout: RolloutConfig | None = None,
    baseline: tuple[str, str] | None = None,
) -> dict:
    """Evaluate the policy at ``policy_path`` (or ``sampler``'s) against SFT; ``reward_paths``: the reward
    model, or an ensemble's members (the proxy is their mean score; ``eval/ensemble_std`` their disagreement);
    ``gold``: the task's true reward, where it has one; ``baseline``: (name, path) of another model to compare
    against (a campaign's champion: ``eval/champion_*``, gains over it); KL is to SFT either way."""
    tokenizer = load_tokenizer(sft_path)
    raw_prompts = [r["prompt"] for r in load_rows(data_dir, "eval_prompts", tokenizer)][: cfg.n_prompts]
    S = cfg.n_samples
    prompts = [p for p in raw_prompts for _ in range(S)]  # prompt-major: answers j*S .. j*S+S-1 answer prompt j
    prompt_ids = encode_prompts(tokenizer, prompts, max_length - cfg.sampling.max_new_tokens)
    sft = load_policy(sft_path, tokenizer).to(ctx.device).eval()
    paths = [reward_paths] if isinstance(reward_paths, str) else list(reward_paths or [])
    rewards = [load_scalar_model(p, tokenizer, zero_head=False).to(ctx.device) for p in paths]
    scorer = Scorer([FrozenModel(r) for r in rewards], missing_eos_penalty)
    score = (lambda s: scorer.proxy(scorer.members(s), s)) if rewards else None
    engine = open_engine(rollout, sft_path, max_length, ctx.device, cfg.seed, cfg.sampling.batch_size)
    env = EvalEnv(sft, score, cfg, tokenizer, ctx.device, AnswerStream(cfg.seed), engine)
    batches, kl, extra = sample_policy(env, policy_path, prompt_ids, sampler, sampler_args)
    env.stream.manual_seed(cfg.seed)  # the baseline's answers with the keys of the policy's (the default sampler's)
    base_name, base = ("sft", sft) if baseline is None else (baseline[0], load_policy(baseline[1], tokenizer))
    answers = {
        "policy": _answers(batches, tokenizer, score),
        base_name: _answers(env.sample(base.to(ctx.device).eval(), prompt_ids), tokenizer, score),
    }
    pol = answers["policy"]
    metrics = {
        "eval/n_prompts": len(raw_prompts),
        "eval/n_samples": S,
        "eval/eos_rate": float(pol["ended"].float().mean()),
        "eval/distinct_2": distinct_n(pol["texts"]),
        **extra,
    }
    lengths = {"response_length": pol["length"], f"{base_name}_response_length": answers[base_name]["length"]}
    for name, values in {"kl": kl, **lengths}.items():
        _with_se(metrics, f"eval/{name}", values, S)
    golds = {who: gold_rewards(gold, prompts, a["texts"], a["ended"]) for who, a in answers.items()} if gold else {}
    if golds:
        metrics.update(comparison_metrics("gold", golds["policy"], golds[base_name], S, base_name))
    if rewards:
        metrics.update(comparison_metrics("proxy", pol["proxy"], answers[base_name]["proxy"], S, base_name))
        if len(rewards) > 1:  # the members' disagreement on the policy's answers (raw units)
            _with_se(metrics, "eval/ensemble_std", torch.cat([scorer.members(b).std(0).cpu() for b in batches]), S)
        metrics.update(rm_accuracy(rewards[0], data_dir, tokenizer, max_length, ctx.device))
    ctx.sink.log_metrics(metrics, 0)
    return {"metrics": metrics, "table": sample_table(cfg.n_samples_table, prompts, answers, golds)}


def sample_policy(env: EvalEnv, policy_path: str, prompt_ids: list, sampler: Sampler | None, sampler_args: dict | None):
    """The policy's answers, their KL to SFT (N,) and the sampler's extra metrics: the model at ``policy_path`` sampled
    as SFT is, or the algorithm's ``sampler`` (best-of-n)."""
    if sampler is not None:
        return sampler(env, prompt_ids, sampler_args or {})
    t = env.cfg.sampling.temperature
    policy = load_policy(policy_path, env.tokenizer).to(env.device).eval()
    batches = env.sample(policy, prompt_ids)
    kl = torch.cat([(sequence_logp(policy, b, t) - sequence_logp(env.sft, b, t)).cpu() for b in batches])
    return batches, kl, {}


def rm_accuracy(reward, data_dir: str, tokenizer, max_length: int, device) -> dict:
    """The reward model on the held-out pairs: against the annotators' labels, and the gold order where known."""
    acc = pair_accuracy(reward, load_rows(data_dir, "eval_pref", tokenizer), tokenizer, max_length, device)
    out = {"eval/rm_accuracy": acc["eval_accuracy"]}
    if "eval_gold_accuracy" in acc:
        out["eval/rm_gold_accuracy"] = acc["eval_gold_accuracy"]
    return out


def sample_table(n_rows: int, prompts: list[str], answers: dict, golds: dict) -> dict:
    """The logged sample table: prompt, the baseline's (SFT's) and the policy's answers, their gold and proxy
    rewards."""
    n = min(n_rows, len(prompts))
    table = {"prompt": prompts[:n], **{f"{who}_answer": a["texts"][:n] for who, a in reversed(answers.items())}}
    proxies = {w: a["proxy"] for w, a in answers.items() if a["proxy"] is not None}
    for kind, values in (("gold", golds), ("proxy", proxies)):
        for who in values:
            table[f"{who}_{kind}_reward"] = [round(float(x), 4) for x in values[who][:n]]
    return table
