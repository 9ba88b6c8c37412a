"""The per-minute summary store: for every frame (not only flagged ones), per camera, class and
minute, a histogram of presence scores, the counts of frames, flagged frames and alerts, and
the summed mask area.

Histograms have BINS fixed bins on [0, 1], right-closed: bin i holds scores in
(i/BINS, (i+1)/BINS] (bin 0 also holds 0), so "score > t" is exactly "bin >= t*BINS" for
any threshold on the 0.01 grid. A minute's histogram is stored as the span from its first to
its last non-empty bin, in the narrowest integer width that holds its counts (a minute's scores
sit in a few neighbouring bins, so a row is about 50 bytes; see scripts/linestats_size.py).

The publisher hands frames to `SummaryWriter.add` (a bounded queue, never blocking); a
thread aggregates them and commits every `stats.flush_s` seconds, adding to rows that
already exist, so frames whose capture clock jumped back (NTP) add to the right minute
instead of replacing it. SQLite in WAL mode: a kill -9 loses at most the last `flush_s`
seconds of counts, never the file. A corrupt file is moved aside and a fresh one started.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from daemon.database import is_corrupt, move_aside, open_database

BINS = 100
STORE_NAME = "linestats.sqlite3"
RETENTION_EVERY_S = 3600.0

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS names (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, "
    "UNIQUE (kind, name))",
    "CREATE TABLE IF NOT EXISTS minutes (minute INTEGER NOT NULL, camera INTEGER NOT NULL, class INTEGER NOT NULL, "
    "frames INTEGER NOT NULL, flagged INTEGER NOT NULL, alerts INTEGER NOT NULL, area_sum REAL NOT NULL, "
    "hist BLOB NOT NULL, PRIMARY KEY (minute, camera, class)) WITHOUT ROWID",
)
_WIDTHS = {1: "u1", 2: "<u2", 4: "<u4"}


def score_bin(score: float) -> int:
    """The histogram bin of a presence score (right-closed bins, clipped to [0, 1])."""
    return min(BINS - 1, max(0, int(np.ceil(score * BINS - 1e-9)) - 1))


def encode_histogram(counts: np.ndarray) -> bytes:
    """[width, first bin] + the counts from the first to the last non-empty bin as 1-, 2- or 4-byte integers."""
    nonzero = np.flatnonzero(counts)
    if not nonzero.size:
        return b"\x01\x00"
    span = counts[nonzero[0]:nonzero[-1] + 1]
    top = int(span.max())
    width = 1 if top < 2 ** 8 else 2 if top < 2 ** 16 else 4
    return bytes((width, int(nonzero[0]))) + span.astype(_WIDTHS[width]).tobytes()


def decode_histogram(blob: bytes) -> np.ndarray:
    """Dense int64 counts of BINS bins from the stored form."""
    width, first = blob[0], blob[1]
    span = np.frombuffer(blob, _WIDTHS[width], offset=2)
    counts = np.zeros(BINS, np.int64)
    counts[first:first + span.size] = span
    return counts


@dataclass
class Bucket:
    """One camera/class/minute being aggregated."""

    frames: int = 0
    flagged: int = 0
    alerts: int = 0
    area_sum: float = 0.0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))


@dataclass(frozen=True)
class FrameSummary:
    """What the store keeps of one published frame."""

    camera: str
    ts: float
    presence: dict[str, float]
    flagged: tuple[str, ...]
    area_frac: dict[str, float]
    alerts: tuple[str, ...] = ()


def _setup(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    for statement in _SCHEMA:
        db.execute(statement)
    db.commit()


class SummaryStore:
    """The SQLite file: merge buckets in, read minutes out, drop old minutes."""

    def __init__(self, path: Path, log: logging.Logger | None = None, repair: bool = True) -> None:
        self.path = path
        self.log = log or logging.getLogger("iseg.linestats")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = open_database(path, _setup, self.log, repair=repair)
        self._ids: dict[tuple[str, str], int] = {}

    def _id(self, kind: str, name: str) -> int:
        key = (kind, name)
        if key not in self._ids:
            self.db.execute("INSERT OR IGNORE INTO names (kind, name) VALUES (?, ?)", key)
            self._ids[key] = int(self.db.execute("SELECT id FROM names WHERE kind = ? AND name = ?", key).fetchone()[0])
        return self._ids[key]

    def merge(self, buckets: dict[tuple[str, str, int], Bucket]) -> None:
        """Add aggregated buckets to the stored minutes in one transaction."""
        with self.db:
            for (camera, name, minute), bucket in buckets.items():
                cam_id, cls_id = self._id("camera", camera), self._id("class", name)
                row = self.db.execute("SELECT frames, flagged, alerts, area_sum, hist FROM minutes WHERE minute = ? "
                                      "AND camera = ? AND class = ?", (minute, cam_id, cls_id)).fetchone()
                frames, flagged, alerts, area = bucket.frames, bucket.flagged, bucket.alerts, bucket.area_sum
                hist = bucket.hist
                if row is not None:
                    frames, flagged, alerts, area = frames + row[0], flagged + row[1], alerts + row[2], area + row[3]
                    hist = hist + decode_histogram(row[4])
                self.db.execute("INSERT OR REPLACE INTO minutes VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                (minute, cam_id, cls_id, frames, flagged, alerts, area, encode_histogram(hist)))

    def minutes(self, camera: str | None = None, cls: str | None = None, since: float | None = None,
                until: float | None = None) -> list[dict[str, Any]]:
        """Stored minutes, oldest first: camera, class, minute (epoch minutes), counts and the dense histogram."""
        query = ("SELECT c.name, k.name, m.minute, m.frames, m.flagged, m.alerts, m.area_sum, m.hist FROM minutes m "
                 "JOIN names c ON c.id = m.camera JOIN names k ON k.id = m.class WHERE 1")
        args: list[Any] = []
        if camera is not None:
            query += " AND c.name = ?"
            args.append(camera)
        if cls is not None:
            query += " AND k.name = ?"
            args.append(cls)
        if since is not None:
            query += " AND m.minute >= ?"
            args.append(int(since // 60))
        if until is not None:
            query += " AND m.minute <= ?"
            args.append(int(until // 60))
        rows = self.db.execute(query + " ORDER BY m.minute, c.name, k.name", args).fetchall()
        return [{"camera": r[0], "class": r[1], "minute": r[2], "frames": r[3], "flagged": r[4], "alerts": r[5],
                 "mean_area": r[6] / r[3] if r[3] else 0.0, "hist": decode_histogram(r[7])} for r in rows]

    def drop_before(self, ts: float) -> int:
        """Delete minutes older than `ts`; returns how many rows went."""
        with self.db:
            return self.db.execute("DELETE FROM minutes WHERE minute < ?", (int(ts // 60),)).rowcount

    def close(self) -> None:
        """Close the file."""
        self.db.close()


def aggregate(frames: Iterable[FrameSummary], into: dict[tuple[str, str, int], Bucket]) -> None:
    """Add frames to per camera/class/minute buckets."""
    for frame in frames:
        minute = int(frame.ts // 60)
        for name, score in frame.presence.items():
            bucket = into.get((frame.camera, name, minute))
            if bucket is None:
                bucket = into[(frame.camera, name, minute)] = Bucket()
            bucket.frames += 1
            bucket.flagged += name in frame.flagged
            bucket.alerts += name in frame.alerts
            bucket.area_sum += frame.area_frac.get(name, 0.0)
            bucket.hist[score_bin(score)] += 1


class SummaryWriter:
    """Off the publisher's hot path: `add` only enqueues; a thread aggregates and commits in batches."""

    def __init__(self, path: Path, flush_s: float, retention_days: float, queue_max: int,
                 log: logging.Logger | None = None) -> None:
        self.log = log or logging.getLogger("iseg.linestats")
        self.path = path
        self.flush_s = flush_s
        self.retention_s = retention_days * 86400.0
        self.queue: queue.Queue[FrameSummary | None] = queue.Queue(maxsize=queue_max)
        self.dropped = 0
        self.written_frames = 0
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="linestats-writer", daemon=True)
        self._store: SummaryStore | None = None

    def start(self) -> "SummaryWriter":
        """Check the store (moving a corrupt one aside, in the caller's log) and start the writer thread,
        which opens its own connection (SQLite connections stay in their thread)."""
        SummaryStore(self.path, self.log).close()
        self._thread.start()
        return self

    def add(self, frame: FrameSummary) -> bool:
        """Queue one frame; False (counted) when the queue is full because the disk is not keeping up."""
        try:
            self.queue.put_nowait(frame)
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def _run(self) -> None:
        self._store = SummaryStore(self.path, self.log)
        buckets: dict[tuple[str, str, int], Bucket] = {}
        pending = 0
        next_flush = time.monotonic() + self.flush_s
        next_retention = 0.0
        running = True
        while running:
            try:
                item = self.queue.get(timeout=max(0.01, next_flush - time.monotonic()))
                if item is None:
                    running = False
                else:
                    aggregate([item], buckets)
                    pending += 1
            except queue.Empty:
                pass
            if time.monotonic() < next_flush and running:
                continue
            next_flush = time.monotonic() + self.flush_s
            if buckets:
                try:
                    self._store.merge(buckets)
                    self.written_frames += pending
                    buckets, pending = {}, 0
                except sqlite3.Error as err:
                    self.errors += 1
                    self.log.error("summary store write failed (%s); keeping %d minute(s) in memory", err, len(buckets))
                    if isinstance(err, sqlite3.DatabaseError) and is_corrupt(err):
                        self._store.close()
                        moved = move_aside(self.path)
                        self.log.error("%s turned corrupt; moved it to %s and started a fresh one",
                                       self.path, moved.name)
                        self._store = SummaryStore(self.path, self.log)
            if time.monotonic() >= next_retention:
                next_retention = time.monotonic() + RETENTION_EVERY_S
                try:
                    dropped = self._store.drop_before(time.time() - self.retention_s)
                    if dropped:
                        self.log.info("summary store: dropped %d minute row(s) older than retention", dropped)
                except sqlite3.Error as err:
                    self.log.error("summary store retention failed: %s", err)
        self._store.close()

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued and stop the thread."""
        if self._thread.is_alive():
            self.queue.put(None)
            self._thread.join(timeout)
