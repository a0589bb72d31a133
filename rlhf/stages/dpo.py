"""DPO stage: the policy starts from SFT; the reference (SFT) log-probs are computed once, up front."""

from __future__ import annotations

import torch

from .. import checkpoint
from ..algorithms import PolicyInputs
from ..config import ModelConfig
from ..config_algorithms import DPOConfig
from ..context import StageContext
from ..data import Encoded, load_rows
from ..losses import dpo_loss
from ..modeling import Logprobs, autocast, disable_dropout, load_policy, load_tokenizer, load_trainable, token_logprobs
from ..trainer import fit
from .common import batched, finish, supervised_trainer
from .reward import encode_preferences


def pair_logps(
    model, chosen: Encoded, rejected: Encoded, idx: torch.Tensor, device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sequence log-probs (sum over answer tokens) of chosen and rejected, one forward: (B,), (B,), tokens."""
    both = Encoded.stack(chosen.batch(idx), rejected.batch(idx)).to(device)
    seq = (token_logprobs(model, both.input_ids, both.attention_mask, first=both.first_target) * both.loss_mask).sum(
        1
    )  # (2B,)
    return seq[: len(idx)], seq[len(idx) :], int(both.attention_mask.sum())


def reference_logps(model, chosen: Encoded, rejected: Encoded, device) -> torch.Tensor:
    """(N, 2) reference log-probs of every pair, computed once: the reference is frozen."""
    model.eval()
    return batched(
        lambda idx: torch.stack(pair_logps(model, chosen, rejected, idx, device)[:2], 1).cpu(), len(chosen), 256
    )


def run(cfg: DPOConfig, model_cfg: ModelConfig, inputs: PolicyInputs, ctx: StageContext) -> dict:
    data_dir, sft_path = inputs.data_dir, inputs.sft_path
    max_length, dtype, amp = model_cfg.max_length, model_cfg.dtype, autocast(model_cfg, ctx.device)
    tokenizer = load_tokenizer(sft_path)
    rows, held = load_rows(data_dir, "pref", tokenizer), load_rows(data_dir, "eval_pref", tokenizer)
    chosen, rejected = encode_preferences(tokenizer, rows, max_length)
    held_c, held_r = encode_preferences(tokenizer, held, max_length)

    reference = load_policy(sft_path, tokenizer, dtype).to(ctx.device)
    with amp():
        ref, ref_held = (
            reference_logps(reference, chosen, rejected, ctx.device),
            reference_logps(reference, held_c, held_r, ctx.device),
        )
    del reference

    resume = ctx.resume_point()
    policy = ctx.placed(load_trainable("policy", sft_path, checkpoint.hf_model(resume, "policy"), tokenizer, model_cfg))
    disable_dropout(policy)
    trainer = supervised_trainer("policy", policy, tokenizer, cfg, len(rows), "dpo", ctx, resume, amp)
    trained = trainer.wrap(Logprobs(policy))

    def micro_loss(idx: torch.Tensor):
        pc, pr, tokens = pair_logps(trained, chosen, rejected, idx, ctx.device)
        r = ref[idx].to(ctx.device)
        loss, metrics = dpo_loss(pc, pr, r[:, 0], r[:, 1], cfg.beta, cfg.label_smoothing)
        return loss, metrics, tokens

    @torch.no_grad()
    def evaluate() -> dict:
        policy.eval()
        with amp():
            logps = batched(
                lambda idx: torch.stack(pair_logps(policy, held_c, held_r, idx, ctx.device)[:2], 1).cpu(),
                len(held),
                256,
            )
        policy.train()
        loss, m = dpo_loss(logps[:, 0], logps[:, 1], ref_held[:, 0], ref_held[:, 1], cfg.beta, cfg.label_smoothing)
        return {"eval_loss": float(loss), "eval_accuracy": float(m["accuracy"]), "eval_margin": float(m["margin"])}

    fit(trainer, len(rows), micro_loss, evaluate)
    return finish(trainer, ctx, policy, tokenizer, "dpo", evaluate())
