"""Bad input fails fast, before any training, naming the key or resource and the fix."""

import socket

import pytest
import torch

from rlhf.config import DataConfig, SFTConfig, validate
from rlhf.data import DatasetError
from rlhf.modeling import ModelPathError
from rlhf.preflight import preflight
from rlhf.stages import prepare, sft
from rlhf.stages.common import StageContext
from rlhf.tracking import TrackingUnavailableError

from .test_stages import TINY_MODEL, Recorder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_model_path_that_does_not_exist(micro):
    with pytest.raises(ModelPathError, match=r"model\.pretrained='/nonexistent/tiny' does not exist\. Fix:"):
        preflight(validate(micro("model.pretrained=/nonexistent/tiny")))


def test_an_unreachable_tracking_server(micro):
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingUnavailableError, match="tracking.uri") as e:
        preflight(validate(micro(f"tracking.uri={uri}", "tracking.connect_timeout_s=1")))
    assert uri in str(e.value) and "Fix:" in str(e.value)


def test_missing_local_dataset_files(micro):
    with pytest.raises(DatasetError, match=r"data\.data_files"):
        preflight(validate(micro("data=hh_rlhf_local", "data.data_files=/nope/pairs.jsonl")))


def test_a_prompt_longer_than_the_context_fails_before_training(tmp_path):
    data = prepare.run(DataConfig(n_sft=16, n_pref=16, n_eval_prompts=4, n_eval_pref=4, n_ppo_prompts=4),
                       StageContext(tmp_path / "data", Recorder(), torch.device("cpu")))
    short = TINY_MODEL.__class__(**{**TINY_MODEL.__dict__, "max_length": 12})
    ctx = StageContext(tmp_path / "sft", Recorder(), torch.device("cpu"))
    with pytest.raises(DatasetError, match=r"longer than the context.*model\.max_length"):
        sft.run(short, SFTConfig(), data["data_dir"], ctx)
    assert not ctx.ckpt_dir.exists() and not ctx.sink.metrics
