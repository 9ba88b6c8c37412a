"""Recorder role: every flagged frame → original (PNG, lossless), mask (PNG), overlay (JPEG)
and metadata JSON under the state dir, indexed in SQLite for review.

Writes are atomic: files are written and fsynced in a temporary folder on the same
filesystem and the folder is renamed into place, so a crash or SIGTERM never leaves a
half recording; the index row is added after the rename. Retention removes recordings
older than `retention_days` and, oldest first, whatever keeps free disk under
`min_free_mb`. A full disk is logged and counted, never a crash.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import zmq

from daemon.config import DaemonConfig
from daemon.metrics import Registry
from daemon.recording_context import ContextFrames, config_version
from daemon.render import encode_png
from daemon.role import Heartbeat, StopFlag
from daemon.wire import Message, WireError, array_from, recv

STATUSES = ("unreviewed", "confirmed", "false-alarm", "unsure")
FILES = ("original.png", "mask.png", "overlay.jpg", "meta.json")


class DiskFull(Exception):
    """Not enough free disk for a recording, even after retention."""


class RecordingStore:
    """The recordings folder and its SQLite index (also used by `iseg review`)."""

    def __init__(self, state_dir: Path, log: logging.Logger | None = None) -> None:
        self.root = state_dir / "recordings"
        self.tmp = self.root / ".tmp"
        self.log = log or logging.getLogger("iseg.recorder")
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(state_dir / "recordings.sqlite3"), timeout=10.0)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS recordings (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                        "camera TEXT NOT NULL, seq INTEGER NOT NULL, capture_ts REAL NOT NULL, created REAL NOT NULL, "
                        "path TEXT NOT NULL UNIQUE, flagged TEXT NOT NULL, presence TEXT NOT NULL, "
                        "alert_ids TEXT NOT NULL, bytes INTEGER NOT NULL, status TEXT NOT NULL DEFAULT 'unreviewed', "
                        "reviewed_at REAL)")
        self.db.execute("CREATE INDEX IF NOT EXISTS recordings_created ON recordings (created)")
        self.db.commit()

    def recover(self) -> tuple[int, int]:
        """After a crash: drop half-written temp folders, index complete folders that lack a row.
        Returns (temp folders removed, recordings re-indexed)."""
        removed = 0
        if self.tmp.exists():
            for leftover in self.tmp.iterdir():
                shutil.rmtree(leftover, ignore_errors=True)
                removed += 1
        known = {row[0] for row in self.db.execute("SELECT path FROM recordings")}
        reindexed = 0
        for meta in self.root.glob("*/*/*/meta.json"):
            relative = str(meta.parent.relative_to(self.root))
            if relative not in known and all((meta.parent / f).is_file() for f in FILES):
                try:
                    self._index(json.loads(meta.read_text()), relative, self._size(meta.parent))
                    reindexed += 1
                except (ValueError, KeyError) as err:
                    self.log.warning("cannot re-index %s: %s", meta.parent, err)
        return removed, reindexed

    @staticmethod
    def _size(folder: Path) -> int:
        return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())

    def _index(self, meta: dict[str, Any], relative: str, size: int) -> int:
        with self.db:
            cursor = self.db.execute(
                "INSERT INTO recordings (camera, seq, capture_ts, created, path, flagged, presence, alert_ids, bytes) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (meta["camera"], meta["seq"], meta["capture_ts"], meta.get("recorded_ts", time.time()), relative,
                 json.dumps(meta["flagged"]), json.dumps(meta["presence"]), json.dumps(meta.get("alert_ids", [])), size))
        return int(cursor.lastrowid)

    def write(self, meta: dict[str, Any], files: dict[str, bytes]) -> int:
        """Write one recording atomically and index it; returns its id. OSError on failure."""
        meta = {**meta, "recorded_ts": time.time()}
        day = time.strftime("%Y-%m-%d", time.localtime(meta["capture_ts"]))
        relative = f"{day}/{meta['camera']}/{meta['seq']:08d}-{int(meta['capture_ts'] * 1000)}"
        final = self.root / relative
        staging = self.tmp / uuid.uuid4().hex
        staging.mkdir(parents=True)
        try:
            contents = {**files, "meta.json": json.dumps(meta, indent=2).encode()}
            for name, data in contents.items():
                with open(staging / name, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                shutil.rmtree(final)
            os.rename(staging, final)
            fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self._index(meta, relative, sum(len(d) for d in contents.values()))

    def free_mb(self) -> float:
        """Free disk under the recordings folder, in MB."""
        return shutil.disk_usage(self.root).free / 1e6

    def delete(self, recording_id: int) -> None:
        """Remove a recording's files, then its row."""
        row = self.db.execute("SELECT path FROM recordings WHERE id = ?", (recording_id,)).fetchone()
        if row is None:
            return
        shutil.rmtree(self.root / row[0], ignore_errors=True)
        with self.db:
            self.db.execute("DELETE FROM recordings WHERE id = ?", (recording_id,))

    def enforce_retention(self, retention_days: float, min_free_mb: float, needed_mb: float = 0.0) -> int:
        """Delete expired recordings, then the oldest ones while free disk is short; returns how many."""
        deleted = 0
        cutoff = time.time() - retention_days * 86400
        for (rid,) in self.db.execute("SELECT id FROM recordings WHERE created < ? ORDER BY created", (cutoff,)).fetchall():
            self.delete(rid)
            deleted += 1
        while self.free_mb() < min_free_mb + needed_mb:
            row = self.db.execute("SELECT id FROM recordings ORDER BY created, id LIMIT 1").fetchone()
            if row is None:
                break
            self.delete(row[0])
            deleted += 1
        return deleted

    def list(self, limit: int = 50, camera: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        """Newest first."""
        query = "SELECT id, camera, seq, capture_ts, flagged, presence, status, path FROM recordings WHERE 1=1"
        args: list[Any] = []
        if camera:
            query += " AND camera = ?"
            args.append(camera)
        if status:
            query += " AND status = ?"
            args.append(status)
        rows = self.db.execute(query + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [{"id": r[0], "camera": r[1], "seq": r[2], "capture_ts": r[3], "flagged": json.loads(r[4]),
                 "presence": json.loads(r[5]), "status": r[6], "path": str(self.root / r[7])} for r in rows]

    def get(self, recording_id: int) -> dict[str, Any] | None:
        """One recording with its metadata and file paths."""
        row = self.db.execute("SELECT path, status, reviewed_at FROM recordings WHERE id = ?", (recording_id,)).fetchone()
        if row is None:
            return None
        folder = self.root / row[0]
        meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}
        return {"id": recording_id, "status": row[1], "reviewed_at": row[2], "folder": str(folder),
                "files": {name: str(folder / name) for name in FILES}, "meta": meta}

    def mark(self, recording_id: int, status: str) -> bool:
        """Set an operator verdict; False when there is no such recording."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}")
        with self.db:
            cursor = self.db.execute("UPDATE recordings SET status = ?, reviewed_at = ? WHERE id = ?",
                                     (status, time.time(), recording_id))
        return cursor.rowcount == 1

    def path_of(self, recording_id: int) -> str:
        """A recording's folder relative to the recordings root."""
        return self.db.execute("SELECT path FROM recordings WHERE id = ?", (recording_id,)).fetchone()[0]

    def count(self) -> int:
        """Number of indexed recordings."""
        return int(self.db.execute("SELECT COUNT(*) FROM recordings").fetchone()[0])

    def close(self) -> None:
        """Close the index."""
        self.db.close()


class Recorder:
    """Turns `flagged.<camera>` messages into recordings, with the disk policy applied."""

    def __init__(self, config: DaemonConfig, store: RecordingStore, metrics: Registry, log: logging.Logger) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.log = log
        self.context = ContextFrames(config.recorder.context_frames, config.recorder.context_frames, config.alerts.n)
        self.config_version = config_version(config.path)
        self.last_flag: dict[str, tuple[str, int]] = {}
        self.last_full_log = 0.0

    def handle(self, message: Message) -> int | None:
        """Write one flagged frame; None when it was skipped (disk full or write error)."""
        h = message.header
        camera = str(h["camera"])
        self._count_missed(camera, str(h.get("publisher_session")), int(h.get("flag_seq", 0)))
        frame = array_from(message.payloads[0], h["frame"]["shape"], h["frame"]["dtype"])
        files = {"original.png": encode_png(frame, rgb=True), "mask.png": bytes(message.payloads[1]),
                 "overlay.jpg": bytes(message.payloads[2]), **self.context.before_files(camera, int(h["seq"]))}
        h = {**h, "window": self.context.window(camera, int(h["seq"]), self.config.alerts.k),
             "config_version": self.config_version}
        needed_mb = sum(len(d) for d in files.values()) / 1e6
        cfg = self.config.recorder
        try:
            deleted = self.store.enforce_retention(cfg.retention_days, cfg.min_free_mb, needed_mb)
            if deleted:
                self.metrics.inc("iseg_recorder_deleted_total", deleted)
            if self.store.free_mb() < cfg.min_free_mb + needed_mb:
                raise DiskFull(f"{self.store.free_mb():.1f} MB free, recorder.min_free_mb is {cfg.min_free_mb:g}")
            recording_id = self.store.write(h, files)
        except DiskFull as err:
            self._disk_full(camera, h["seq"], str(err))
            return None
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                self._disk_full(camera, h["seq"], os.strerror(err.errno))
            else:
                self.metrics.inc("iseg_recorder_write_errors_total", camera=camera)
                self.log.error("recording %s/%s failed: %s", camera, h["seq"], err)
            return None
        except sqlite3.OperationalError as err:
            self.metrics.inc("iseg_recorder_write_errors_total", camera=camera)
            self.log.error("recording index update for %s/%s failed: %s", camera, h["seq"], err)
            return None
        self.metrics.inc("iseg_recorder_frames_total", camera=camera)
        self.context.expect_after(camera, int(h["seq"]), self.store.root / self.store.path_of(recording_id))
        return recording_id

    def dispatch(self, message: Message) -> None:
        """An overlay feeds the context frames; a flagged frame becomes a recording."""
        if message.topic.startswith("overlay."):
            self.context.overlay(message.header, bytes(message.payloads[0]))
        else:
            self.handle(message)

    def _count_missed(self, camera: str, session: str, flag_seq: int) -> None:
        """Flagged frames the PUB socket dropped before we read them (we were too slow)."""
        previous = self.last_flag.get(camera)
        if previous is not None and previous[0] == session and flag_seq > previous[1] + 1:
            missed = flag_seq - previous[1] - 1
            self.metrics.inc("iseg_recorder_missed_total", missed, camera=camera)
            self.log.warning("missed %d flagged frame(s) of camera %s (recorder fell behind)", missed, camera)
        self.last_flag[camera] = (session, flag_seq)

    def _disk_full(self, camera: str, seq: int, reason: str) -> None:
        self.metrics.inc("iseg_recorder_disk_full_total", camera=camera)
        if time.monotonic() - self.last_full_log > 10.0:
            self.last_full_log = time.monotonic()
            self.log.error("disk full: flagged frame %s/%s not recorded (%s); counting until space frees up",
                           camera, seq, reason)


def run_recorder(config: DaemonConfig, stop: StopFlag) -> int:
    """Recorder process body: SUB to flagged frames until stopped (finishing the write in hand)."""
    log = logging.getLogger("iseg.recorder")
    metrics = Registry()
    ctx = zmq.Context()
    heartbeat = Heartbeat(ctx, config.endpoint("telemetry"), "recorder", "recorder", metrics, stop).start()
    store = RecordingStore(config.state_path, log)
    removed, reindexed = store.recover()
    if removed or reindexed:
        log.info("recovered: removed %d half-written recording(s), re-indexed %d", removed, reindexed)
    recorder = Recorder(config, store, metrics, log)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 1000)
    sub.setsockopt(zmq.SUBSCRIBE, b"flagged.")
    sub.setsockopt(zmq.SUBSCRIBE, b"overlay.")
    sub.connect(config.endpoint("publish"))
    log.info("recording flagged frames under %s (retention %g days, min free %g MB)",
             store.root, config.recorder.retention_days, config.recorder.min_free_mb)
    heartbeat.update(ready=True)
    next_retention = 0.0
    try:
        while not stop.stopping:
            heartbeat.progress()
            if time.monotonic() >= next_retention:
                try:
                    deleted = store.enforce_retention(config.recorder.retention_days, config.recorder.min_free_mb)
                    if deleted:
                        metrics.inc("iseg_recorder_deleted_total", deleted)
                        log.info("retention removed %d recording(s)", deleted)
                except (OSError, sqlite3.OperationalError) as err:
                    log.error("retention pass failed: %s", err)
                next_retention = time.monotonic() + config.recorder.retention_check_s
            if not sub.poll(200):
                continue
            try:
                recorder.dispatch(recv(sub))
            except (WireError, KeyError, TypeError, ValueError, IndexError) as err:
                metrics.inc("iseg_recorder_bad_messages_total")
                log.warning("rejected a malformed flagged-frame message: %s", err)
            heartbeat.update(recordings=store.count())
        log.info("recorder stopped (%s)", stop.signal_name or "done")
    finally:
        heartbeat.stop()
        sub.close()
        store.close()
        ctx.term()
    return 0
