"""Where delivery state lives: the alert store read by id, and one cursor per sink.

The publisher's alert store is the outbox: every alert is committed there before it
is published, with an increasing id. A sink never reads the PUB socket; it reads
`id > cursor` from the store on its own read-only connection and moves its cursor
only after the receiver acknowledged (or the alert was dead-lettered), so a crash or
restart resends at most the alert in hand — at-least-once, in id order.

On a host without the alert store (a split host with its own state directory) the same
reads go through the publisher's replay socket, which answers from the store by id.

`sinks.sqlite3` (in the sinks role's state directory) holds per sink: the cursor, how many alerts
were delivered (the Modbus counter is derived from it, so a resend writes the same
value), a generation bumped by `iseg sinks resend` so a running role notices the
rewind, the last error and state for `iseg sinks status`; the dead letters (kept until
resent); and the daemon's instance id, half of every idempotency key.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from daemon.database import open_database

ALERTS_FILE = "alerts.sqlite3"
SINKS_FILE = "sinks.sqlite3"


class AlertReader:
    """Read-only view of the alert store; never writes, never blocks the publisher.

    A store the publisher moved aside (corrupt) and restarted is a new file: the reader
    notices the changed inode and reopens. An unreadable store reads as empty for now
    (`error` says why); the cursor stays where it is, so nothing is skipped.
    """

    def __init__(self, state_path: Path) -> None:
        self.path = state_path / ALERTS_FILE
        self.db: sqlite3.Connection | None = None
        self.inode: int | None = None
        self.error = ""

    def _connect(self) -> sqlite3.Connection | None:
        try:
            inode = os.stat(self.path).st_ino
        except OSError:
            self.close()
            return None
        if self.db is not None and inode != self.inode:
            self.close()
        if self.db is None:
            try:
                db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10.0)
                db.execute("SELECT 1 FROM alerts LIMIT 1")
            except sqlite3.Error as err:
                self.error = f"alert store {self.path}: {err}"
                return None
            self.db, self.inode, self.error = db, inode, ""
        return self.db

    def _query(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        db = self._connect()
        if db is None:
            return []
        try:
            return db.execute(sql, args).fetchall()
        except sqlite3.Error as err:
            self.error = f"alert store {self.path}: {err}"
            self.close()
            return []

    def after(self, alert_id: int, limit: int = 100) -> list[dict[str, Any]]:
        """Stored alerts with id > alert_id, oldest first ([] while the store does not exist yet)."""
        out = []
        for row_id, body in self._query("SELECT id, body FROM alerts WHERE id > ? ORDER BY id LIMIT ?", (alert_id, limit)):
            try:
                alert = json.loads(body) if body else {}
            except ValueError:
                alert = {"body_error": "stored body is not JSON"}
            alert["id"] = int(row_id)
            out.append(alert)
        return out

    def last_id(self) -> int:
        """Highest stored alert id (0 when none or no store yet)."""
        rows = self._query("SELECT COALESCE(MAX(id), 0) FROM alerts", ())
        return int(rows[0][0]) if rows else 0

    def close(self) -> None:
        """Close the connection."""
        if self.db is not None:
            self.db.close()
            self.db = None


class ReplayReader:
    """The same view through the publisher's replay socket, for a sinks role on another host.

    Answers come from the publisher's alert store by id, like the local reader's; no answer
    within `timeout_s` (publisher down) reads as empty for now and the socket is renewed.
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, timeout_s: float = 2.0) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.sock: zmq.Socket | None = None
        self.error = ""

    def _ask(self, since: int, limit: int) -> dict[str, Any] | None:
        if self.sock is None:
            self.sock = self.ctx.socket(zmq.REQ)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.connect(self.endpoint)
        self.sock.send(json.dumps({"since": since, "limit": limit}).encode())
        if not self.sock.poll(int(self.timeout_s * 1000)):
            self.error = f"no answer from the publisher's replay socket {self.endpoint} within {self.timeout_s:g}s"
            self.close()
            return None
        try:
            answer = json.loads(self.sock.recv())
        except ValueError:
            answer = {"ok": False, "error": "answer is not JSON"}
        if not isinstance(answer, dict) or not answer.get("ok"):
            self.error = f"replay socket {self.endpoint}: {answer.get('error') if isinstance(answer, dict) else answer}"
            return None
        self.error = ""
        return answer

    def after(self, alert_id: int, limit: int = 100) -> list[dict[str, Any]]:
        """Stored alerts with id > alert_id, oldest first ([] when the publisher does not answer)."""
        answer = self._ask(alert_id, limit)
        return [a for a in answer.get("alerts", []) if isinstance(a, dict) and isinstance(a.get("id"), int)] \
            if answer else []

    def last_id(self) -> int:
        """Highest stored alert id the publisher reports (0 when it does not answer)."""
        answer = self._ask(0, 1)
        return int(answer.get("last_id", 0)) if answer else 0

    def close(self) -> None:
        """Close the socket."""
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None


class AlertSource:
    """The local alert store, or the publisher's replay socket on a split host.

    A split host reaches the publisher over tcp://; with an ipc:// replay endpoint the
    publisher runs on this host and its store is local (a store not created yet reads as
    empty). So: tcp:// and no local store → replay socket; otherwise the local file.
    """

    def __init__(self, state_path: Path, ctx: zmq.Context | None = None, replay_endpoint: str | None = None) -> None:
        self.local = AlertReader(state_path)
        remote = ctx is not None and bool(replay_endpoint) and str(replay_endpoint).startswith("tcp://")
        self.remote = ReplayReader(ctx, str(replay_endpoint)) if remote else None

    def _reader(self) -> AlertReader | ReplayReader:
        return self.remote if self.remote is not None and not self.local.path.exists() else self.local

    @property
    def remote_now(self) -> bool:
        """True while reads go to the publisher's replay socket."""
        return self._reader() is self.remote

    @property
    def error(self) -> str:
        """Why the last read came back empty, if it failed."""
        return self._reader().error

    def after(self, alert_id: int, limit: int = 100) -> list[dict[str, Any]]:
        """Stored alerts with id > alert_id, oldest first."""
        return self._reader().after(alert_id, limit)

    def last_id(self) -> int:
        """Highest stored alert id."""
        return self._reader().last_id()

    def close(self) -> None:
        """Close both."""
        self.local.close()
        if self.remote is not None:
            self.remote.close()


@dataclass
class Cursor:
    """A sink's position: alerts up to `alert_id` are done; `delivered` counts acknowledged alerts."""

    alert_id: int
    delivered: int
    generation: int


class CursorStore:
    """sinks.sqlite3: cursors, dead letters and the instance id. One connection per thread."""

    def __init__(self, state_path: Path) -> None:
        state_path.mkdir(parents=True, exist_ok=True)
        self.db = open_database(state_path / SINKS_FILE, self._setup, logging.getLogger("iseg.sinks"))

    @staticmethod
    def _setup(db: sqlite3.Connection) -> None:
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a power cut may roll back the last cursor moves, which resends
        # (at-least-once), never skips.
        db.execute("PRAGMA synchronous=NORMAL")
        with db:
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute("CREATE TABLE IF NOT EXISTS cursors (sink TEXT PRIMARY KEY, alert_id INTEGER NOT NULL, "
                       "delivered INTEGER NOT NULL DEFAULT 0, generation INTEGER NOT NULL DEFAULT 0, "
                       "state TEXT NOT NULL DEFAULT '', last_error TEXT NOT NULL DEFAULT '', "
                       "last_error_ts REAL, updated_ts REAL)")
            db.execute("CREATE TABLE IF NOT EXISTS dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                       "sink TEXT NOT NULL, alert_id INTEGER NOT NULL, ts REAL NOT NULL, error TEXT NOT NULL, "
                       "resolved_ts REAL)")
            db.execute("CREATE INDEX IF NOT EXISTS dead_by_sink ON dead_letters (sink, alert_id)")
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('instance', ?)", (uuid.uuid4().hex,))

    def instance_id(self) -> str:
        """This state directory's daemon instance id (stable across restarts)."""
        return str(self.db.execute("SELECT value FROM meta WHERE key = 'instance'").fetchone()[0])

    def cursor(self, sink: str, start_at: int | None = None) -> Cursor:
        """The sink's cursor; a sink seen for the first time starts at `start_at` (the store's last id)."""
        row = self.db.execute("SELECT alert_id, delivered, generation FROM cursors WHERE sink = ?", (sink,)).fetchone()
        if row is None:
            if start_at is None:
                raise KeyError(sink)
            with self.db:
                self.db.execute("INSERT OR IGNORE INTO cursors (sink, alert_id, updated_ts) VALUES (?, ?, ?)",
                                (sink, start_at, time.time()))
            return self.cursor(sink)
        return Cursor(int(row[0]), int(row[1]), int(row[2]))

    def generation(self, sink: str) -> int:
        """Bumped by every rewind; a runner holding an older one must reload its cursor."""
        row = self.db.execute("SELECT generation FROM cursors WHERE sink = ?", (sink,)).fetchone()
        return int(row[0]) if row else -1

    def advance(self, sink: str, cursor: Cursor, alert_id: int, delivered: bool = False,
                dead_error: str | None = None) -> bool:
        """Move the cursor to alert_id (and count it delivered or dead-letter it) in one transaction.

        False when a rewind happened meanwhile (generation changed): nothing is written.
        """
        now = time.time()
        with self.db:
            done = self.db.execute("UPDATE cursors SET alert_id = ?, delivered = delivered + ?, updated_ts = ? "
                                   "WHERE sink = ? AND generation = ?",
                                   (alert_id, 1 if delivered else 0, now, sink, cursor.generation)).rowcount
            if not done:
                return False
            if dead_error is not None:
                self.db.execute("INSERT INTO dead_letters (sink, alert_id, ts, error) VALUES (?, ?, ?, ?)",
                                (sink, alert_id, now, dead_error))
            elif delivered:
                self.db.execute("UPDATE dead_letters SET resolved_ts = ? WHERE sink = ? AND alert_id = ? "
                                "AND resolved_ts IS NULL", (now, sink, alert_id))
        cursor.alert_id = alert_id
        cursor.delivered += 1 if delivered else 0
        return True

    def rewind(self, sink: str, from_id: int) -> Cursor:
        """Resend from alert `from_id` on: the cursor goes to from_id - 1 and the generation moves on."""
        with self.db:
            self.db.execute("INSERT OR IGNORE INTO cursors (sink, alert_id, updated_ts) VALUES (?, 0, ?)", (sink, time.time()))
            self.db.execute("UPDATE cursors SET alert_id = ?, generation = generation + 1, updated_ts = ? WHERE sink = ?",
                            (max(0, from_id - 1), time.time(), sink))
        return self.cursor(sink)

    def record_state(self, sink: str, state: str, last_error: str) -> None:
        """Remember the sink's state and last error for `iseg sinks status`."""
        with self.db:
            self.db.execute("UPDATE cursors SET state = ?, last_error = ?, last_error_ts = CASE WHEN ? != '' "
                            "AND ? != last_error THEN ? ELSE last_error_ts END WHERE sink = ?",
                            (state, last_error, last_error, last_error, time.time(), sink))

    def dead_letters(self, sink: str, include_resolved: bool = False, limit: int = 100) -> list[dict[str, Any]]:
        """Dead letters of a sink, oldest first."""
        query = "SELECT alert_id, ts, error, resolved_ts FROM dead_letters WHERE sink = ?"
        if not include_resolved:
            query += " AND resolved_ts IS NULL"
        rows = self.db.execute(query + " ORDER BY id LIMIT ?", (sink, limit)).fetchall()
        return [{"alert_id": r[0], "ts": r[1], "error": r[2], "resolved_ts": r[3]} for r in rows]

    def dead_letter_count(self, sink: str) -> int:
        """Unresolved dead letters of a sink."""
        return int(self.db.execute("SELECT COUNT(*) FROM dead_letters WHERE sink = ? AND resolved_ts IS NULL",
                                   (sink,)).fetchone()[0])

    def status(self, sink: str) -> dict[str, Any] | None:
        """The stored row of a sink, or None when it never ran."""
        row = self.db.execute("SELECT alert_id, delivered, generation, state, last_error, last_error_ts, updated_ts "
                              "FROM cursors WHERE sink = ?", (sink,)).fetchone()
        if row is None:
            return None
        keys = ("cursor", "delivered", "generation", "state", "last_error", "last_error_ts", "updated_ts")
        return dict(zip(keys, row))

    def close(self) -> None:
        """Close the database."""
        self.db.close()
