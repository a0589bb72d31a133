"""Gao et al.'s over-optimisation forms fitted to known curves; ensemble scores; the guard's choice."""

import math
from types import SimpleNamespace

import pytest
import torch

from rlhf import frontier
from rlhf.scoring import Scorer, ensemble_score


@pytest.mark.parametrize("form, alpha, beta", [("rl", 1.2, 0.8), ("bon", 0.9, 0.3)])
def test_fits_recover_the_parameters_and_the_peak_of_a_known_curve(form, alpha, beta):
    d = torch.linspace(0, 4, 17, dtype=torch.float64)
    truth = frontier.Fit(form, alpha, beta, 1.0, len(d))
    noise = torch.randn(17, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.01
    f = frontier.fit(form, d, truth.predict(d) + noise)
    assert f.alpha == pytest.approx(alpha, abs=0.03) and f.beta == pytest.approx(beta, abs=0.03) and f.r2 > 0.99
    expected_peak = alpha / (2 * beta) if form == "bon" else math.exp(alpha / beta - 1)
    assert f.d_star == pytest.approx(expected_peak, rel=0.05)


def test_a_curve_that_never_turns_has_no_peak_and_a_flat_one_explains_nothing():
    d = torch.linspace(0, 3, 10)
    assert frontier.fit("rl", d, 0.5 * d).d_star == math.inf  # beta ~ 0: still rising
    assert frontier.fit("bon", d, torch.zeros(10)).r2 == 0.0
    assert frontier.distance([-0.2, 4.0]).tolist() == [0.0, 2.0]  # a negative KL estimate is no distance


def test_ensemble_scores():
    z = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0]])  # 3 members, 2 answers
    assert ensemble_score(z, "mean").tolist() == [2.0, 0.0]
    assert ensemble_score(z, "worst").tolist() == [1.0, 0.0]
    assert ensemble_score(z, "uncertainty", 0.5).tolist() == pytest.approx([2.0 - 0.5 * 1.0, 0.0])  # var(1, 3, 2) = 1


def scorer(member_stats: torch.Tensor) -> Scorer:
    """The scoring rule of an ensemble with these members' statistics on SFT answers (K, 2) (no model needed here)."""
    out = Scorer([None] * len(member_stats), missing_eos_penalty=0.0)
    out.member_stats = member_stats
    return out


@pytest.mark.parametrize("how", ["mean", "worst", "uncertainty"])
def test_an_ensemble_scores_on_the_single_models_scale_whatever_its_other_members_spread(how):
    single = torch.tensor([0.5, 1.0, 2.5, 1.0])  # member 0's raw scores of 4 answers
    members = torch.stack(
        [single, 3 * single - 2, 0.5 * single + 7]
    )  # members that agree with it on a wider and a narrower scale
    stats = torch.stack([members.mean(1), members.std(1)], 1)  # (K, 2) as measured on SFT answers
    assert torch.allclose(scorer(stats).ensemble(members, how, 0.5), single)  # beta means what it means with member 0


@pytest.mark.parametrize("how", ["mean", "worst", "uncertainty"])
def test_a_critic_started_from_member_0_starts_centred_like_an_ensembles_scores(how):
    from rlhf.stages.ppo import PPO

    members = (
        torch.randn(4, 256, generator=torch.Generator().manual_seed(0)) * torch.tensor([[1.0], [1.5], [0.7], [1.2]])
        + 0.3
    )  # SFT answers
    stats = torch.stack([members.mean(1), members.std(1)], 1)
    run = SimpleNamespace(cfg=SimpleNamespace(value_init="reward", score_norm=True, normalize_reward=False))
    ensemble = scorer(stats).ensemble(members, how, 0.5)
    run.score_offset, run.ensemble_gap = (
        float(ensemble.mean()),
        float((ensemble - members[0]).mean()),
    )  # as measure_score_offset sets them
    shift, scale = PPO.value_scale(run)
    scores, values = (
        ensemble - run.score_offset,
        (members[0] - shift) / scale,
    )  # what PPO optimises; the critic reading member 0
    assert scores.mean() == pytest.approx(0.0, abs=1e-5) and values.mean() == pytest.approx(0.0, abs=1e-5)
    if how == "worst":
        assert (
            run.ensemble_gap < -0.3
        )  # the minimum of 4 members lies well below member 0: unshifted, the critic would start too optimistic
