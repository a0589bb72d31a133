"""Tokenised layouts, the HH-RLHF prompt split, the real-data path and dataset errors."""

import json

import pytest

from rlhf.data import DatasetError, Encoded, encode_pairs, encode_prompts
from rlhf.sources import build_splits, split_hh
from rlhf.tiny import train_tokenizer

from .conftest import SHARED_HH
from .tiny import local_data


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["topic: fruit. answer: apple banana cherry"] * 20, vocab_size=300)


def test_loss_mask_covers_the_answer_and_eos_only(tok):
    from rlhf.chat import render_answer

    prompts, answers = ["topic: fruit. answer:", "topic:"], ["apple banana", "cherry"]
    enc = encode_pairs(
        tok, prompts, [render_answer(tok, p, a) for p, a in zip(prompts, answers)], max_length=32
    )  # plain text: one space
    for row in range(2):
        ids = enc.input_ids[row]
        targets = ids[1:][enc.loss_mask[row].bool()]  # the tokens the loss scores
        assert targets[-1].item() == tok.eos_token_id
        text = tok.decode(targets[:-1].tolist())
        assert text == [" apple banana", " cherry"][row]
        assert enc.last_index[row] == enc.attention_mask[row].sum() - 1
        assert ids[enc.last_index[row]] == tok.eos_token_id


def test_stack_pads_both_halves_to_one_width(tok):
    a = encode_pairs(tok, ["topic:"], ["apple banana cherry apple"], 32)
    b = encode_pairs(tok, ["topic:"], ["apple"], 32)
    both = Encoded.stack(a, b)
    assert both.input_ids.shape == (2, a.input_ids.shape[1]) and both.loss_mask.shape == (2, a.input_ids.shape[1] - 1)
    assert both.loss_mask[1].sum() == b.loss_mask[0].sum()


def test_prompt_longer_than_the_context_is_a_clear_error(tok):
    with pytest.raises(DatasetError, match="model.max_length"):
        encode_prompts(tok, ["apple " * 50], max_prompt_len=16)


def test_split_hh_takes_the_last_assistant_turn():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: like this"
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: no"
    row = split_hh(chosen, rejected)
    assert row == {
        "prompt": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:",
        "chosen": " like this",
        "rejected": " no",
    }


def test_missing_and_empty_columns_name_the_mapping(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"question": "q", "good": "a", "bad": "b"}) + "\n")
    cfg = local_data(f, format="columns", columns={"prompt": "prompt", "chosen": "good", "rejected": "bad"})
    with pytest.raises(DatasetError, match=r"data\.columns\.<role>") as e:
        build_splits(cfg)
    assert "'prompt'" in str(e.value) and "question" in str(e.value)
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(DatasetError):
        build_splits(local_data(empty))


@pytest.mark.skipif(
    not SHARED_HH.exists(), reason="needs ../shared/data/hh-rlhf (present in CI, absent in a user's clone)"
)
def test_real_hh_rlhf_slice_loads_offline_through_datasets():
    cfg = local_data(SHARED_HH, n_sft=500, n_pref=500, n_eval_prompts=50, n_eval_pref=100, n_ppo_prompts=200)
    s = build_splits(cfg)
    assert len(s["sft"]) == 500 and len(s["pref"]) == 500 and len(s["eval_pref"]) == 100
    assert all(r["prompt"].endswith("\n\nAssistant:") for r in s["pref"])
    assert all(r["chosen"] != r["rejected"] for r in s["pref"])
    held = {r["prompt"] for r in s["eval_pref"]}
    assert (
        not held & {r["prompt"] for r in s["pref"]} or len(held & {r["prompt"] for r in s["pref"]}) < 5
    )  # disjoint rows
