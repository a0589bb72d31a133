"""SFT stage: build (tiny) or load the base model, then maximise the likelihood of the demonstrations."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import checkpoint
from ..chat import prepare_tokenizer, texts
from ..config import ModelConfig, SFTConfig
from ..context import StageContext
from ..data import Encoded, encode_pairs, is_conversational, load_rows, load_split
from ..losses import sft_loss
from ..modeling import Logprobs, autocast, load_tokenizer, load_trainable, token_logprobs
from ..tiny import build_tiny
from ..trainer import fit
from .common import batched, finish, supervised_trainer

EVAL_SHARE = 0.05  # demonstrations held out for sft/eval_loss


def base_model(model_cfg: ModelConfig, data_dir: Path, ctx: StageContext) -> str:
    """The hub id / folder to start from; for the tiny default, build it once under the stage folder."""
    if model_cfg.pretrained:
        return model_cfg.pretrained
    base = ctx.out_dir / "base"
    if not (base / "config.json").exists():
        corpus = [" ".join(texts(r)) for split in ("sft", "pref") for r in load_split(data_dir, split)]
        with checkpoint.atomic_dir(base) as tmp:
            build_tiny(model_cfg, corpus, tmp, chat=is_conversational(data_dir))
    return str(base)


def run(model_cfg: ModelConfig, cfg: SFTConfig, data_dir: str, ctx: StageContext) -> dict:
    with ctx.accelerator.main_process_first():  # one process builds the tiny base; the others load it
        base = base_model(model_cfg, Path(data_dir), ctx)
    key = "model.tokenizer" if model_cfg.tokenizer else "model.pretrained"
    tokenizer = load_tokenizer(model_cfg.tokenizer or base, key)
    if is_conversational(data_dir):  # the template and its end-of-turn EOS travel with the SFT model to later stages
        prepare_tokenizer(tokenizer, model_cfg.default_chat_template)
    resume = ctx.resume_point()
    model = ctx.placed(load_trainable("policy", base, checkpoint.hf_model(resume, "policy"), tokenizer, model_cfg))
    amp = autocast(model_cfg, ctx.device)
    rows = load_rows(data_dir, "sft", tokenizer)
    n_eval = max(1, int(EVAL_SHARE * len(rows))) if len(rows) > 1 else 0
    train, held = (
        demonstrations(tokenizer, rows[n_eval:], model_cfg),
        demonstrations(tokenizer, rows[:n_eval], model_cfg),
    )
    trainer = supervised_trainer("policy", model, tokenizer, cfg, len(train), "sft", ctx, resume, amp)
    trained = trainer.wrap(Logprobs(model))

    def micro_loss(idx: torch.Tensor):
        b = train.batch(idx).to(ctx.device)
        logp = token_logprobs(trained, b.input_ids, b.attention_mask, first=b.first_target)
        loss, metrics = sft_loss(logp, b.loss_mask)
        return loss, metrics, int(b.attention_mask.sum())

    evaluate = lambda: held_out_nll(model, held, ctx, amp)  # noqa: E731
    fit(trainer, len(train), micro_loss, evaluate)
    return finish(trainer, ctx, model, tokenizer, "sft", evaluate())


def demonstrations(tokenizer, rows: list[dict], model_cfg: ModelConfig) -> Encoded | None:
    """Prompt + response of each demonstration, encoded (None for no rows)."""
    if not rows:
        return None
    return encode_pairs(tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows], model_cfg.max_length)


def held_out_nll(model, held: Encoded | None, ctx: StageContext, amp) -> dict:
    """The token NLL of the held-out demonstrations' answers (``eval_loss``)."""
    if held is None:
        return {}
    model.eval()

    def nll(idx):
        b = held.batch(idx).to(ctx.device)
        with amp():
            lp = token_logprobs(model, b.input_ids, b.attention_mask, first=b.first_target)
        return torch.stack([-(lp * b.loss_mask).sum(), b.loss_mask.sum()])[None]

    sums = batched(nll, len(held), 256).sum(0)
    model.train()
    return {"eval_loss": float(sums[0] / sums[1])}
