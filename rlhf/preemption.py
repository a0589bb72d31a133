"""Stop signals during a training stage: finish the step, checkpoint, stop; a second signal stops at once.

Kubernetes, Slurm and spot reclaims stop a job with SIGTERM and a grace period (30 s by default on
Kubernetes); Ctrl-C sends SIGINT. While :class:`StopSignals` is active (a training stage's body), the first
of either only sets a flag: the training loop sees it at the end of its current step
(:meth:`rlhf.trainer.Trainer.stop_if_requested`), writes a checkpoint and raises :class:`Preempted`, and
the next run resumes at that step. A second signal restores the default action and re-sends itself: the
process ends at once (a run left RUNNING is marked KILLED by the next run on the host).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_active: StopSignals | None = None


class Preempted(RuntimeError):
    """A training stage stopped on a signal with its last step checkpointed; running it again resumes there."""

    def __init__(self, stage: str, signum: int, step: int) -> None:
        self.stage, self.signum, self.step = stage, signum, step
        super().__init__(
            f"{stage}: stopped by {signal.Signals(signum).name} after step {step}; its checkpoint is written. "
            f"Fix: nothing to fix; run the same command again to resume at step {step}."
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for a process ended by a signal


class StopSignals:
    """While active (``with StopSignals():``, main thread only), SIGTERM and SIGINT ask training to stop after its
    step. ``on_first(signum)`` runs on the first signal too (a launcher forwards it to its processes)."""

    def __init__(self, on_first: Callable[[int], None] | None = None) -> None:
        self.on_first = on_first
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is not None:  # the second signal: stop now
            for s in SIGNALS:
                signal.signal(s, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        if self.on_first is not None:
            self.on_first(signum)

    def __enter__(self) -> StopSignals:
        global _active
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
            _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        if _active is self:
            _active = None


def requested() -> int | None:
    """The signal that asked this process to stop, or None."""
    return _active.signum if _active is not None else None
