"""vLLM as the rollout engine (vLLM's CPU build, fp32): its answers and log-probs against the HF sampler's, the weight
sync after every update (and what a skipped sync looks like), the rollout correction, and micro pipelines.

`make test` installs vLLM (scripts/install_vllm.sh); where that failed, these tests skip with the reason."""

import sys
from pathlib import Path

import pytest
import torch

from rlhf.answer_keys import AnswerStream
from rlhf.config import DataConfig, ModelConfig, RewardConfig, RolloutConfig, SamplingConfig, SFTConfig
from rlhf.data import encode_prompts, left_pad, load_rows
from rlhf.engines import open_engine, vllm_installed
from rlhf.modeling import load_policy, load_tokenizer, token_logprobs
from rlhf.rollout import generate

from .conftest import micro_overrides
from .tiny import LOOP, ctx, inputs_of, on_policy

UNAVAILABLE = Path(__file__).parents[1] / ".venv" / ".vllm-unavailable"
pytestmark = pytest.mark.skipif(
    not vllm_installed(),
    reason="vLLM is not installed: "
    + (UNAVAILABLE.read_text()[-300:] if UNAVAILABLE.exists() else "run `make test` (it installs '.[vllm]')"),
)

DEFAULT_MODEL = ModelConfig()  # the default run's architecture: heads of 128 / 4 = 32, which vLLM's CPU kernels take
VLLM = RolloutConfig(engine="vllm")


@pytest.fixture(scope="module")
def vllm_upstream(tmp_path_factory):
    """Data, an SFT model of the default architecture (briefly trained) and a reward model."""
    from rlhf.stages import prepare, reward, sft

    root = tmp_path_factory.mktemp("vllm")
    torch.manual_seed(0)
    sizes = DataConfig(n_sft=128, n_pref=64, n_eval_prompts=64, n_eval_pref=16, n_ppo_prompts=32)
    data = prepare.run(sizes, ctx(root, "data"))
    s = sft.run(DEFAULT_MODEL, SFTConfig(lr=3e-3, epochs=2, **LOOP), data["data_dir"], ctx(root, "sft"))
    rm = RewardConfig(lr=1e-3, epochs=1, **LOOP)
    r = reward.run(rm, DEFAULT_MODEL, data["data_dir"], s["model_path"], ctx(root, "rm"))
    return {"root": root, "data": data["data_dir"], "sft": s, "rm": r}


@pytest.fixture(scope="module")
def held_out(vllm_upstream):
    """The SFT policy, 64 held-out prompts (left-padded) and an engine holding nothing yet."""
    path = vllm_upstream["sft"]["model_path"]
    tok = load_tokenizer(path)
    prompts = [r["prompt"] for r in load_rows(vllm_upstream["data"], "eval_prompts", tok)][:64]
    ids, mask = left_pad(encode_prompts(tok, prompts, DEFAULT_MODEL.max_length - 24), tok.pad_token_id)
    engine = open_engine(VLLM, path, DEFAULT_MODEL.max_length, "cpu", 0, 64)
    return load_policy(path, tok).eval(), tok, ids, mask, engine


def test_greedy_answers_are_hf_s_token_for_token_and_sampled_log_probs_agree(held_out):
    policy, tok, ids, mask, engine = held_out
    assert len(ids) == 64
    keys = AnswerStream(0).take(64)
    greedy = SamplingConfig(top_k=1, max_new_tokens=24)
    hf = generate(policy, ids, mask, greedy, tok.eos_token_id, tok.pad_token_id, keys)
    vl = engine.sample(policy, "sft", ids, mask, greedy, tok.eos_token_id, tok.pad_token_id, keys)
    assert torch.equal(vl.response_mask, hf.response_mask) and torch.equal(vl.response_ids, hf.response_ids)
    assert torch.equal(vl.ended, hf.ended) and hf.ended.any()  # EOS ends an answer, and is kept, alike
    for temperature in (1.0, 0.7):
        sampling = SamplingConfig(temperature=temperature, max_new_tokens=24)
        s = engine.sample(policy, "sft", ids, mask, sampling, tok.eos_token_id, tok.pad_token_id, keys)
        trainer = s.response_slice(token_logprobs(policy, s.input_ids, s.attention_mask, temperature, s.first_target))
        gap = ((trainer - s.engine_logprobs) * s.response_mask).abs().max()
        assert gap < 1e-4, (temperature, gap)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    again = engine.sample(policy, "sft", ids[:7].flip(0), mask[:7].flip(0), sampling, eos, pad, keys[:7].flip(0))
    assert answers(again)[::-1] == answers(s)[:7]  # an answer depends on its prompt and key, not on its batch


def test_pad_is_never_drawn_even_where_the_model_prefers_it(vllm_upstream, held_out):
    policy, tok, ids, mask, engine = held_out
    pad_loving = load_policy(vllm_upstream["sft"]["model_path"], tok).eval()
    with torch.no_grad():  # PAD's (tied) embedding along the final hidden states: its logit rises above the rest
        hidden = pad_loving.transformer(ids, attention_mask=mask).last_hidden_state[mask.bool()].mean(0)
        pad_loving.lm_head.weight[tok.pad_token_id] = 20 * hidden / hidden.norm() ** 2
    greedy_hf = generate(pad_loving, ids, mask, SamplingConfig(max_new_tokens=4, top_k=1), tok.eos_token_id, -1)
    assert (greedy_hf.response_ids == tok.pad_token_id).float().mean() > 0.5  # unmasked, the model picks PAD
    s = engine.sample(
        pad_loving,
        "pad",
        ids,
        mask,
        SamplingConfig(max_new_tokens=8),
        tok.eos_token_id,
        tok.pad_token_id,
        AnswerStream(3).take(len(ids)),
    )
    assert not (s.response_ids == tok.pad_token_id).logical_and(s.response_mask.bool()).any()
    trainer = s.response_slice(token_logprobs(pad_loving, s.input_ids, s.attention_mask, 1.0, s.first_target))
    assert ((trainer - s.engine_logprobs) * s.response_mask).abs().max() < 1e-4  # the rest of the softmax as HF's


def answers(s) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(s.response_ids, s.response_mask)]


def test_a_push_that_leaves_other_weights_in_the_engine_stops_with_a_named_error(vllm_upstream, held_out, monkeypatch):
    from rlhf.vllm_engine import VLLMEngine, WeightSyncError

    policy, tok, ids, mask, engine = held_out
    moved = load_policy(vllm_upstream["sft"]["model_path"], tok).eval()
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn_like(p))
    monkeypatch.setattr(VLLMEngine, "_push", lambda self, model: None)  # a sync that silently does nothing
    with pytest.raises(WeightSyncError, match="sync_check_tol"):
        engine.load(moved, "moved")
    assert engine.holds is None  # nothing is sampled from it until a push succeeds
    monkeypatch.undo()
    engine.load(moved, "moved")
    assert engine.sync_gap < 1e-4 and engine.holds == "moved"


def _ppo_with_vllm(vllm_upstream, name: str, rollout: RolloutConfig = VLLM, **overrides):
    from rlhf.stages import ppo

    c = ctx(vllm_upstream["root"], name)
    cfg = on_policy(max_new_tokens=12, **overrides)
    ppo.run(cfg, DEFAULT_MODEL, inputs_of(vllm_upstream, rollout=rollout), c)
    return c.sink


def test_ppo_syncs_the_engine_after_every_update_and_a_skipped_sync_shows(vllm_upstream, monkeypatch):
    """Three PPO iterations with vLLM: after each sync the engine's log-probs of a fixed sequence and of the sampled
    answers are the trainer's within 1e-4; the first step is the HF sampler's (ratio 1, no clipping, KL 0). With the
    pushes after the first skipped (and the sync check off), the gap shows in the same metrics, and truncated
    importance sampling's weights move off 1."""
    from rlhf.vllm_engine import VLLMEngine

    pushed = []
    load, push = VLLMEngine.load, VLLMEngine._push
    monkeypatch.setattr(
        VLLMEngine,
        "load",
        lambda self, model, weights: (self.holds != weights and pushed.append(weights), load(self, model, weights)),
    )
    m = _ppo_with_vllm(vllm_upstream, "ppo-vllm")
    assert [s for s, _ in m.metrics["rollout/logprob_abs_diff_max"]] == [1, 2, 3]
    assert all(v < 1e-4 for _, v in m.metrics["rollout/sync_logprob_abs_diff_max"])
    assert all(v < 1e-4 for _, v in m.metrics["rollout/logprob_abs_diff_max"])
    assert all(0 <= v < 1e-8 for _, v in m.metrics["rollout/engine_kl"])
    # the reference (the SFT answers' score offset), the policy before training (held-out evaluation), then after each
    # iteration's 4 optimizer steps (its evaluation; the next rollout samples the same weights)
    assert pushed == [("reference",), ("policy", 0), ("policy", 4), ("policy", 8), ("policy", 12)]
    assert abs(m.first("ppo/kl")) < 1e-4 and m.first("ppo/clipfrac_first_minibatch") == 0
    assert abs(m.first("ppo/approx_kl_first_minibatch")) < 1e-6

    def first_push_only(self, model):
        if not getattr(self, "pushed_once", False):
            self.pushed_once = True
            push(self, model)

    monkeypatch.setattr(VLLMEngine, "_push", first_push_only)
    unchecked = RolloutConfig(engine="vllm", sync_check_tol=1e9)  # the check off: the stale engine keeps sampling
    tis = dict(rollout_correction="tis", rollout_correction_cap=1.5)
    stale = _ppo_with_vllm(vllm_upstream, "ppo-vllm-stale", unchecked, **tis)
    gaps = dict(stale.metrics["rollout/logprob_abs_diff_max"])
    assert gaps[1] < 1e-4 and gaps[2] > 1e-3 and gaps[3] > 1e-3, gaps  # the engine kept the SFT weights
    assert dict(stale.metrics["rollout/sync_logprob_abs_diff_max"])[3] > 1e-3
    weights = dict(stale.metrics["ppo/tis_weight"])  # truncated importance sampling corrects for the stale engine
    assert weights[1] == pytest.approx(1.0, abs=1e-4) and all(abs(weights[i] - 1) > 1e-4 for i in (2, 3)), weights
    assert all(w <= 1.5 for w in weights.values())
    from tests.test_docs import SWEEP_GROUP, TRACKING_GROUP, VLLM_GROUP, reference, unmatched

    names = {*m.metrics, *stale.metrics}
    undocumented = unmatched(names, [g for g in reference() if g not in (TRACKING_GROUP, SWEEP_GROUP)])[0]
    assert not undocumented and not unmatched(names, [VLLM_GROUP])[1]  # docs/metrics.yaml has what vLLM runs log


@pytest.fixture(scope="module")
def pipeline_root(tmp_path_factory):
    """One root for the micro pipelines: the second finds data, SFT and the reward model cached."""
    return tmp_path_factory.mktemp("vllm-pipelines")


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_micro_pipelines_with_vllm_pass_the_first_step_checks(pipeline_root, prefect_server, monkeypatch, algo):
    from mlflow import MlflowClient

    from flows.compose import load_config
    from flows.dag import rlhf_pipeline
    from rlhf.vllm_engine import VLLMEngine

    callers = []
    sample = VLLMEngine.sample
    monkeypatch.setattr(
        VLLMEngine,
        "sample",
        lambda self, *a, **k: (callers.append(Path(sys._getframe(1).f_code.co_filename).name), sample(self, *a, **k))[
            1
        ],
    )
    cfg = load_config(
        micro_overrides(
            pipeline_root, "experiment=micro_onpolicy", f"algo={algo}", "rollout.engine=vllm", "model.n_head=1"
        )
    )
    result = rlhf_pipeline(cfg)
    client = MlflowClient(result["tracking_uri"])
    run = client.get_run(client.get_run(result["run_id"]).data.tags[f"stage.{algo}.run_id"])
    history = lambda k: [p.value for p in client.get_metric_history(run.info.run_id, k)]  # noqa: E731
    assert abs(history(f"{algo}/kl")[0]) < 1e-4 and history(f"{algo}/clipfrac_first_minibatch")[0] == 0
    assert abs(history(f"{algo}/approx_kl_first_minibatch")[0]) < 1e-6  # ratio 1 at the first minibatch
    assert history(f"{algo}/ratio")[0] == pytest.approx(1.0, abs=0.05)  # the iteration's mean, as the HF tests
    assert max(history("rollout/logprob_abs_diff_max")) < 1e-4
    assert "eval/gold_reward" in result["metrics"] and {"onpolicy.py", "evaluate.py"} <= set(callers)  # both sampled
