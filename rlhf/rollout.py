"""Batched sampling with the KV cache, and the rollout batch it produces.

Prompts are left-padded so every answer starts in the same column; answers are right-padded with PAD
after their EOS. One forward over the prompt fills the cache, then one single-token forward per new
token; the loop stops as soon as every answer has ended.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from . import answer_keys
from .answer_keys import AnswerStream
from .config import SamplingConfig
from .modeling import fp32_projection, positions, unwrapped
from .sharding import as_root_forward


@dataclass
class Samples:
    """A batch of prompts and sampled answers.

    prompt_ids, prompt_mask:     (B, P) left-padded
    response_ids, response_mask: (B, R) right-padded; mask is 1 up to and including the first EOS
    ended:                       (B,)   True where the answer emitted EOS within max_new_tokens
    logprobs:                    (B, R) log pi(y_t) of the sampler's tempered softmax without PAD (what
                                        :class:`~rlhf.modeling.Logprobs` computes), 0 after EOS; None unless asked for
    engine_logprobs:             (B, R) the same from a rollout engine that is not the trained model (vLLM: its own
                                        numerics; kept beside the trainer's to measure and correct the gap), else None
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor
    logprobs: torch.Tensor | None = None
    engine_logprobs: torch.Tensor | None = None

    @property
    def input_ids(self) -> torch.Tensor:  # (B, P + R)
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:  # (B, P + R)
        return torch.cat([self.prompt_mask, self.response_mask.long()], dim=1)

    @property
    def last_index(self) -> torch.Tensor:  # (B,) column of the last answer token (EOS if ended)
        return self.prompt_ids.shape[1] + self.response_mask.sum(1).long().clamp(min=1) - 1

    @property
    def first_target(self) -> int:
        """Target position of the first answer token in ``token_logprobs`` output (answers start at column P)."""
        return self.prompt_ids.shape[1] - 1

    def response_slice(self, per_token: torch.Tensor) -> torch.Tensor:
        """Cut the answer columns out of a (B, P + R - 1) per-target tensor from ``token_logprobs``."""
        start = self.prompt_ids.shape[1] - 1
        return per_token[:, start : start + self.response_ids.shape[1]]

    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1)

    def trimmed(self) -> Samples:
        """The same answers without the columns that are padding in every row: the left padding all prompts
        share and the right padding past the longest answer (a minibatch of short answers costs what they do)."""
        left = self.prompt_ids.shape[1] - int(self.prompt_mask.sum(1).max())  # columns that are padding in every prompt
        width = max(1, int(self.response_mask.sum(1).max()))
        cut = lambda t: None if t is None else t[:, :width]  # noqa: E731
        return Samples(
            self.prompt_ids[:, left:],
            self.prompt_mask[:, left:],
            *(cut(t) for t in (self.response_ids, self.response_mask)),
            self.ended,
            *(cut(t) for t in (self.logprobs, self.engine_logprobs)),
        )

    def __getitem__(self, idx) -> Samples:
        return Samples(*(None if t is None else t[idx] for t in (getattr(self, f.name) for f in fields(self))))


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then nucleus filtering: (B, V) -> (B, V) with removed entries at -inf."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix with mass >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def _next_logits(model, input_ids, attention_mask, position_ids, past=None):
    """The next token's logits (B, V), the LM head in fp32 on the last position only (as the update's
    log-probs are: the sampler and the ratio see the same numbers), and the KV cache."""
    lm = unwrapped(model)
    return as_root_forward(lm, _backbone_step, lm, input_ids, attention_mask, position_ids, past)


def _backbone_step(lm, input_ids, attention_mask, position_ids, past):
    out = lm.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past,
        use_cache=True,
    )
    return fp32_projection(out.last_hidden_state[:, -1], lm.get_output_embeddings()), out.past_key_values


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    cfg: SamplingConfig,
    eos_id: int,
    pad_id: int,
    keys: torch.Tensor | None = None,
    logprobs: bool = False,
) -> Samples:
    """Sample answers for a batch of left-padded prompts, reusing the KV cache between steps. ``keys`` (B,): each
    answer's random numbers (:mod:`rlhf.answer_keys`; default: a fresh stream from torch's global generator), so an
    answer depends on its prompt and key, not on its batch or process. With ``logprobs``
    also the log-prob of each sampled token under the tempered softmax before top-k / top-p (the policy's
    distribution, which the PPO ratio and the KL use), from the logits the sampler has anyway."""
    batch = prompt_ids.shape[0]
    if keys is None:
        keys = AnswerStream(int(torch.randint(2**31, ()))).take(batch, prompt_ids.device)
    mask = prompt_mask
    pos = positions(mask)
    logits, past = _next_logits(model, prompt_ids, mask, pos)
    next_pos = pos[:, -1:] + 1  # (B, 1)
    done = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
    tokens, token_logprobs = [], []
    for step in range(cfg.max_new_tokens):
        logits = logits / cfg.temperature
        logits[:, pad_id] = float("-inf")  # PAD is never an answer token (Logprobs excludes it too)
        probs = filter_logits(logits, cfg.top_k, cfg.top_p).softmax(-1)
        tok = answer_keys.sample(probs, keys, step)  # (B,)
        if logprobs:
            lp = (logits.gather(1, tok[:, None]) - logits.logsumexp(-1, keepdim=True)).squeeze(1)  # (B,)
            token_logprobs.append(lp.masked_fill(done, 0.0))
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens.append(tok)
        done |= tok == eos_id
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits, past = _next_logits(model, tok[:, None], mask, next_pos, past)
        next_pos = next_pos + 1
    response = torch.stack(tokens, dim=1)  # (B, R)
    is_eos = response == eos_id
    before_or_at_eos = (is_eos.long().cumsum(1) - is_eos.long()) == 0
    return Samples(
        prompt_ids,
        prompt_mask,
        response,
        before_or_at_eos.float(),
        is_eos.any(1),
        torch.stack(token_logprobs, dim=1) if logprobs else None,
    )


def decode_responses(tokenizer, samples: Samples) -> list[str]:
    """Answer texts without EOS / PAD."""
    ids = samples.response_ids.masked_fill(samples.response_mask == 0, tokenizer.pad_token_id)
    return tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)
