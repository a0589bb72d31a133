"""Watching a stage train: a bar on a terminal, periodic log lines anywhere else.

On a terminal (``runtime.progress=auto`` and stdout and stderr are TTYs, or ``bar``) each training stage
draws a tqdm bar: step / total, the loss (or PPO's score and KL), tokens/s, elapsed and ETA. Anywhere
else (CI, a work pool's worker, a redirected stdout) the same facts go to the ``rlhf.progress`` logger at
the first step, at least every ``runtime.progress_every_s`` seconds and at the last step; inside a
Prefect run those records also reach the flow run's logs (``PREFECT_LOGGING_EXTRA_LOGGERS=rlhf``).
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from dataclasses import dataclass

log = logging.getLogger("rlhf.progress")

# The metrics a line shows, in this order, where a stage logs them (names without the stage prefix).
SHOWN = ("loss", "accuracy", "score", "kl", "reward", "eval_gold_reward")


@dataclass(frozen=True)
class ProgressSettings:
    mode: str = "off"  # auto | bar | log | off (runtime.progress)
    every_s: float = 5.0  # seconds between log lines (runtime.progress_every_s)

    def uses_bar(self) -> bool:
        return self.mode == "bar" or (self.mode == "auto" and sys.stdout.isatty() and sys.stderr.isatty())


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Progress of one stage over ``total`` steps, resumed at ``start``."""

    def __init__(self, name: str, total: int, settings: ProgressSettings, start: int = 0) -> None:
        self.name, self.total, self.settings = name, total, settings
        self.start_step, self.step, self.tokens = start, start, 0
        self.started = self.last_line = time.monotonic()
        self.bar = None
        if settings.mode != "off" and settings.uses_bar():
            from tqdm import tqdm

            size = shutil.get_terminal_size((100, 24))  # a terminal that reports no size (0 x 0) would hide the bar
            self.bar = tqdm(
                total=total,
                initial=start,
                desc=name,
                unit="step",
                ncols=size.columns,
                nrows=size.lines,
                file=sys.stderr,
            )

    def rates(self) -> tuple[float, float, float]:
        """Tokens/s, elapsed seconds and the ETA of the remaining steps at this session's pace."""
        elapsed = time.monotonic() - self.started
        done = self.step - self.start_step
        eta = elapsed / done * (self.total - self.step) if done else float("nan")
        return self.tokens / max(elapsed, 1e-9), elapsed, eta

    def update(self, step: int, metrics: dict[str, float], tokens: int = 0) -> None:
        """Step ``step`` is done; ``metrics`` are its values (names with or without the stage prefix)."""
        if self.settings.mode == "off":
            return
        self.step, self.tokens = step, self.tokens + tokens
        values = {k.rsplit("/", 1)[-1]: float(v) for k, v in metrics.items()}
        shown = {k: values[k] for k in SHOWN if k in values}
        tokens_per_s, elapsed, eta = self.rates()
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(
                {**{k: f"{v:.4g}" for k, v in shown.items()}, "tok/s": f"{tokens_per_s:,.0f}"}, refresh=False
            )
            return
        now = time.monotonic()
        if step == self.start_step + 1 or step >= self.total or now - self.last_line >= self.settings.every_s:
            self.last_line = now
            parts = [f"{self.name} step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)"]
            parts += [f"{k} {v:.4g}" for k, v in shown.items()]
            if self.tokens:
                parts.append(f"{tokens_per_s:,.0f} tok/s")
            parts.append(f"elapsed {_clock(elapsed)} eta {_clock(eta) if eta == eta else '?'}")
            log.info("  ".join(parts))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
