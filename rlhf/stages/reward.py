"""Reward stage: a scalar head on the SFT backbone, trained with the Bradley-Terry pairwise loss."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import torch

from .. import checkpoint, reward_report
from ..chat import texts as chat_texts
from ..config import ModelConfig, RewardConfig
from ..context import StageContext
from ..data import Encoded, encode_pairs, load_rows, load_split
from ..losses import pairwise_loss
from ..modeling import TokenValues, autocast, load_tokenizer, load_trainable
from ..trainer import fit
from .common import batched, finish, supervised_trainer

# A campaign's judge (campaign.labeller=judge) learns from the held-out pairs, which no reward model of the campaign
# trains on, and is evaluated on the training pairs, which it never sees.
JUDGE_SPLITS = ("eval_pref", "pref")


def encode_preferences(tokenizer, rows: list[dict], max_length: int) -> tuple[Encoded, Encoded]:
    prompts = [r["prompt"] for r in rows]
    return (
        encode_pairs(tokenizer, prompts, [r["chosen"] for r in rows], max_length),
        encode_pairs(tokenizer, prompts, [r["rejected"] for r in rows], max_length),
    )


def pair_scores(
    scorer: TokenValues, chosen: Encoded, rejected: Encoded, idx: torch.Tensor, device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Scores of chosen and rejected answers of pairs ``idx`` in one forward: (B,), (B,), tokens."""
    both = Encoded.stack(chosen.batch(idx), rejected.batch(idx)).to(device)
    values = scorer(both.input_ids, both.attention_mask)  # (2B, T)
    scores = values.gather(1, both.last_index.unsqueeze(1)).squeeze(1)  # (2B,)
    return scores[: len(idx)], scores[len(idx) :], int(both.attention_mask.sum())


@torch.no_grad()
def held_out_scores(model, rows: list[dict], tokenizer, max_length: int, device) -> torch.Tensor:
    """(N, 2) scores of the chosen and rejected answers of ``rows``."""
    chosen, rejected = encode_preferences(tokenizer, rows, max_length)
    was_training = model.training
    model.eval()
    scorer = TokenValues(model)
    scores = batched(
        lambda idx: torch.stack(pair_scores(scorer, chosen, rejected, idx, device)[:2], 1).cpu(), len(rows), 256
    )
    model.train(was_training)
    return scores


@torch.no_grad()
def pair_accuracy(model, rows: list[dict], tokenizer, max_length: int, device) -> dict:
    """Held-out accuracy against the annotators' labels and, where known, against the gold order."""
    scores = held_out_scores(model, rows, tokenizer, max_length, device)
    margins = scores[:, 0] - scores[:, 1]
    out = {
        "eval_accuracy": float((margins > 0).float().mean()),
        "eval_loss": float(-torch.nn.functional.logsigmoid(margins).mean()),
    }
    if "gold_chosen" in rows[0]:
        gold = torch.tensor([r["gold_chosen"] - r["gold_rejected"] for r in rows])
        keep = gold != 0
        out["eval_gold_accuracy"] = float(((margins[keep] > 0) == (gold[keep] > 0)).float().mean())
    return out


def has_score_head(path: str) -> bool:
    """Is the model at ``path`` a trained reward model (a sequence-classification head), not a causal LM?"""
    config = Path(path) / "config.json"
    archs = json.loads(config.read_text()).get("architectures") or [] if config.is_file() else []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def run(
    cfg: RewardConfig,
    model_cfg: ModelConfig,
    data_dir: str,
    sft_path: str,
    ctx: StageContext,
    member: int = 0,
    splits: tuple[str, str] = ("pref", "eval_pref"),
) -> dict:
    """Train reward model ``member`` of the ensemble (0: the single reward model): its own seed (data order)
    and, with ``cfg.bootstrap`` and member > 0, its own bootstrap resample of the pairs. ``sft_path``: the SFT
    model (a new head on its backbone) or a reward model to continue from (a campaign's warm start). ``splits``:
    the pairs it trains on and those it is evaluated on (a campaign's judge swaps them: :data:`JUDGE_SPLITS`)."""
    train_split, held_out_split = splits
    cfg = replace(cfg, seed=cfg.seed + member)
    tokenizer = load_tokenizer(sft_path)
    resume = ctx.resume_point()
    fresh_head = not has_score_head(sft_path)  # from SFT: a new head, zeroed; from a reward model (warm): its own
    model = ctx.placed(
        load_trainable(
            "scalar", sft_path, checkpoint.hf_model(resume, "reward"), tokenizer, model_cfg, zero_head=fresh_head
        )
    )
    amp, max_length = autocast(model_cfg, ctx.device), model_cfg.max_length
    rows, held = load_rows(data_dir, train_split, tokenizer), load_rows(data_dir, held_out_split, tokenizer)
    if cfg.bootstrap and member:
        rng = random.Random(cfg.seed)
        rows = [rows[rng.randrange(len(rows))] for _ in rows]
    chosen, rejected = encode_preferences(tokenizer, rows, max_length)

    trainer = supervised_trainer("reward", model, tokenizer, cfg, len(rows), "rm", ctx, resume, amp)
    trained = trainer.wrap(TokenValues(model))

    def micro_loss(idx: torch.Tensor):
        r_c, r_r, tokens = pair_scores(trained, chosen, rejected, idx, ctx.device)
        loss, metrics = pairwise_loss(r_c, r_r, cfg.center_rewards_coef)
        return loss, metrics, tokens

    def evaluate() -> dict:
        with amp():
            return pair_accuracy(model, held, tokenizer, max_length, ctx.device)

    fit(trainer, len(rows), micro_loss, evaluate)
    report = report_on(model, load_split(data_dir, held_out_split), held, tokenizer, max_length, ctx, amp, trainer.step)
    return finish(trainer, ctx, model, tokenizer, "reward", {**evaluate(), **report})


def report_on(
    model, raw_rows: list[dict], rows: list[dict], tokenizer, max_length: int, ctx: StageContext, amp, step: int
) -> dict:
    """The reward-model report (:mod:`rlhf.reward_report`) on the held-out pairs: metrics of the stage's
    last step, and ``figures/reward_report.png``."""
    with amp():
        scores = held_out_scores(model, rows, tokenizer, max_length, ctx.device)
    words = torch.tensor(
        [
            [
                len(" ".join(chat_texts({"a": r["chosen"]})).split()),
                len(" ".join(chat_texts({"a": r["rejected"]})).split()),
            ]
            for r in raw_rows
        ]
    )
    gold = (
        torch.tensor([[r["gold_chosen"], r["gold_rejected"]] for r in raw_rows])
        if "gold_chosen" in raw_rows[0]
        else None
    )
    metrics, plot = reward_report.report(scores[:, 0], scores[:, 1], words, gold)
    ctx.sink.log_metrics({f"rm/{k}": v for k, v in metrics.items()}, step)
    if ctx.accelerator.is_main_process:
        fig = reward_report.figure(metrics, plot)
        (ctx.out_dir / "figures").mkdir(parents=True, exist_ok=True)
        fig.savefig(ctx.out_dir / "figures" / "reward_report.png", dpi=100)
        import matplotlib.pyplot as plt

        plt.close(fig)
    return metrics
