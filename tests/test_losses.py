"""Every loss against hand-computed values and its defining properties."""

import math

import pytest
import torch

from rlhf import losses as L

from .tiny import tiny_gpt2


def test_sft_loss_averages_answer_tokens_only():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    loss, _ = L.sft_loss(logp, mask)
    assert loss.item() == pytest.approx((2 + 3 + 4) / 3)


def test_pairwise_loss_hand_computed():
    rc, rr = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    loss, m = L.pairwise_loss(rc, rr)
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(2.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["accuracy"].item() == 0.5 and m["margin"].item() == pytest.approx(-0.5)
    centred, _ = L.pairwise_loss(rc, rr, center_coef=0.1)
    assert centred.item() == pytest.approx(expected + 0.1 * (1.0 + 4.0) / 2, rel=1e-6)


def test_dpo_loss_is_ln2_when_policy_equals_reference():
    x = torch.tensor([-3.0, -7.5])
    loss, m = L.dpo_loss(x, x - 1, x, x - 1, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    assert m["kl"].item() == 0 and m["margin"].item() == 0


def test_dpo_loss_hand_computed():
    # chosen ratio +1, rejected ratio -1 -> h = 0.5 * 2 = 1
    loss, m = L.dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5
    )
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.0)), rel=1e-6)
    assert m["rewards_chosen"].item() == pytest.approx(0.5) and m["rewards_rejected"].item() == pytest.approx(-0.5)
    assert m["accuracy"].item() == 1.0 and m["kl"].item() == pytest.approx(0.0)
    smooth, _ = L.dpo_loss(
        torch.tensor([-1.0]),
        torch.tensor([-3.0]),
        torch.tensor([-2.0]),
        torch.tensor([-2.0]),
        beta=0.5,
        label_smoothing=0.2,
    )
    assert smooth.item() == pytest.approx(
        0.8 * math.log(1 + math.exp(-1.0)) + 0.2 * math.log(1 + math.exp(1.0)), rel=1e-6
    )


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert torch.allclose(L.kl_k1(logp, ref), torch.tensor([0.5, -1.0]))
    k3 = L.kl_k3(logp, ref)
    assert torch.allclose(k3, torch.tensor([math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]))
    g = torch.Generator().manual_seed(0)  # 200 x 1000 pairs: exp(x) - 1 - x went below 0 in 4 of 200 such draws
    a, b = torch.randn(200, 1000, generator=g), torch.randn(200, 1000, generator=g)
    assert (L.kl_k3(a, b) >= 0).all() and (L.kl_k3(a, a + 1e-4 * b) >= 0).all()
    assert L.kl_k3(logp, logp).abs().max() == 0


def test_policy_loss_at_ratio_one_is_unclipped_with_no_clipping():
    logp = torch.randn(4, 6)
    adv, mask = torch.randn(4, 6), (torch.rand(4, 6) > 0.3).float()
    loss, m = L.policy_loss(logp, logp.clone(), adv, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(L.masked_mean(-adv, mask).item(), abs=1e-6)
    assert m["clipfrac"].item() == 0 and abs(m["approx_kl"].item()) < 1e-7


def test_policy_loss_clips_hand_computed():
    # ratio e^0.5 ~ 1.6487 with A = +1 and clip 0.2 -> the clipped term -1.2 is the max
    logp, old = torch.tensor([[0.5, 0.0]]), torch.tensor([[0.0, 0.0]])
    adv, mask = torch.tensor([[1.0, -2.0]]), torch.tensor([[1.0, 1.0]])
    loss, m = L.policy_loss(logp, old, adv, mask, 0.2)
    assert loss.item() == pytest.approx((-1.2 + 2.0) / 2, rel=1e-6)
    assert m["clipfrac"].item() == 0.5


def test_value_loss_hand_computed():
    values, old = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    returns, mask = torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 1.0]])
    loss, m = L.value_loss(values, old, returns, mask, clip_range=0.5)
    # token 1: max((1-2)^2, (0.5-2)^2) = 2.25; token 2: max(1, 1) = 1 -> 0.5 * mean = 0.8125
    assert loss.item() == pytest.approx(0.8125)
    assert m["value_clipfrac"].item() == 0.5


def test_masked_positions_never_contribute():
    logp, old, adv = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]]).float()
    garbage = torch.where(mask.bool(), 0.0, 1e6)
    a, _ = L.policy_loss(logp, old, adv, mask, 0.2)
    b, _ = L.policy_loss(logp + garbage, old - garbage, adv + garbage, mask, 0.2)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    va, _ = L.value_loss(logp, old, adv, mask, 0.2)
    vb, _ = L.value_loss(logp + garbage, old, adv - garbage, mask, 0.2)
    assert va.item() == pytest.approx(vb.item(), rel=1e-6)
    sa, _ = L.sft_loss(logp, mask)
    sb, _ = L.sft_loss(logp + garbage, mask)
    assert sa.item() == pytest.approx(sb.item(), rel=1e-6)


def test_token_entropy_matches_the_categorical_and_carries_no_gradient():
    from rlhf.modeling import token_logprobs, token_logprobs_and_entropy

    model = tiny_gpt2(vocab=7, n_layer=1, n_embd=16)
    ids, mask = torch.randint(1, 7, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    logp, entropy = token_logprobs_and_entropy(model, ids, mask, temperature=0.7)
    logits = model(input_ids=ids).logits[:, :-1].detach() / 0.7
    logits[..., 0] = float("-inf")  # PAD is outside the policy's support, as in the sampler
    expected = torch.distributions.Categorical(logits=logits).entropy()
    assert torch.allclose(entropy, expected, atol=1e-5) and not entropy.requires_grad
    assert torch.allclose(logp, token_logprobs(model, ids, mask, temperature=0.7), atol=1e-6) and logp.requires_grad


def test_token_and_sequence_aggregation():
    from rlhf.losses import aggregate

    per_token = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    assert aggregate(per_token, mask, "token") == pytest.approx(8 / 5)  # every token weighs the same
    assert aggregate(per_token, mask, "sequence") == pytest.approx((1 + 4) / 2)  # every answer weighs the same
    # Dr. GRPO: the same token sum over a constant, 2 answers x at most 6 tokens, whatever the answers' lengths
    assert aggregate(per_token, mask, "dr_grpo", max_tokens=6) == pytest.approx(8 / 12)
    assert aggregate(per_token[:, :2], mask[:, :2], "dr_grpo", max_tokens=6) == pytest.approx(
        (2 + 4) / 12
    )  # a trimmed batch


def test_dr_grpo_policy_loss_has_no_length_normalisation():
    """Liu et al. 2025: with the per-answer 1/|o| a long answer's tokens each get a smaller gradient than a short one's;
    with the constant normaliser every token's gradient is A / (B * L), whatever its answer's length."""
    from rlhf.losses import policy_loss

    logp = torch.zeros(2, 4, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    advantages = torch.tensor([[1.0] * 4, [1.0] * 4]) * mask
    loss, _ = policy_loss(logp, logp.detach(), advantages, mask, 0.2, "dr_grpo", max_tokens=8)
    assert float(loss) == pytest.approx(-5 / 16)  # -sum_t A_t rho_t / (2 x 8), rho = 1
    loss.backward()
    assert torch.allclose(logp.grad, -mask / 16)  # every answer token the same gradient
    logp.grad = None
    policy_loss(logp, logp.detach(), advantages, mask, 0.2, "sequence")[0].backward()
    assert logp.grad[0, 0] == pytest.approx(-1 / 8) and logp.grad[1, 0] == pytest.approx(
        -1 / 2
    )  # sequence: 1/|o| per answer


def test_kl_loss_is_k3_with_gradient_through_the_policy():
    from rlhf.losses import kl_loss

    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0]])
    loss, metrics = kl_loss(logp, ref, torch.ones(1, 2))
    expected = (0.0 + (math.exp(1.0) - 1 - 1.0)) / 2  # r = pi_ref / pi = e^(ref - logp): 1 and e
    assert float(loss) == pytest.approx(expected) and float(metrics["kl_loss"]) == pytest.approx(expected)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] < 0  # d/dlogp (e^(ref-logp) - 1 - (ref-logp)) = 1 - e^(ref-logp)


def test_token_means_over_split_minibatches_weigh_every_token_the_same():
    """A minibatch split over 2 processes x 2 micro-batches of unequal lengths: with the denominator the update passes
    (the minibatch's tokens / 4), the micro-batch losses averaged as the trainer and DDP / FSDP average them are the
    minibatch's token mean; each micro-batch's own mean, averaged, is not."""
    from rlhf.losses import token_mean

    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 6, generator=g)
    mask = (torch.arange(6) < torch.tensor([1, 6, 2, 6, 3, 1, 6, 4])[:, None]).float()
    tokens = float(mask.sum()) / 4
    parts = [slice(i, i + 2) for i in range(0, 8, 2)]
    split = sum(token_mean(x[p], mask[p], tokens) for p in parts) / 4
    assert split == pytest.approx(float(token_mean(x, mask)), abs=1e-6)
    assert sum(token_mean(x[p], mask[p]) for p in parts) / 4 != pytest.approx(float(token_mean(x, mask)), abs=1e-3)


def test_truncated_importance_sampling_weights_each_token_by_the_capped_ratio():
    """TIS (Yao et al. 2025): w_t = min(pi_old / mu, C), no gradient; the policy loss is each token's surrogate times
    its weight."""
    old = torch.tensor([[math.log(0.5), math.log(0.9), math.log(0.2)]], requires_grad=True)
    engine = torch.tensor([[math.log(0.25), math.log(0.3), math.log(0.4)]])
    w = L.truncated_is_weights(old, engine, cap=2.0)
    assert w.tolist()[0] == pytest.approx([2.0, 2.0, 0.5]) and not w.requires_grad  # 2, 3 capped to 2, 0.5
    logp = old.detach().clone().requires_grad_()
    adv, mask = torch.tensor([[1.0, -2.0, 3.0]]), torch.ones(1, 3)
    loss, _ = L.policy_loss(logp, old.detach(), adv, mask, 0.2, weights=w)
    assert loss.item() == pytest.approx(-(2.0 * 1.0 + 2.0 * -2.0 + 0.5 * 3.0) / 3)  # ratio 1: -A_t w_t, token mean
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([-2.0 / 3, 4.0 / 3, -0.5])  # d/dlogp of -A w rho / 3


def test_engine_mismatch_is_the_gap_and_the_k3_kl_on_the_engine_s_tokens():
    old = torch.tensor([[math.log(0.5), math.log(0.9), 0.0]])
    engine = torch.tensor([[math.log(0.25), math.log(0.9), 0.0]])
    m = L.engine_mismatch(old, engine, torch.tensor([[1.0, 1.0, 0.0]]))
    assert m["logprob_abs_diff_mean"].item() == pytest.approx(math.log(2) / 2)
    assert m["logprob_abs_diff_max"].item() == pytest.approx(math.log(2))
    assert m["engine_kl"].item() == pytest.approx(
        (2 - 1 - math.log(2)) / 2
    )  # r = 2 on the first token, 1 on the second
