"""The committed throughput results: every peer measured on the same fields, the report rendered from the JSON
(every other report and the docs' results pages: tests/test_docs.py)."""

import json
from pathlib import Path

import pytest

from benchmarks.throughput import OURS, markdown

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@pytest.fixture(scope="module")
def throughput():
    return json.loads((RESULTS / "throughput_cpu.json").read_text())


def test_ppo_is_measured_against_trl_and_the_plain_loop_on_the_same_fields_with_gold(throughput):
    ppo = throughput["ppo"]
    assert set(ppo["reference"]) <= set(ppo["trl"]) and {
        "tokens_per_s",
        "step_s",
        "update_s",
        "tokens_per_s_each",
    } <= set(ppo["trl"])
    assert all(
        len(ppo[impl]["tokens_per_s_each"]) == ppo["repeats"] for impl in ("ours", "trl", "reference", *OURS[1:])
    )
    for impl in ("ours", "trl", "reference"):  # the counted run is the fastest of the rounds
        assert ppo[impl]["tokens_per_s"] == max(ppo[impl]["tokens_per_s_each"])
        assert {"gold_gain", "gold_gain_se", "win_rate_gold"} <= set(ppo["gold"][impl])
    assert set(throughput["critic_free"]) == {"rloo", "grpo"}


def test_the_markdown_report_renders_the_committed_json_with_its_ratios(throughput):
    md = markdown(throughput)
    ppo = throughput["ppo"]
    ratio = ppo["ours"]["tokens_per_s"] / ppo["trl"]["tokens_per_s"]
    assert f"**{ratio:.2f}x**" in md and "ours with the old log-probs recomputed by a forward" in md
    assert md == (RESULTS / "throughput_cpu.md").read_text()  # the committed report is this JSON's


def test_the_campaign_benchmark_compares_both_arms_over_two_seeds_with_standard_errors():
    """Iterated against one-shot on the same labels and iterations, per seed, with SEs; the over-optimising challenger
    rejected with its reason (the report itself: tests/test_docs.py renders every report from its JSON)."""
    from benchmarks.campaign import README, headline
    from benchmarks.campaign import markdown as campaign_markdown

    out = json.loads((RESULTS / "campaign.json").read_text())
    for arm in ("iterated", "one_shot"):
        seeds = out[arm]["seeds"]
        assert len(seeds) >= 2
        for s in seeds.values():
            assert s["gold_se"] > 0 and s["gain_over_sft_se"] > 0
    labels = {
        arm: [sum(r["n_labels"] for r in s["rounds"]) for s in out[arm]["seeds"].values()]
        for arm in out
        if arm in ("iterated", "one_shot")
    }
    assert all(abs(a - b) <= 0.05 * b for a, b in zip(labels["iterated"], labels["one_shot"]))  # the same label budget
    gate = out["gate"]
    assert not gate["promoted"] and gate["reason"]
    assert campaign_markdown(out) == (RESULTS / "campaign.md").read_text()
    assert f"-->\n{headline(out)}\n<!--" in README.read_text()  # the README's sentence is this JSON's too
