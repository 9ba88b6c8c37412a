"""Alert debouncing and the alert store.

A class alerts when it was flagged in k of its camera's last n frames and has not
alerted within `cooldown_s`: one scratch on one frame is noise, three in a row is a
part to pull. Alerts are committed to SQLite before they are published, so the
replay socket can give a subscriber that was away everything it missed; when the
store cannot take them (a full disk, an SQLite error) they are still published, held
in memory in order (bounded) and written, in order and under the ids they were
published with, as soon as it can again.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections import deque
from pathlib import Path
from typing import Any

from daemon.database import is_corrupt, move_aside, open_database

MAX_PENDING = 10_000
"""Alerts held in memory while the store fails; later ones are published but never stored (counted)."""
RETRY_S = 1.0


class Debouncer:
    """k-of-n voting and per-class cooldown, per camera. A frame may arrive after a later one (a frame
    re-sent after its worker was lost): the cooldown is the distance in capture time either way."""

    def __init__(self, k: int, n: int, cooldown_s: float) -> None:
        self.k, self.n, self.cooldown_s = k, n, cooldown_s
        self.windows: dict[tuple[str, str], deque[bool]] = {}
        self.last_alert: dict[tuple[str, str], float] = {}

    def update(self, camera: str, classes: list[str], flagged: list[str], ts: float) -> list[str]:
        """Feed one frame's flags; returns the classes that alert on this frame."""
        firing = []
        for name in classes:
            key = (camera, name)
            window = self.windows.setdefault(key, deque(maxlen=self.n))
            window.append(name in flagged)
            if name not in flagged or sum(window) < self.k:
                continue
            last = self.last_alert.get(key)
            if last is not None and abs(ts - last) < self.cooldown_s:
                continue
            self.last_alert[key] = ts
            firing.append(name)
        return firing

    def export(self) -> dict[str, Any]:
        """Windows and last alert times as JSON (camera -> class -> ...), to survive a restart."""
        out: dict[str, Any] = {}
        for (camera, name), window in self.windows.items():
            out.setdefault(camera, {})[name] = {"window": list(window), "last_alert": self.last_alert.get((camera, name))}
        return out

    def restore(self, saved: Any, classes: dict[str, tuple[str, ...]]) -> int:
        """Take back what `export` wrote, for configured cameras and classes only; returns the classes restored."""
        restored = 0
        for camera, names in (saved.items() if isinstance(saved, dict) else ()):
            for name, entry in (names.items() if isinstance(names, dict) and camera in classes else ()):
                if name not in classes[camera] or not isinstance(entry, dict):
                    continue
                window, last = entry.get("window"), entry.get("last_alert")
                if isinstance(window, list) and all(isinstance(v, bool) for v in window):
                    self.windows[(camera, name)] = deque(window, maxlen=self.n)
                if isinstance(last, (int, float)) and not isinstance(last, bool):
                    self.last_alert[(camera, name)] = float(last)
                restored += 1
        return restored


class AlertStore:
    """SQLite table of alerts; rows are durable when `add` returns (WAL, synchronous=FULL) unless the
    store is failing, in which case they wait in `pending` and `flush` writes them later."""

    def __init__(self, path: Path, log: logging.Logger | None = None, first_id: int = 1,
                 max_pending: int = MAX_PENDING) -> None:
        self.path = path
        self.log = log or logging.getLogger("iseg.alerts")
        self.max_pending = max_pending
        self.db: sqlite3.Connection | None = None
        self.pending: deque[dict[str, Any]] = deque()
        self.error = ""
        self.errors = 0
        self.unstored = 0
        self._retry_at = 0.0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._connect()
        self.next_id = max(first_id, self._stored_max() + 1)

    @staticmethod
    def _setup(db: sqlite3.Connection) -> None:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE IF NOT EXISTS alerts (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                   "camera TEXT NOT NULL, ts REAL NOT NULL, body TEXT NOT NULL)")
        db.commit()

    def _connect(self) -> bool:
        try:
            self.db = open_database(self.path, self._setup, self.log)
            return True
        except (sqlite3.Error, OSError) as err:
            self._failed(err)
            return False

    def _stored_max(self) -> int:
        if self.db is None:
            return 0
        try:
            return int(self.db.execute("SELECT COALESCE(MAX(id), 0) FROM alerts").fetchone()[0])
        except sqlite3.Error as err:
            self._failed(err)
            return 0

    def _failed(self, err: Exception) -> None:
        if not self.error:
            self.log.error("alert store %s cannot be written (%s); alerts are still published and held in "
                           "memory (up to %d) until it can", self.path, err, self.max_pending)
        self.error = str(err) or type(err).__name__
        self.errors += 1
        self._retry_at = time.monotonic() + RETRY_S
        if isinstance(err, sqlite3.DatabaseError) and is_corrupt(err) and self.db is not None:
            self.db.close()
            self.db = None
            moved = move_aside(self.path)
            self.log.error("%s became corrupt; moved it to %s, a fresh one starts on the next write", self.path, moved.name)

    def add(self, alert: dict[str, Any]) -> int:
        """Give the alert the next id (set in the dict and returned) and store it, or hold it when the
        store is failing (the caller publishes it either way)."""
        alert["id"] = self.next_id
        self.next_id += 1
        if len(self.pending) >= self.max_pending:
            self.unstored += 1
            if self.unstored == 1 or self.unstored % 1000 == 0:
                self.log.error("%d alert(s) held in memory already; alert %d is published but will not be stored "
                               "(%d so far)", len(self.pending), alert["id"], self.unstored)
            return alert["id"]
        self.pending.append(alert)
        self.flush()
        return alert["id"]

    def put(self, alert: dict[str, Any]) -> bool:
        """Store an alert under the id it already has (replicated from the leading publisher), replacing
        one stored under that id; False (logged) when the store cannot be written."""
        self.next_id = max(self.next_id, alert["id"] + 1)
        if self.db is None and not self._connect():
            return False
        try:
            with self.db:
                self.db.execute("INSERT OR REPLACE INTO alerts (id, camera, ts, body) VALUES (?, ?, ?, ?)",
                                (alert["id"], alert["camera"], alert["capture_ts"], json.dumps(alert)))
        except (sqlite3.Error, OSError) as err:
            self._failed(err)
            self.unstored += 1
            return False
        return True

    def remove(self, alert_id: int) -> None:
        """Take back an alert stored but never published (its publisher lost the lead meanwhile)."""
        self.pending = deque(a for a in self.pending if a["id"] != alert_id)
        if self.db is not None:
            try:
                with self.db:
                    self.db.execute("DELETE FROM alerts WHERE id = ?", (alert_id,))
            except sqlite3.Error as err:
                self._failed(err)

    def flush(self) -> bool:
        """Write held alerts in order; True when none are left. While the store fails it is retried at
        most once per RETRY_S (a full disk is not hammered on every alert)."""
        if not self.pending:
            return True
        if self.error and time.monotonic() < self._retry_at:
            return False
        if self.db is None and not self._connect():
            return False
        try:
            with self.db:
                for alert in self.pending:
                    self._insert(alert)
        except sqlite3.IntegrityError:
            if not self._insert_one_by_one():
                return False
        except (sqlite3.Error, OSError) as err:
            self._failed(err)
            return False
        written = len(self.pending)
        self.pending.clear()
        if self.error:
            self.log.warning("alert store %s is writable again; wrote %d held alert(s) in order", self.path, written)
            self.error = ""
        return True

    def _insert(self, alert: dict[str, Any]) -> None:
        assert self.db is not None
        self.db.execute("INSERT INTO alerts (id, camera, ts, body) VALUES (?, ?, ?, ?)",
                        (alert["id"], alert["camera"], alert["capture_ts"], json.dumps(alert)))

    def _insert_one_by_one(self) -> bool:
        """An id already taken (ids published before a crash of a failing store): store under a new id."""
        assert self.db is not None
        while self.pending:
            alert = self.pending[0]
            try:
                with self.db:
                    try:
                        self._insert(alert)
                    except sqlite3.IntegrityError:
                        old = alert["id"]
                        alert["id"] = max(self._stored_max() + 1, self.next_id)
                        self.next_id = alert["id"] + 1
                        self.log.error("alert id %d was already stored; alert stored as %d", old, alert["id"])
                        self._insert(alert)
            except (sqlite3.Error, OSError) as err:
                self._failed(err)
                return False
            self.pending.popleft()
        return True

    def since(self, after_id: int, limit: int = 1000, camera: str | None = None) -> list[dict[str, Any]]:
        """Alerts with id > after_id, oldest first, held ones included; sqlite3.Error when the store
        cannot be read."""
        if self.db is None:
            raise sqlite3.OperationalError(f"alert store unavailable: {self.error}")
        query = "SELECT body FROM alerts WHERE id > ?"
        args: list[Any] = [after_id]
        if camera:
            query += " AND camera = ?"
            args.append(camera)
        rows = self.db.execute(query + " ORDER BY id LIMIT ?", (*args, limit)).fetchall()
        stored = [json.loads(body) for (body,) in rows]
        held = [a for a in self.pending if a["id"] > after_id and (not camera or a["camera"] == camera)]
        return (stored + held)[:limit]

    def last_id(self) -> int:
        """Highest alert id given out so far (0 when none)."""
        return self.next_id - 1

    def close(self) -> None:
        """Try once more to write held alerts, then close the database."""
        if self.pending:
            self._retry_at = 0.0
            if not self.flush():
                ids = [a["id"] for a in self.pending]
                self.log.error("%d published alert(s) could not be stored before stopping (ids %d..%d): %s",
                               len(ids), ids[0], ids[-1], self.error)
        if self.db is not None:
            self.db.close()
            self.db = None
