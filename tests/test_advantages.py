"""GAE, whitening and the KL controllers against hand-computed values and a reference loop."""

import pytest
import torch

from rlhf.advantages import RunningMoments, gae, whiten
from rlhf.kl_control import AdaptiveKLController, FixedKLController


def gae_loop(rewards, values, mask, gamma, lam):
    """The textbook reverse loop, as a reference for the vectorised version."""
    B, T = rewards.shape
    adv = torch.zeros(B, T)
    for b in range(B):
        last = 0.0
        for t in reversed(range(T)):
            if not mask[b, t]:
                continue
            next_v = values[b, t + 1] if t + 1 < T and mask[b, t + 1] else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, adv + values * mask


def test_gae_matches_the_reference_loop():
    torch.manual_seed(0)
    rewards, values = torch.randn(4, 7), torch.randn(4, 7)
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] * 5 + [0] * 2, [1] + [0] * 6]).float()
    for gamma, lam in ((1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)):
        adv, ret = gae(rewards, values, mask, gamma, lam)
        ref_adv, ref_ret = gae_loop(rewards, values, mask, gamma, lam)
        assert torch.allclose(adv, ref_adv, atol=1e-5) and torch.allclose(ret, ref_ret, atol=1e-5)


def test_gamma_lambda_one_gives_reward_to_go_minus_values():
    rewards = torch.tensor([[0.0, -0.1, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.2, 0.3, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    assert torch.allclose(adv, torch.tensor([[0.9 - 0.5, 0.9 - 0.2, 1.0 - 0.3, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.9, 0.9, 1.0, 0.0]]))


def test_gae_hand_computed():
    # T=2, gamma=0.5, lam=0.5: d1 = 1 - 1 = 0... see inline
    rewards, values, mask = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 2.0]]), torch.ones(1, 2)
    adv, _ = gae(rewards, values, mask, 0.5, 0.5)
    d1 = 1.0 - 2.0  # last step: r - V
    d0 = 0.0 + 0.5 * 2.0 - 1.0
    assert torch.allclose(adv, torch.tensor([[d0 + 0.25 * d1, d1]]))


def test_whiten_masked():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, mask)
    assert w[0, 3] == 0
    assert torch.allclose(w[0, :3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6)  # unbiased std of (1,2,3) is 1


def test_running_moments_match_batch_statistics():
    rm, data = RunningMoments(), torch.randn(1000) * 3 + 2
    for chunk in data.split(100):
        rm.update(chunk)
    assert rm.mean == pytest.approx(data.mean().item(), abs=1e-4)
    assert rm.std == pytest.approx(data.std(unbiased=False).item(), rel=1e-3)


def test_adaptive_kl_controller_hand_computed():
    ctl = AdaptiveKLController(0.1, target=2.0, horizon=1000)
    ctl.update(current_kl=3.0, n_samples=100)  # error = clip(0.5, +-0.2) = 0.2 -> x(1 + 0.2 * 0.1)
    assert ctl.value == pytest.approx(0.1 * 1.02)
    ctl.update(current_kl=1.8, n_samples=100)  # error = -0.1 -> x(1 - 0.01)
    assert ctl.value == pytest.approx(0.1 * 1.02 * 0.99)
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05


def test_leave_one_out_baseline_is_the_mean_of_the_others():
    from rlhf.advantages import leave_one_out

    r = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    # 1 - (2+6)/2 = -3; 2 - (1+6)/2 = -1.5; 6 - (1+2)/2 = 4.5 ; 0 - 1.5 = -1.5 twice; 3 - 0 = 3
    assert leave_one_out(r).tolist() == [[-3.0, -1.5, 4.5], [-1.5, -1.5, 3.0]]
    assert torch.allclose(leave_one_out(r).sum(1), torch.zeros(2))  # a constant reward (and any offset) cancels


def test_group_normalised_advantages():
    from rlhf.advantages import group_normalized

    r = torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]])
    std = torch.tensor([1.0, 2.0, 3.0, 6.0]).std().item()  # unbiased: sqrt(14/3)
    expected = [[(x - 3.0) / (std + 1e-4) for x in (1.0, 2.0, 3.0, 6.0)], [0.0] * 4]
    assert torch.allclose(group_normalized(r), torch.tensor(expected), atol=1e-6)  # a group that agrees teaches nothing
    assert group_normalized(r, scale=False)[0].tolist() == [-2.0, -1.0, 0.0, 3.0]
