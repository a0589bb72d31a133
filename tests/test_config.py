"""Config composition and validation: bad values fail before any training, naming the key and the fix."""

import pytest

from flows.pipeline import load_config
from rlhf.config import ConfigError, validate


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
    bad = {"algo.clip_range": ["algo.clip_range=1.0"], "algo.rollout_batch_size": ["algo.rollout_batch_size=60", "algo.minibatch_size=16"]}[key]
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
