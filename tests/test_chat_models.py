"""Chat models and conversational data: Llama / Qwen2 / GPT-2 built from configs, chat templates, dropout
off in every form, LoRA sharing its base weights, and data whose content is in the data stage's key."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from rlhf.chat import prepare_tokenizer, render_row
from rlhf.config import ModelConfig
from rlhf.config_model import CHATML
from rlhf.data import DatasetError, encode_pairs, load_rows
from rlhf.modeling import disable_dropout, load_policy, token_logprobs
from rlhf.sources import build_splits, conversation_pair
from rlhf.synthetic import behaviour_answer, random_spec
from rlhf.tiny import model_config, train_tokenizer

from .conftest import micro_overrides
from .tiny import local_data


def ultrafeedback_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows in trl-lib/ultrafeedback_binarized's schema: chosen / rejected message lists sharing the user turn."""
    rng, rows = random.Random(seed), []
    for _ in range(n):
        spec = random_spec(rng, held_out=False)
        user = {"role": "user", "content": spec.prompt()}
        a, b = (behaviour_answer(rng, spec) or spec.keyword for _ in range(2))  # a chat answer is never empty
        rows.append(
            {
                "chosen": [user, {"role": "assistant", "content": a}],
                "rejected": [user, {"role": "assistant", "content": b}],
                "score_chosen": 8.0,
                "score_rejected": 4.0,
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- conversational rows ------------------------------------------------------------------------
def test_pairs_take_the_shared_messages_or_the_prompt_column_as_their_prompt():
    user = {"role": "user", "content": "hi"}
    implicit = conversation_pair(
        None, [user, {"role": "assistant", "content": "a"}], [user, {"role": "assistant", "content": "b"}], "row 0"
    )
    assert implicit == {
        "prompt": [user],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    }
    full_beside_prompt = conversation_pair(
        "hi", [user, {"role": "assistant", "content": "a"}], [user, {"role": "assistant", "content": "b"}], "r"
    )
    assert full_beside_prompt == implicit  # ultrafeedback_binarized: a prompt string and whole conversations
    explicit = conversation_pair([user], [{"role": "assistant", "content": "a"}], "b", "r")
    assert explicit == implicit  # TRL's explicit prompt format; a plain string is an assistant message


@pytest.mark.parametrize(
    "break_row, message",
    [
        (lambda r: r["chosen"][0].pop("role"), "message 0"),  # a message without a role
        (lambda r: r["rejected"][1].update(content="  "), "not a non-empty assistant turn"),
        (lambda r: r["rejected"][0].update(content="another question"), "do not share their prompt"),
    ],
)
def test_malformed_rows_name_the_row_and_the_fix(tmp_path, break_row, message):
    rows = json.loads(json.dumps(ultrafeedback_rows(30)))  # no message dict shared between rows
    break_row(rows[17])
    cfg = local_data(
        write_jsonl(tmp_path / "uf.jsonl", rows),
        format="conversational",
        n_sft=8,
        n_pref=8,
        n_eval_prompts=2,
        n_eval_pref=2,
        n_ppo_prompts=4,
    )
    with pytest.raises(DatasetError) as e:
        build_splits(cfg)
    assert "row 17" in str(e.value) and message in str(e.value) and "Fix:" in str(e.value)


def chat_tokenizer():
    return train_tokenizer(["topic fruit open mango apple cherry answer"] * 20, 300, CHATML)


def test_prompts_carry_the_template_and_the_loss_covers_the_assistant_turn_only(tmp_path):
    tok = chat_tokenizer()
    prepare_tokenizer(tok, CHATML)
    assert tok.eos_token == "<|im_end|>"  # the assistant's turn ends where generation must stop
    pair = conversation_pair(
        None,
        *[
            [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "topic: fruit"},
                {"role": "assistant", "content": a},
            ]
            for a in ("mango apple", "cherry")
        ],
        "r",
    )
    row = render_row(tok, pair)
    assert (
        row["prompt"]
        == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\ntopic: fruit<|im_end|>\n<|im_start|>assistant\n"
    )
    assert row["chosen"] == "mango apple"
    enc = encode_pairs(tok, [row["prompt"]], [row["chosen"]], 64)
    ids = enc.input_ids[0, : int(enc.last_index[0]) + 1]
    scored = ids[1:][enc.loss_mask[0, : len(ids) - 1].bool()]  # the target tokens the loss (and DPO) count
    assert scored.tolist() == tok("mango apple", add_special_tokens=False)["input_ids"] + [
        tok.convert_tokens_to_ids("<|im_end|>")
    ]
    assert (
        int(ids[-1]) == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    )  # the reward model reads the end of turn
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids.tolist()  # markers are single special tokens, not text


def test_a_tokenizer_without_a_template_gets_the_default_one_with_its_markers():
    tok = train_tokenizer(["plain text only"] * 10, 200)
    assert not tok.chat_template and "<|im_end|>" not in tok.get_vocab()
    prepare_tokenizer(tok, CHATML)
    assert tok.chat_template == CHATML and tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.all_special_tokens


# ---- architectures and dropout ------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_dropout_off_means_every_form_of_it(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(arch=arch, n_layer=2, n_embd=32, n_head=2, vocab_size=300, dropout=0.3)
    tok = chat_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(cfg, len(tok), tok.pad_token_id, tok.eos_token_id))
    ids = torch.randint(5, 200, (4, 12))
    mask = torch.ones_like(ids)
    model.train()
    noisy = token_logprobs(model, ids, mask).detach()
    assert (
        noisy - token_logprobs(model.eval(), ids, mask).detach()
    ).abs().max() > 1e-3  # dropout 0.3 moves log-probs in train mode
    disable_dropout(model.train())
    assert torch.allclose(token_logprobs(model, ids, mask), token_logprobs(model.eval(), ids, mask), atol=1e-6)


def test_gpt2s_gelu_loads_as_the_fused_kernel_with_the_same_outputs(tmp_path):
    from transformers import AutoModelForCausalLM

    tok = chat_tokenizer()
    torch.manual_seed(0)
    saved = AutoModelForCausalLM.from_config(
        model_config(ModelConfig(n_layer=2, n_embd=32, n_head=2), len(tok), tok.pad_token_id, tok.eos_token_id)
    )
    assert saved.config.activation_function == "gelu_new"  # GPT-2's own: the tanh formula as Python-level ops
    saved.save_pretrained(tmp_path)
    loaded = load_policy(str(tmp_path), tok)
    assert loaded.config.activation_function == "gelu_pytorch_tanh"  # one kernel, the same formula
    ids = torch.randint(5, 200, (4, 12))
    mask = torch.ones_like(ids)
    assert torch.allclose(token_logprobs(loaded.eval(), ids, mask), token_logprobs(saved.eval(), ids, mask), atol=1e-5)


# ---- the pipeline on chat architectures and conversational data ----------------------------------
@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("uf") / "ultrafeedback.jsonl", ultrafeedback_rows(160))


def chat_overrides(root: Path, file: Path, arch: str, *extra: str, rows: int = 96) -> list[str]:
    """micro on conversational data: ``rows`` demonstrations and as many preference pairs."""
    return micro_overrides(
        root,
        "data=conversational_local",
        f"data.data_files={file}",
        f"data.n_sft={rows}",
        f"data.n_pref={rows}",
        "data.n_eval_prompts=16",
        "data.n_eval_pref=16",
        "data.n_ppo_prompts=64",
        f"model.arch={arch}",
        "model.dropout=0.1",
        "model.max_length=96",
        "model.vocab_size=400",
        *extra,
    )


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dpo_and_ppo_on_chat_architectures_and_conversational_data(tmp_path, conversations, arch, prefect_server):
    from flows.compose import load_config
    from flows.dag import rlhf_pipeline

    dpo = rlhf_pipeline(load_config(chat_overrides(tmp_path, conversations, arch)))
    client = MlflowClient(dpo["tracking_uri"])
    history = lambda run, key: client.get_metric_history(run, key)  # noqa: E731
    assert history(dpo["records"]["dpo"]["run_id"], "dpo/loss")[0].value == pytest.approx(math.log(2), abs=0.01)
    assert "eval/proxy_reward" in dpo["metrics"] and "eval/gold_reward" not in dpo["metrics"]
    sft_dir = Path(dpo["records"]["sft"]["model_path"])
    assert json.loads((sft_dir / "config.json").read_text())["model_type"] == arch
    tok = __import__("transformers").AutoTokenizer.from_pretrained(sft_dir)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template == CHATML  # the template travels with the SFT model
    prompt = load_rows(dpo["records"]["data"]["data_dir"], "eval_prompts", tok)[0]["prompt"]
    assert prompt.startswith("<|im_start|>user\ntopic: ") and prompt.endswith("<|im_start|>assistant\n")

    ppo = rlhf_pipeline(load_config(chat_overrides(tmp_path, conversations, arch, "experiment=micro_ppo")))
    assert ppo["cached"] == {"data": True, "sft": True, "reward": True, "ppo": False, "eval": False}
    run = ppo["records"]["ppo"]["run_id"]
    assert history(run, "ppo/clipfrac_first_minibatch")[0].value == 0.0  # dropout 0.1 in the config, off in PPO
    assert history(run, "ppo/approx_kl_first_minibatch")[0].value == pytest.approx(0.0, abs=1e-7)
    assert abs(history(run, "ppo/kl")[0].value) < 1e-4


@pytest.mark.slow
def test_changed_rows_rerun_data_and_everything_after_unchanged_rows_stay_cached(tmp_path, prefect_server):
    from flows.compose import load_config
    from flows.dag import rlhf_pipeline

    file = write_jsonl(tmp_path / "uf.jsonl", ultrafeedback_rows(160))
    overrides = chat_overrides(tmp_path, file, "gpt2", rows=32)
    first = rlhf_pipeline(load_config(overrides))
    again = rlhf_pipeline(load_config(overrides))
    assert all(again["cached"].values())
    write_jsonl(file, ultrafeedback_rows(160, seed=1))  # same path, same config, new rows
    changed = rlhf_pipeline(load_config(overrides))
    assert not any(changed["cached"].values()) and changed["keys"]["data"] != first["keys"]["data"]
    origin = json.loads(
        MlflowClient(changed["tracking_uri"])
        .get_run(changed["records"]["sft"]["run_id"])
        .inputs.dataset_inputs[0]
        .dataset.source
    )
    assert (
        origin["origin"]["files"]["uf.jsonl"]
        != first["records"]["data"]["datasets"]["sft"]["origin"]["files"]["uf.jsonl"]
    )
