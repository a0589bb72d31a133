"""What the stage tests share: the tiny model's config, a metric sink that keeps every point, a stage context."""

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


def ctx(root: Path, name: str, **kw) -> StageContext:
    return StageContext(root / name, Recorder(), torch.device("cpu"), **kw)


def params_of(path):
    return torch.cat([p.flatten() for p in AutoModelForCausalLM.from_pretrained(path).parameters()])
