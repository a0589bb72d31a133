"""The on-policy methods (PPO, RLOO, GRPO), best-of-n and the eval stage on tiny sizes: the first step's exact
numbers, the sampler's log-probs, LoRA, ensembles and the guard, compile."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.config import RewardConfig
from rlhf.stages import ppo, reward
from rlhf.stages.ppo import PPOConfig

from .tiny import LOOP, TINY_MODEL, ctx, inputs_of, on_policy, params_of


def test_ppo_first_step_has_zero_kl_and_no_clipping(upstream):
    c = ctx(upstream["root"], "ppo")
    cfg = on_policy()
    out = ppo.run(
        cfg,
        TINY_MODEL,
        inputs_of(upstream),
        c,
    )
    m = c.sink
    assert abs(m.first("ppo/kl")) < 1e-4 and abs(m.first("ppo/kl_k3")) < 1e-4
    assert m.first("ppo/clipfrac_first_minibatch") == 0 and abs(m.first("ppo/approx_kl_first_minibatch")) < 1e-6
    assert [s for s, _ in m.metrics["ppo/kl"]] == [1, 2, 3]
    assert all(v >= 0 for _, v in m.metrics["ppo/kl_k3"])
    assert m.first("ppo/kl_coef") == pytest.approx(cfg.beta)
    assert not torch.allclose(params_of(upstream["sft"]["model_path"]), params_of(out["model_path"]))
    assert (c.out_dir / "figures" / "kl_curve.png").stat().st_size > 1000
    assert (c.ckpt_dir / "step-000012" / "COMPLETE").exists()  # 3 iterations x 2 epochs x 2 minibatches


@pytest.mark.parametrize("autocast", ["none", "bfloat16"])
def test_old_log_probs_come_from_the_sampler_in_fp32_and_from_a_forward_under_bf16(upstream, monkeypatch, autocast):
    """In fp32 the experience pass and the held-out KL take the policy's log-probs from the sampler: no forward of
    the policy without a gradient; under bf16 autocast a forward recomputes them. The first step's numbers hold either
    way."""
    import dataclasses

    from rlhf.modeling import Logprobs

    scoring_forwards = []
    forward = Logprobs.forward

    def counting(self, *args, **kwargs):
        if not torch.is_grad_enabled() and any(
            p.requires_grad for p in self.model.parameters()
        ):  # the policy, not the reference
            scoring_forwards.append(args[0].shape)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Logprobs, "forward", counting)
    c = ctx(upstream["root"], f"ppo-logprobs-{autocast}")
    cfg = on_policy(steps=2, ppo_epochs=1, eval_every=1, checkpoint_every=10)
    model = dataclasses.replace(TINY_MODEL, autocast=autocast)
    ppo.run(
        cfg,
        model,
        inputs_of(upstream),
        c,
    )
    assert len(scoring_forwards) == (
        0 if autocast == "none" else 2 + 3
    )  # 2 experience passes, 3 evaluations (before, 1, 2)
    assert abs(c.sink.first("ppo/kl")) < 1e-4 and abs(c.sink.first("ppo/approx_kl_first_minibatch")) < 1e-6
    assert abs(c.sink.first("ppo/eval_kl")) < 1e-4  # the policy before training is the reference


def test_a_value_warmup_keeps_the_policy_and_evaluates_only_once_it_moves(upstream):
    c = ctx(upstream["root"], "ppo-warmup")
    cfg = on_policy(steps=4, ppo_epochs=1, eval_every=1, checkpoint_every=10, value_warmup_steps=2)
    ppo.run(
        cfg,
        TINY_MODEL,
        inputs_of(upstream),
        c,
    )
    kl = dict(c.sink.metrics["ppo/kl"])  # the rollouts' KL to the reference: 0 while only the value model trains
    assert abs(kl[1]) < 1e-4 and abs(kl[2]) < 1e-4 and abs(kl[3]) < 1e-4 and abs(kl[4]) > 1e-4
    assert [s for s, _ in c.sink.metrics["ppo/eval_gold_reward"]] == [0, 3, 4]  # no evaluations of the unchanged policy


def test_compiled_ppo_trains_the_same_modules_and_adamw_is_fused(upstream, monkeypatch):
    """runtime.compile sends the update's forwards through dynamo. Inductor's code generation for them takes a minute
    on 2 cores, so here dynamo hands its graphs to the eager backend (benchmarks/throughput.py measures inductor)."""
    from safetensors.torch import load_file

    from rlhf.trainer import adamw

    assert adamw([{"params": [torch.nn.Parameter(torch.zeros(3))]}], PPOConfig()).defaults["fused"] is True
    from torch._dynamo.utils import counters

    cfg = on_policy(steps=2, ppo_epochs=1, eval_every=10, checkpoint_every=10)
    inputs = inputs_of(upstream)
    module_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: module_compile(self, backend="eager", **kw))
    runs = {}
    for compiled in (False, True):
        counters.clear()
        c = ctx(upstream["root"], f"ppo-compiled-{compiled}", compile=compiled)
        out = ppo.run(cfg, TINY_MODEL, inputs, c)
        runs[compiled] = c.sink
        assert (
            counters["stats"]["unique_graphs"] > 0
        ) == compiled  # the update's forwards (policy and value) went through dynamo
    assert abs(runs[True].first("ppo/kl")) < 1e-4 and abs(runs[True].first("ppo/approx_kl_first_minibatch")) < 1e-5
    for key in ("ppo/policy_loss", "ppo/value_loss", "ppo/score"):  # compiled = eager numerics, step by step
        assert [v for _, v in runs[True].metrics[key]] == pytest.approx(
            [v for _, v in runs[False].metrics[key]], abs=1e-4
        ), key
    saved = load_file(Path(out["model_path"]) / "model.safetensors")
    assert set(saved) == set(
        load_file(Path(upstream["sft"]["model_path"]) / "model.safetensors")
    )  # no _orig_mod. prefixes
    assert not torch.allclose(params_of(upstream["sft"]["model_path"]), params_of(out["model_path"]))


def test_lora_ppo_holds_each_base_once_and_matches_separate_frozen_copies(upstream):
    from dataclasses import replace

    from rlhf.onpolicy_models import OnPolicyModels

    lora = replace(TINY_MODEL, lora_r=4, lora_alpha=8.0)
    cfg = on_policy(lr=1e-2, eval_every=100, checkpoint_every=100, forward_batch_size=3)
    inputs = inputs_of(upstream)
    models = OnPolicyModels(lora, inputs, None, torch.device("cpu"), value_init="reward")
    assert (
        models.reference.model is models.policy and models.rewards[0].model is models.value
    )  # adapters off, no second copy
    storage = lambda *ms: {p.data_ptr() for m in ms for p in m.parameters()}  # noqa: E731
    assert storage(models.policy, models.value, models.reference.model, models.rewards[0].model) == storage(
        models.policy, models.value
    )
    copies = OnPolicyModels(
        replace(lora, lora_shared_reference=False), inputs, None, torch.device("cpu"), value_init="reward"
    )
    assert not storage(copies.reference.model) & storage(copies.policy)  # the old way: a frozen copy of the SFT weights

    runs = {}
    for name, model in (("shared", lora), ("copies", replace(lora, lora_shared_reference=False))):
        c = ctx(upstream["root"], f"ppo-lora-{name}")
        torch.manual_seed(0)  # the LoRA initialisation (as runtime.setup seeds a stage)
        ppo.run(cfg, model, inputs, c)
        runs[name] = c.sink.metrics
    for key in ("ppo/kl", "ppo/score", "ppo/policy_loss", "ppo/value_loss"):  # the adapters moved: the KL grows from 0
        assert [v for _, v in runs["shared"][key]] == pytest.approx([v for _, v in runs["copies"][key]], abs=1e-5), key
    assert abs(runs["shared"]["ppo/kl"][-1][1]) > 1e-3


@pytest.mark.parametrize("shared", [True, False], ids=["shared-reference", "frozen-copies"])
def test_lora_ppo_keeps_training_after_the_guard_saves_and_returns_the_kept_adapters_merged(upstream, shared):
    from dataclasses import replace

    from peft import PeftModel

    from rlhf.guard import GUARD_DIR

    lora = replace(TINY_MODEL, lora_r=4, lora_alpha=8.0, lora_shared_reference=shared)
    cfg = on_policy(steps=4, lr=1e-2, eval_every=1, checkpoint_every=100, guard="conservative", guard_patience=0)
    c = ctx(upstream["root"], f"ppo-lora-guard-{shared}")
    torch.manual_seed(0)
    out = ppo.run(
        cfg,
        lora,
        inputs_of(upstream),
        c,
    )
    m = c.sink.metrics
    assert [s for s, _ in m["ppo/kl"]] == [
        1,
        2,
        3,
        4,
    ]  # the reference (the policy with its adapters off) answered every iteration
    assert all(
        v > 1e-7 for s, v in m["ppo/approx_kl"] if s >= 2
    )  # the guard saved at iteration 1; the adapters still train after
    kept = c.out_dir / GUARD_DIR
    assert (kept / "adapter_config.json").exists()  # the guard kept the adapters, not a merged copy of the live policy
    expected = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(upstream["sft"]["model_path"]), str(kept)
    ).merge_and_unload()
    final = dict(AutoModelForCausalLM.from_pretrained(out["model_path"]).named_parameters())
    assert all(
        torch.allclose(p, final[k], atol=1e-6) for k, p in expected.named_parameters()
    )  # the stage's model: the kept one, merged


@pytest.mark.parametrize(
    "name, extra",
    [("rloo", {}), ("grpo", {}), ("grpo", {"loss_aggregation": "dr_grpo"})],
    ids=["rloo", "grpo", "dr_grpo"],
)
def test_critic_free_methods_start_at_zero_kl_and_ratio_one_and_move_the_policy(upstream, name, extra):
    from rlhf.stages import grpo, rloo

    module, schema = {"rloo": (rloo, rloo.RLOOConfig), "grpo": (grpo, grpo.GRPOConfig)}[name]
    c = ctx(upstream["root"], f"{name}-{len(extra)}")
    cfg = on_policy(schema, samples_per_prompt=4, **extra)
    out = module.run(
        cfg,
        TINY_MODEL,
        inputs_of(upstream, missing_eos_penalty=1.0),
        c,
    )
    m = c.sink
    assert abs(m.first(f"{name}/kl")) < 1e-4 and m.first(f"{name}/clipfrac_first_minibatch") == 0
    assert abs(m.first(f"{name}/approx_kl_first_minibatch")) < 1e-6 and m.first(f"{name}/ratio") == pytest.approx(
        1.0, abs=0.05
    )
    assert [s for s, _ in m.metrics[f"{name}/kl"]] == [1, 2, 3] and f"{name}/eval_gold_reward" in m.metrics
    assert f"{name}/group_reward_std" in m.metrics and f"{name}/entropy" in m.metrics
    assert not torch.allclose(params_of(upstream["sft"]["model_path"]), params_of(out["model_path"]))
    assert (c.out_dir / "figures" / "kl_curve.png").stat().st_size > 1000
    assert (c.ckpt_dir / "step-000012" / "COMPLETE").exists()  # resumable: 3 iterations x 2 epochs x 2 minibatches


def test_a_reward_ensemble_scores_conservatively_and_the_guard_returns_its_checkpoint(upstream):
    from rlhf.guard import GUARD_DIR

    second = reward.run(
        RewardConfig(lr=1e-3, epochs=1, bootstrap=True, **LOOP),
        TINY_MODEL,
        upstream["data"],
        upstream["sft"]["model_path"],
        ctx(upstream["root"], "rm-1"),
        member=1,
    )
    assert not torch.allclose(
        params_of(second["model_path"]), params_of(upstream["rm"]["model_path"])
    )  # another seed, another resample
    c = ctx(upstream["root"], "ppo-ensemble")
    cfg = on_policy(
        steps=12,
        lr=3e-3,
        eval_every=1,
        checkpoint_every=100,
        reward_ensemble="worst",
        guard="conservative",
        guard_patience=2,
    )
    inputs = inputs_of(upstream, missing_eos_penalty=1.0, extra_reward_paths=(second["model_path"],))
    out = ppo.run(cfg, TINY_MODEL, inputs, c)
    m = c.sink.metrics
    assert "ppo/ensemble_std" in m and "ppo/eval_ensemble_std" in m and "ppo/eval_guard_score" in m
    scores = dict(m["ppo/eval_guard_score"])  # every evaluation's held-out conservative score, step 0 = SFT
    kept = int(c.sink.first("ppo/guard_iteration"))
    assert scores[kept] == max(
        v for k, v in scores.items() if k >= 1
    )  # the best evaluated checkpoint (the guard never saw gold)
    stopped = m.get("ppo/guard_stopped_at")
    assert stopped is None or stopped[0][1] - kept >= 2  # it stopped only after 2 evaluations without a better score
    assert torch.equal(
        params_of(out["model_path"]), params_of(c.out_dir / GUARD_DIR)
    )  # the stage's model is the kept one
    assert {"ppo/frontier_gold_alpha", "ppo/frontier_gold_r2", "ppo/frontier_proxy_d_star"} <= set(m)
    assert (c.out_dir / "figures" / "frontier.png").stat().st_size > 1000
