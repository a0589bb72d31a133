"""SFT, reward and DPO train for a few steps on tiny sizes: parameters move and the first metrics are exact; precision,
LoRA, NaN and a crash mid-stage."""

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf.algorithms import PolicyInputs
from rlhf.config import EvalConfig, SamplingConfig, SFTConfig
from rlhf.stages import dpo, evaluate, sft
from rlhf.stages.dpo import DPOConfig
from rlhf.synthetic import gold_reward
from rlhf.trainer import NonFiniteLossError, Trainer

from .tiny import LOOP, TINY_MODEL, ctx, params_of


def test_sft_learns_and_saves_a_loadable_checkpoint(upstream):
    sink = upstream["sft_sink"]
    losses = [v for _, v in sink.metrics["sft/loss"]]
    assert losses[-1] < losses[0] - 0.5
    assert {"sft/eval_loss", "sft/tokens_per_s", "sft/lr", "sft/grad_norm"} <= set(sink.metrics)
    base, tuned = (
        params_of(Path(upstream["sft"]["model_path"]).parent / "base"),
        params_of(upstream["sft"]["model_path"]),
    )
    assert not torch.allclose(base, tuned)


def test_dpo_first_loss_is_ln2_and_the_policy_moves(upstream):
    c = ctx(upstream["root"], "dpo")
    out = dpo.run(
        DPOConfig(lr=1e-3, beta=0.1, **LOOP),
        TINY_MODEL,
        PolicyInputs(upstream["data"], upstream["sft"]["model_path"]),
        c,
    )
    assert c.sink.first("dpo/loss") == pytest.approx(math.log(2), abs=1e-4)
    assert abs(c.sink.first("dpo/kl")) < 1e-4 and c.sink.first("dpo/margin") == pytest.approx(0, abs=1e-5)
    assert {"dpo/rewards_chosen", "dpo/rewards_rejected", "dpo/accuracy", "dpo/eval_accuracy"} <= set(c.sink.metrics)
    assert not torch.allclose(params_of(upstream["sft"]["model_path"]), params_of(out["model_path"]))


def test_mixed_precision_and_gradient_checkpointing_train_in_bf16_with_fp32_weights(upstream, monkeypatch):
    from dataclasses import replace

    from transformers.pytorch_utils import Conv1D

    from rlhf import modeling

    seen, heads = [], []
    forward, projection = Conv1D.forward, modeling.fp32_projection
    monkeypatch.setattr(
        Conv1D,
        "forward",
        lambda self, x: (
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))) or forward(self, x)
        ),
    )
    monkeypatch.setattr(
        modeling,
        "fp32_projection",
        lambda h, layer: heads.append(torch.is_autocast_enabled("cpu")) or projection(h, layer),
    )
    model = replace(TINY_MODEL, autocast="bfloat16", gradient_checkpointing=True)
    c = ctx(upstream["root"], "dpo-bf16")
    out = dpo.run(
        DPOConfig(lr=1e-3, beta=0.1, **LOOP), model, PolicyInputs(upstream["data"], upstream["sft"]["model_path"]), c
    )
    assert seen and set(seen) == {
        (True, torch.bfloat16)
    }  # every transformer block's projection ran under bf16 autocast
    assert heads and all(heads)  # the LM head was called inside autocast, and fp32_projection takes it out (next test)
    assert c.sink.first("dpo/loss") == pytest.approx(math.log(2), abs=0.02)  # bf16 forwards: ln 2 up to rounding
    assert all(math.isfinite(v) for _, v in c.sink.metrics["dpo/loss"])
    assert AutoModelForCausalLM.from_pretrained(out["model_path"]).dtype == torch.float32


def test_the_output_projection_runs_in_fp32_under_bf16_autocast():
    from rlhf.modeling import fp32_projection

    torch.manual_seed(0)
    head, hidden = torch.nn.Linear(64, 300, bias=False), torch.randn(4, 7, 64) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = head(hidden)
        fp32 = fp32_projection(hidden, head)
    assert bf16.dtype == torch.bfloat16 and fp32.dtype == torch.float32
    exact = hidden @ head.weight.T
    assert (
        torch.allclose(fp32, exact, atol=1e-5) and (bf16.float() - exact).abs().max() > 1e-2
    )  # bf16 logits round by 0.01+


def test_lora_trains_adapters_only_resumes_from_them_and_saves_a_merged_model(upstream):
    from dataclasses import replace

    model = replace(TINY_MODEL, lora_r=4, lora_alpha=8.0)
    c = ctx(upstream["root"], "dpo-lora")
    out = dpo.run(
        DPOConfig(lr=1e-2, beta=0.1, **LOOP), model, PolicyInputs(upstream["data"], upstream["sft"]["model_path"]), c
    )
    assert c.sink.first("dpo/loss") == pytest.approx(math.log(2), abs=1e-4)  # LoRA's B = 0: the policy starts as SFT
    ckpt = sorted((c.out_dir / "ckpt").glob("step-*"))[-1] / "policy"
    assert (ckpt / "adapter_config.json").exists() and not (ckpt / "model.safetensors").exists()
    sft_model = AutoModelForCausalLM.from_pretrained(upstream["sft"]["model_path"])
    tuned = AutoModelForCausalLM.from_pretrained(out["model_path"])  # a plain model: the adapters are merged
    before, after = dict(sft_model.named_parameters()), dict(tuned.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("c_attn" in k for k in changed)  # peft's default target for GPT-2; nothing else moved
    again = dpo.run(
        DPOConfig(lr=1e-2, beta=0.1, **LOOP),
        model,
        PolicyInputs(upstream["data"], upstream["sft"]["model_path"]),
        ctx(upstream["root"], "dpo-lora"),
    )
    resumed = AutoModelForCausalLM.from_pretrained(again["model_path"])  # from the last checkpoint's adapters
    assert all(torch.allclose(p, dict(resumed.named_parameters())[k], atol=1e-6) for k, p in after.items())


def test_reward_model_starts_at_ln2(upstream):
    # a zeroed head scores every answer 0: the first pairwise loss is exactly ln 2
    sink = upstream["rm_sink"]
    assert sink.first("rm/loss") == pytest.approx(math.log(2), abs=1e-6) and sink.first("rm/margin") == 0
    assert {"rm/accuracy", "rm/eval_accuracy", "rm/eval_gold_accuracy"} <= set(sink.metrics)
    assert AutoModelForSequenceClassification.from_pretrained(upstream["rm"]["model_path"]) is not None


def test_a_nan_loss_names_the_step_and_keeps_the_last_checkpoint(upstream, monkeypatch):
    c = ctx(upstream["root"], "sft-nan")
    calls = {"n": 0}
    real = sft.sft_loss

    def poisoned(logp, mask):
        calls["n"] += 1
        loss, m = real(logp, mask)
        return (loss * float("nan"), m) if calls["n"] == 3 else (loss, m)

    monkeypatch.setattr(sft, "sft_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 3"):
        sft.run(TINY_MODEL, SFTConfig(lr=3e-3, epochs=1, **LOOP), upstream["data"], c)
    assert (c.ckpt_dir / "step-000002" / "COMPLETE").exists()
    assert AutoModelForCausalLM.from_pretrained(c.ckpt_dir / "step-000002" / "policy") is not None


def test_a_failed_stage_resumes_from_its_last_checkpoint(upstream, monkeypatch):
    c = ctx(upstream["root"], "sft-resume")
    cfg = SFTConfig(lr=3e-3, epochs=2, **LOOP)

    original = Trainer.optimizer_step

    def crash_at_step_5(self, *a, **kw):
        if self.step == 4:  # after the checkpoint at step 4
            raise KeyboardInterrupt("killed")
        return original(self, *a, **kw)

    monkeypatch.setattr(Trainer, "optimizer_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        sft.run(TINY_MODEL, cfg, upstream["data"], c)
    monkeypatch.undo()
    resumed = ctx(upstream["root"], "sft-resume")
    out = sft.run(TINY_MODEL, cfg, upstream["data"], resumed)
    steps = [s for s, _ in resumed.sink.metrics["sft/loss"]]
    assert steps[0] == 5 and out["steps"] == steps[-1] == 8  # continued at step 5, ended at the configured total


def best_of_n_eval(upstream, cfg: EvalConfig, name: str, n: int) -> dict:
    """The eval stage on best-of-n of the tiny SFT model and reward model, against SFT."""
    from rlhf.stages.best_of_n import sample

    s, rm = upstream["sft"]["model_path"], upstream["rm"]["model_path"]
    stage = ctx(upstream["root"], name)
    return evaluate.run(
        cfg, TINY_MODEL.max_length, gold_reward, upstream["data"], s, s, rm, stage, 1.0, sample, {"n": n}
    )


def test_best_of_one_is_sft_sampling_and_the_analytic_kl(upstream):
    from rlhf.stages.best_of_n import BestOfNConfig, analytic_kl
    from rlhf.stages.best_of_n import run as best_of_n_run

    assert analytic_kl(1) == 0 and analytic_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    s, rm = upstream["sft"]["model_path"], upstream["rm"]["model_path"]
    record = best_of_n_run(
        BestOfNConfig(n=1),
        TINY_MODEL,
        PolicyInputs(upstream["data"], s, rm, gold_reward, 1.0),
        ctx(upstream["root"], "bon1"),
    )
    assert record["model_path"] == s and record["sampler_args"] == {"n": 1, "seed": 0}
    cfg = EvalConfig(n_prompts=16, sampling=SamplingConfig(max_new_tokens=8))
    one = best_of_n_eval(upstream, cfg, "eval-bon1", 1)
    m = one["metrics"]
    assert m["eval/kl"] == 0 and m["eval/kl_analytic"] == 0  # best-of-1 is SFT sampling
    # ... from a stream of its own: its answers are not the very SFT answers they are compared with (a tie of 0.5
    # exactly)
    table = one["table"]
    assert table["policy_answer"] != table["sft_answer"] and m["eval/win_rate_gold"] != 0.5
    assert (
        abs(m["eval/win_rate_gold"] - 0.5) < 3 * m["eval/win_rate_gold_se"] + 0.05
    )  # and as good as SFT, within noise
    four = best_of_n_eval(upstream, cfg, "eval-bon4", 4)
    m4 = four["metrics"]
    assert m4["eval/proxy_gain"] > 0 and m4["eval/win_rate_proxy"] > 0.5  # the reward model picks what it likes
    assert m4["eval/kl_analytic"] == pytest.approx(math.log(4) - 0.75) and 0 < m4["eval/kl"] <= math.log(4)


def test_evaluation_of_the_sft_policy_against_itself_is_a_tie(upstream):
    s = upstream["sft"]["model_path"]
    out = evaluate.run(
        EvalConfig(n_prompts=16, sampling=SamplingConfig(max_new_tokens=8)),
        TINY_MODEL.max_length,
        gold_reward,
        upstream["data"],
        s,
        s,
        upstream["rm"]["model_path"],
        ctx(upstream["root"], "eval"),
    )
    m = out["metrics"]
    assert m["eval/win_rate_gold"] == 0.5 and m["eval/win_rate_proxy"] == 0.5 and abs(m["eval/kl"]) < 1e-4
    assert m["eval/gold_reward"] == m["eval/sft_gold_reward"]
    assert 0 <= m["eval/eos_rate"] <= 1 and 0 <= m["eval/distinct_2"] <= 1
    assert len(out["table"]["prompt"]) == 16  # min(n_samples_table, n_prompts)
