"""A synthetic instruction task whose true ("gold") preference is a known function.

A prompt asks for an answer about a topic, opening with a given keyword, avoiding one word of the
topic, of a given length::

    topic: fruit. open: mango. avoid: plum. length: short. answer:

There are 6 x 8 x 7 x 2 = 672 such prompts; a fixed two fifths of them (by a stable hash: 258 prompts)
are held out: the evaluation prompts (distinct, drawn without replacement) and pairs come only from
those, training data never does.

An answer is a sequence of words. The gold reward (:func:`gold_reward`) is prompt-dependent and more
than a bag of words:

- relevance  (on-topic words - off-topic words - unknown words) / n          in [-1, 1]
- opening    +OPEN_BONUS if the first word is the prompt's keyword           (position)
- avoidance  -AVOID_PENALTY if the avoided word appears                      (negation)
- repetition -REPEAT_PENALTY * share of repeated words                       (non-linear)
- length     -LONG_PENALTY per word past the target, -SHORT_PENALTY per word short of it
- ending     -UNFINISHED_PENALTY if the answer never ended (no EOS)

The best answer (keyword first, then distinct on-topic words without the avoided one, exactly the
target length) scores 1.5.

Simulated annotators label pairs through a Bradley-Terry model on the gold reward with noise
(``annotator_temperature``) and a bias every annotator shares toward longer answers
(``annotator_length_bias`` per word, :func:`annotator_prob`). A reward model learned from their labels is
a *proxy* with two sources of error: the shared bias (past the target length the gold reward loses
``LONG_PENALTY`` per word, the annotators' preference gains ``annotator_length_bias`` per word; with a bias
above the penalty, the proxy keeps rewarding length where gold falls) and the reward model's own errors
from a limited, noisy sample of pairs (``n_pref``, the temperature).

SFT demonstrations come from a decent-but-not-optimal demonstrator; preference pairs from a broader
behaviour distribution so the reward model sees good and bad answers.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass

from .config_data import PAIR_LENGTH_JITTER

TOPICS: dict[str, tuple[str, ...]] = {
    "fruit": ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"),
    "animal": ("cat", "dog", "horse", "tiger", "whale", "eagle", "snake", "rabbit"),
    "color": ("red", "blue", "green", "yellow", "purple", "black", "white", "pink"),
    "weather": ("rain", "snow", "wind", "storm", "sun", "cloud", "fog", "thunder"),
    "sport": ("soccer", "tennis", "golf", "hockey", "rugby", "boxing", "cycling", "rowing"),
    "music": ("piano", "guitar", "violin", "drum", "flute", "trumpet", "cello", "harp"),
}
FILLER: tuple[str, ...] = ("and", "the", "very", "with", "some", "many")
TARGET_LENGTH = {"short": 4, "long": 8}

OPEN_BONUS = 0.5
AVOID_PENALTY = 0.5
HELD_OUT_FIFTHS = 2  # two prompt specs in five are held out (enough for 256 distinct evaluation prompts)
REPEAT_PENALTY = 1.0
LONG_PENALTY = 0.3
SHORT_PENALTY = 0.2
UNFINISHED_PENALTY = 1.0
EMPTY_SCORE = -2.0

_WORD_TOPIC = {w: t for t, words in TOPICS.items() for w in words}
_PROMPT_RE = re.compile(r"topic: (\w+)\. open: (\w+)\. avoid: (\w+)\. length: (\w+)\. answer:")


@dataclass(frozen=True)
class Spec:
    """What a prompt asks for."""

    topic: str
    keyword: str
    avoid: str
    length: str  # "short" | "long"

    @property
    def target(self) -> int:
        return TARGET_LENGTH[self.length]

    def prompt(self) -> str:
        return f"topic: {self.topic}. open: {self.keyword}. avoid: {self.avoid}. length: {self.length}. answer:"

    @property
    def held_out(self) -> bool:
        digest = hashlib.sha256(self.prompt().encode()).digest()
        return digest[0] % 5 < HELD_OUT_FIFTHS


def parse_prompt(prompt: str) -> Spec:
    m = _PROMPT_RE.search(prompt)
    if m is None:
        raise ValueError(f"not a synthetic-task prompt: {prompt!r}")
    return Spec(*m.groups())


def gold_reward(prompt: str, response: str, ended: bool = True) -> float:
    """The true reward of ``response`` to ``prompt`` (see the module docstring for the terms)."""
    spec = parse_prompt(prompt)
    words = response.split()
    n = len(words)
    if n == 0:
        return EMPTY_SCORE
    on = sum(_WORD_TOPIC.get(w) == spec.topic for w in words)
    off = sum(w not in FILLER and _WORD_TOPIC.get(w) != spec.topic for w in words)
    relevance = (on - off) / n
    opening = OPEN_BONUS if words[0] == spec.keyword else 0.0
    avoidance = -AVOID_PENALTY if spec.avoid in words else 0.0
    repetition = -REPEAT_PENALTY * (1.0 - len(set(words)) / n)
    length = -LONG_PENALTY * max(0, n - spec.target) - SHORT_PENALTY * max(0, spec.target - n)
    ending = 0.0 if ended else -UNFINISHED_PENALTY
    return relevance + opening + avoidance + repetition + length + ending


def annotator_prob(
    gold_a: float, gold_b: float, len_a: int, len_b: int, temperature: float, length_bias: float
) -> float:
    """P(annotator prefers a over b) = sigmoid((g_a - g_b + length_bias * (len_a - len_b)) / temperature)."""
    z = (gold_a - gold_b + length_bias * (len_a - len_b)) / temperature
    return 1.0 / (1.0 + math.exp(-max(min(z, 60.0), -60.0)))


def all_specs(held_out: bool) -> list[Spec]:
    """Every prompt spec of the held-out fifth (``held_out``) or of the training rest, in a fixed order."""
    specs = [
        Spec(t, k, a, length)
        for t in sorted(TOPICS)
        for k in TOPICS[t]
        for a in TOPICS[t]
        if a != k
        for length in sorted(TARGET_LENGTH)
    ]
    return [s for s in specs if s.held_out == held_out]


def distinct_held_out_prompts(rng: random.Random, n: int) -> list[str]:
    """``n`` different held-out prompts (evaluation: no prompt counted twice)."""
    specs = all_specs(held_out=True)
    if n > len(specs):
        raise ValueError(
            f"data.n_eval_prompts={n} asks for more distinct held-out prompts than the task has ({len(specs)}). "
            f"Fix: pass data.n_eval_prompts<={len(specs)} (and eval.n_samples > 1 for more answers per prompt)."
        )
    return [s.prompt() for s in rng.sample(specs, n)]


def random_spec(rng: random.Random, held_out: bool) -> Spec:
    """A uniformly drawn prompt spec from the held-out fifth (``held_out``) or the training rest."""
    while True:
        topic = rng.choice(sorted(TOPICS))
        keyword, avoid = rng.sample(TOPICS[topic], 2)
        spec = Spec(topic, keyword, avoid, rng.choice(sorted(TARGET_LENGTH)))
        if spec.held_out == held_out:
            return spec


def sample_answer(
    rng: random.Random, spec: Spec, on_topic: float, open_prob: float, length_jitter: tuple[int, int]
) -> str:
    """An answer from a noisy writer: ``on_topic`` share of on-topic words, the rest filler or off-topic."""
    n = max(0, spec.target + rng.randint(*length_jitter))
    others = [w for t, ws in TOPICS.items() if t != spec.topic for w in ws]
    words = []
    for i in range(n):
        if i == 0 and rng.random() < open_prob:
            words.append(spec.keyword)
            continue
        u = rng.random()
        if u < on_topic:
            words.append(rng.choice(TOPICS[spec.topic]))
        elif u < on_topic + (1.0 - on_topic) * 0.5:
            words.append(rng.choice(FILLER))
        else:
            words.append(rng.choice(others))
    return " ".join(words)


def demonstration(rng: random.Random, spec: Spec, quality: float) -> str:
    """A decent, not optimal, SFT demonstration."""
    return sample_answer(rng, spec, on_topic=quality, open_prob=0.5, length_jitter=(-2, 2))


DEGENERATE_SHARE = 0.1  # behaviour answers of 0-2 words: the reward model must see (and learn to dislike) them


def behaviour_answer(rng: random.Random, spec: Spec, length_jitter: tuple[int, int] = PAIR_LENGTH_JITTER) -> str:
    """An answer from the broad behaviour policy that produces the preference pairs: ``length_jitter`` words
    around the target, and now and then a degenerate one (empty to 2 words) that a policy could otherwise
    find as a hole in the reward model."""
    jitter = (-spec.target, 2 - spec.target) if rng.random() < DEGENERATE_SHARE else length_jitter
    return sample_answer(rng, spec, on_topic=rng.uniform(0.2, 1.0), open_prob=rng.random(), length_jitter=jitter)


def preference_pair(
    rng: random.Random,
    spec: Spec,
    temperature: float,
    length_bias: float,
    length_jitter: tuple[int, int] = PAIR_LENGTH_JITTER,
) -> dict:
    """Two behaviour answers labelled by a simulated annotator. Keeps the gold scores for analysis."""
    prompt = spec.prompt()
    a, b = behaviour_answer(rng, spec, length_jitter), behaviour_answer(rng, spec, length_jitter)
    while b == a:
        b = behaviour_answer(rng, spec, length_jitter)
    ga, gb = gold_reward(prompt, a), gold_reward(prompt, b)
    p = annotator_prob(ga, gb, len(a.split()), len(b.split()), temperature, length_bias)
    if rng.random() < p:
        return {"prompt": prompt, "chosen": a, "rejected": b, "gold_chosen": ga, "gold_rejected": gb}
    return {"prompt": prompt, "chosen": b, "rejected": a, "gold_chosen": gb, "gold_rejected": ga}


def pair_length_stats(pairs: list[dict]) -> dict:
    """What length alone says in preference pairs: the share of pairs of unequal length whose shorter answer is
    the chosen one, and the correlation of answer length (words) with gold over all their answers."""
    lengths = [(len(p["chosen"].split()), len(p["rejected"].split())) for p in pairs]
    unequal = [(c, r) for c, r in lengths if c != r]
    words = [float(n) for pair in lengths for n in pair]
    golds = [p[f"gold_{k}"] for p in pairs for k in ("chosen", "rejected")]
    return {
        "n": len(pairs),
        "shorter_chosen": sum(c < r for c, r in unequal) / len(unequal),
        "corr_length_gold": _correlation(words, golds),
    }


def _correlation(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    return cov / math.sqrt(sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))


def make_splits(
    seed: int,
    n_sft: int,
    n_pref: int,
    n_eval_prompts: int,
    n_eval_pref: int,
    n_ppo_prompts: int,
    annotator_temperature: float,
    annotator_length_bias: float,
    demo_quality: float,
    pair_length_jitter: tuple[int, int] = PAIR_LENGTH_JITTER,
) -> dict[str, list[dict]]:
    """Every split of the task, deterministic in ``seed``. Held-out splits use their own streams."""
    streams = {name: random.Random(f"{seed}/{name}") for name in ("sft", "pref", "eval", "eval_pref", "ppo")}
    sft = []
    for _ in range(n_sft):
        spec = random_spec(streams["sft"], held_out=False)
        sft.append({"prompt": spec.prompt(), "response": demonstration(streams["sft"], spec, demo_quality)})
    label = dict(temperature=annotator_temperature, length_bias=annotator_length_bias, length_jitter=pair_length_jitter)
    pref = [preference_pair(streams["pref"], random_spec(streams["pref"], False), **label) for _ in range(n_pref)]
    eval_pref = [
        preference_pair(streams["eval_pref"], random_spec(streams["eval_pref"], True), **label)
        for _ in range(n_eval_pref)
    ]
    eval_prompts = [{"prompt": p} for p in distinct_held_out_prompts(streams["eval"], n_eval_prompts)]
    ppo_prompts = [{"prompt": random_spec(streams["ppo"], False).prompt()} for _ in range(n_ppo_prompts)]
    return {"sft": sft, "pref": pref, "eval_prompts": eval_prompts, "eval_pref": eval_pref, "ppo_prompts": ppo_prompts}
