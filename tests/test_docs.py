"""The docs site: it builds with --strict, every page is in the navigation, its metric reference and the metrics the
code logs are the same set, and its results pages hold only numbers rendered from the results' JSON."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf.synthetic import gold_reward

PROJECT = Path(__file__).resolve().parents[1]
DOCS = PROJECT / "docs"
TRAINERS = ("sft", "rm", "dpo", "ppo", "rloo", "grpo")  # every prefix the shared trainer logs under
ON_POLICY = ("ppo", "rloo", "grpo")
TRACKING_GROUP = "Every stage run (tracking)"  # logged by tasks/runner.py around a stage: checked in tests/test_flow.py
SWEEP_GROUP = "A sweep's row"  # logged by flows/sweep.py: checked in tests/test_ui.py
VLLM_GROUP = "Rollout engine (rollout.engine=vllm; each iteration)"  # checked on vLLM runs in tests/test_vllm.py
ROUND_GROUP = "A campaign round (flows.campaign; its stages' runs)"  # checked in tests/test_campaign.py
CAMPAIGN_GROUP = "A campaign's row (step = round)"  # checked in tests/test_campaign.py


def hooks():
    """docs/hooks.py, the mkdocs hook that renders the generated pages (loaded by path: docs/ is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference() -> dict[str, dict[str, str]]:
    return yaml.safe_load((DOCS / "metrics.yaml").read_text())


def pattern(entry: str) -> re.Pattern:
    """An entry of the reference as a regex: <stage> any trainer's prefix, <algo> an on-policy method's, * anything."""
    text = (
        re.escape(entry)
        .replace(re.escape("<stage>"), f"({'|'.join(TRAINERS)})")
        .replace(re.escape("<algo>"), f"({'|'.join(ON_POLICY)})")
    )
    return re.compile(text.replace(re.escape("<any stage>"), r"[a-z_.0-9]+").replace(r"\*", ".*") + "$")


def unmatched(logged: set[str], groups: list[str]) -> tuple[set[str], set[str]]:
    """(logged metrics with no entry in ``groups``, entries of ``groups`` that match no logged metric)."""
    entries = [e for g in groups for e in reference()[g]]
    regexes = {e: pattern(e) for e in entries}
    return {m for m in logged if not any(r.match(m) for r in regexes.values())}, {
        e for e, r in regexes.items() if not any(r.match(m) for m in logged)
    }


def check_reference(logged: set[str], groups: list[str]) -> None:
    missing, unused = unmatched(logged, groups)
    assert not missing, f"logged but not in docs/metrics.yaml: {sorted(missing)}"
    assert not unused, f"in docs/metrics.yaml but logged by no run: {sorted(unused)}"


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> set[str]:
    """Every metric name the stages log on tiny runs that switch every logged feature on: a reward ensemble with the
    guard and the adaptive KL controller in PPO, the KL as a loss in RLOO, best-of-n in the eval stage."""
    import torch

    from rlhf.algorithms import PolicyInputs
    from rlhf.config import DataConfig, EvalConfig, RewardConfig, SamplingConfig, SFTConfig
    from rlhf.stages import dpo, evaluate, grpo, ppo, prepare, reward, rloo, sft
    from rlhf.stages.best_of_n import BestOfNConfig, sample
    from rlhf.stages.best_of_n import run as best_of_n

    from .tiny import LOOP, TINY_MODEL, ctx, on_policy

    root = tmp_path_factory.mktemp("metrics")
    torch.manual_seed(0)
    sinks = []

    def stage(name):
        c = ctx(root, name)
        sinks.append(c.sink)
        return c

    splits = DataConfig(n_sft=32, n_pref=32, n_eval_prompts=8, n_eval_pref=16, n_ppo_prompts=16)
    data = prepare.run(splits, stage("data"))["data_dir"]
    s = sft.run(TINY_MODEL, SFTConfig(epochs=1, **LOOP), data, stage("sft"))["model_path"]
    rm = RewardConfig(epochs=1, bootstrap=True, **LOOP)
    rms = [reward.run(rm, TINY_MODEL, data, s, stage(f"rm{i}"), member=i)["model_path"] for i in (0, 1)]
    inputs = PolicyInputs(data, s, rms[0], gold_reward, 1.0, (rms[1],))
    dpo.run(dpo.DPOConfig(epochs=1, **LOOP), TINY_MODEL, inputs, stage("dpo"))
    loop = dict(steps=2, ppo_epochs=1, eval_every=1, checkpoint_every=10, lr=1e-4, max_new_tokens=6)
    everything = dict(
        reward_ensemble="worst", guard="conservative", guard_patience=1, adaptive_kl=True, normalize_reward=True
    )
    ppo.run(on_policy(**loop, **everything), TINY_MODEL, inputs, stage("ppo"))
    rloo.run(on_policy(rloo.RLOOConfig, **loop, kl_penalty="loss"), TINY_MODEL, inputs, stage("rloo"))
    grpo.run(on_policy(grpo.GRPOConfig, **loop), TINY_MODEL, inputs, stage("grpo"))
    best_of_n(BestOfNConfig(n=2), TINY_MODEL, inputs, stage("best_of_n"))
    cfg = EvalConfig(n_prompts=8, sampling=SamplingConfig(max_new_tokens=6))
    evaluate.run(cfg, TINY_MODEL.max_length, gold_reward, data, s, s, rms, stage("eval"), 1.0, sample, {"n": 2})
    return {name for sink in sinks for name in sink.metrics}


def test_every_metric_the_stages_log_has_an_entry_and_every_entry_is_logged(logged):
    # each of these groups is checked on the runs that log it
    elsewhere = (TRACKING_GROUP, SWEEP_GROUP, VLLM_GROUP, ROUND_GROUP, CAMPAIGN_GROUP)
    check_reference(logged, [g for g in reference() if g not in elsewhere])


def test_an_unknown_metric_or_a_stale_entry_fails_the_check(logged):
    """The check can fail, both ways."""
    assert unmatched({*logged, "ppo/not_documented"}, list(reference()))[0] == {"ppo/not_documented"}
    assert "<algo>/kl" in unmatched(logged - {"ppo/kl", "rloo/kl", "grpo/kl"}, list(reference()))[1]


def mkdocs(*args: str, cwd: Path = PROJECT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_site_builds_strict_with_every_page_in_the_navigation(tmp_path):
    out = mkdocs("build", "--strict", "--site-dir", str(tmp_path / "site"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    config = yaml.load((PROJECT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    nav = {p for item in config["nav"] for p in _pages(item)}
    assert nav == {str(p.relative_to(DOCS)) for p in DOCS.glob("**/*.md")}  # every page linked, every link a page
    assert (tmp_path / "site" / "speed" / "index.html").exists() and (
        tmp_path / "site" / "beta_sweep_frontier.png"
    ).exists()
    speed = (tmp_path / "site" / "speed" / "index.html").read_text()
    assert "runtime.compile=true" in speed and "TRL" in speed  # the reports rendered from their JSON are on the page


def _pages(item) -> list[str]:
    if isinstance(item, str):
        return [item]
    return (
        [p for v in item.values() for p in (_pages(v) if isinstance(v, (dict, list)) else [v])]
        if isinstance(item, dict)
        else [p for i in item for p in _pages(i)]
    )


def test_a_page_with_a_broken_link_fails_the_strict_build(tmp_path):
    """The strict build can fail: the same site from a copy of the pages, one of them linking to a page that is not
    there."""
    pages = tmp_path / "docs"
    shutil.copytree(DOCS, pages, ignore=shutil.ignore_patterns("hooks.py", "__pycache__"))
    (pages / "index.md").write_text((pages / "index.md").read_text() + "\n[gone](no-such-page.md)\n")
    config = (
        (PROJECT / "mkdocs.yml")
        .read_text()
        .replace("docs_dir: docs", f"docs_dir: {pages}")
        .replace("- docs/hooks.py", f"- {DOCS / 'hooks.py'}")
    )
    (tmp_path / "mkdocs.yml").write_text(config)
    out = mkdocs("build", "--strict", "-f", str(tmp_path / "mkdocs.yml"), "--site-dir", str(tmp_path / "site"))
    assert out.returncode != 0 and "no-such-page.md" in out.stdout + out.stderr


NUMBER = re.compile(r"(?<![\w.`/-])\d+(?:\.\d+)?\s?(?:x|%|SE)\b|(?<![\w.`/-])[+-]?\d[\d,]*\.\d+(?![\w.`])")


def typed_numbers(text: str) -> list[str]:
    """Decimal numbers, ratios (1.52x), percentages and counts of standard errors in prose: outside code and macros."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`]*`|\{\{.*?\}\}|\([^)]*\.(?:md|png|json)\)", "", text)
    return NUMBER.findall(text)


def test_results_are_rendered_from_their_json_never_typed():
    h = hooks()
    for name, render in h._reports().items():  # each committed report is its JSON's rendering, as the docs render it
        assert render(h.load(name)) == (h.RESULTS / f"{name}.md").read_text(), name
        assert h.report(name).startswith("### ")
    for page in sorted(DOCS.glob("*.md")):
        assert not typed_numbers(page.read_text()), (page.name, typed_numbers(page.read_text()))
        h.expand(page.read_text())  # every macro resolves
    assert typed_numbers("PPO is 1.52x TRL's, a gain of +0.085 ± 0.028, 3.3 SE") == [
        "1.52x",
        "+0.085",
        "0.028",
        "3.3 SE",
    ]
    assert typed_numbers("{{ value throughput_cpu ppo.ours.tokens_per_s ,.0f }} tokens/s, `lr=1e-3`") == []
