"""PPO stage (Ziegler et al. 2019; Stiennon et al. 2020; Huang et al. 2024, "The N+ implementation details").

Each iteration:
  1. sample answers for ``rollout_batch_size`` prompts with the KV cache            (rollout)
  2. once, under no_grad: old / reference log-probs, values, reward-model scores    (experience)
  3. per-token reward  r_t = -beta * (log pi_old - log pi_ref)_t, plus the score at the EOS token
  4. GAE advantages (whitened) and returns
  5. ``ppo_epochs`` passes of clipped policy + clipped value updates over minibatches

Policy and value start from SFT and the reward model; reference = SFT, frozen. Dropout is off in
every model. Scores are shifted so SFT answers score mean 0, and answers that never end lose
``missing_eos_penalty``.

Under ``accelerate launch`` (``runtime.num_processes``) each process samples its share of every rollout
batch and updates DDP copies of policy and value on its share of every minibatch; the score offset,
reward moments, logged statistics and the KL controller's input are taken over all processes, the
advantages are whitened per process (as TRL does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .. import synthetic
from ..advantages import RunningMoments, gae, whiten
from ..algorithms import Algorithm, PolicyInputs
from ..config import ModelConfig, OnPolicyConfig, SamplingConfig, setting
from ..data import encode_prompts, left_pad, load_rows
from ..kl_control import make_controller
from ..losses import kl_k1, kl_k3, masked_mean, masked_var, policy_loss, value_loss
from ..modeling import (FrozenModel, Logprobs, TokenValues, autocast, disable_dropout, load_policy, load_scalar_model, load_trainable, load_tokenizer,
                        sequence_scores, token_logprobs, token_logprobs_and_entropy, token_values)
from ..rollout import Samples, decode_responses, generate
from ..trainer import Trainer, epoch_order
from .common import StageContext

SCORE_NORM_BATCHES = 2  # rollout batches of the SFT policy used to measure the score offset
EVAL_PROMPTS = 128  # held-out prompts scored at each evaluation during training


@dataclass
class PPOConfig(OnPolicyConfig):
    """PPO's own hyperparameters beside the on-policy loop's (beta, clip_range, steps, batch sizes, sampling)."""

    algo: str = setting("ppo", "Algorithm name.", choices=["ppo"])
    gamma: float = setting(1.0, "Discount.", ge=0.0, le=1.0)
    lam: float = setting(0.95, "GAE lambda.", ge=0.0, le=1.0)
    vf_coef: float = setting(0.1, "Value-loss weight.", ge=0.0)
    value_clip_range: float = setting(0.2, "Value clipping around the rollout values.", gt=0.0)
    value_lr: Optional[float] = setting(None, "Value model learning rate (null: same as lr).", gt=0.0)
    whiten_advantages: bool = setting(True, "Normalise advantages per batch.")
    normalize_reward: bool = setting(False, "Scale scores by a running std (rescales beta: see README).")
    adaptive_kl: bool = setting(False, "Adaptive KL controller (Ziegler et al. 2019).")
    target_kl: float = setting(3.0, "Adaptive controller's target sequence KL (nats).", gt=0.0)
    kl_horizon: int = setting(10000, "Adaptive controller's horizon (samples).", ge=1)
    value_init: str = setting("reward", "Initialise the value model from the reward model or the SFT policy.", choices=["reward", "sft"])
    value_warmup_steps: int = setting(0, "Iterations that train only the value model before the policy moves.", ge=0)


@dataclass
class Experience:
    """A rollout batch with everything PPO needs, computed once per batch under no_grad.

    All (B, R) tensors are aligned with the answer tokens; ``mask`` is 1 up to and including EOS.
    """

    samples: Samples
    mask: torch.Tensor  # (B, R)
    old_logp: torch.Tensor  # (B, R) log pi_old(y_t)
    ref_logp: torch.Tensor  # (B, R) log pi_ref(y_t)
    old_values: torch.Tensor  # (B, R) V(x, y_<t)
    scores: torch.Tensor  # (B,)   reward-model score (shifted, penalised, normalised)
    advantages: torch.Tensor  # (B, R) whitened GAE
    returns: torch.Tensor  # (B, R) value targets

    def __getitem__(self, idx) -> "Experience":
        return Experience(self.samples[idx], *(t[idx] for t in (self.mask, self.old_logp, self.ref_logp, self.old_values, self.scores, self.advantages, self.returns)))


class PPOModels:
    """Policy and value (trained), reference and reward (frozen), all with dropout off.

    Under LoRA (``model.lora_shared_reference``) the reference is the policy with its adapters off and,
    when the value model starts from the reward model, the reward model is the value model with its
    adapters (and trained head) off: one copy of each base's weights instead of two.
    """

    def __init__(self, cfg: PPOConfig, model_cfg: ModelConfig, sft_path: str, reward_path: str, resume: Path | None, device) -> None:
        dtype = model_cfg.dtype
        self.tokenizer = load_tokenizer(sft_path)
        tok = self.tokenizer
        self.policy = load_trainable("policy", sft_path, resume and resume / "policy", tok, model_cfg).to(device)
        value_start = reward_path if cfg.value_init == "reward" else sft_path
        self.value = load_trainable("scalar", value_start, resume and resume / "value", tok, model_cfg, zero_head=cfg.value_init == "sft").to(device)
        share = model_cfg.lora_r > 0 and model_cfg.lora_shared_reference
        self.reference = FrozenModel(adapters_of=self.policy) if share else FrozenModel(load_policy(sft_path, tok, dtype).to(device))
        self.reward = FrozenModel(adapters_of=self.value) if share and cfg.value_init == "reward" else \
            FrozenModel(load_scalar_model(reward_path, tok, dtype, zero_head=False).to(device))
        for m in (self.policy, self.value, self.reference.model, self.reward.model):
            disable_dropout(m)
        self.amp = autocast(model_cfg, device)


class PPO:
    """One PPO run: rollout, experience, update; state that must survive a resume lives here."""

    def __init__(self, cfg: PPOConfig, models: PPOModels, prompts: list[list[int]], ctx: StageContext, n_optimizer_steps: int) -> None:
        self.cfg, self.m, self.prompts, self.ctx = cfg, models, prompts, ctx
        self.kl_ctl = make_controller(cfg.beta, cfg.adaptive_kl, cfg.target_kl, cfg.kl_horizon)
        self.score_moments = RunningMoments()
        self.score_offset = 0.0
        self.iteration = 0
        self.history: dict[str, list[tuple[int, float]]] = {}  # the KL curve, kept across resumes
        value_lr = cfg.value_lr or cfg.lr
        trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731  (LoRA: adapters and heads only)
        groups = [{"params": trainable(models.policy)}, {"params": trainable(models.value), "lr": value_lr}]
        self.trainer = Trainer({"policy": models.policy, "value": models.value}, models.tokenizer, cfg, n_optimizer_steps, "ppo", ctx.sink,
                               ctx.ckpt_dir, groups, amp=models.amp, accelerator=ctx.accelerator)
        self.rank, self.world = self.trainer.rank, self.trainer.world
        self.policy_train = self.trainer.wrap(Logprobs(models.policy))  # the update's forwards (DDP under accelerate launch)
        self.value_train = self.trainer.wrap(TokenValues(models.value))

    # ---- state ----------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"iteration": self.iteration, "kl_ctl": self.kl_ctl.state_dict(), "score_moments": self.score_moments.state_dict(),
                "score_offset": self.score_offset, "history": self.history}

    def load(self, ckpt: Path) -> None:
        extra = self.trainer.load(ckpt)
        self.iteration, self.score_offset, self.history = extra["iteration"], extra["score_offset"], extra["history"]
        self.kl_ctl.load_state_dict(extra["kl_ctl"])
        self.score_moments.load_state_dict(extra["score_moments"])

    # ---- rollout --------------------------------------------------------------------------------
    def prompt_batch(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's prompts of an iteration: a pure function of (seed, iteration, rank), so resuming
        replays the same data; the processes' shares make up the rollout batch."""
        n, b = len(self.prompts), self.cfg.rollout_batch_size
        position = iteration * b + torch.arange(b)  # position in the endless stream of shuffled epochs
        epochs = position // n
        orders = {int(e): epoch_order(n, self.cfg.seed, int(e)) for e in epochs.unique()}
        idx = [int(orders[int(e)][p % n]) for e, p in zip(epochs, position)][self.rank :: self.world]
        ids, mask = left_pad([self.prompts[i] for i in idx], self.m.tokenizer.pad_token_id)
        return ids.to(self.ctx.device), mask.to(self.ctx.device)

    def rollout(self, model, iteration: int, sampling: SamplingConfig | None = None) -> Samples:
        generator = torch.Generator(device=self.ctx.device).manual_seed((self.cfg.seed * 1_000_003 + iteration) * self.world + self.rank)
        ids, mask = self.prompt_batch(iteration)
        model.eval()
        tok = self.m.tokenizer
        return generate(model, ids, mask, sampling or self.cfg.sampling, tok.eos_token_id, tok.pad_token_id, generator)

    @torch.no_grad()
    def raw_scores(self, samples: Samples) -> torch.Tensor:
        """Reward-model score at the last answer token, minus the penalty for answers that never ended."""
        with self.m.reward.use() as reward:
            scores = sequence_scores(reward, samples.input_ids, samples.attention_mask, samples.last_index)
        return scores - self.cfg.missing_eos_penalty * (~samples.ended).float()

    @torch.no_grad()
    def measure_score_offset(self) -> float:
        """Mean score of SFT answers (Huang et al. 2024: normalise the reward so SFT scores 0)."""
        with self.m.reference.use() as sft:
            answers = [self.rollout(sft, -1 - i) for i in range(SCORE_NORM_BATCHES)]
        scores = [self.raw_scores(a) for a in answers]
        return float(self.trainer.average({"score": torch.cat(scores).mean()})["score"])

    @torch.no_grad()
    def forwards(self, samples: Samples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Old and reference log-probs, values (B, R) and raw scores (B,), in chunks of ``forward_batch_size``
        rollouts (activation memory is one chunk's)."""
        m, t, first = self.m, self.cfg.sampling.temperature, samples.first_target
        parts = []
        for i in range(0, len(samples.ended), self.cfg.forward_batch_size):
            s = samples[i : i + self.cfg.forward_batch_size]
            ids, attn = s.input_ids, s.attention_mask
            old = s.response_slice(token_logprobs(m.policy, ids, attn, t, first))
            with m.reference.use() as reference:
                ref = s.response_slice(token_logprobs(reference, ids, attn, t, first))
            parts.append((old, ref, s.response_slice(token_values(m.value, ids, attn)[:, :-1]), self.raw_scores(s)))
        return tuple(torch.cat(p) for p in zip(*parts))

    @torch.no_grad()
    def experience(self, samples: Samples) -> tuple[Experience, dict]:
        cfg, mask = self.cfg, samples.response_mask
        old_logp, ref_logp, values, raw = self.forwards(samples)
        old_logp, ref_logp, values = old_logp * mask, ref_logp * mask, values * mask  # (B, R) each
        scores = raw - self.score_offset if cfg.score_norm else raw
        if cfg.normalize_reward:
            self.score_moments.update(self.ctx.accelerator.gather(scores))  # the same moments in every process
            scores = scores / self.score_moments.std
        kl = kl_k1(old_logp, ref_logp) * mask  # (B, R)
        beta = self.kl_ctl.value
        rewards = -beta * kl
        last = (mask.sum(1).long() - 1).clamp(min=0)  # (B,) column of EOS (or the last token)
        rewards = rewards.scatter_add(1, last[:, None], scores[:, None])
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        raw_adv = advantages
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)
        seq_kl = kl.sum(1)
        stats = {
            "kl": seq_kl.mean(), "kl_k3": (kl_k3(old_logp, ref_logp) * mask).sum(1).mean(), "kl_coef": torch.tensor(beta),
            "score": scores.mean(), "score_raw": raw.mean(), "reward": (scores - beta * seq_kl).mean(),
            "eos_rate": samples.ended.float().mean(), "response_length": mask.sum(1).mean(),
            "advantages_mean": masked_mean(raw_adv, mask), "advantages_std": masked_var(raw_adv, mask).sqrt(),
            "explained_variance": 1 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8),
        }
        return Experience(samples, mask, old_logp, ref_logp, values, scores, advantages, returns), self.trainer.average(stats)

    # ---- update ---------------------------------------------------------------------------------
    def minibatch_losses(self, exp: Experience, train_policy: bool):
        """Yield (loss, metrics) per micro-batch of a minibatch: clipped policy loss + vf_coef * clipped value loss."""
        cfg, m = self.cfg, self.m
        micro = len(exp.mask) // cfg.grad_accum
        for i in range(0, len(exp.mask), micro):
            e = exp[slice(i, i + micro)]
            s = e.samples
            ids, attn = s.input_ids, s.attention_mask
            values = s.response_slice(self.value_train(ids, attn)[:, :-1])
            vf_loss, vf_metrics = value_loss(values, e.old_values, e.returns, e.mask, cfg.value_clip_range)
            metrics = dict(vf_metrics)
            loss = cfg.vf_coef * vf_loss
            if train_policy:
                logp, entropy = token_logprobs_and_entropy(self.policy_train, ids, attn, cfg.sampling.temperature, s.first_target)
                logp, entropy = s.response_slice(logp), s.response_slice(entropy)
                pg_loss, pg_metrics = policy_loss(logp, e.old_logp, e.advantages, e.mask, cfg.clip_range)
                metrics.update(pg_metrics, entropy=masked_mean(entropy.detach(), e.mask))
                loss = loss + pg_loss
            yield loss, metrics

    def update(self, exp: Experience) -> dict:
        cfg = self.cfg
        train_policy = self.iteration > cfg.value_warmup_steps
        self.m.policy.train(), self.m.value.train()
        sums: dict[str, float] = {}
        count, first = 0, {}
        g = torch.Generator().manual_seed(cfg.seed * 7919 + self.iteration)
        minibatch = cfg.minibatch_size // self.world  # this process's share of a minibatch
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(len(exp.mask), generator=g)
            for j in range(0, len(order), minibatch):
                metrics = self.trainer.optimizer_step(self.minibatch_losses(exp[order[j : j + minibatch]], train_policy))
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
        """Proxy and (when known) gold reward of the current policy on held-out prompts."""
        tok = self.m.tokenizer
        ids, mask = left_pad(eval_ids, tok.pad_token_id)
        generator = torch.Generator(device=self.ctx.device).manual_seed(self.cfg.seed + 99)
        self.m.policy.eval()
        s = generate(self.m.policy, ids.to(self.ctx.device), mask.to(self.ctx.device), self.cfg.sampling, tok.eos_token_id, tok.pad_token_id, generator)
        out = {"eval_proxy_reward": float(self.raw_scores(s).mean() - self.score_offset)}
        if has_gold:
            texts = decode_responses(tok, s)
            out["eval_gold_reward"] = sum(synthetic.gold_reward(p, a, bool(e)) for p, a, e in zip(eval_prompts, texts, s.ended)) / len(texts)
        return out


def kl_curve_figure(history: dict[str, list[tuple[int, float]]], out_file: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, keys in zip(axes, (("ppo/kl", "ppo/kl_k3"), ("ppo/score", "ppo/eval_proxy_reward", "ppo/eval_gold_reward"))):
        for k in keys:
            if history.get(k):
                steps, values = zip(*history[k])
                ax.plot(steps, values, label=k, marker="." if len(steps) < 30 else None)
        ax.set_xlabel("PPO step")
        ax.legend()
    axes[0].set_ylabel("nats")
    fig.tight_layout()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_file, dpi=100)
    plt.close(fig)
    return out_file


def run(cfg: PPOConfig, model_cfg: ModelConfig, inputs: PolicyInputs, ctx: StageContext) -> dict:
    data_dir, sft_path, reward_path, has_gold = inputs.data_dir, inputs.sft_path, inputs.reward_path, inputs.has_gold
    resume = ctx.resume_point()
    models = PPOModels(cfg, model_cfg, sft_path, reward_path, resume, ctx.device)
    amp, max_length = models.amp, model_cfg.max_length
    tok = models.tokenizer
    max_prompt = max_length - cfg.sampling.max_new_tokens
    prompts = encode_prompts(tok, [r["prompt"] for r in load_rows(data_dir, "ppo_prompts", tok)], max_prompt)
    eval_prompts = [r["prompt"] for r in load_rows(data_dir, "eval_prompts", tok)][:EVAL_PROMPTS]
    eval_ids = encode_prompts(tok, eval_prompts, max_prompt)
    n_updates = cfg.steps * cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.minibatch_size)
    ppo = PPO(cfg, models, prompts, ctx, n_updates)
    if resume:
        ppo.load(resume)
    elif cfg.score_norm:
        with amp():
            ppo.score_offset = ppo.measure_score_offset()
    ctx.sink.log_metrics({"ppo/score_offset": ppo.score_offset}, ppo.iteration)

    progress = ctx.progress("ppo", cfg.steps, ppo.iteration)
    metrics: dict[str, float] = {}
    while ppo.iteration < cfg.steps:
        t0 = time.perf_counter()
        with amp():
            samples = ppo.rollout(models.policy, ppo.iteration)
            t1 = time.perf_counter()
            exp, stats = ppo.experience(samples)
            t2 = time.perf_counter()
        ppo.iteration += 1
        train = ppo.update(exp)
        t3 = time.perf_counter()
        ppo.kl_ctl.update(float(stats["kl"]), cfg.rollout_batch_size)
        gen_tokens, train_tokens = ctx.accelerator.reduce(torch.stack([exp.mask.sum(), samples.attention_mask.sum() * cfg.ppo_epochs]).float(), "sum").tolist()
        metrics = {f"ppo/{k}": float(v) for k, v in {**stats, **train}.items()}
        metrics.update({"ppo/gen_tokens_per_s": gen_tokens / (t1 - t0), "ppo/train_tokens_per_s": train_tokens / (t3 - t2),
                        "ppo/time_generation_s": t1 - t0, "ppo/time_scoring_s": t2 - t1, "ppo/time_update_s": t3 - t2})
        evaluating = ppo.iteration % cfg.eval_every == 0 or ppo.iteration == cfg.steps or ppo.iteration == 1
        if evaluating and ctx.accelerator.is_main_process:  # the one process that logs
            with amp():
                metrics.update({f"ppo/{k}": v for k, v in ppo.evaluate(eval_prompts, eval_ids, has_gold).items()})
        ctx.sink.log_metrics(metrics, ppo.iteration)
        progress.update(ppo.iteration, metrics, int(gen_tokens + train_tokens))
        for k in ("ppo/kl", "ppo/kl_k3", "ppo/score", "ppo/eval_proxy_reward", "ppo/eval_gold_reward"):
            if k in metrics:
                ppo.history.setdefault(k, []).append((ppo.iteration, metrics[k]))
        if ppo.iteration % cfg.checkpoint_every == 0 or ppo.iteration == cfg.steps:
            ppo.trainer.save(ppo.state())

    progress.close()
    if ctx.accelerator.is_main_process:
        kl_curve_figure(ppo.history, ctx.out_dir / "figures" / "kl_curve.png")
    ctx.save_final(models.policy, tok, {"stage": "ppo", "iterations": ppo.iteration})
    return {"model_path": str(ctx.final_dir), "metrics": {k: v for k, v in metrics.items() if not k.startswith("ppo/time")}, "steps": ppo.iteration}


ALGORITHM = Algorithm("ppo", PPOConfig, run, needs_reward=True, code=("rlhf.rollout", "rlhf.advantages", "rlhf.kl_control", "rlhf.synthetic"))
