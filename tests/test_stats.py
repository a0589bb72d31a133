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
    assert mean_se(per_prompt(values, 2))[1] == pytest.approx(math.sqrt(((2 - 8 / 3) ** 2 + (8 / 3) ** 2 + (6 - 8 / 3) ** 2) / 2) / math.sqrt(3))


def test_comparisons_are_paired_and_ties_count_half():
    assert wins(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 4.0])).tolist() == [1.0, 0.5, 0.0]
    policy, sft = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 1.0, 2.0, 3.0])  # always exactly 1 better
    m = comparison_metrics("gold", policy, sft, n_samples=1)
    assert m["eval/gold_gain"] == 1.0 and m["eval/gold_gain_se"] == 0.0  # the prompts' own spread cancels in the pair
    assert m["eval/gold_reward_se"] > 0.6 and m["eval/win_rate_gold"] == 1.0 and m["eval/win_rate_gold_se"] == 0.0
