"""Alert debouncing and the alert store.

A class alerts when it was flagged in k of its camera's last n frames and has not
alerted within `cooldown_s`: one scratch on one frame is noise, three in a row is a
part to pull. Alerts are committed to SQLite *before* they are published, so the
replay socket can give a subscriber that was away everything it missed.
"""

from __future__ import annotations

import json
import sqlite3
from collections import deque
from pathlib import Path
from typing import Any


class Debouncer:
    """k-of-n voting and per-class cooldown, per camera."""

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
            if last is not None and ts - last < self.cooldown_s:
                continue
            self.last_alert[key] = ts
            firing.append(name)
        return firing


class AlertStore:
    """SQLite table of alerts; `add` returns only after the row is durable (WAL, synchronous=FULL)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), timeout=10.0)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS alerts (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                        "camera TEXT NOT NULL, ts REAL NOT NULL, body TEXT NOT NULL)")
        self.db.commit()

    def add(self, alert: dict[str, Any]) -> int:
        """Persist an alert; its id is set in the dict and returned."""
        with self.db:
            cursor = self.db.execute("INSERT INTO alerts (camera, ts, body) VALUES (?, ?, '')", (alert["camera"], alert["capture_ts"]))
            alert["id"] = int(cursor.lastrowid)
            self.db.execute("UPDATE alerts SET body = ? WHERE id = ?", (json.dumps(alert), alert["id"]))
        return alert["id"]

    def since(self, after_id: int, limit: int = 1000, camera: str | None = None) -> list[dict[str, Any]]:
        """Alerts with id > after_id, oldest first."""
        query = "SELECT body FROM alerts WHERE id > ?"
        args: list[Any] = [after_id]
        if camera:
            query += " AND camera = ?"
            args.append(camera)
        rows = self.db.execute(query + " ORDER BY id LIMIT ?", (*args, limit)).fetchall()
        return [json.loads(body) for (body,) in rows]

    def last_id(self) -> int:
        """Highest alert id so far (0 when none)."""
        return int(self.db.execute("SELECT COALESCE(MAX(id), 0) FROM alerts").fetchone()[0])

    def close(self) -> None:
        """Close the database."""
        self.db.close()
