"""The on-policy loop PPO, RLOO and GRPO share: sample, score, update with the clipped surrogate.

Each iteration of :func:`train`:
  1. sample answers for the iteration's prompts with the KV cache, ``samples_per_prompt`` each  (rollout)
  2. once per batch, under no_grad and in chunks: old and reference log-probs, the reward model's
     scores (and values, where a method has a critic)                                          (experience)
  3. the method's advantages: :meth:`OnPolicy.experience`
  4. ``ppo_epochs`` passes over shuffled minibatches of :meth:`OnPolicy.minibatch_losses`        (update)
and, every ``eval_every`` iterations, the held-out proxy (and gold) reward of the current policy.

A method subclasses :class:`OnPolicy` with its experience and its losses; the rollout, the scoring
(the reward model, the missing-EOS penalty, the SFT score offset), the KL bookkeeping, the trainer, the
checkpoints, the progress, the metrics (``<algo>/...``) and the KL curve figure are these. Policy from
SFT, frozen reference = SFT, dropout off everywhere. Under ``accelerate launch`` each process samples its
share of the prompts (a prompt's group of answers stays in one process) and updates DDP copies on its
share of every minibatch; the statistics and the score offset are taken over all processes.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list

from . import checkpoint, frontier, synthetic
from .algorithms import PolicyInputs
from .config import ModelConfig, OnPolicyConfig, SamplingConfig
from .data import encode_prompts, left_pad, load_rows
from .kl_control import FixedKLController
from .losses import kl_k1, kl_k3, kl_loss, masked_mean, policy_loss
from .modeling import (
    FrozenModel,
    Logprobs,
    autocast,
    disable_dropout,
    is_lora,
    load_adapters,
    load_policy,
    load_scalar_model,
    load_tokenizer,
    load_trainable,
    save_pretrained_atomic,
    sequence_scores,
    token_logprobs,
    token_logprobs_and_entropy,
    token_values,
)
from .rollout import Samples, decode_responses, generate
from .stages.common import StageContext
from .stats import mean_se
from .trainer import Trainer, epoch_order

SCORE_NORM_BATCHES = 2  # rollout batches of the SFT policy used to measure the score offset
GUARD_DIR = "guard_best"  # the checkpoint the over-optimisation guard keeps (a stage folder's)
EVAL_PROMPTS = 256  # held-out prompts scored at each evaluation during training (the default task has 258)
CURVES = (
    "kl",
    "kl_k3",
    "score",
    "eval_proxy_reward",
    "eval_gold_reward",
    "eval_guard_score",
)  # what the KL curve figure plots


@dataclass
class Experience:
    """A rollout batch with everything an update needs, computed once per batch under no_grad.

    All (B, R) tensors are aligned with the answer tokens; ``mask`` is 1 up to and including EOS.
    Critic-free methods leave ``old_values`` and ``returns`` empty.
    """

    samples: Samples
    mask: torch.Tensor  # (B, R)
    old_logp: torch.Tensor  # (B, R) log pi_old(y_t)
    ref_logp: torch.Tensor  # (B, R) log pi_ref(y_t)
    scores: torch.Tensor  # (B,)   reward-model score as used (shifted, penalised, normalised)
    advantages: torch.Tensor  # (B, R) per token (a sequence's advantage repeated on its tokens for critic-free methods)
    old_values: torch.Tensor | None = None  # (B, R) V(x, y_<t)
    returns: torch.Tensor | None = None  # (B, R) value targets

    def __getitem__(self, idx) -> Experience:
        return Experience(
            self.samples[idx], *(None if (t := getattr(self, f.name)) is None else t[idx] for f in fields(self)[1:])
        )

    def trimmed(self) -> Experience:
        """Without the padding every row shares (:meth:`Samples.trimmed`): what an update's forwards run on."""
        samples = self.samples.trimmed()
        width = samples.response_ids.shape[1]
        cut = lambda t: t if t is None or t.dim() == 1 else t[:, :width]  # noqa: E731
        return Experience(samples, *(cut(getattr(self, f.name)) for f in fields(self)[1:]))


class OnPolicyModels:
    """The policy (trained), the reference and the reward model(s) (frozen: ``rewards``, one per ensemble
    member) and, with ``value_init``, a value model (trained); dropout off in all of them.

    Under LoRA (``model.lora_shared_reference``) the reference is the policy with its adapters off, and
    the reward model is the value model with its adapters (and trained head) off when the value model
    starts from it: one copy of each base's weights instead of two.
    """

    def __init__(
        self, model_cfg: ModelConfig, inputs: PolicyInputs, resume: Path | None, device, value_init: str | None = None
    ) -> None:
        dtype, sft_path, reward_path = model_cfg.dtype, inputs.sft_path, inputs.reward_path
        self.tokenizer = tok = load_tokenizer(sft_path)
        self.policy = load_trainable("policy", sft_path, resume and resume / "policy", tok, model_cfg).to(device)
        self.value = None
        if value_init:
            start = reward_path if value_init == "reward" else sft_path
            self.value = load_trainable(
                "scalar", start, resume and resume / "value", tok, model_cfg, zero_head=value_init == "sft"
            ).to(device)
        share = model_cfg.lora_r > 0 and model_cfg.lora_shared_reference
        self.reference = (
            FrozenModel(adapters_of=self.policy) if share else FrozenModel(load_policy(sft_path, tok, dtype).to(device))
        )
        first = (
            FrozenModel(adapters_of=self.value)
            if share and value_init == "reward"
            else FrozenModel(load_scalar_model(reward_path, tok, dtype, zero_head=False).to(device))
        )
        self.rewards = [first] + [
            FrozenModel(load_scalar_model(p, tok, dtype, zero_head=False).to(device)) for p in inputs.extra_reward_paths
        ]
        for m in (self.policy, self.value, self.reference.model, *(r.model for r in self.rewards)):
            if m is not None:
                disable_dropout(m)
        self.amp = autocast(model_cfg, device)
        self.sampler_logprobs = sampler_logprobs_exact(model_cfg)  # old log-probs from the sampler, not a forward

    def trained(self) -> dict[str, torch.nn.Module]:
        return {"policy": self.policy, **({"value": self.value} if self.value is not None else {})}


class OnPolicy:
    """One on-policy run: the state that must survive a resume, the rollout, scoring and update loop.

    Subclasses give :meth:`experience` (advantages from the batch) and :meth:`minibatch_losses`, and may
    add trained models through :meth:`param_groups`.
    """

    samples_per_prompt = 1  # answers sampled for each prompt of an iteration

    def __init__(
        self,
        name: str,
        cfg: OnPolicyConfig,
        models: OnPolicyModels,
        prompts: list[list[int]],
        ctx: StageContext,
        inputs: PolicyInputs,
    ) -> None:
        self.name, self.cfg, self.m, self.prompts, self.ctx = name, cfg, models, prompts, ctx
        self.missing_eos_penalty = inputs.missing_eos_penalty
        self.kl_ctl = FixedKLController(cfg.beta)
        self.score_offset = 0.0
        self.member_stats = torch.zeros(
            len(models.rewards), 2
        )  # (K, 2) mean and std of each member's scores on SFT answers
        self.ensemble_gap = 0.0  # mean score of SFT answers, the ensemble's minus member 0's (0 for one reward model)
        self.guard = {
            "best": None,
            "iteration": None,
            "since": 0,
            "stopped": None,
        }  # the over-optimisation guard's memory
        self.iteration = 0
        self.history: dict[str, list[tuple[int, float]]] = {}  # the KL curve, kept across resumes
        n_updates = cfg.steps * cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.minibatch_size)
        self.trainer = Trainer(
            models.trained(),
            models.tokenizer,
            cfg,
            n_updates,
            name,
            ctx.sink,
            ctx.ckpt_dir,
            self.param_groups(),
            amp=models.amp,
            accelerator=ctx.accelerator,
        )
        self.rank, self.world = self.trainer.rank, self.trainer.world
        self.policy_train = self.trainer.wrap(
            self.compiled(Logprobs(models.policy))
        )  # the update's forwards (DDP under accelerate launch)

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.m.policy.parameters() if p.requires_grad]}]  # LoRA: adapters only

    def compiled(self, forward: torch.nn.Module) -> torch.nn.Module:
        """An update's forward module (:class:`Logprobs`, :class:`TokenValues`: backbone, head and loss inputs),
        compiled
        in place with ``runtime.compile`` (dynamic shapes: the minibatches' widths vary). Its parameters are the
        trained model's, so their names, checkpoints and saved models stay those of the plain modules; sampling and
        the experience pass (no_grad, a cache that grows each token) stay eager."""
        if self.ctx.compile:
            forward.compile(dynamic=True)
        return forward

    # ---- state ----------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "iteration": self.iteration,
            "kl_ctl": self.kl_ctl.state_dict(),
            "score_offset": self.score_offset,
            "history": self.history,
            "member_stats": self.member_stats,
            "ensemble_gap": self.ensemble_gap,
            "guard": self.guard,
        }

    def load(self, ckpt: Path) -> dict:
        extra = self.trainer.load(ckpt)
        self.iteration, self.score_offset, self.history = extra["iteration"], extra["score_offset"], extra["history"]
        self.member_stats, self.guard = extra["member_stats"], extra["guard"]
        self.ensemble_gap = extra.get("ensemble_gap", 0.0)  # absent from checkpoints written before it existed
        self.kl_ctl.load_state_dict(extra["kl_ctl"])
        return extra

    # ---- rollout --------------------------------------------------------------------------------
    def prompt_batch(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's prompts of an iteration, each repeated ``samples_per_prompt`` times (a group stays
        together): a pure function of (seed, iteration, rank), so resuming replays the same data."""
        n, b = len(self.prompts), self.cfg.rollout_batch_size // self.samples_per_prompt
        position = iteration * b + torch.arange(b)  # position in the endless stream of shuffled epochs
        epochs = position // n
        orders = {int(e): epoch_order(n, self.cfg.seed, int(e)) for e in epochs.unique()}
        idx = [int(orders[int(e)][p % n]) for e, p in zip(epochs, position)][self.rank :: self.world]
        ids, mask = left_pad(
            [self.prompts[i] for i in idx for _ in range(self.samples_per_prompt)], self.m.tokenizer.pad_token_id
        )
        return ids.to(self.ctx.device), mask.to(self.ctx.device)

    def rollout(self, model, iteration: int, sampling: SamplingConfig | None = None) -> Samples:
        generator = torch.Generator(device=self.ctx.device).manual_seed(
            (self.cfg.seed * 1_000_003 + iteration) * self.world + self.rank
        )
        ids, mask = self.prompt_batch(iteration)
        model.eval()
        tok = self.m.tokenizer
        return generate(
            model,
            ids,
            mask,
            sampling or self.cfg.sampling,
            tok.eos_token_id,
            tok.pad_token_id,
            generator,
            logprobs=self.m.sampler_logprobs and model is self.m.policy,
        )

    # ---- scoring --------------------------------------------------------------------------------
    @torch.no_grad()
    def member_scores(self, samples: Samples) -> torch.Tensor:
        """Each reward model's raw score at the last answer token: (K, B)."""
        out = []
        for reward in self.m.rewards:
            with reward.use() as model:
                out.append(sequence_scores(model, samples.input_ids, samples.attention_mask, samples.last_index))
        return torch.stack(out)

    def penalty(self, samples: Samples) -> torch.Tensor:
        return self.missing_eos_penalty * (~samples.ended).float()

    def ensemble(self, members: torch.Tensor, how: str | None = None) -> torch.Tensor:
        """The score a method optimises from its members' raw scores (K, B): the single model's score, or the
        ensemble's ``reward_ensemble`` of the members standardised on SFT answers, put on the scale of member 0
        (the single reward model of ``reward.ensemble_size=1``), so that beta means what it means with that
        model alone and an ensemble differs from it in the aggregation only (bootstrapped members can spread
        their scores wider than member 0: on their mean scale an ensemble would run at a weaker effective beta)."""
        if len(members) == 1:
            return members[0]
        stats = self.member_stats.to(members.device)  # (K, 2) mean, std
        z = (members - stats[:, :1]) / stats[:, 1:]  # (K, B)
        return ensemble_score(z, how or self.cfg.reward_ensemble, self.cfg.uncertainty_coef) * stats[0, 1] + stats[0, 0]

    @torch.no_grad()
    def raw_scores(self, samples: Samples) -> torch.Tensor:
        """The (ensemble's) score of each answer minus the penalty for answers that never ended: (B,)."""
        return self.ensemble(self.member_scores(samples)) - self.penalty(samples)

    @torch.no_grad()
    def measure_score_offset(self) -> float:
        """Mean score of SFT answers (Huang et al. 2024: normalise the reward so SFT scores 0); with an ensemble,
        each member's mean and std on the same answers first, and how far the ensemble's mean lies from member 0's
        (``ensemble_gap``: a worst-case ensemble scores SFT answers below its member 0)."""
        with self.m.reference.use() as sft:
            answers = [self.rollout(sft, -1 - i) for i in range(SCORE_NORM_BATCHES)]
        members = torch.cat([self.member_scores(a) for a in answers], 1)  # (K, N)
        gathered = self.ctx.accelerator.gather(members.T.contiguous()).T  # every process's answers: the same statistics
        self.member_stats = torch.stack([gathered.mean(1), gathered.std(1).clamp(min=1e-6)], 1).cpu()
        penalties = torch.cat([self.penalty(a) for a in answers])
        ensemble = self.ensemble(members)
        means = self.trainer.average({"score": (ensemble - penalties).mean(), "gap": (ensemble - members[0]).mean()})
        self.ensemble_gap = float(means["gap"])
        return float(means["score"])

    @torch.no_grad()
    def policy_logprobs(self, s: Samples) -> torch.Tensor:
        """The current policy's log-probs of the answer tokens (B, R): the sampler's where it kept them
        (:func:`sampler_logprobs_exact`), else a forward."""
        if s.logprobs is not None:
            return s.logprobs
        return s.response_slice(
            token_logprobs(self.m.policy, s.input_ids, s.attention_mask, self.cfg.sampling.temperature, s.first_target)
        )

    @torch.no_grad()
    def forwards(self, samples: Samples) -> dict[str, torch.Tensor]:
        """Old and reference log-probs (B, R), values (B, R) where there is a critic, and raw scores (B,),
        in chunks of ``forward_batch_size`` rollouts (activation memory is one chunk's)."""
        m, t = self.m, self.cfg.sampling.temperature
        parts: dict[str, list[torch.Tensor]] = {}
        width = samples.response_ids.shape[1]
        pad = lambda x: torch.nn.functional.pad(x, (0, width - x.shape[1]))  # noqa: E731  (a trimmed chunk back to the batch's width)
        for i in range(0, len(samples.ended), self.cfg.forward_batch_size):
            s = samples[i : i + self.cfg.forward_batch_size].trimmed()
            ids, attn, first = s.input_ids, s.attention_mask, s.first_target
            out = {"old_logp": pad(self.policy_logprobs(s))}
            with m.reference.use() as reference:
                out["ref_logp"] = pad(s.response_slice(token_logprobs(reference, ids, attn, t, first)))
            if m.value is not None:
                out["values"] = pad(s.response_slice(token_values(m.value, ids, attn)[:, :-1]))
            members = self.member_scores(s)
            out["raw"] = self.ensemble(members) - self.penalty(s)
            if len(members) > 1:  # how much the members disagree on each answer (standardised units)
                out["disagreement"] = (
                    (members - self.member_stats[:, :1].to(members.device))
                    / self.member_stats[:, 1:].to(members.device)
                ).std(0)
            for k, v in out.items():
                parts.setdefault(k, []).append(v)
        mask = samples.response_mask
        return {k: torch.cat(v) * (mask if v[0].dim() == 2 else 1) for k, v in parts.items()}

    def scores(self, raw: torch.Tensor) -> torch.Tensor:
        """The score a method optimises: raw minus the SFT offset (``score_norm``)."""
        return raw - self.score_offset if self.cfg.score_norm else raw

    def ensemble_stats(self, forwards: dict) -> dict[str, torch.Tensor]:
        """How much an ensemble's members disagree on the batch (standardised units), where there is one."""
        return {"ensemble_std": forwards["disagreement"].mean()} if "disagreement" in forwards else {}

    def kl_stats(self, old_logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sequence KL to the reference, k1 and k3, mean over the batch."""
        return {
            "kl": (kl_k1(old_logp, ref_logp) * mask).sum(1).mean(),
            "kl_k3": (kl_k3(old_logp, ref_logp) * mask).sum(1).mean(),
        }

    # ---- the method -----------------------------------------------------------------------------
    def experience(self, samples: Samples) -> tuple[Experience, dict]:
        raise NotImplementedError

    def sequence_experience(self, samples: Samples, advantages_of, kl_in_reward: bool) -> tuple[Experience, dict]:
        """Experience of a critic-free method: one advantage per answer, from the rewards of its prompt's group
        (``advantages_of``: (G, k) rewards -> (G, k) advantages), repeated on the answer's tokens. With
        ``kl_in_reward`` an answer's reward is its score minus beta times its sequence KL (k1)."""
        mask, f = samples.response_mask, self.forwards(samples)
        scores = self.scores(f["raw"])
        seq_kl = ((f["old_logp"] - f["ref_logp"]) * mask).sum(1)  # (B,)
        beta = self.kl_ctl.value
        rewards = scores - beta * seq_kl if kl_in_reward else scores
        advantages = advantages_of(rewards.view(-1, self.samples_per_prompt)).reshape(-1)  # (B,)
        stats = {
            **self.kl_stats(f["old_logp"], f["ref_logp"], mask),
            "kl_coef": torch.tensor(beta),
            "score": scores.mean(),
            "score_raw": f["raw"].mean(),
            "reward": rewards.mean(),
            "eos_rate": samples.ended.float().mean(),
            "response_length": mask.sum(1).mean(),
            "advantages_mean": advantages.mean(),
            "advantages_std": advantages.std(),
            "group_reward_std": rewards.view(-1, self.samples_per_prompt).std(1).mean(),
            **self.ensemble_stats(f),
        }
        exp = Experience(samples, mask, f["old_logp"], f["ref_logp"], scores, advantages[:, None] * mask)
        return exp, self.trainer.average(stats)

    def minibatch_losses(self, exp: Experience, train_policy: bool):
        """Yield (loss, metrics) per micro-batch of a minibatch."""
        raise NotImplementedError

    def trains_policy(self) -> bool:
        return True

    def micro_batches(self, exp: Experience):
        """A minibatch in ``grad_accum`` micro-batches, each without the padding all its rows share."""
        micro = len(exp.mask) // self.cfg.grad_accum
        for i in range(0, len(exp.mask), micro):
            yield exp[slice(i, i + micro)].trimmed()

    def policy_terms(
        self, e: Experience, aggregation: str = "token", kl_coef: float = 0.0
    ) -> tuple[torch.Tensor, dict]:
        """The clipped surrogate on a micro-batch (and, with ``kl_coef``, the k3 KL to the reference as a loss term)."""
        s = e.samples
        logp, entropy = token_logprobs_and_entropy(
            self.policy_train, s.input_ids, s.attention_mask, self.cfg.sampling.temperature, s.first_target
        )
        logp, entropy = (
            s.response_slice(logp) * e.mask,
            s.response_slice(entropy),
        )  # PAD after EOS: 0, as old / ref log-probs
        max_tokens = self.cfg.sampling.max_new_tokens  # dr_grpo's constant normaliser (rlhf.losses.aggregate)
        loss, metrics = policy_loss(
            logp, e.old_logp, e.advantages, e.mask, self.cfg.clip_range, aggregation, max_tokens
        )
        metrics["entropy"] = masked_mean(entropy.detach(), e.mask)
        if kl_coef:
            kl_term, kl_metrics = kl_loss(logp, e.ref_logp, e.mask, aggregation, max_tokens)
            loss = loss + kl_coef * kl_term
            metrics.update(kl_metrics)
        return loss, metrics

    # ---- update ---------------------------------------------------------------------------------
    def update(self, exp: Experience) -> dict:
        cfg, train_policy = self.cfg, self.trains_policy()
        for model in self.m.trained().values():
            model.train()
        sums: dict[str, float] = {}
        count, first = 0, {}
        g = torch.Generator().manual_seed(cfg.seed * 7919 + self.iteration)
        minibatch = cfg.minibatch_size // self.world  # this process's share of a minibatch
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(len(exp.mask), generator=g)
            for j in range(0, len(order), minibatch):
                metrics = self.trainer.optimizer_step(
                    self.minibatch_losses(exp[order[j : j + minibatch]], train_policy)
                )
                metrics = {k: float(v) for k, v in metrics.items()}
                if not first:  # the policy still equals the rollout policy: ratio 1, clipfrac 0, approx_kl 0
                    first = {f"{k}_first_minibatch": metrics[k] for k in ("clipfrac", "approx_kl") if k in metrics}
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        return {**{k: v / count for k, v in sums.items()}, **first}

    # ---- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, eval_prompts: list[str], eval_ids: list[list[int]], has_gold: bool) -> dict:
        """The current policy on held-out prompts: proxy reward (the eval stage's: the members' mean raw score
        minus the missing-EOS penalty), gold reward where known, KL to the reference, and the guard's score
        (the ensemble's ``guard_score`` aggregation, which never sees gold)."""
        tok, t = self.m.tokenizer, self.cfg.sampling.temperature
        ids, mask = left_pad(eval_ids, tok.pad_token_id)
        generator = torch.Generator(device=self.ctx.device).manual_seed(self.cfg.seed + 99)
        self.m.policy.eval()
        s = generate(
            self.m.policy,
            ids.to(self.ctx.device),
            mask.to(self.ctx.device),
            self.cfg.sampling,
            tok.eos_token_id,
            tok.pad_token_id,
            generator,
            logprobs=self.m.sampler_logprobs,
        )
        members, penalty = self.member_scores(s), self.penalty(s)
        logp = self.policy_logprobs(s)
        with self.m.reference.use() as reference:
            ref = s.response_slice(token_logprobs(reference, s.input_ids, s.attention_mask, t, s.first_target))
        out = {
            "eval_proxy_reward": float((members.mean(0) - penalty).mean()),
            "eval_kl": float(((logp - ref) * s.response_mask).sum(1).mean()),
            "eval_guard_score": float((self.ensemble(members, self.cfg.guard_score) - penalty).mean()),
        }
        if len(members) > 1:
            out["eval_ensemble_std"] = float(members.std(0).mean())
        if has_gold:
            texts = decode_responses(tok, s)
            gold = torch.tensor([synthetic.gold_reward(p, a, bool(e)) for p, a, e in zip(eval_prompts, texts, s.ended)])
            out["eval_gold_reward"], out["eval_gold_reward_se"] = mean_se(gold)
        return out

    # ---- the over-optimisation guard ------------------------------------------------------------
    def guard_step(self, held_out: dict) -> bool:
        """After an evaluation (main process): keep this checkpoint if the guard prefers it; True when
        training should stop.

        Eligible checkpoints are those within ``guard_kl_budget`` (held-out KL to the reference); among them
        the guard keeps the best ``eval_guard_score`` (``guard=conservative|both``) or the latest
        (``guard=kl``). Training stops after ``guard_patience`` evaluations without a better eligible
        checkpoint (one past the budget counts as none); with ``guard_patience=0`` it runs to the end.
        """
        cfg, g = self.cfg, self.guard
        within = cfg.guard_kl_budget is None or held_out["eval_kl"] <= cfg.guard_kl_budget
        score = held_out["eval_guard_score"] if cfg.guard in ("conservative", "both") else float(self.iteration)
        if within and (g["best"] is None or score > g["best"]):
            g.update(best=score, iteration=self.iteration, since=0)
            # LoRA: the adapters alone; merging them would unload them from the policy being trained
            save_pretrained_atomic(
                self.m.policy,
                self.m.tokenizer,
                self.ctx.out_dir / GUARD_DIR,
                {"iteration": self.iteration},
                merge=False,
            )
            return False
        g["since"] += 1
        stop = bool(cfg.guard_patience) and g["since"] >= cfg.guard_patience
        if stop:
            g["stopped"] = self.iteration
        return stop


def sampler_logprobs_exact(model_cfg: ModelConfig) -> bool:
    """Whether the sampler's log-probs stand for the old log-probs of the experience pass (and the held-out KL).
    In fp32 (weights and forwards) the KV-cached sampler and a full forward agree to float rounding (at most
    1.4e-6 nats per token on the default task), so recomputing them is a forward of the policy over the batch
    that the algorithm does not need; TRL's PPOTrainer takes them from the sampler's logits too. Under bf16 the
    cached decode and the full forward round differently (more so on GPUs, whose prefill and decode kernels
    differ), so there a forward recomputes them and the ratio compares like with like."""
    return model_cfg.autocast == "none" and model_cfg.dtype == "float32"


def ensemble_score(z: torch.Tensor, how: str, coef: float = 0.5) -> torch.Tensor:
    """A reward-model ensemble's score from its K members' standardised scores z (K, B) (Coste et al. 2023):

    mean:         mean_k z_k
    worst:        min_k z_k                            (worst-case optimisation, WCO)
    uncertainty:  mean_k z_k - coef * var_k z_k        (uncertainty-weighted optimisation, UWO)
    """
    if how == "worst":
        return z.min(0).values
    if how == "uncertainty":
        return z.mean(0) - coef * z.var(0)
    return z.mean(0)


def kl_curve_figure(history: dict[str, list[tuple[int, float]]], name: str, out_file: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, keys in zip(axes, (CURVES[:2], CURVES[2:])):
        for k in (f"{name}/{c}" for c in keys):
            if history.get(k):
                steps, values = zip(*history[k])
                ax.plot(steps, values, label=k, marker="." if len(steps) < 30 else None)
        ax.set_xlabel(f"{name} iteration")
        ax.legend()
    axes[0].set_ylabel("nats")
    fig.tight_layout()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_file, dpi=100)
    plt.close(fig)
    return out_file


def prompts_of(
    cfg: OnPolicyConfig, model_cfg: ModelConfig, inputs: PolicyInputs, tokenizer
) -> tuple[list, list[str], list]:
    """Training prompt ids, and the held-out prompts (text and ids) scored during training."""
    max_prompt = model_cfg.max_length - cfg.sampling.max_new_tokens
    prompts = encode_prompts(
        tokenizer, [r["prompt"] for r in load_rows(inputs.data_dir, "ppo_prompts", tokenizer)], max_prompt
    )
    eval_prompts = [r["prompt"] for r in load_rows(inputs.data_dir, "eval_prompts", tokenizer)][:EVAL_PROMPTS]
    return prompts, eval_prompts, encode_prompts(tokenizer, eval_prompts, max_prompt)


def frontier_fit(history: dict, name: str, has_gold: bool) -> tuple[dict, object]:
    """Gao et al.'s RL form fitted over a run's evaluations (d = sqrt(held-out KL), the reward gain over the
    evaluation before training): metrics ``<name>/frontier_<gold|proxy>_<alpha|beta|r2|d_star>`` and the figure."""
    kl = dict(history.get(f"{name}/eval_kl", []))
    points, fits = {}, {}
    for kind in ("gold", "proxy") if has_gold else ("proxy",):
        series = dict(history.get(f"{name}/eval_{kind}_reward", []))
        steps = sorted(set(series) & set(kl))
        if len(steps) < 3 or steps[0] != 0:
            continue
        d = frontier.distance([kl[s] for s in steps])
        gain = torch.tensor([series[s] - series[0] for s in steps], dtype=torch.float64)
        points[kind], fits[kind] = (d.tolist(), gain.tolist()), frontier.fit("rl", d, gain)
    metrics = {k: v for kind, f in fits.items() for k, v in f.metrics(f"{name}/frontier_{kind}").items()}
    return metrics, (
        frontier.figure(points, fits, f"{name}: reward gain vs sqrt(KL) over its evaluations") if fits else None
    )


def train(method: OnPolicy, eval_prompts: list[str], eval_ids: list, inputs: PolicyInputs, resume: Path | None) -> dict:
    """The on-policy loop (see the module docstring); returns the stage's record."""
    cfg, ctx, m, name = method.cfg, method.ctx, method.m, method.name

    def held_out() -> dict:
        """Evaluate on held-out prompts (main process: the one that logs) and let the guard see it."""
        if not ctx.accelerator.is_main_process:
            return {}
        with m.amp():
            out = {f"{name}/{k}": v for k, v in method.evaluate(eval_prompts, eval_ids, inputs.has_gold).items()}
        for k in (f"{name}/{c}" for c in (*CURVES, "eval_kl")):
            if k in out:
                method.history.setdefault(k, []).append((method.iteration, out[k]))
        return out

    if resume:
        method.load(resume)
    else:
        if cfg.score_norm or len(m.rewards) > 1:
            with m.amp():
                offset = method.measure_score_offset()
            method.score_offset = offset if cfg.score_norm else 0.0
        ctx.sink.log_metrics(
            {f"{name}/score_offset": method.score_offset, **held_out()}, 0
        )  # the policy before training: SFT

    progress = method.trainer.progress = ctx.progress(name, cfg.steps, method.iteration)
    metrics: dict[str, float] = {}
    while method.iteration < cfg.steps and method.guard["stopped"] is None:
        t0 = time.perf_counter()
        with m.amp():
            samples = method.rollout(m.policy, method.iteration)
            t1 = time.perf_counter()
            exp, stats = method.experience(samples)
            t2 = time.perf_counter()
        method.iteration += 1
        trained = method.update(exp)
        t3 = time.perf_counter()
        method.kl_ctl.update(float(stats["kl"]), cfg.rollout_batch_size)
        gen_tokens, train_tokens = ctx.accelerator.reduce(
            torch.stack([exp.mask.sum(), samples.attention_mask.sum() * cfg.ppo_epochs]).float(), "sum"
        ).tolist()
        method.trainer.tokens_trained += int(train_tokens)
        metrics = {f"{name}/{k}": float(v) for k, v in {**stats, **trained}.items()}
        metrics[f"{name}/tokens_trained"] = method.trainer.tokens_trained
        metrics.update(
            {
                f"{name}/gen_tokens_per_s": gen_tokens / (t1 - t0),
                f"{name}/train_tokens_per_s": train_tokens / (t3 - t2),
                f"{name}/time_generation_s": t1 - t0,
                f"{name}/time_scoring_s": t2 - t1,
                f"{name}/time_update_s": t3 - t2,
            }
        )
        # evaluations of a policy that has moved (none during a value warm-up: the same policy as iteration 0)
        if method.iteration == cfg.steps or (
            method.trains_policy() and (method.iteration % cfg.eval_every == 0 or method.iteration == 1)
        ):
            evaluated = held_out()
            metrics.update(evaluated)
            if cfg.guard != "none":
                if ctx.accelerator.is_main_process:
                    method.guard_step({k.split("/", 1)[1]: v for k, v in evaluated.items()})
                method.guard = broadcast_object_list([method.guard])[0]  # every process stops together
                if method.guard["stopped"] is not None:
                    metrics[f"{name}/guard_stopped_at"] = method.iteration
        ctx.sink.log_metrics(metrics, method.iteration)
        progress.update(method.iteration, metrics, int(gen_tokens + train_tokens))
        for k in (f"{name}/{c}" for c in CURVES[:3]):
            method.history.setdefault(k, []).append((method.iteration, metrics[k]))
        saved = (
            method.iteration % cfg.checkpoint_every == 0
            or method.iteration == cfg.steps
            or method.guard["stopped"] is not None
        )
        if saved:
            method.trainer.save(method.state())
        method.trainer.stop_if_requested(method.state, saved)

    progress.close()
    summary = dict(metrics)
    if ctx.accelerator.is_main_process:
        kl_curve_figure(method.history, name, ctx.out_dir / "figures" / "kl_curve.png")
        fitted, fig = frontier_fit(method.history, name, inputs.has_gold)
        if fig is not None:
            fig.savefig(ctx.out_dir / "figures" / "frontier.png", dpi=100)
            import matplotlib.pyplot as plt

            plt.close(fig)
        ctx.sink.log_metrics(fitted, method.iteration)
        summary.update(fitted)
    kept = ctx.out_dir / GUARD_DIR
    if cfg.guard != "none" and method.guard["iteration"] is not None and (kept / "rlhf_meta.json").exists():
        # the guard's checkpoint is the stage's model: the eval stage evaluates what the guard chose
        if is_lora(m.policy):  # kept as adapters: back into the policy, then saved merged
            load_adapters(m.policy, kept)
            ctx.save_final(m.policy, m.tokenizer, {"stage": name, "iterations": method.guard["iteration"]})
        elif ctx.accelerator.is_main_process:
            with checkpoint.atomic_dir(ctx.final_dir) as tmp:
                shutil.copytree(kept, tmp, dirs_exist_ok=True)
        ctx.accelerator.wait_for_everyone()
        guard = {f"{name}/guard_iteration": method.guard["iteration"], f"{name}/guard_score": method.guard["best"]}
        ctx.sink.log_metrics(guard, method.iteration)
        summary.update(guard)
    else:
        ctx.save_final(m.policy, m.tokenizer, {"stage": name, "iterations": method.iteration})
    return {
        "model_path": str(ctx.final_dir),
        "metrics": {k: v for k, v in summary.items() if "/time_" not in k},
        "steps": method.iteration,
    }
