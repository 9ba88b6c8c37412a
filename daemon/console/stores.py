"""Read-only views of the alert store and the recordings index for the console.

Connections are opened with SQLite's `mode=ro`, so the console can never change what
the publisher and recorder own; changes go through daemon.review. A store that does
not exist yet (the console started before the pipeline) reads as empty.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from daemon.recorder import FILES

IMAGE_FILES = {"original": "original.png", "overlay": "overlay.jpg", "mask": "mask.png"}
CONTEXT_KINDS = ("before", "after")
MAX_CONTEXT = 9


def _connect_ro(path: Path) -> sqlite3.Connection | None:
    if not path.is_file():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0, check_same_thread=False)
    return db


class ReadOnlyDB:
    """A lazily opened read-only connection (opened once the file exists)."""

    def __init__(self, path: Path, table: str) -> None:
        self.path = path
        self.table = table
        self.db: sqlite3.Connection | None = None

    def rows(self, query: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run a query; [] while the database or its table does not exist yet."""
        if self.db is None:
            self.db = _connect_ro(self.path)
            if self.db is None:
                return []
        try:
            return self.db.execute(query, args).fetchall()
        except sqlite3.OperationalError as err:
            if "no such table" in str(err):
                return []
            raise

    def close(self) -> None:
        """Close the connection."""
        if self.db is not None:
            self.db.close()


class AlertReader:
    """Alerts, newest first or after an id, filtered by camera, class, time and ack state."""

    def __init__(self, state_dir: Path) -> None:
        self.store = ReadOnlyDB(state_dir / "alerts.sqlite3", "alerts")

    def get(self, alert_id: int) -> dict[str, Any] | None:
        """One alert by id."""
        rows = self.store.rows("SELECT body FROM alerts WHERE id = ?", (alert_id,))
        return json.loads(rows[0][0]) if rows and rows[0][0] else None

    def query(self, since: int | None = None, camera: str | None = None, cls: str | None = None,
              start: float | None = None, end: float | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """With `since`: ids above it, oldest first; otherwise the newest first."""
        sql, args = "SELECT body FROM alerts WHERE body != ''", []
        if since is not None:
            sql += " AND id > ?"
            args.append(since)
        if camera:
            sql += " AND camera = ?"
            args.append(camera)
        if cls:
            sql += " AND json_extract(body, '$.class') = ?"
            args.append(cls)
        if start is not None:
            sql += " AND ts >= ?"
            args.append(start)
        if end is not None:
            sql += " AND ts <= ?"
            args.append(end)
        sql += f" ORDER BY id {'ASC' if since is not None else 'DESC'} LIMIT ?"
        args.append(limit)
        return [json.loads(body) for (body,) in self.store.rows(sql, tuple(args))]

    def last_id(self) -> int:
        """Highest alert id (0 when none)."""
        rows = self.store.rows("SELECT COALESCE(MAX(id), 0) FROM alerts")
        return int(rows[0][0]) if rows else 0


class RecordingReader:
    """The recordings index and the files of one recording, by id only."""

    def __init__(self, state_dir: Path) -> None:
        self.root = (state_dir / "recordings").resolve()
        self.index = ReadOnlyDB(state_dir / "recordings.sqlite3", "recordings")

    def query(self, status: str | None = None, camera: str | None = None, limit: int = 100,
              order: str = "DESC") -> list[dict[str, Any]]:
        """Recordings, newest first (order ASC: oldest first, the natural review-queue order)."""
        sql, args = "SELECT id, camera, seq, capture_ts, flagged, presence, status, reviewed_at FROM recordings WHERE 1=1", []
        if status:
            sql += " AND status = ?"
            args.append(status)
        if camera:
            sql += " AND camera = ?"
            args.append(camera)
        sql += f" ORDER BY id {'ASC' if order == 'ASC' else 'DESC'} LIMIT ?"
        args.append(limit)
        return [{"id": r[0], "camera": r[1], "seq": r[2], "capture_ts": r[3], "flagged": json.loads(r[4]),
                 "presence": json.loads(r[5]), "status": r[6], "reviewed_at": r[7]}
                for r in self.index.rows(sql, tuple(args))]

    def folder(self, recording_id: int) -> Path | None:
        """The recording's folder, only when it lies inside the recordings root."""
        rows = self.index.rows("SELECT path FROM recordings WHERE id = ?", (recording_id,))
        if not rows:
            return None
        folder = (self.root / rows[0][0]).resolve()
        return folder if folder.is_relative_to(self.root) and folder.is_dir() else None

    def get(self, recording_id: int) -> dict[str, Any] | None:
        """Index row, metadata and which context frames exist."""
        rows = self.index.rows("SELECT id, camera, seq, capture_ts, status, reviewed_at FROM recordings WHERE id = ?",
                               (recording_id,))
        folder = self.folder(recording_id)
        if not rows or folder is None:
            return None
        r = rows[0]
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            meta = {}
        context = {kind: sorted(int(p.stem.split("-")[1]) for p in folder.glob(f"{kind}-[0-9].jpg"))
                   for kind in CONTEXT_KINDS}
        return {"id": r[0], "camera": r[1], "seq": r[2], "capture_ts": r[3], "status": r[4], "reviewed_at": r[5],
                "meta": meta, "context": context}

    def image(self, recording_id: int, kind: str) -> Path | None:
        """The file for original|overlay|mask|before-N|after-N, or None (unknown kind or id, missing file)."""
        name = IMAGE_FILES.get(kind)
        if name is None:
            prefix, _, number = kind.partition("-")
            if prefix not in CONTEXT_KINDS or not number.isdigit() or not 1 <= int(number) <= MAX_CONTEXT:
                return None
            name = f"{prefix}-{int(number)}.jpg"
        folder = self.folder(recording_id)
        if folder is None:
            return None
        path = folder / name
        return path if path.is_file() and path.name in (*FILES, name) else None

    def close(self) -> None:
        """Close the index."""
        self.index.close()
