"""Bad input fails fast, before any training, naming the key or resource and the fix."""

import socket

import pytest
import torch

from rlhf.config import DataConfig, SFTConfig
from rlhf.context import StageContext
from rlhf.data import DatasetError
from rlhf.model_paths import ModelPathError
from rlhf.preflight import preflight
from rlhf.stages import prepare, sft
from rlhf.tracking import TrackingUnavailableError
from rlhf.validate import validate

from .tiny import TINY_MODEL, Recorder, local_data


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
    data = prepare.run(
        DataConfig(n_sft=16, n_pref=16, n_eval_prompts=4, n_eval_pref=4, n_ppo_prompts=4),
        StageContext(tmp_path / "data", Recorder(), torch.device("cpu")),
    )
    short = TINY_MODEL.__class__(**{**TINY_MODEL.__dict__, "max_length": 12})
    ctx = StageContext(tmp_path / "sft", Recorder(), torch.device("cpu"))
    with pytest.raises(DatasetError, match=r"longer than the context.*model\.max_length"):
        sft.run(short, SFTConfig(), data["data_dir"], ctx)
    assert not ctx.ckpt_dir.exists() and not ctx.sink.metrics


def write_jsonl(path, rows, broken_line: int | None = None):
    import json

    lines = [json.dumps(r) for r in rows]
    if broken_line:
        lines[broken_line - 1] = lines[broken_line - 1][:-7]  # a row cut short, as a truncated export leaves it
    path.write_text("\n".join(lines) + "\n")
    return path


PAIR = {"prompt": "What is two and two?", "chosen": "four", "rejected": "five"}


def test_message_lists_under_the_columns_format_name_the_row_and_the_format_to_use(tmp_path):
    from rlhf.sources import build_splits

    turn = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731  (a conversational export, read as columns)
    rows = [{"prompt": "Hi", "chosen": turn("Hello"), "rejected": turn("Go away")}] * 3
    with pytest.raises(DatasetError) as e:
        build_splits(local_data(write_jsonl(tmp_path / "pairs.jsonl", rows), format="columns"))
    assert (
        "row 0" in str(e.value)
        and "column 'chosen'" in str(e.value)
        and "Fix: pass data.format=conversational" in str(e.value)
    )


def test_a_broken_json_line_is_named_by_file_and_line(tmp_path):
    from rlhf.sources import build_splits

    file = write_jsonl(tmp_path / "pairs.jsonl", [PAIR] * 5, broken_line=4)
    file.write_text(file.read_text().replace("\n", "\n\n", 1))  # a blank line before it: the broken one is line 5
    with pytest.raises(DatasetError) as e:
        build_splits(local_data(file, format="columns"))
    assert f"{file} line 5" in str(e.value) and "Fix: make every line of the file one JSON object" in str(e.value)


def test_pairs_whose_answers_are_all_the_same_are_blamed_on_that_not_on_the_prompt_limit(tmp_path):
    from rlhf.sources import build_splits

    rows = [{"prompt": f"q{i}", "chosen": "same", "rejected": "same"} for i in range(6)]
    with pytest.raises(DatasetError) as e:
        build_splits(local_data(write_jsonl(tmp_path / "pairs.jsonl", rows), format="columns"))
    msg = str(e.value)
    assert "all 6 were dropped (6 with the same answer as chosen and rejected)" in msg and "max_prompt_chars" not in msg
    assert "Fix: pairs need two different answers" in msg


@pytest.mark.parametrize("contents, what", [((), "model"), (("config.json",), "tokenizer")])
def test_a_folder_without_a_model_or_a_tokenizer_is_named_before_training(micro, tmp_path, contents, what):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    for name in contents:
        (folder / name).write_text("{}")
    with pytest.raises(ModelPathError) as e:
        preflight(validate(micro(f"model.pretrained={folder}")))
    assert f"model.pretrained='{folder}' is a folder without a {what}" in str(
        e.value
    ) and "Fix: point model.pretrained" in str(e.value)


@pytest.mark.parametrize("where", ["under-a-file", "in-proc"])
def test_a_root_that_cannot_be_created_names_paths_root_and_the_fix(micro, tmp_path, where):
    from rlhf.settings import ConfigError

    (tmp_path / "a-file").write_text("")
    root = tmp_path / "a-file" / "root" if where == "under-a-file" else "/proc/rlhf-root"
    with pytest.raises(ConfigError) as e:
        preflight(validate(micro(f"paths.root={root}")))
    assert f"paths.root='{root}' cannot be used" in str(
        e.value
    ) and "Fix: pass paths.root=<a writable folder> or set RLHF_HOME" in str(e.value)


def test_a_json_array_file_is_not_blamed_on_json_lines(tmp_path):
    """A file the json builder reads fine (a JSON array) failing for another reason keeps datasets' own reason."""
    import json

    from rlhf.sources import build_splits

    file = tmp_path / "pairs.json"
    file.write_text(json.dumps([PAIR] * 4, indent=1))
    with pytest.raises(DatasetError) as e:
        build_splits(local_data(file, test_split="test", format="columns"))  # a split the file does not have
    assert "line 1" not in str(e.value) and "could not be loaded" in str(e.value) and "test" in str(e.value)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["rollout.engine=vllm", "runtime.num_processes=2"], r"rollout\.engine=vllm .* Fix: pass rollout\.engine=hf"),
        (["rollout.engine=vllm"], r"model\.n_embd / model\.n_head = 32 / 2 = 16 .* Fix: pass model\.n_head=1"),
        (["rollout.engine=vllm", "model.n_head=1", "algo.rollout_correction=is"], r"algo\.rollout_correction='is'"),
    ],
    ids=["processes", "head-size", "correction"],
)
def test_a_vllm_rollout_it_cannot_run_is_refused_before_training(micro, monkeypatch, overrides, match):
    import importlib.util

    from rlhf.settings import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    with pytest.raises(ConfigError, match=match):
        validate(micro("algo=ppo", "runtime.device=cpu", *overrides))


def test_a_vllm_rollout_without_vllm_names_the_install_script(micro, monkeypatch):
    import importlib.util

    from rlhf.settings import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ConfigError, match=r"vLLM is not installed .* Fix: bash scripts/install_vllm\.sh"):
        validate(micro("algo=ppo", "rollout.engine=vllm", "model.n_head=1"))
