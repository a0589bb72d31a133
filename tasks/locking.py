"""A file lock manager that survives ``kill -9``.

Prefect's ``FileSystemLockManager`` takes a stage's lock with no expiry and records only an opaque
holder id, so a process killed while training leaves the lock behind and the next run waits for it
forever. This subclass also records the holder's host and PID, and treats a lock whose process no
longer exists on this host as released.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from prefect.locking.filesystem import FileSystemLockManager


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ProcessFileLockManager(FileSystemLockManager):
    def acquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        acquired = super().acquire_lock(key, holder, acquire_timeout, hold_timeout)
        if acquired:
            path = self._lock_path_for_key(key)
            info = json.loads(Path(path).read_bytes())
            Path(path).write_text(json.dumps({**info, "pid": os.getpid(), "host": socket.gethostname()}))
        return acquired

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        if not super().is_locked(key, use_cache=use_cache):
            return False
        path = Path(self._lock_path_for_key(key))
        try:
            info = json.loads(path.read_bytes())
        except (FileNotFoundError, ValueError):  # released, or being written right now
            return path.exists()
        if info.get("host") == socket.gethostname() and "pid" in info and not _alive(int(info["pid"])):
            path.unlink(missing_ok=True)  # the holder died without releasing (kill -9, OOM)
            self._locks.pop(key, None)
            return False
        return True
