"""The registered models as a server: ``mlflow models serve`` of ``models:/rlhf-policy@champion`` takes generation
params and answers with the answer alone; the reward model gives one score per text; a chat policy is served as
chat completions through its template."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import mlflow
import pytest
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.model_logging import GENERATION, SCORING, log_final_model, serving_params
from rlhf.tracking import experiment_id

from .servers import BIN, Processes, free_port

PROMPT = "topic: fruit. open: mango. avoid: plum. length: short. answer:"


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh tracking store with one run to log into; models:/ URIs resolve against it, as a user would set it."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    exp = experiment_id(client, "rlhf", tmp_path, uri)
    return client, exp, client.create_run(exp).info.run_id


def log(store, path, name: str, task: str, registered: str | None = None) -> dict:
    client, exp, run = store
    return log_final_model(client, exp, run, run, Path(path), name, task, registered)


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def serve(procs: Processes, uri: str, model: str) -> str:
    """``mlflow models serve`` of ``model`` on a free port (one uvicorn worker); its base URL once /ping answers."""
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }  # it execs uvicorn
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", model, "--env-manager", "local"]
    procs.start("serve", [*cmd, "-h", "127.0.0.1", "-p", str(port), "--workers", "1"], env)
    procs.wait_healthy("serve", f"http://127.0.0.1:{port}/ping", timeout=120)
    return f"http://127.0.0.1:{port}"


def test_the_champion_policy_serves_the_answer_alone_as_long_as_asked(upstream, store, tmp_path):
    client = store[0]
    logged = log(store, upstream["sft"]["model_path"], "sft", GENERATION, "rlhf-policy")
    client.set_registered_model_alias("rlhf-policy", "champion", logged["version"])
    info = mlflow.models.get_model_info("models:/rlhf-policy@champion")
    assert {p.name: p.default for p in info.signature.params.params} == serving_params()
    procs = Processes(tmp_path / "logs")
    try:
        url = serve(procs, client.tracking_uri, "models:/rlhf-policy@champion")
        answers = [
            httpx.post(
                f"{url}/invocations",
                json={"inputs": [PROMPT], "params": {"max_new_tokens": n, "do_sample": False}},  # greedy: repeatable
                timeout=60,
            ).json()["predictions"][0]
            for n in (3, 12)
        ]
    finally:
        procs.stop_all()
    short, long = answers
    tok = AutoTokenizer.from_pretrained(upstream["sft"]["model_path"])
    assert short.strip() and PROMPT not in short and not short.lstrip().startswith("topic:")  # the answer alone
    assert n_tokens(tok, short) <= 3 < n_tokens(tok, long)  # max_new_tokens reached the pipeline
    assert long.startswith(short)  # greedy: the longer answer goes on from the shorter one


def test_the_reward_model_gives_one_score_per_text(upstream, store):
    logged = log(store, upstream["rm"]["model_path"], "reward", SCORING, "rlhf-reward")
    scorer = mlflow.pyfunc.load_model(f"models:/rlhf-reward/{logged['version']}")
    assert scorer.metadata.signature.outputs.input_names() == ["label", "score"]
    eos = AutoTokenizer.from_pretrained(upstream["rm"]["model_path"]).eos_token
    texts = [f"{PROMPT} mango apple cherry{eos}", f"{PROMPT} dog dog dog dog dog{eos}", f"{PROMPT} plum{eos}"]
    scores = scorer.predict(texts)["score"]
    assert len(scores) == len(texts) and all(isinstance(s, float) for s in scores.tolist())
    assert scores.nunique() > 1  # raw scores of the regression head, not one constant "probability"


def test_a_chat_policy_is_served_as_chat_completions_through_its_template(store, tmp_path):
    from rlhf.chat import prepare_tokenizer
    from rlhf.config import ModelConfig
    from rlhf.config_model import CHATML
    from rlhf.tiny import model_config, train_tokenizer

    tok = train_tokenizer(["topic fruit open mango apple cherry answer"] * 20, 300, CHATML)
    prepare_tokenizer(tok, CHATML)  # EOS: <|im_end|>, where the assistant's turn ends
    cfg = ModelConfig(arch="llama", n_layer=1, n_embd=16, n_head=2, vocab_size=300, max_length=64)
    AutoModelForCausalLM.from_config(model_config(cfg, len(tok), tok.pad_token_id, tok.eos_token_id)).save_pretrained(
        tmp_path / "chat"
    )
    tok.save_pretrained(tmp_path / "chat")
    policy = mlflow.pyfunc.load_model(log(store, tmp_path / "chat", "sft", GENERATION)["model_uri"])
    messages = [{"role": "user", "content": "topic fruit open mango"}]
    out = policy.predict({"messages": messages, "max_tokens": 3, "temperature": 0.7})[0]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    assert out["usage"]["prompt_tokens"] == n_tokens(tok, rendered)  # the template was applied, as in training
    assert 1 <= out["usage"]["completion_tokens"] <= 3
