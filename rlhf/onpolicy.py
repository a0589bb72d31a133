"""The on-policy method PPO, RLOO and GRPO share: sample, score, update with the clipped surrogate.

A method subclasses :class:`OnPolicy` with its :meth:`~OnPolicy.experience` (advantages from the batch) and its
:meth:`~OnPolicy.minibatch_losses`; the rollout, the experience pass (old and reference log-probs, scores under the
scoring rule of :mod:`rlhf.scoring`, values where there is a critic), the KL bookkeeping, the clipped updates, the
held-out evaluation and the guard (:mod:`rlhf.guard`) are these, and :mod:`rlhf.onpolicy_loop` runs them. Policy
from SFT, frozen reference = SFT, dropout off everywhere. With several processes each samples a contiguous
block of the iteration's prompts (a prompt's group of answers stays in one process), each answer with its own
random numbers (:mod:`rlhf.answer_keys`), and scores its block; advantages and statistics are then computed on the
whole batch in every process, and each process updates on every ``world``-th row of each minibatch with token
means over the whole minibatch. So an iteration gives the same numbers on any number of processes (up to float
summation order), and a checkpoint resumes on another number of processes as the run would have gone on.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .algorithms import PolicyInputs
from .answer_keys import AnswerStream
from .config import SamplingConfig
from .config_training import OnPolicyConfig
from .context import StageContext
from .data import left_pad
from .engines import open_engine
from .experience import Experience, every_process
from .guard import GUARD_DIR, Guard
from .kl_control import FixedKLController
from .losses import engine_mismatch, kl_k1, kl_k3, kl_loss, policy_loss, token_mean, truncated_is_weights
from .modeling import Logprobs, token_logprobs, token_logprobs_and_entropy, token_values
from .onpolicy_models import OnPolicyModels
from .rollout import Samples, decode_responses
from .scoring import Scorer, gold_rewards
from .stats import mean_se
from .trainer import Trainer, epoch_order

SCORE_NORM_BATCHES = 2  # rollout batches of the SFT policy used to measure the score offset
HELD_OUT_STREAM = -99  # the held-out evaluation's answer stream (iterations' streams are their numbers, from -2)


class OnPolicy:
    """One on-policy run: the state that must survive a resume, the rollout, the experience and the update."""

    name = ""  # the method's name: its metrics' prefix and its stage's

    def __init__(
        self,
        cfg: OnPolicyConfig,
        models: OnPolicyModels,
        prompts: list[list[int]],
        ctx: StageContext,
        inputs: PolicyInputs,
    ) -> None:
        self.cfg, self.m, self.prompts, self.ctx, self.gold = cfg, models, prompts, ctx, inputs.gold
        self.samples_per_prompt = getattr(cfg, "samples_per_prompt", 1)  # answers sampled for each prompt (a group)
        self.scorer = Scorer(models.rewards, inputs.missing_eos_penalty)
        self.kl_ctl = FixedKLController(cfg.beta)
        self.score_offset = 0.0
        self.ensemble_gap = 0.0  # mean score of SFT answers, the ensemble's minus member 0's (0 for one reward model)
        self.guard = Guard(cfg)
        self.iteration = 0
        self.history: dict[str, list[tuple[int, float]]] = {}  # the KL curve, kept across resumes
        n_updates = cfg.steps * cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.minibatch_size)
        self.trainer = Trainer(
            models.trained(),
            models.tokenizer,
            cfg,
            n_updates,
            self.name,
            ctx.sink,
            ctx.ckpt_dir,
            self.param_groups(),
            amp=models.amp,
            accelerator=ctx.accelerator,
            sharding=ctx.sharding,
        )
        self.rank, self.world = self.trainer.rank, self.trainer.world
        self.engine = open_engine(  # HF forwards, or a vLLM engine the policy's weights are pushed to (rlhf.engines)
            inputs.rollout,
            inputs.sft_path,
            models.max_length,
            ctx.device,
            cfg.seed,
            max(cfg.rollout_batch_size, cfg.sampling.batch_size),
            models.dtype,
            self.world,
        )
        self.policy_train = self.trainer.wrap(self.compiled(Logprobs(models.policy)))  # the update's forwards (DDP)

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.m.policy.parameters() if p.requires_grad]}]  # LoRA: adapters only

    def compiled(self, forward: torch.nn.Module) -> torch.nn.Module:
        """An update's forward module (:class:`Logprobs`, :class:`TokenValues`: backbone, head and loss inputs),
        compiled in place with ``runtime.compile`` (dynamic shapes: the minibatches' widths vary). Its parameters are
        the trained model's, so their names, checkpoints and saved models stay those of the plain modules; sampling
        and the experience pass (no_grad, a cache that grows each token) stay eager."""
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
            "member_stats": self.scorer.member_stats,
            "ensemble_gap": self.ensemble_gap,
            "guard": self.guard.state,
        }

    def load(self, ckpt: Path) -> dict:
        extra = self.trainer.load(ckpt)
        self.iteration, self.score_offset, self.history = extra["iteration"], extra["score_offset"], extra["history"]
        self.scorer.member_stats, self.guard.state = extra["member_stats"], extra["guard"]
        self.ensemble_gap = extra.get("ensemble_gap", 0.0)  # absent from checkpoints written before it existed
        self.kl_ctl.load_state_dict(extra["kl_ctl"])
        return extra

    # ---- rollout --------------------------------------------------------------------------------
    def prompt_batch(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This process's prompts of an iteration, each repeated ``samples_per_prompt`` times (a group stays
        together), and the answers' numbers in the iteration (B,): a pure function of (seed, iteration, rank), so
        resuming replays the same data. Process r takes the r-th contiguous block of the iteration's prompts, so the
        processes' batches laid end to end are the batch one process would sample."""
        n, b, k = len(self.prompts), self.cfg.rollout_batch_size // self.samples_per_prompt, self.samples_per_prompt
        share = b // self.world
        position = iteration * b + torch.arange(self.rank * share, (self.rank + 1) * share)  # in the endless stream
        epochs = position // n
        orders = {int(e): epoch_order(n, self.cfg.seed, int(e)) for e in epochs.unique()}
        idx = [int(orders[int(e)][p % n]) for e, p in zip(epochs, position)]
        prompts = [self.prompts[i] for i in idx for _ in range(k)]
        ids, mask = left_pad(prompts, self.m.tokenizer.pad_token_id)
        answers = torch.arange(self.rank * share * k, (self.rank + 1) * share * k)
        return ids.to(self.ctx.device), mask.to(self.ctx.device), answers.to(self.ctx.device)

    def policy_weights(self) -> tuple:
        """The label of the policy's current weights: the engine pushes them when it holds another."""
        return ("policy", self.trainer.step)

    def rollout(self, model, iteration: int, sampling: SamplingConfig | None = None, weights=None) -> Samples:
        """Answers to this process's prompts of ``iteration``, each drawn with the key of its number in the iteration
        (:mod:`rlhf.answer_keys`): the same answers on any number of processes. ``weights``: the label of ``model``'s
        weights (default: the policy's now)."""
        ids, mask, answers = self.prompt_batch(iteration)
        model.eval()
        tok = self.m.tokenizer
        return self.engine.sample(
            model,
            weights or self.policy_weights(),
            ids,
            mask,
            sampling or self.cfg.sampling,
            tok.eos_token_id,
            tok.pad_token_id,
            AnswerStream(self.cfg.seed, iteration).keys(answers),
            logprobs=self.m.sampler_logprobs and model is self.m.policy,
        )

    # ---- experience -----------------------------------------------------------------------------
    def ensemble(self, members: torch.Tensor, how: str | None = None) -> torch.Tensor:
        """The score the method optimises from the members' raw scores (K, B): :meth:`Scorer.ensemble`."""
        return self.scorer.ensemble(members, how or self.cfg.reward_ensemble, self.cfg.uncertainty_coef)

    @torch.no_grad()
    def measure_score_offset(self) -> float:
        """Mean score of SFT answers (Huang et al. 2024: normalise the reward so SFT scores 0); with an ensemble,
        each member's mean and std on the same answers first, and how far the ensemble's mean lies from member 0's
        (``ensemble_gap``: a worst-case ensemble scores SFT answers below its member 0)."""
        with self.m.reference.use() as sft, self.ctx.sharding.gathered(sft):  # sampled whole (answers end unevenly)
            answers = [self.rollout(sft, -1 - i, weights=("reference",)) for i in range(SCORE_NORM_BATCHES)]
        members = torch.cat([self.scorer.members(a) for a in answers], 1)  # (K, N)
        gathered = self.ctx.accelerator.gather(members.T.contiguous()).T  # every process's answers: the same statistics
        self.scorer.member_stats = torch.stack([gathered.mean(1), gathered.std(1).clamp(min=1e-6)], 1).cpu()
        penalties = torch.cat([self.scorer.penalty(a) for a in answers])
        ensemble = self.ensemble(members)
        means = self.trainer.average({"score": (ensemble - penalties).mean(), "gap": (ensemble - members[0]).mean()})
        self.ensemble_gap = float(means["gap"])
        return float(means["score"])

    @torch.no_grad()
    def policy_logprobs(self, s: Samples) -> torch.Tensor:
        """The current policy's log-probs of the answer tokens (B, R): the sampler's where it kept them
        (:func:`~rlhf.onpolicy_models.sampler_logprobs_exact`), else a forward."""
        if s.logprobs is not None:
            return s.logprobs
        t = self.cfg.sampling.temperature
        return s.response_slice(token_logprobs(self.m.policy, s.input_ids, s.attention_mask, t, s.first_target))

    @torch.no_grad()
    def forwards(self, samples: Samples) -> tuple[Samples, dict[str, torch.Tensor]]:
        """Old and reference log-probs (B, R), values (B, R) where there is a critic, and raw scores (B,) of this
        process's rollouts, in chunks of ``forward_batch_size`` (activation memory is one chunk's); returned with the
        rollouts for every process's rows (:func:`~rlhf.experience.every_process`), so the advantages, whitening and
        statistics are the whole batch's and do not depend on how many processes sampled it."""
        m, t = self.m, self.cfg.sampling.temperature
        parts: dict[str, list[torch.Tensor]] = {}
        width = samples.response_ids.shape[1]
        pad = lambda x: torch.nn.functional.pad(x, (0, width - x.shape[1]))  # noqa: E731  (a trimmed chunk back to width)
        for i in range(0, len(samples.ended), self.cfg.forward_batch_size):
            s = samples[i : i + self.cfg.forward_batch_size].trimmed()
            ids, attn, first = s.input_ids, s.attention_mask, s.first_target
            out = {"old_logp": pad(self.policy_logprobs(s))}
            if s.engine_logprobs is not None:  # the engine's own numbers, beside the trainer's (rollout/...)
                out["engine_logp"] = pad(s.engine_logprobs)
            with m.reference.use() as reference:
                out["ref_logp"] = pad(s.response_slice(token_logprobs(reference, ids, attn, t, first)))
            if m.value is not None:
                out["values"] = pad(s.response_slice(token_values(m.value, ids, attn)[:, :-1]))
            members = self.scorer.members(s)
            out["raw"] = self.ensemble(members) - self.scorer.penalty(s)
            if len(members) > 1:  # how much the members disagree on each answer (standardised units)
                out["disagreement"] = self.scorer.standardised(members).std(0)
            for k, v in out.items():
                parts.setdefault(k, []).append(v)
        mask = samples.response_mask
        f = {k: torch.cat(v) * (mask if v[0].dim() == 2 else 1) for k, v in parts.items()}
        if self.world == 1:
            return samples, f
        return every_process(samples, f, self.ctx.accelerator, m.tokenizer.pad_token_id)

    def scores(self, raw: torch.Tensor) -> torch.Tensor:
        """The score a method optimises: raw minus the SFT offset (``score_norm``)."""
        return raw - self.score_offset if self.cfg.score_norm else raw

    def batch_stats(self, samples: Samples, f: dict, scores: torch.Tensor, rewards: torch.Tensor) -> dict:
        """What every method logs of a rollout batch: KL to the reference (k1, k3), scores, lengths, the ensemble."""
        mask = samples.response_mask
        ensemble = {"ensemble_std": f["disagreement"].mean()} if "disagreement" in f else {}
        if "engine_logp" in f:
            mismatch = engine_mismatch(f["old_logp"], f["engine_logp"], mask)
            ensemble.update({f"rollout/{k}": v for k, v in mismatch.items()})
            ensemble["rollout/sync_logprob_abs_diff_max"] = torch.tensor(self.engine.sync_gap)
        return {
            "kl": (kl_k1(f["old_logp"], f["ref_logp"]) * mask).sum(1).mean(),
            "kl_k3": (kl_k3(f["old_logp"], f["ref_logp"]) * mask).sum(1).mean(),
            "kl_coef": torch.tensor(self.kl_ctl.value),
            "score": scores.mean(),
            "score_raw": f["raw"].mean(),
            "reward": rewards.mean(),
            "eos_rate": samples.ended.float().mean(),
            "response_length": mask.sum(1).mean(),
            **ensemble,
        }

    def experience(self, samples: Samples) -> tuple[Experience, dict]:
        raise NotImplementedError

    def sequence_experience(self, samples: Samples, advantages_of, kl_in_reward: bool) -> tuple[Experience, dict]:
        """Experience of a critic-free method: one advantage per answer, from the rewards of its prompt's group
        (``advantages_of``: (G, k) rewards -> (G, k) advantages), repeated on the answer's tokens. With
        ``kl_in_reward`` an answer's reward is its score minus beta times its sequence KL (k1)."""
        samples, f = self.forwards(samples)
        mask = samples.response_mask
        scores = self.scores(f["raw"])
        seq_kl = ((f["old_logp"] - f["ref_logp"]) * mask).sum(1)  # (B,)
        rewards = scores - self.kl_ctl.value * seq_kl if kl_in_reward else scores
        advantages = advantages_of(rewards.view(-1, self.samples_per_prompt)).reshape(-1)  # (B,)
        stats = {
            **self.batch_stats(samples, f, scores, rewards),
            "advantages_mean": advantages.mean(),
            "advantages_std": advantages.std(),
            "group_reward_std": rewards.view(-1, self.samples_per_prompt).std(1).mean(),
        }
        exp = Experience(
            samples,
            mask,
            f["old_logp"],
            f["ref_logp"],
            scores,
            advantages[:, None] * mask,
            engine_logp=f.get("engine_logp"),
        )
        return exp, stats

    # ---- update ---------------------------------------------------------------------------------
    def minibatch_losses(self, exp: Experience, train_policy: bool, tokens: float):
        """Yield (loss, metrics) per micro-batch of this process's share of a minibatch; token-level terms divide
        their sums by ``tokens`` (:func:`~rlhf.losses.token_mean`)."""
        raise NotImplementedError

    def trains_policy(self) -> bool:
        return True

    def micro_batches(self, exp: Experience):
        """A minibatch in ``grad_accum`` micro-batches, each without the padding all its rows share."""
        micro = len(exp.mask) // self.cfg.grad_accum
        for i in range(0, len(exp.mask), micro):
            yield exp[slice(i, i + micro)].trimmed()

    def policy_terms(
        self, e: Experience, tokens: float, aggregation: str = "token", kl_coef: float = 0.0
    ) -> tuple[torch.Tensor, dict]:
        """The clipped surrogate on a micro-batch (and, with ``kl_coef``, the k3 KL to the reference as a loss term);
        ``tokens``: the token means' denominator (:func:`~rlhf.losses.token_mean`)."""
        s, t = e.samples, self.cfg.sampling.temperature
        logp, entropy = token_logprobs_and_entropy(self.policy_train, s.input_ids, s.attention_mask, t, s.first_target)
        logp, entropy = s.response_slice(logp) * e.mask, s.response_slice(entropy)  # PAD after EOS: 0, as old / ref
        max_tokens = self.cfg.sampling.max_new_tokens  # dr_grpo's constant normaliser (rlhf.losses.aggregate)
        weights = None
        if self.cfg.rollout_correction == "tis" and e.engine_logp is not None:
            weights = truncated_is_weights(e.old_logp, e.engine_logp, self.cfg.rollout_correction_cap)
        loss, metrics = policy_loss(
            logp, e.old_logp, e.advantages, e.mask, self.cfg.clip_range, aggregation, max_tokens, tokens, weights
        )
        if weights is not None:
            metrics["tis_weight"] = token_mean(weights, e.mask, tokens)
        metrics["entropy"] = token_mean(entropy.detach(), e.mask, tokens)
        if kl_coef:
            kl_term, kl_metrics = kl_loss(logp, e.ref_logp, e.mask, aggregation, max_tokens, tokens)
            loss = loss + kl_coef * kl_term
            metrics.update(kl_metrics)
        return loss, metrics

    def update(self, exp: Experience) -> dict:
        """``ppo_epochs`` passes over shuffled minibatches of the whole batch (``exp``: every process's rows); each
        process takes every ``world``-th row of a minibatch, and a token weighs the same in the loss whichever process
        and micro-batch it lands in, so the update does not depend on the number of processes. Returns the mean of
        each metric over the minibatches, and the first's clipfrac and approx_kl (the policy is still the rollout
        policy there: both 0)."""
        cfg, train_policy = self.cfg, self.trains_policy()
        for model in self.m.trained().values():
            model.train()
        sums: dict[str, float] = {}
        count, first = 0, {}
        g = torch.Generator().manual_seed(cfg.seed * 7919 + self.iteration)
        micro_batches = cfg.grad_accum * self.world  # a minibatch's, over every process
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(len(exp.mask), generator=g).to(exp.mask.device)  # the same in every process
            for j in range(0, len(order), cfg.minibatch_size):
                rows = order[j : j + cfg.minibatch_size]
                tokens = float(exp.mask[rows].sum()) / micro_batches  # what a micro-batch's token sums are divided by
                losses = self.minibatch_losses(exp[rows[self.rank :: self.world]], train_policy, tokens)
                metrics = {k: float(v) for k, v in self.trainer.optimizer_step(losses).items()}
                first = first or {f"{k}_first_minibatch": metrics[k] for k in ("clipfrac", "approx_kl") if k in metrics}
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        return {**{k: v / count for k, v in sums.items()}, **first}

    # ---- held-out evaluation and the guard --------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, eval_prompts: list[str], eval_ids: list[list[int]]) -> dict:
        """The current policy on held-out prompts: proxy reward (the eval stage's), gold reward where the task has
        one, KL to the reference, and the guard's score (the ensemble's ``guard_score`` aggregation: never gold)."""
        tok, t, device = self.m.tokenizer, self.cfg.sampling.temperature, self.ctx.device
        ids, mask = left_pad(eval_ids, tok.pad_token_id)
        self.m.policy.eval()
        with self.ctx.sharding.gathered(self.m.policy):  # sampled whole; the forwards below take every process's
            s = self.engine.sample(
                self.m.policy,
                self.policy_weights(),
                ids.to(device),
                mask.to(device),
                self.cfg.sampling,
                tok.eos_token_id,
                tok.pad_token_id,
                AnswerStream(self.cfg.seed, HELD_OUT_STREAM).take(len(ids), device),
                logprobs=self.m.sampler_logprobs,
            )
        members, penalty = self.scorer.members(s), self.scorer.penalty(s)
        logp = self.policy_logprobs(s)
        with self.m.reference.use() as reference:
            ref = s.response_slice(token_logprobs(reference, s.input_ids, s.attention_mask, t, s.first_target))
        out = {
            "eval_proxy_reward": float(self.scorer.proxy(members, s).mean()),
            "eval_kl": float(((logp - ref) * s.response_mask).sum(1).mean()),
            "eval_guard_score": float((self.ensemble(members, self.cfg.guard_score) - penalty).mean()),
        }
        if len(members) > 1:
            out["eval_ensemble_std"] = float(members.std(0).mean())
        if self.gold is not None:
            gold = gold_rewards(self.gold, eval_prompts, decode_responses(tok, s), s.ended)
            out["eval_gold_reward"], out["eval_gold_reward_se"] = mean_se(gold)
        return out

    def keep_for_guard(self) -> None:
        """The policy as the guard's kept checkpoint (every process calls it; LoRA: the adapters alone, merging them
        would unload them from the policy being trained)."""
        meta = {"iteration": self.iteration}
        self.ctx.save_model(self.m.policy, self.m.tokenizer, self.ctx.out_dir / GUARD_DIR, meta, merge=False)
