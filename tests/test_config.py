"""Config composition and validation: bad values fail before any training, naming the key and the fix."""

import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from flows.compose import load_config
from rlhf.algorithms import registry
from rlhf.config import PipelineConfig
from rlhf.settings import ConfigError, flatten, to_dict
from rlhf.validate import validate


def test_default_config_composes_and_validates():
    cfg = validate(load_config())
    assert cfg.model.name == "tiny" and cfg.data.source == "synthetic" and cfg.algo.algo == "dpo"
    assert cfg.tracking.uri is None and cfg.paths.root.startswith("/")  # absolute: Hydra's folder cannot move it


def test_ppo_group_and_sweep_names():
    cfg = validate(load_config(["algo=ppo", "algo.beta=0.02", "algo.clip_range=0.1"]))
    assert cfg.algo.algo == "ppo" and cfg.algo.beta == 0.02 and cfg.algo.clip_range == 0.1


@pytest.mark.parametrize(
    "override, key, fix",
    [
        ("algo.beta=0", "algo.beta", "> 0"),
        ("algo.beta=-1", "algo.beta", "> 0"),
        ("sft.lr=0", "sft.lr", "> 0"),
        ("sft.batch_size=0", "sft.batch_size", ">= 1"),
        ("data.annotator_temperature=0", "data.annotator_temperature", "> 0"),
        ("sft.batch_size=30", "sft.batch_size", "grad_accum"),
        ("model.n_head=3", "model.n_embd", "n_head"),
        ("eval.sampling.top_p=1.5", "eval.sampling.top_p", "<= 1.0"),
        ("data.pair_length_jitter=[4,1]", "data.pair_length_jitter", "[-4,4]"),
    ],
)
def test_out_of_range_values_name_the_key_and_the_fix(override, key, fix):
    overrides = [override] + (["sft.grad_accum=4"] if override == "sft.batch_size=30" else [])
    with pytest.raises(ConfigError) as e:
        validate(load_config(overrides))
    assert key in str(e.value) and fix in str(e.value) and "Fix:" in str(e.value)


@pytest.mark.parametrize(
    "override, key",
    [("algo=ppo", "algo.clip_range"), ("algo=ppo", "algo.rollout_batch_size")],
)
def test_ppo_specific_checks(override, key):
    bad = {
        "algo.clip_range": ["algo.clip_range=1.0"],
        "algo.rollout_batch_size": ["algo.rollout_batch_size=60", "algo.minibatch_size=16"],
    }[key]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(load_config([override, *bad]))


def test_wrong_type_and_unknown_key_are_named():
    with pytest.raises(ConfigError, match=r"algo\.beta"):
        validate(load_config(["algo.beta=abc"]))
    with pytest.raises(ConfigError, match=r"algo\.bta"):
        validate(load_config(["+algo.bta=0.1"]))


def test_refresh_must_name_stages():
    with pytest.raises(ConfigError, match="refresh"):
        validate(load_config(["refresh=[dop]"]))


# --- one source of defaults: the schema; a YAML option holds only what it changes --------------------
GROUPS = ("model", "data", "algo", "tracking", "dispatch")
CONF = Path(__file__).resolve().parents[1] / "conf"


def group_schema(group: str, option: str):
    if group == "algo":
        return registry()[option].schema
    return typing.get_type_hints(PipelineConfig)[group]


def test_the_default_config_is_the_schema_defaults():
    composed = to_dict(validate(load_config()))
    expected = to_dict(PipelineConfig(algo=registry()["dpo"].schema()))
    assert composed.pop("paths")["root"].endswith(".rlhf") and expected.pop("paths")
    assert composed == expected


@pytest.mark.parametrize(
    "group, option",
    [(d.name, p.stem) for d in sorted(CONF.iterdir()) if d.name in GROUPS for p in sorted(d.glob("*.yaml"))],
)
def test_each_option_changes_only_what_its_yaml_says_and_restates_no_default(group, option):
    own = OmegaConf.load(CONF / group / f"{option}.yaml")
    own.pop("defaults", None)
    own = flatten(OmegaConf.to_container(own, resolve=False))
    defaults = flatten(to_dict(group_schema(group, option)()))
    composed = flatten(load_config([f"{group}={option}"])[group])
    assert set(own) <= set(defaults), f"{group}/{option}.yaml sets keys the schema lacks: {set(own) - set(defaults)}"
    for key, value in composed.items():
        if key in own:
            assert own[key] != defaults[key], (
                f"{group}/{option}.yaml restates the schema default {key}={defaults[key]!r}: delete it"
            )
            if not (isinstance(own[key], str) and "${" in own[key]):
                assert value == own[key]
        else:
            assert value == defaults[key], (group, option, key)


def test_help_lists_groups_and_typed_fields_and_cfg_job_prints_the_schema():
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "flows.pipeline", *a], cwd=CONF.parent, capture_output=True, text=True, timeout=120
    )  # noqa: E731
    help_text = run("--help").stdout
    groups = dict(
        line.split(": ", 1)
        for line in help_text.split("== Config groups (group=option) ==\n")[1].split("\n\n")[0].splitlines()
    )
    assert groups["algo"] == "best_of_n, dpo, grpo, ppo, rloo" and {"tiny", "gpt2", "qwen2_450m"} <= set(
        groups["model"].split(", ")
    )
    assert "algo.clip_range: float = 0.2" in help_text and "Ratio clip epsilon" in help_text
    assert "paths.root: str = '${oc.env:RLHF_HOME,.rlhf}'" in help_text
    job = yaml.safe_load(run("algo=ppo", "--cfg", "job").stdout)
    assert (
        job["algo"]["clip_range"] == 0.2
        and job["data"]["max_prompt_chars"] is None
        and job["algo"]["sampling"]["batch_size"] == 64
    )


def test_documented_overrides_of_schema_keys_need_no_plus():
    cfg = validate(
        load_config(
            [
                "data=hh_rlhf_local",
                "data.max_prompt_chars=300",
                "data.columns.prompt=question",
                "tracking.log_checkpoints=true",
            ]
        )
    )
    assert (
        cfg.data.max_prompt_chars == 300 and cfg.data.columns["prompt"] == "question" and cfg.tracking.log_checkpoints
    )


@pytest.mark.skipif(not (CONF.parent / ".git").exists(), reason="needs the git checkout")
@pytest.mark.parametrize("name", ["rloo", "grpo", "best_of_n"])
def test_an_algorithm_is_named_only_in_its_stage_module_its_config_and_the_registry(name):
    out = subprocess.run(
        ["git", "grep", "-l", f'"{name}"'], cwd=CONF.parent, capture_output=True, text=True
    ).stdout.split()
    allowed = {f"rlhf/stages/{name}.py", f"conf/algo/{name}.yaml", "rlhf/config_algorithms.py", "rlhf/algorithms.py"}
    assert {
        f for f in out if not f.startswith(("tests/", "docs/", "benchmarks/")) and not f.endswith(".md")
    } <= allowed, out


ALGO_OF_EXPERIMENT = {"micro_onpolicy": "grpo"}  # an experiment for any on-policy method names none itself


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_validates(experiment):
    """The docs run ``experiment=<name>``: each must compose against the schema and pass validation."""
    algo = ALGO_OF_EXPERIMENT.get(experiment)
    cfg = validate(load_config([f"experiment={experiment}", *([f"algo={algo}"] if algo else [])]))
    assert cfg.algo.algo in registry() and (algo is None or cfg.algo.algo == algo)


def test_the_ensembles_experiment_is_coste_et_al_setting():
    """Few noisy pairs, and nothing every member would learn alike: no annotator length bias and no length
    trend in the pairs (the shorter answer wins about half the pairs of unequal length; length tells nothing
    of gold), so the single model's errors are its own. The docs' two arms compose as documented."""
    from rlhf.sources import build_splits
    from rlhf.synthetic import pair_length_stats

    cfg = validate(load_config(["experiment=ensembles"]))
    assert cfg.reward.ensemble_size == 4 and cfg.reward.bootstrap and cfg.data.annotator_length_bias == 0.0
    assert validate(load_config(["experiment=ensembles", "reward.ensemble_size=1"])).reward.ensemble_size == 1
    assert validate(load_config(["experiment=ensembles", "algo.reward_ensemble=worst"])).algo.reward_ensemble == "worst"
    pairs = build_splits(cfg.data)["pref"]
    stats = pair_length_stats(pairs)
    assert (
        stats["n"] == cfg.data.n_pref and 0.42 < stats["shorter_chosen"] < 0.58 and abs(stats["corr_length_gold"]) < 0.1
    )
    agreement = sum(p["gold_chosen"] > p["gold_rejected"] for p in pairs) / len(pairs)
    assert 0.6 < agreement < 0.8  # noisy labels: many pairs name the worse answer as chosen
