"""Operator decisions: verdicts on recordings and acknowledgements of alerts, with an audit trail.

This is the one implementation behind `iseg review mark` and the console's
`POST /api/recordings/{id}/verdict` and `POST /api/alerts/{id}/ack`: the verdict itself
lives in the recordings index (so `iseg review list` shows it), while acknowledgements
and the audit of every change (who, when, old → new, note) live in `review.sqlite3`
in the state directory.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from daemon.recorder import STATUSES, RecordingStore

VERDICTS = tuple(s for s in STATUSES if s != "unreviewed")
MAX_NOTE_CHARS = 500


class ReviewError(ValueError):
    """A verdict or acknowledgement that cannot be applied (bad value); the message says what would be right."""


class NotFound(LookupError):
    """No recording or alert with that id."""


class ReviewLog:
    """Acknowledgements and the audit table (`review.sqlite3`)."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(state_dir / "review.sqlite3"), timeout=10.0, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS acks (alert_id INTEGER PRIMARY KEY, user TEXT NOT NULL, ts REAL NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, "
                        "user TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL, old TEXT, new TEXT, note TEXT)")
        self.db.commit()

    def acks(self, alert_ids: list[int]) -> dict[int, dict[str, Any]]:
        """Acknowledgement (user, ts) of each of these alerts that has one."""
        if not alert_ids:
            return {}
        marks = ",".join("?" * len(alert_ids))
        rows = self.db.execute(f"SELECT alert_id, user, ts FROM acks WHERE alert_id IN ({marks})", alert_ids).fetchall()
        return {r[0]: {"user": r[1], "ts": r[2]} for r in rows}

    def acked_ids(self) -> set[int]:
        """Every acknowledged alert id (for filtering by state)."""
        return {r[0] for r in self.db.execute("SELECT alert_id FROM acks")}

    def audit(self, limit: int = 100, target: str | None = None) -> list[dict[str, Any]]:
        """Newest audit entries first."""
        query, args = "SELECT id, ts, user, action, target, old, new, note FROM audit", []
        if target:
            query += " WHERE target = ?"
            args.append(target)
        rows = self.db.execute(query + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        keys = ("id", "ts", "user", "action", "target", "old", "new", "note")
        return [dict(zip(keys, r)) for r in rows]

    def _audit(self, user: str, action: str, target: str, old: str | None, new: str, note: str) -> None:
        self.db.execute("INSERT INTO audit (ts, user, action, target, old, new, note) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (time.time(), user, action, target, old, new, note))

    def close(self) -> None:
        """Close the database."""
        self.db.close()


def _check_note(note: str) -> str:
    if not isinstance(note, str):
        raise ReviewError("note: must be a string")
    if len(note) > MAX_NOTE_CHARS:
        raise ReviewError(f"note: {len(note)} characters, at most {MAX_NOTE_CHARS}")
    return note.strip()


def mark_verdict(store: RecordingStore, log: ReviewLog, recording_id: int, verdict: str, user: str,
                 note: str = "") -> dict[str, Any]:
    """Set a recording's verdict and audit old → new; returns {id, old, new}."""
    if verdict not in VERDICTS:
        raise ReviewError(f"verdict: {verdict!r} must be one of {', '.join(VERDICTS)}")
    note = _check_note(note)
    row = store.db.execute("SELECT status FROM recordings WHERE id = ?", (recording_id,)).fetchone()
    if row is None:
        raise NotFound(f"no recording {recording_id}")
    store.mark(recording_id, verdict)
    with log.db:
        log._audit(user, "verdict", f"recording:{recording_id}", row[0], verdict, note)
    return {"id": recording_id, "old": row[0], "new": verdict}


def acknowledge(log: ReviewLog, alert_exists: bool, alert_id: int, user: str, note: str = "") -> dict[str, Any]:
    """Acknowledge an alert (again: the latest user and time win) and audit it; returns {id, user, ts, old}."""
    if not alert_exists:
        raise NotFound(f"no alert {alert_id}")
    note = _check_note(note)
    now = time.time()
    with log.db:
        old = log.db.execute("SELECT user, ts FROM acks WHERE alert_id = ?", (alert_id,)).fetchone()
        log.db.execute("INSERT OR REPLACE INTO acks (alert_id, user, ts) VALUES (?, ?, ?)", (alert_id, user, now))
        log._audit(user, "ack", f"alert:{alert_id}", f"acked by {old[0]}" if old else "unacknowledged",
                   f"acked by {user}", note)
    return {"id": alert_id, "user": user, "ts": now, "old": old[0] if old else None}
