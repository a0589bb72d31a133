"""What the stage tests share: the tiny model's config, a metric sink that keeps every point, a stage context."""

import dataclasses
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from rlhf.config import ModelConfig
from rlhf.context import StageContext

TINY_MODEL = ModelConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=300, max_length=48)


LOOP = dict(batch_size=16, log_every=1, eval_every=2, checkpoint_every=2)


class Recorder:
    """A metric sink that keeps every point: metrics[name] = [(step, value), ...]."""

    def __init__(self):
        self.metrics = defaultdict(list)

    def log_metrics(self, metrics, step):
        for k, v in metrics.items():
            self.metrics[k].append((step, v))

    def flush(self):
        pass

    def first(self, name):
        return self.metrics[name][0][1]


def tiny_gpt2(vocab: int, seed: int = 0, **config):
    """A GPT-2 of random weights (seeded) without dropout, PAD = token 0; ``config``: GPT2Config's sizes."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    no_dropout = dict(resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_head=2, pad_token_id=0, **no_dropout, **config))


def ctx(root: Path, name: str, **kw) -> StageContext:
    return StageContext(root / name, Recorder(), torch.device("cpu"), **kw)


def params_of(path):
    return torch.cat([p.flatten() for p in AutoModelForCausalLM.from_pretrained(path).parameters()])


def on_policy(schema: type | None = None, max_new_tokens: int = 8, **overrides):
    """A tiny on-policy config (PPO's unless ``schema``): a few iterations of small batches, short answers."""
    from rlhf.config import SamplingConfig
    from rlhf.config_algorithms import PPOConfig

    loop = dict(
        steps=3, rollout_batch_size=8, minibatch_size=4, ppo_epochs=2, lr=1e-3, eval_every=2, checkpoint_every=2
    )
    return (schema or PPOConfig)(**{**loop, **overrides}, sampling=SamplingConfig(max_new_tokens=max_new_tokens))


def inputs_of(upstream: dict, **kw):
    """The policy stages' inputs from the session's tiny upstream (tests/conftest.py), with the task's gold reward."""
    from rlhf.algorithms import PolicyInputs
    from rlhf.synthetic import gold_reward

    return PolicyInputs(
        upstream["data"], upstream["sft"]["model_path"], upstream["rm"]["model_path"], gold_reward, **kw
    )


def local_data(file, **kw):
    """A data config reading one local JSON-lines file (one split: a tenth held out), as data=hh_rlhf_local does."""
    from rlhf.config import DataConfig

    return DataConfig(
        **{
            "source": "hub",
            "path": "json",
            "data_files": str(file),
            "train_split": "train",
            "test_split": "train",
            **kw,
        }
    )


def stages_in_one_launch(**bodies):
    """One launch's body that runs each stage in a folder of its own (a launch costs seconds of start-up here). The
    stages share the launch's MLflow run, random state and process group: their metric names must differ."""
    return lambda c: {name: body(dataclasses.replace(c, out_dir=c.out_dir / name)) for name, body in bodies.items()}


def values(history: list) -> list[float]:
    """The values of a metric history [(step, value), ...]."""
    return [v for _, v in history]
