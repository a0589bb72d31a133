"""The one training-loop skeleton every stage shares.

:class:`Trainer` owns what is the same in SFT, reward modelling, DPO and PPO: AdamW and its schedule,
gradient accumulation and clipping, the non-finite-loss guard, metric windows (averaged between logs,
the first step always logged), throughput, and resumable atomic checkpoints. A stage supplies the loss
of a micro-batch; :func:`fit` runs the supervised epochs loop (SFT, reward, DPO) on top of it, and PPO
drives :meth:`Trainer.optimizer_step` from its own rollout loop.

Data parallelism: under ``accelerate launch`` each process trains on its share of every batch, gradients are
averaged in the last micro-batch's backward and metrics over the processes. Under ``runtime.strategy=ddp`` each
process trains a DDP copy (:meth:`Trainer.wrap`) and the main process alone writes checkpoints; under ``fsdp`` the
trainer shards its models (:mod:`rlhf.sharding`) and every process writes its shards of each checkpoint.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator

from . import checkpoint, preemption
from .config_training import OptimConfig, SupervisedConfig
from .progress import Progress, ProgressSettings
from .sharding import Sharding, full_tensor


class NonFiniteLossError(RuntimeError):
    """A loss or gradient became NaN/inf; the message names the stage and the step."""


class MetricSink(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def flush(self) -> None: ...


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at a step: linear warm-up, then cosine / linear / constant."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return f


def adamw(groups: list[dict], cfg) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one kernel over all parameters) where the parameters' device and dtype
    allow it. On CPU, PyTorch's default is a loop over the parameter tensors (its foreach kernels are for
    accelerators); on the 2-core CPU default the fused kernel made a PPO iteration 1.2x faster
    (benchmarks/results/throughput_cpu.md)."""
    kwargs = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95), eps=1e-8)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, **kwargs)


class Trainer:
    """Optimiser, schedule, accumulation, clipping, logging and checkpoints for a set of models.

    ``models`` maps a name (``policy``, ``reward``, ``value``) to a trainable module; all of them are
    saved in each checkpoint as HF folders. ``param_groups`` lets PPO give the value model its own lr.
    ``accelerator``: the stage's (:func:`rlhf.runtime.accelerator`), one process or a DDP launch.
    """

    def __init__(
        self,
        models: dict[str, torch.nn.Module],
        tokenizer,
        cfg: OptimConfig,
        total_steps: int,
        prefix: str,
        sink: MetricSink,
        ckpt_dir: Path,
        param_groups: list[dict] | None = None,
        amp: Callable[[], ContextManager] = contextlib.nullcontext,
        *,
        accelerator: Accelerator,
        sharding: Sharding | None = None,
    ) -> None:
        self.models, self.tokenizer, self.cfg, self.amp = models, tokenizer, cfg, amp
        self.accelerator, self.sharding = accelerator, sharding or Sharding()
        self._synced: list[torch.nn.Module] = []  # the DDP wrappers whose gradients are averaged
        self.total_steps, self.prefix, self.sink, self.ckpt_dir = total_steps, prefix, sink, Path(ckpt_dir)
        groups = self._sharded(param_groups or [{"params": [p for m in models.values() for p in m.parameters()]}])
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = adamw(groups, cfg)
        warmup = int(cfg.warmup_ratio * total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.schedule, warmup, total_steps))
        self.step = 0
        self.progress = Progress(
            prefix, total_steps, ProgressSettings("off")
        )  # a stage sets its own (StageContext.progress)
        self._window: dict[str, list[float]] = defaultdict(list)
        self._tokens, self._window_start = 0, time.perf_counter()
        self.tokens_trained = (
            0  # every process's training tokens so far (kept in checkpoints): the stage's compute, in tokens
        )

    def _sharded(self, groups: list[dict]) -> list[dict]:
        """Shard the models (FSDP: each parameter is replaced by its shard, under the same name) and return
        ``groups`` with the parameters the optimizer must hold now."""
        names = {id(p): (n, fqn) for n, m in self.models.items() for fqn, p in m.named_parameters()}
        for model in self.models.values():
            self.sharding.shard(model, self.accelerator.device)  # where the stage has not (StageContext.placed)
        now = {(n, fqn): p for n, m in self.models.items() for fqn, p in m.named_parameters()}
        return [{**g, "params": [now[names[id(p)]] if id(p) in names else p for p in g["params"]]} for g in groups]

    # ---- data parallelism ------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module to run training forwards through: a DDP wrapper under ``accelerate launch``, else ``module``.
        Its parameters are the trainer's, so saving ``models`` saves what it trained. Under FSDP, ``module``: the
        sharded models' hooks reduce the gradients."""
        if self.sharding.fsdp:
            return module
        wrapped = self.accelerator.prepare_model(module, device_placement=False)
        self._synced.append(wrapped)
        return wrapped

    def average(self, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The processes' mean of each scalar metric, in one all-reduce (the metrics themselves in one process)."""
        if self.world == 1:
            return metrics
        names = list(metrics)
        device = self.accelerator.device
        mean = self.accelerator.reduce(
            torch.stack([torch.as_tensor(metrics[k], device=device).float() for k in names]), "mean"
        )
        return dict(zip(names, mean))

    def _no_sync(self) -> ContextManager:
        """Skip DDP's gradient all-reduce (accumulate locally) in every micro-batch but the last. FSDP reduce-scatters
        every micro-batch's gradients instead: its shards accumulate, and no process holds whole gradients."""
        stack = contextlib.ExitStack()
        for module in self._synced:
            stack.enter_context(self.accelerator.no_sync(module))
        return stack

    # ---- optimisation ---------------------------------------------------------------------------
    def optimizer_step(self, micro_losses: Iterable[tuple[torch.Tensor, dict]], n_micro: int | None = None) -> dict:
        """Backward each micro-batch loss (scaled by 1/n), clip, step. Returns the step's metrics.

        ``micro_losses`` yields (loss, metrics) lazily so each micro-batch's graph is freed before the
        next forward. With several processes, each passes its own ``n_micro`` micro-batches (the same count
        everywhere) and the returned metrics are the processes' mean.
        """
        n_micro = n_micro or self.cfg.grad_accum
        totals: dict[str, torch.Tensor] = {}
        loss_sum = 0.0
        micro_losses = iter(micro_losses)
        for i in itertools.count():
            with self._no_sync() if i < n_micro - 1 else contextlib.nullcontext():
                with self.amp():  # forwards under autocast (mixed precision); backward outside it
                    item = next(micro_losses, None)
                if item is None:
                    break
                loss, metrics = item
                (loss / n_micro).backward()
            loss_sum = loss_sum + loss.detach()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + torch.as_tensor(v).detach().float() / n_micro
        totals = self.average({**totals, "_loss_sum": loss_sum})  # every process sees (and checks) the same numbers
        loss_sum = totals.pop("_loss_sum")
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        if not (torch.isfinite(loss_sum) and torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"{self.prefix}: non-finite loss ({float(loss_sum):.4g}) or gradient norm ({float(grad_norm):.4g}) at "
                f"step "
                f"{self.step + 1}. Nothing was applied; the last checkpoint in {self.ckpt_dir} is intact. "
                f"Fix: lower {self.prefix}'s lr or check the data; re-running resumes from that checkpoint."
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        totals["grad_norm"] = grad_norm.detach()
        totals["lr"] = torch.tensor(self.scheduler.get_last_lr()[0])
        return totals

    # ---- metrics --------------------------------------------------------------------------------
    def record(self, metrics: dict, tokens: int = 0) -> None:
        """Add a step's metrics to the window; log the window's mean on the first and every log_every-th step."""
        if self.world > 1:
            tokens = int(self.accelerator.reduce(torch.tensor(float(tokens), device=self.accelerator.device), "sum"))
        for k, v in metrics.items():
            self._window[k].append(float(v))
        self._tokens += tokens
        self.tokens_trained += tokens
        self.progress.update(self.step, metrics, tokens)
        if self.step == 1 or self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
            self.flush()

    def flush(self) -> dict:
        if not self._window:
            return {}
        elapsed = time.perf_counter() - self._window_start
        out = {f"{self.prefix}/{k}": sum(v) / len(v) for k, v in self._window.items()}
        if self._tokens:
            out[f"{self.prefix}/tokens_per_s"] = self._tokens / max(elapsed, 1e-9)
        self.sink.log_metrics(out, self.step)
        self._window.clear()
        self._tokens, self._window_start = 0, time.perf_counter()
        return out

    def log(self, metrics: dict) -> None:
        """Log metrics (already named without prefix) at the current step, outside the window."""
        self.sink.log_metrics({f"{self.prefix}/{k}": float(v) for k, v in metrics.items()}, self.step)

    # ---- checkpoints ----------------------------------------------------------------------------
    def due(self, every: int) -> bool:
        return self.step % every == 0 or self.step == self.total_steps

    def save(self, extra_state: dict | None = None) -> Path:
        """Checkpoint (the main process writes it; DDP keeps every copy identical) with every process's random state;
        every process waits for it. Under FSDP every process writes its shards and its random state."""
        if self.sharding.fsdp:
            self.sink.flush()
            state = {"scheduler": self.scheduler.state_dict(), "extra": extra_state or {}}
            state["tokens_trained"] = self.tokens_trained
            models = torch.nn.ModuleDict(self.models)
            return checkpoint.save_sharded(
                self.ckpt_dir, self.step, models, self.optimizer, state, checkpoint.rng_state()
            )
        rng = [checkpoint.rng_state()]
        if self.world > 1:
            from accelerate.utils import gather_object

            rng = gather_object(rng)  # rank order
        if self.accelerator.is_main_process:
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "extra": extra_state or {},
                "tokens_trained": self.tokens_trained,
                "rng": rng,
            }
            self.sink.flush()  # metrics up to a checkpoint are never lost with the process
            checkpoint.save(self.ckpt_dir, self.step, self.models, self.tokenizer, state)
        self.accelerator.wait_for_everyone()
        return checkpoint.step_dir(self.ckpt_dir, self.step)

    def stop_if_requested(
        self, extra_state: Callable[[], dict] | None = None, saved: bool = False, at: str = ""
    ) -> None:
        """At the end of a step: if a stop signal came (:mod:`rlhf.preemption`; in any process, so all stop at the same
        step), log the metrics of the steps since the last log, checkpoint (unless this step just ``saved``) and raise
        :class:`~rlhf.preemption.Preempted` naming where (``at``, else the step). ``extra_state``: what the stage adds
        to its checkpoints. After the last step nothing is raised: the stage finishes, and the pipeline stops after
        it."""
        signum = preemption.requested() or 0
        if self.world > 1:
            signum = int(self.accelerator.reduce(torch.tensor(signum, device=self.accelerator.device), "max"))
        if not signum or self.step >= self.total_steps:
            return
        self.flush()
        if not saved:
            self.save(extra_state() if extra_state else None)
        self.progress.close()
        raise preemption.Preempted(self.prefix, signum, at or f"step {self.step}")

    def load(self, ckpt: Path) -> dict:
        """Restore optimizer, schedule, RNG and step from a checkpoint (weights are loaded by the stage; under FSDP
        here, from the shards, on any number of processes)."""
        state = checkpoint.load_trainer_state(ckpt)
        if self.sharding.fsdp:
            rng = checkpoint.load_sharded(ckpt, torch.nn.ModuleDict(self.models), self.optimizer)
        else:
            if "optimizer" not in state:
                raise checkpoint.CheckpointError(
                    f"{ckpt} is a sharded checkpoint (runtime.strategy=fsdp wrote it) and this stage runs under ddp. "
                    f"Fix: resume with runtime.strategy=fsdp, or pass refresh=[<stage>] to train the stage afresh."
                )
            self.optimizer.load_state_dict(state["optimizer"])
            saved = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # per process (older: one)
            rng = saved[self.rank] if self.rank < len(saved) else None
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.tokens_trained = state["step"], state.get("tokens_trained", 0)
        if rng is not None:
            checkpoint.set_rng_state(rng)
        else:  # resumed on more processes than saved: a fresh stream of its own, the same on every resume
            from .runtime import seed_all

            seed_all((self.cfg.seed * 1_000_003 + self.step) * 1_009 + self.rank)
        return state["extra"]


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of epoch ``epoch``: a pure function of (seed, epoch), so a resumed run sees the same data."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def steps_for(n_examples: int, cfg: SupervisedConfig) -> int:
    return max(1, math.ceil(cfg.epochs * n_examples / cfg.batch_size))


def _micro_losses(
    micro_loss: Callable, batch: torch.Tensor, micro: int, tokens: list[int]
) -> Iterable[tuple[torch.Tensor, dict]]:
    """(loss, metrics) of each micro-batch of ``batch``, lazily (one graph at a time), adding their tokens to
    ``tokens[0]``."""
    for i in range(0, len(batch), micro):
        loss, metrics, n_tok = micro_loss(batch[i : i + micro])
        tokens[0] += n_tok
        yield loss, metrics


def fit(
    trainer: Trainer,
    n_examples: int,
    micro_loss: Callable[[torch.Tensor], tuple[torch.Tensor, dict, int]],
    evaluate: Callable[[], dict] | None = None,
) -> None:
    """Supervised loop: shuffled epochs of batches, each split into ``grad_accum`` micro-batches.

    ``micro_loss(indices) -> (loss, metrics, n_tokens)``; under data parallelism each process gets every
    ``world``-th example of the batch, so the processes together see exactly one process's batch. Starts at
    ``trainer.step`` (0, or the resumed
    step) and stops at ``trainer.total_steps``; evaluates every ``eval_every`` steps and at the end;
    checkpoints every ``checkpoint_every`` steps and at the end.
    """
    cfg = trainer.cfg
    steps_per_epoch = max(1, n_examples // cfg.batch_size)
    micro = cfg.batch_size // (cfg.grad_accum * trainer.world)
    while trainer.step < trainer.total_steps:
        epoch, offset = divmod(trainer.step, steps_per_epoch)
        order = epoch_order(n_examples, cfg.seed, epoch)
        batch = order[offset * cfg.batch_size : (offset + 1) * cfg.batch_size]
        batch = batch[: len(batch) - len(batch) % trainer.world][
            trainer.rank :: trainer.world
        ]  # this process's equal share
        tokens = [0]  # the micro-batches' real tokens, counted as the optimizer step draws them
        metrics = trainer.optimizer_step(
            _micro_losses(micro_loss, batch, micro, tokens), n_micro=math.ceil(len(batch) / micro)
        )
        trainer.record(metrics, tokens[0])
        if evaluate is not None and trainer.due(cfg.eval_every):
            trainer.log(evaluate())
        saved = trainer.due(cfg.checkpoint_every)
        if saved:
            trainer.save()
        trainer.stop_if_requested(saved=saved)
    trainer.progress.close()
