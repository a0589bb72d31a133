"""Stop signals during a training stage: finish the step, checkpoint, stop; a second signal stops at once.

Kubernetes, Slurm and spot reclaims stop a job with SIGTERM and a grace period (30 s by default on Kubernetes);
Ctrl-C sends SIGINT. While :class:`StopSignals` is active (a training stage's body), the first of either only
records the request: the training loop sees it at the end of its current step
(:meth:`rlhf.trainer.Trainer.stop_if_requested`), writes a checkpoint and raises :class:`Preempted`, and the next
run resumes at that step. A request that comes after the loop's last check lets the stage finish and stops the
pipeline after it (the stage is then Cached). A second signal restores the default action and re-sends itself:
the process ends at once, and with it (``on_second``) whatever it started.

A data-parallel stage's processes are told through a stop file the launching process writes (``stop_file``), not
by signals, which the launcher (torch elastic) would meet with a kill after its own short timeout; a signal that
reaches them directly (Slurm, a cgroup kill) asks the same, however often it comes.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_active: StopSignals | None = None
_pending: Preempted | None = None  # a stop asked for after a stage's last check: the pipeline stops after that stage


class Preempted(RuntimeError):
    """A training stage stopped on a signal with its last step checkpointed (``at``: where it stopped, e.g.
    "iteration 37"; None: after the stage finished); running it again resumes there."""

    def __init__(self, stage: str, signum: int, at: str | None) -> None:
        self.stage, self.signum, self.at = stage, signum, at
        where = f"after {at}; its checkpoint is written" if at else "after the stage finished"
        super().__init__(
            f"{stage}: stopped by {signal.Signals(signum).name} {where}. Fix: nothing to fix; run the same command "
            f"again to {'resume at ' + at if at else 'go on with the next stage'}."
        )

    def __reduce__(self):  # picklable (Prefect may store it with the failed state)
        return (Preempted, (self.stage, self.signum, self.at))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for a process ended by a signal


class StopSignals:
    """While active (``with StopSignals():``, main thread only), SIGTERM and SIGINT ask training to stop after its
    step. ``on_first(signum)`` runs on the first signal (a launcher tells its processes), ``on_second(signum)`` on a
    second one before the process ends (a launcher kills its processes); ``once=True`` (a launched process) treats
    every signal as the first. ``stop_file``: a file whose appearance asks the same (holding the signal's number)."""

    def __init__(
        self,
        on_first: Callable[[int], None] | None = None,
        on_second: Callable[[int], None] | None = None,
        once: bool = False,
        stop_file: Path | None = None,
    ) -> None:
        self.on_first, self.on_second, self.once, self.stop_file = on_first, on_second, once, stop_file
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is not None and not self.once:  # the second signal: stop now
            if self.on_second is not None:
                self.on_second(signum)
            for s in SIGNALS:
                signal.signal(s, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        first = self.signum is None
        self.signum = signum
        if first and self.on_first is not None:
            self.on_first(signum)

    def requested(self) -> int | None:
        if self.signum is None and self.stop_file is not None and self.stop_file.exists():
            self.signum = int(self.stop_file.read_text().strip() or signal.SIGTERM)
        return self.signum

    def __enter__(self) -> StopSignals:
        global _active
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)  # None: a handler set from C
        if _active is self:
            _active = None


def requested() -> int | None:
    """The signal that asked this process to stop, or None."""
    return _active.requested() if _active is not None else None


def stop_after(stage: str, signum: int) -> None:
    """A stop came after the stage's training loop had ended: the stage finishes, then the pipeline stops."""
    global _pending
    _pending = Preempted(stage, signum, None)


def pending() -> Preempted | None:
    """The stop left by :func:`stop_after`, once."""
    global _pending
    stop, _pending = _pending, None
    return stop


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process it started (the launcher's workers run in sessions of their own)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when the one that started it dies (Linux; elsewhere nothing): a
    launcher and its workers never outlive a pipeline killed with SIGKILL (a lost machine, the OOM killer), so
    a rerun never trains beside them. A stop signal still reaches them through the stop file."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


PR_SET_PDEATHSIG = 1
# loaded here, not in die_with_parent: that runs between fork and exec (preexec_fn), where loading a library may
# deadlock on a lock another thread of the parent held
_LIBC = (
    __import__("ctypes").CDLL("libc.so.6", use_errno=True) if __import__("sys").platform.startswith("linux") else None
)
