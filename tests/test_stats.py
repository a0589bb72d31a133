"""Standard errors of the eval metrics against hand-computed values."""

import math

import pytest
import torch

from rlhf.stages.evaluate import comparison_metrics
from rlhf.stats import mean_se, per_prompt, wins


def test_mean_and_standard_error():
    mean, se = mean_se(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert mean == 3.0 and se == pytest.approx(math.sqrt(14 / 3) / 2)  # var = (4 + 1 + 0 + 9) / 3
    assert mean_se(torch.tensor([5.0])) == (5.0, 0.0)


def test_several_answers_per_prompt_count_as_one_observation_of_the_prompt():
    values = torch.tensor([1.0, 3.0, 0.0, 0.0, 5.0, 7.0])  # 3 prompts x 2 answers, prompt-major
    assert per_prompt(values, 2).tolist() == [2.0, 0.0, 6.0]
    assert mean_se(per_prompt(values, 2))[1] == pytest.approx(
        math.sqrt(((2 - 8 / 3) ** 2 + (8 / 3) ** 2 + (6 - 8 / 3) ** 2) / 2) / math.sqrt(3)
    )


def test_comparisons_are_paired_and_ties_count_half():
    assert wins(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 4.0])).tolist() == [1.0, 0.5, 0.0]
    policy, sft = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 1.0, 2.0, 3.0])  # always exactly 1 better
    m = comparison_metrics("gold", policy, sft, n_samples=1)
    assert m["eval/gold_gain"] == 1.0 and m["eval/gold_gain_se"] == 0.0  # the prompts' own spread cancels in the pair
    assert m["eval/gold_reward_se"] > 0.6 and m["eval/win_rate_gold"] == 1.0 and m["eval/win_rate_gold_se"] == 0.0


def test_ece_of_a_calibrated_scorer_is_about_zero_and_of_an_overconfident_one_is_not():
    from rlhf.reward_report import report
    from rlhf.stats import expected_calibration_error

    g = torch.Generator().manual_seed(0)
    margins = torch.randn(20000, generator=g) * 1.5  # true reward differences
    prefers_a = torch.rand(20000, generator=g) < torch.sigmoid(margins)  # Bradley-Terry labels on them
    chosen, rejected = (
        torch.where(prefers_a, margins, 0.0),
        torch.where(prefers_a, 0.0, margins),
    )  # a scorer that predicts exactly
    lengths = torch.ones(20000, 2)
    calibrated, _ = report(chosen, rejected, lengths)
    overconfident, _ = report(3 * chosen, 3 * rejected, lengths)
    assert calibrated["eval_ece"] < 0.02 and overconfident["eval_ece"] > 0.1
    ece, table = expected_calibration_error(torch.tensor([0.05, 0.05, 0.95, 0.95]), torch.tensor([0, 1, 1, 1]))
    assert (
        ece == pytest.approx(0.5 * 0.45 + 0.5 * 0.05)
        and table[0].tolist() == pytest.approx([0.05, 0.5, 2])
        and table[5, 2] == 0
    )


def test_the_bias_detector_sees_a_scorer_that_likes_length_more_than_gold_does():
    from rlhf.reward_report import report

    words = torch.tensor([[4.0, 8.0], [6.0, 3.0], [10.0, 5.0], [4.0, 7.0]])
    gold = torch.tensor([[1.0, 0.2], [0.8, 0.9], [0.1, 1.0], [1.2, 0.4]])  # gold falls with length
    metrics, _ = report(words[:, 0] * 0.5, words[:, 1] * 0.5, words, gold)  # a scorer that only counts words
    assert metrics["eval_length_corr"] == pytest.approx(1.0) and metrics["eval_gold_length_corr"] < -0.5
