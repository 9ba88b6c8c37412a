"""Ownership of the state directory: one `iseg run` (or one standalone role that binds sockets
or writes state) per state dir.

The owner holds an exclusive `flock` on `<state_dir>/iseg.lock`, which names its pid.
A second instance fails before it touches any socket or file of the first: "state dir
in use by pid N". Roles started by `iseg run` inherit the supervisor's lock (the open
file is passed to them, its number in ISEG_STATE_LOCK_FD), so they run under it; a role
started by hand on a state dir that `iseg run` owns is refused. The kernel drops the
lock when its holders die, so a crashed daemon never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "iseg.lock"
ENV_FD = "ISEG_STATE_LOCK_FD"


_held: dict[Path, int] = {}


class StateDirInUse(Exception):
    """Another live process owns the state directory."""


def _inherited(path: Path) -> int | None:
    """The lock fd handed down by our supervisor, if it really is this state dir's held lock."""
    value = os.environ.get(ENV_FD, "")
    if not value.isdigit():
        return None
    fd = int(value)
    try:
        held, wanted = os.fstat(fd), os.stat(path)
        if (held.st_dev, held.st_ino) != (wanted.st_dev, wanted.st_ino):
            return None
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the same open file: succeeds only if it holds the lock
    except OSError:
        return None
    return fd


def acquire(state_dir: Path) -> int:
    """Hold the state dir's lock (or the inherited one); returns its fd. StateDirInUse when another
    process holds it; nothing else in the state dir is touched before this succeeds."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = (state_dir / LOCK_NAME).resolve()
    if path in _held:
        return _held[path]
    if path.exists():
        fd = _inherited(path)
        if fd is not None:
            _held[path] = fd
            return fd
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateDirInUse(f"state dir {state_dir} in use by pid {owner} (another iseg run or role); "
                            "stop it first or give this config its own state_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[path] = fd
    return fd
