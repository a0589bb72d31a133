"""Over-optimisation is visible: against a reward model learned from length-biased annotators, PPO with a
small beta raises the proxy score while the held-out gold reward falls below its best; a larger beta
holds the KL lower."""

import pytest
import torch

from rlhf.algorithms import PolicyInputs
from rlhf.config import DataConfig, ModelConfig, RewardConfig, SFTConfig
from rlhf.context import StageContext
from rlhf.stages import ppo, prepare, reward, sft
from rlhf.synthetic import gold_reward

from .tiny import Recorder, on_policy

pytestmark = pytest.mark.slow
MODEL = ModelConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=400, max_length=48)


def ctx(root, name):
    return StageContext(root / name, Recorder(), torch.device("cpu"))


@pytest.fixture(scope="module")
def biased_reward_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("overopt")
    data = prepare.run(
        DataConfig(
            n_sft=1000, n_pref=1500, n_eval_prompts=64, n_eval_pref=64, n_ppo_prompts=400, annotator_length_bias=0.5
        ),
        ctx(root, "data"),
    )["data_dir"]
    s = sft.run(
        MODEL,
        SFTConfig(lr=3e-3, epochs=2, log_every=50, eval_every=1000, checkpoint_every=1000),
        data,
        ctx(root, "sft"),
    )
    r = reward.run(
        RewardConfig(lr=1e-3, epochs=2, log_every=50, eval_every=1000, checkpoint_every=1000),
        MODEL,
        data,
        s["model_path"],
        ctx(root, "rm"),
    )
    return root, data, s["model_path"], r["model_path"]


def run_ppo(setup, beta, name):
    root, data, sft_path, rm_path = setup
    c = ctx(root, name)
    batches = dict(rollout_batch_size=32, minibatch_size=16, ppo_epochs=4, max_new_tokens=16)
    cfg = on_policy(beta=beta, steps=24, lr=3e-4, eval_every=4, checkpoint_every=1000, **batches)
    ppo.run(cfg, MODEL, PolicyInputs(data, sft_path, rm_path, gold_reward, missing_eos_penalty=1.0), c)
    return {
        k: [v for _, v in c.sink.metrics[k]]
        for k in ("ppo/kl", "ppo/eval_proxy_reward", "ppo/eval_gold_reward", "ppo/response_length")
    }


def test_small_beta_overoptimises_the_proxy_and_a_larger_beta_holds_kl_lower(biased_reward_model):
    small = run_ppo(biased_reward_model, 0.001, "small")
    proxy, gold = small["ppo/eval_proxy_reward"], small["ppo/eval_gold_reward"]
    assert proxy[-1] > proxy[0] + 0.2  # the proxy keeps rising...
    assert gold[-1] < max(gold) - 0.2  # ...while the gold reward falls below its best evaluation
    assert small["ppo/response_length"][-1] > small["ppo/response_length"][0]  # by lengthening answers
    large = run_ppo(biased_reward_model, 0.5, "large")
    assert sum(large["ppo/kl"][-4:]) < sum(small["ppo/kl"][-4:])
