"""The PPO reference of the throughput benchmark: the loop most people write first, in plain PyTorch.

Same work as ``rlhf/stages/ppo.py`` per step (rollout of ``rollout_batch_size`` prompts with sampling,
old/reference log-probs, values, reward score, per-token KL reward, GAE, ``ppo_epochs`` passes of clipped
policy + value updates over minibatches), written the straightforward way: ``model.generate``, one
forward per model, GAE as a reversed loop over tokens, AdamW on the policy and the value model. It
shares no code with the package beyond loading the data.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf.data import load_split


def _positions(attn):
    return (attn.cumsum(1) - 1).clamp(min=0)  # left padding: the first real token is position 0


def _logprobs(model, ids, attn, temperature):
    logits = model(input_ids=ids, attention_mask=attn, position_ids=_positions(attn)).logits[:, :-1] / temperature
    return torch.gather(F.log_softmax(logits, -1), 2, ids[:, 1:, None])[..., 0]


def _values(model, ids, attn):
    hidden = model.base_model(input_ids=ids, attention_mask=attn, position_ids=_positions(attn)).last_hidden_state
    return model.score(hidden)[..., 0]


def run_baseline(
    cfg, max_length: int, data_dir: str, sft_path: str, reward_path: str, device, out_dir=None
) -> list[dict]:
    """``cfg.steps`` iterations; per iteration after the first: seconds of each phase and tokens/s (the keys of
    ``benchmarks/throughput.py``'s PPO rows). Saves the trained policy to ``out_dir`` when given."""
    tok = AutoTokenizer.from_pretrained(sft_path)
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(sft_path).to(device)
    ref = AutoModelForCausalLM.from_pretrained(sft_path).to(device).eval()
    value = AutoModelForSequenceClassification.from_pretrained(reward_path, num_labels=1).to(device)
    reward = AutoModelForSequenceClassification.from_pretrained(reward_path, num_labels=1).to(device).eval()
    for m in (value, reward):
        m.config.pad_token_id = tok.pad_token_id
    opt = torch.optim.AdamW(
        [{"params": policy.parameters()}, {"params": value.parameters(), "lr": cfg.value_lr or cfg.lr}], lr=cfg.lr
    )
    prompts = [r["prompt"] for r in load_split(data_dir, "ppo_prompts")]
    s = cfg.sampling
    rows = []
    g = torch.Generator().manual_seed(cfg.seed)
    for step in range(cfg.steps):
        batch = [prompts[i] for i in torch.randint(len(prompts), (cfg.rollout_batch_size,), generator=g)]
        enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        t0 = time.perf_counter()
        policy.eval()
        with torch.no_grad():
            seq = policy.generate(
                **enc,
                do_sample=True,
                max_new_tokens=s.max_new_tokens,
                temperature=s.temperature,
                top_k=0,
                top_p=1.0,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        t1 = time.perf_counter()
        P = enc["input_ids"].shape[1]
        resp = seq[:, P:]
        # answer mask: tokens up to and including the first EOS
        is_eos = resp == tok.eos_token_id
        after_eos = (torch.cumsum(is_eos, 1) - is_eos.long()) > 0
        mask = (~after_eos).float()
        attn = torch.cat([enc["attention_mask"], mask.long()], 1)
        with torch.no_grad():
            old_logp = _logprobs(policy, seq, attn, s.temperature)[:, P - 1 :] * mask
            ref_logp = _logprobs(ref, seq, attn, s.temperature)[:, P - 1 :] * mask
            values = _values(value, seq, attn)[:, P - 1 : -1] * mask
            last = mask.sum(1).long() - 1
            hidden = reward.base_model(
                input_ids=seq, attention_mask=attn, position_ids=_positions(attn)
            ).last_hidden_state
            score = reward.score(hidden[torch.arange(len(seq)), P + last])[:, 0]
            rewards = -cfg.beta * (old_logp - ref_logp)
            rewards[torch.arange(len(seq)), last] += score
            # GAE, one token at a time from the end
            adv = torch.zeros_like(rewards)
            lastgaelam = torch.zeros(len(seq), device=device)
            R = rewards.shape[1]
            for t in reversed(range(R)):
                next_v = values[:, t + 1] if t + 1 < R else torch.zeros_like(lastgaelam)
                delta = rewards[:, t] + cfg.gamma * next_v - values[:, t]
                lastgaelam = delta + cfg.gamma * cfg.lam * lastgaelam
                adv[:, t] = lastgaelam
            returns = adv + values
            mean = (adv * mask).sum() / mask.sum()
            var = (((adv - mean) * mask) ** 2).sum() / mask.sum()
            adv = (adv - mean) * torch.rsqrt(var + 1e-8) * mask
        t2 = time.perf_counter()
        policy.train(), value.train()
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(len(seq), generator=g)
            for j in range(0, len(seq), cfg.minibatch_size):
                i = order[j : j + cfg.minibatch_size]
                m = mask[i]
                logp = _logprobs(policy, seq[i], attn[i], s.temperature)[:, P - 1 :]
                ratio = torch.exp(logp - old_logp[i])
                pg = torch.max(-adv[i] * ratio, -adv[i] * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range))
                v = _values(value, seq[i], attn[i])[:, P - 1 : -1]
                v_clip = values[i] + (v - values[i]).clamp(-cfg.value_clip_range, cfg.value_clip_range)
                vf = 0.5 * torch.max((v - returns[i]) ** 2, (v_clip - returns[i]) ** 2)
                loss = ((pg + cfg.vf_coef * vf) * m).sum() / m.sum()
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(policy.parameters()) + list(value.parameters()), cfg.max_grad_norm)
                opt.step()
        t3 = time.perf_counter()
        if step > 0:  # the first step warms up
            rows.append(
                {
                    "step_s": t3 - t0,
                    "generation_s": t1 - t0,
                    "scoring_s": t2 - t1,
                    "update_s": t3 - t2,
                    "gen_tokens_per_s": float(mask.sum()) / (t1 - t0),
                    "train_tokens_per_s": float(attn.sum()) * cfg.ppo_epochs / (t3 - t2),
                    "tokens_per_s": float(attn.sum()) / (t3 - t0),
                }
            )
    if out_dir is not None:
        policy.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
    return rows
