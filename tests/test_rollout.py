"""Generation with the KV cache: same tokens as without it, correct EOS / PAD masks, filtering."""

import torch

from rlhf.config import SamplingConfig
from rlhf.data import left_pad
from rlhf.modeling import positions, token_logprobs
from rlhf.rollout import filter_logits, generate

from .tiny import tiny_gpt2


def tiny_lm(vocab=20, seed=0):
    return tiny_gpt2(vocab, seed=seed, n_layer=2, n_embd=32, n_positions=64, eos_token_id=1).eval()


def greedy_without_cache(model, ids, n):
    """Reference: re-run the whole (unpadded) sequence for every new token."""
    seq = list(ids)
    for _ in range(n):
        logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
        logits[0] = float("-inf")
        seq.append(int(logits.argmax()))
    return seq[len(ids) :]


def sample(model, ids, mask, max_new_tokens: int):
    """Answers of ``model`` (EOS 1, PAD 0) from a fixed seed."""
    return generate(
        model,
        ids,
        mask,
        SamplingConfig(max_new_tokens=max_new_tokens),
        eos_id=1,
        pad_id=0,
        generator=torch.Generator().manual_seed(0),
    )


def test_cached_generation_matches_uncached_with_left_padding():
    model = tiny_lm()
    prompts = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12]]
    ids, mask = left_pad(prompts, pad_id=0)
    s = generate(model, ids, mask, SamplingConfig(top_k=1, max_new_tokens=6), eos_id=99, pad_id=0)  # eos never sampled
    for row, p in enumerate(prompts):
        assert s.response_ids[row].tolist() == greedy_without_cache(model, p, 6)


def test_masks_stop_at_the_first_eos_and_pad_after():
    model = tiny_lm(vocab=4, seed=1)  # tokens 1..3 with eos=1: answers end quickly
    ids, mask = left_pad([[2, 3], [3, 3, 2]], pad_id=0)
    s = sample(model, ids, mask, 30)
    for row in range(2):
        r, m = s.response_ids[row], s.response_mask[row]
        if s.ended[row]:
            first = int((r == 1).nonzero()[0])
            assert m[: first + 1].all() and not m[first + 1 :].any()
            assert (r[first + 1 :] == 0).all()  # PAD after EOS
        else:
            assert m.all()
    assert int(s.last_index[0]) == ids.shape[1] + int(s.response_mask[0].sum()) - 1


def test_rollout_logprobs_align_with_the_answer_tokens_and_the_sampler():
    model = tiny_lm()
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    s = sample(model, ids, mask, 4)
    full = s.response_slice(token_logprobs(model, s.input_ids, s.attention_mask))  # (B, R)
    answers_only = s.response_slice(token_logprobs(model, s.input_ids, s.attention_mask, first=s.first_target))
    assert torch.equal(full, answers_only)  # the LM head on the answers alone gives the same numbers
    # recompute the first answer token's log-prob from the prompt alone, under the sampler's distribution (no PAD)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits[:, -1]
    expected = (
        logits.index_fill(-1, torch.tensor([0]), float("-inf"))
        .log_softmax(-1)
        .gather(1, s.response_ids[:, :1])
        .squeeze(1)
    )
    assert torch.allclose(full[:, 0], expected, atol=1e-5)


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert (
        torch.isinf(filter_logits(logits, 2, 1.0)[0, 2:]).all()
        and torch.isfinite(filter_logits(logits, 2, 1.0)[0, :2]).all()
    )
    kept = torch.isfinite(filter_logits(logits, 0, 0.7)[0])
    assert kept.tolist() == [True, True, False, False]  # 0.5 + 0.3 >= 0.7


def test_trimming_drops_only_the_padding_every_row_shares_and_keeps_the_log_probs():
    model = tiny_lm()
    ids, mask = left_pad([[5, 6, 7, 8, 9], [3, 4], [10, 11, 12]], pad_id=0)
    s = sample(model, ids, mask, 10)
    part = s[1:]  # the two short prompts: their common left padding is 2 columns
    t = part.trimmed()
    assert t.prompt_ids.shape[1] == 3 and t.response_ids.shape[1] == int(part.response_mask.sum(1).max())
    full = (
        part.response_slice(token_logprobs(model, part.input_ids, part.attention_mask))[:, : t.response_ids.shape[1]]
        * t.response_mask
    )
    trim = (
        t.response_slice(token_logprobs(model, t.input_ids, t.attention_mask, first=t.first_target)) * t.response_mask
    )
    assert torch.allclose(full, trim, atol=1e-5) and torch.equal(part.last_index - 2, t.last_index)


def test_the_samplers_log_probs_are_the_forwards_under_filtering_and_zero_after_eos():
    """PPO's old log-probs come from the sampler in fp32 (no second forward): they must be a full forward's, of the
    tempered softmax before top-k / top-p (the policy the ratio and the KL are about), and 0 where the mask is."""
    model = tiny_lm(vocab=6, seed=2)  # few tokens with eos=1: some answers end early, some run to the limit
    ids, mask = left_pad([[5, 2, 3], [4], [3, 3, 2, 5], [2, 4]], pad_id=0)
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.7, top_k=3, top_p=0.9)
    s = generate(model, ids, mask, cfg, eos_id=1, pad_id=0, generator=torch.Generator().manual_seed(0), logprobs=True)
    assert s.ended.any() and (~s.ended).any() and s.logprobs.shape == s.response_ids.shape
    forward = s.response_slice(token_logprobs(model, s.input_ids, s.attention_mask, cfg.temperature, s.first_target))
    m = s.response_mask.bool()
    assert torch.allclose(s.logprobs[m], forward[m], atol=1e-5)
    assert (s.logprobs[~m] == 0).all() and (s.logprobs[m] < 0).all()
    assert torch.equal(s[1:].trimmed().logprobs, s.logprobs[1:, : s[1:].trimmed().response_ids.shape[1]])
    assert generate(model, ids, mask, cfg, eos_id=1, pad_id=0).logprobs is None  # not asked: nothing computed
