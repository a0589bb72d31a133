"""Generation with the KV cache: same tokens as without it, correct EOS / PAD masks, filtering."""

import torch

from rlhf.answer_keys import AnswerStream
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
        keys=AnswerStream(0).take(len(ids)),
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
    s = generate(model, ids, mask, cfg, eos_id=1, pad_id=0, keys=AnswerStream(0).take(len(ids)), logprobs=True)
    assert s.ended.any() and (~s.ended).any() and s.logprobs.shape == s.response_ids.shape
    forward = s.response_slice(token_logprobs(model, s.input_ids, s.attention_mask, cfg.temperature, s.first_target))
    m = s.response_mask.bool()
    assert torch.allclose(s.logprobs[m], forward[m], atol=1e-5)
    assert (s.logprobs[~m] == 0).all() and (s.logprobs[m] < 0).all()
    assert torch.equal(s[1:].trimmed().logprobs, s.logprobs[1:, : s[1:].trimmed().response_ids.shape[1]])
    assert generate(model, ids, mask, cfg, eos_id=1, pad_id=0).logprobs is None  # not asked: nothing computed


def test_keyed_sampling_draws_each_token_with_its_probability():
    """The inverse distribution at hashed uniforms draws from p: 200k rows of one distribution land within 4 binomial
    standard errors of p in every entry, and never on an entry of probability 0."""
    from rlhf.answer_keys import sample

    p = torch.tensor([0.5, 0.3, 0.0, 0.15, 0.05, 0.0])
    n = 200_000
    counts = torch.bincount(sample(p.repeat(n, 1), AnswerStream(7).take(n), step=3), minlength=6).double()
    se = (p.double() * (1 - p.double()) / n).sqrt()
    assert ((counts / n - p).abs() <= 4 * se + 1e-12).all() and counts[2] == counts[5] == 0
    again = sample(p.repeat(n, 1), AnswerStream(7).take(n), step=4)  # another step: other draws, same law
    assert (again != sample(p.repeat(n, 1), AnswerStream(7).take(n), step=3)).float().mean() > 0.4


def test_an_answer_depends_on_its_prompt_and_key_not_on_its_batch():
    """The same prompts sampled in one batch, and in two batches in another order with other padding, with the same
    answers' keys: the same answers (what makes rollouts the same on any number of processes)."""
    model = tiny_lm(seed=3)
    prompts = [[5, 2, 3], [4], [3, 3, 2, 5, 7, 8], [2, 4], [9, 9]]
    keys = AnswerStream(11, 2).keys(torch.arange(5))
    cfg = SamplingConfig(max_new_tokens=10)
    whole = generate(model, *left_pad(prompts, pad_id=0), cfg, eos_id=1, pad_id=0, keys=keys)
    texts = [r[m.bool()].tolist() for r, m in zip(whole.response_ids, whole.response_mask)]
    assert len({tuple(t) for t in texts}) > 2  # sampled, not one greedy answer
    for part in ([3, 1], [4, 0, 2]):
        s = generate(model, *left_pad([prompts[i] for i in part], 0), cfg, eos_id=1, pad_id=0, keys=keys[part])
        assert [r[m.bool()].tolist() for r, m in zip(s.response_ids, s.response_mask)] == [texts[i] for i in part]
    other = generate(model, *left_pad(prompts, 0), cfg, eos_id=1, pad_id=0, keys=AnswerStream(12, 2).take(5))
    assert not torch.equal(other.response_ids, whole.response_ids)


def test_streams_of_negative_and_wide_numbers_are_their_own():
    """The score offset's rollouts (iterations -1, -2), the held-out stream (-99) and seeds past 32 bits get keys of
    their own, not those of iterations 0, 1, 98 or of seed 1."""
    roots = [AnswerStream(0, i).root for i in (-1, 0, -2, 1, -99, 98)] + [
        AnswerStream(2**32).root,  # not the parts (0, 1)
        AnswerStream(1).root,
        AnswerStream(1, 0).root,
    ]
    assert len(set(roots)) == len(roots)


def test_the_weights_pushed_to_an_engine_are_a_lora_policy_merged_and_its_reference_the_base():
    """rlhf.vllm_engine.trainer_weights (no vLLM needed): a LoRA policy's tensors under the plain model's names with the
    adapters merged in, as peft's merge_and_unload gives them; with the adapters switched off (the shared reference),
    the base weights."""
    import copy

    from peft import LoraConfig, get_peft_model

    from rlhf.modeling import FrozenModel
    from rlhf.vllm_engine import trainer_weights

    base = tiny_gpt2(64, n_embd=32, n_layer=2)
    plain = {k: v.clone() for k, v in base.state_dict().items()}
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # adapters that move the weights (lora_B starts at 0)
    merged = copy.deepcopy(policy).merge_and_unload().state_dict()
    pushed = dict(trainer_weights(policy))
    assert pushed.keys() == merged.keys()
    assert all(torch.allclose(pushed[k], merged[k], atol=1e-6) for k in merged)
    assert not torch.allclose(pushed["transformer.h.0.attn.c_attn.weight"], plain["transformer.h.0.attn.c_attn.weight"])
    with FrozenModel(adapters_of=policy).use() as reference:
        assert all(torch.equal(t, plain[k]) for k, t in trainer_weights(reference))
