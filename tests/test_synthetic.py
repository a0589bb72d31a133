"""The synthetic task: determinism, the gold reward's terms, the annotator model, held-out prompts."""

import math
import random

import pytest

from rlhf import synthetic as S

PROMPT = "topic: fruit. open: mango. avoid: plum. length: short. answer:"


def test_splits_are_deterministic_in_the_seed():
    sizes = dict(n_sft=50, n_pref=50, n_eval_prompts=20, n_eval_pref=20, n_ppo_prompts=20)
    kw = dict(**sizes, annotator_temperature=0.3, annotator_length_bias=0.1, demo_quality=0.65)
    assert S.make_splits(seed=3, **kw) == S.make_splits(seed=3, **kw)
    assert S.make_splits(seed=3, **kw)["sft"] != S.make_splits(seed=4, **kw)["sft"]


def test_gold_reward_of_the_best_answer():
    # keyword first, distinct on-topic words, the avoided word absent, exactly 4 words
    assert S.gold_reward(PROMPT, "mango apple cherry grape") == pytest.approx(1.5)


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("apple cherry grape lemon", 1.0),  # no opening bonus
        ("mango apple plum grape", 1.0),  # the avoided word: -0.5
        ("mango apple apple grape", 1.5 - 0.25),  # one repeat in four words
        ("mango apple tiger grape", 0.5 + 0.5),  # (3 on - 1 off) / 4 = 0.5, + opening
        ("mango the apple grape", 0.75 + 0.5),  # filler is neither on nor off topic
        ("mango apple cherry grape lemon peach", 1.5 - 2 * 0.3),  # two words past the target
        ("mango apple", 1.5 - 2 * 0.2),  # two words short
        ("", S.EMPTY_SCORE),
    ],
)
def test_gold_reward_terms(answer, expected):
    assert S.gold_reward(PROMPT, answer) == pytest.approx(expected)


def test_unfinished_answers_are_penalised():
    assert S.gold_reward(PROMPT, "mango apple cherry grape", ended=False) == pytest.approx(1.5 - S.UNFINISHED_PENALTY)


def test_gold_depends_on_the_prompt():
    other = "topic: animal. open: cat. avoid: dog. length: long. answer:"
    assert S.gold_reward(other, "mango apple cherry grape") < 0 < S.gold_reward(PROMPT, "mango apple cherry grape")


def test_annotator_is_bradley_terry_with_length_bias():
    assert S.annotator_prob(1.0, 1.0, 4, 4, 0.3, 0.1) == pytest.approx(0.5)
    assert S.annotator_prob(1.0, 0.5, 4, 4, 0.5, 0.0) == pytest.approx(1 / (1 + math.exp(-1.0)))
    # equal gold, the longer answer is preferred: bias 0.1 per word, 3 words, temperature 0.3 -> sigmoid(1)
    assert S.annotator_prob(0.0, 0.0, 7, 4, 0.3, 0.1) == pytest.approx(1 / (1 + math.exp(-1.0)))


def _pairs(length_bias: float) -> list[dict]:
    rng = random.Random(0)
    return [
        S.preference_pair(rng, S.random_spec(rng, False), temperature=0.3, length_bias=length_bias) for _ in range(2000)
    ]


def test_labels_follow_gold_with_noise_and_favour_length():
    def agreement(pairs):
        return sum(p["gold_chosen"] > p["gold_rejected"] for p in pairs) / len(pairs)

    def longer_chosen(pairs):
        return sum(len(p["chosen"].split()) > len(p["rejected"].split()) for p in pairs) / len(pairs)

    fair, biased = _pairs(0.0), _pairs(0.3)
    assert 0.7 < agreement(fair) < 0.95  # informative but noisy
    assert agreement(biased) < agreement(fair)  # the bias costs agreement with gold...
    assert longer_chosen(biased) > longer_chosen(fair) + 0.1  # ...because longer answers win more often


@pytest.mark.parametrize("jitter", [S.PAIR_LENGTH_JITTER, (-4, 4)])
def test_the_pairs_answers_span_the_configured_lengths_around_the_target(jitter):
    rng = random.Random(0)
    pairs = [S.preference_pair(rng, S.random_spec(rng, False), 0.3, 0.0, jitter) for _ in range(2000)]
    offsets = {len(p[k].split()) - S.parse_prompt(p["prompt"]).target for p in pairs for k in ("chosen", "rejected")}
    degenerate = {n - t for t in S.TARGET_LENGTH.values() for n in range(3)}  # the occasional 0-2 word answer
    assert set(range(jitter[0], jitter[1] + 1)) <= offsets <= set(range(jitter[0], jitter[1] + 1)) | degenerate


def test_held_out_prompts_never_appear_in_training_splits():
    s = S.make_splits(0, 500, 500, 100, 100, 200, 0.3, 0.1, 0.65)
    held = {r["prompt"] for r in s["eval_prompts"]} | {r["prompt"] for r in s["eval_pref"]}
    train = {r["prompt"] for name in ("sft", "pref", "ppo_prompts") for r in s[name]}
    assert held and train and not held & train
    assert all(S.parse_prompt(p).held_out for p in held)


def test_demonstrations_are_decent_not_optimal():
    s = S.make_splits(0, 1000, 10, 10, 10, 10, 0.3, 0.1, 0.65)
    mean = sum(S.gold_reward(r["prompt"], r["response"]) for r in s["sft"]) / 1000
    assert 0.0 < mean < 1.0  # the best possible is 1.5


def test_evaluation_prompts_are_distinct_and_there_are_at_least_256():
    s = S.make_splits(0, 10, 10, 256, 10, 10, 0.3, 0.1, 0.65)
    prompts = [r["prompt"] for r in s["eval_prompts"]]
    assert len(set(prompts)) == 256 and all(S.parse_prompt(p).held_out for p in prompts)
    assert len(S.all_specs(held_out=True)) >= 256


def test_asking_for_more_held_out_prompts_than_exist_is_refused_before_training():
    from flows.compose import load_config
    from rlhf.settings import ConfigError
    from rlhf.validate import validate

    with pytest.raises(ConfigError, match=r"data\.n_eval_prompts=400.*Fix: pass data\.n_eval_prompts<="):
        validate(load_config(["data.n_eval_prompts=400"]))


def test_pair_length_stats_on_hand_made_pairs():
    pairs = [
        {"chosen": "a b", "rejected": "a b c", "gold_chosen": 1.0, "gold_rejected": 0.0},
        {"chosen": "a b c d", "rejected": "a b", "gold_chosen": 0.0, "gold_rejected": 1.0},
        {"chosen": "a", "rejected": "b", "gold_chosen": 0.5, "gold_rejected": 0.5},
    ]
    stats = S.pair_length_stats(pairs)
    assert stats["n"] == 3 and stats["shorter_chosen"] == 0.5  # the equal-length pair does not count
    assert stats["corr_length_gold"] == pytest.approx(
        -0.5738190417570045
    )  # lengths 2,3,4,2,1,1 against gold 1,0,0,1,.5,.5
