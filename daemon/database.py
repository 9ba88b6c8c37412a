"""Opening the daemon's SQLite files so that a corrupt one never stops a role.

A file SQLite cannot read as a database (garbage, a truncated copy, a failed
`quick_check`) is renamed aside with a timestamp (`alerts.sqlite3.corrupt-20260102T030405`,
with its -wal/-shm files) and a fresh one is started, with one log line saying where the
old file went. Errors that are not corruption (a locked file, a full disk, a missing
permission) are raised unchanged: moving a healthy database aside would lose it.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Callable

CORRUPT_CODES = ("SQLITE_CORRUPT", "SQLITE_NOTADB")


def is_corrupt(err: sqlite3.Error) -> bool:
    """True for SQLite's "malformed" / "not a database" errors (not for locked, full or read-only)."""
    name = getattr(err, "sqlite_errorname", None)
    if name:
        return name.startswith(CORRUPT_CODES)
    return type(err) is sqlite3.DatabaseError


def move_aside(path: Path) -> Path:
    """Rename a database (and its -wal and -shm files) to `<name>.corrupt-<UTC time>`; returns the new path."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.rename(side, target.with_name(target.name + suffix))
    if path.exists():
        os.rename(path, target)
    return target


def open_database(path: Path, setup: Callable[[sqlite3.Connection], None], log: logging.Logger,
                  repair: bool = True) -> sqlite3.Connection:
    """Connect, run `setup` (pragmas, tables) and a quick_check; a corrupt file is moved aside and a
    fresh one set up when `repair` (roles), raised when not (read-only tools like `iseg review`)."""
    try:
        return _open(path, setup)
    except sqlite3.DatabaseError as err:
        if not repair or not is_corrupt(err):
            raise
        moved = move_aside(path)
        log.error("%s is corrupt (%s); moved it to %s and started a fresh one", path, err, moved.name)
        return _open(path, setup)


def _open(path: Path, setup: Callable[[sqlite3.Connection], None]) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), timeout=10.0)
    try:
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {check}")
        setup(db)
    except BaseException:
        db.close()
        raise
    return db
