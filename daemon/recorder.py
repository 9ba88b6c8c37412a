"""Recorder role: every flagged frame → original (PNG, lossless), mask (PNG), overlay (JPEG)
and metadata JSON under the state dir, indexed in SQLite for review.

Writes are atomic: files are written and fsynced in a temporary folder on the same
filesystem and the folder is renamed into place, so a crash or SIGTERM never leaves a
half recording; the index row is added after the rename. A full disk is logged and
counted, never a crash; a deleted recordings folder is recreated; a corrupt index is
moved aside and rebuilt from the recordings' meta.json files (verdicts are lost).

Retention treats judged recordings as evidence. By age it removes recordings older than
`retention_days`; by free disk, when free space is under `min_free_mb`, it removes
unreviewed recordings first, then false alarms, oldest first. Confirmed recordings are
kept unless `delete_confirmed`, recordings younger than `keep_recent_h` are never
removed, and when even deleting every candidate could not reach `min_free_mb` (a floor
above what the disk can give) it removes nothing and says so. Every deletion is logged
with its reason.
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
from daemon.database import open_database
from daemon.messages import Boundary, Flagged, Picture, Rejected, Rejections
from daemon.metrics import Registry
from daemon.recording_context import ContextFrames, config_version
from daemon.render import encode_png
from daemon.role import Heartbeat, StopFlag

STATUSES = ("unreviewed", "confirmed", "false-alarm", "unsure")
FILES = ("original.png", "mask.png", "overlay.jpg", "meta.json")
DELETION_ORDER = ("unreviewed", "false-alarm", "unsure", "confirmed")
"""Which recordings free disk first: evidence an operator judged goes last (unsure and confirmed only if allowed)."""
FOLDER_CHECK_S = 2.0
OPEN_RETRY_S = 2.0


class DiskFull(Exception):
    """Not enough free disk for a recording, even after retention."""


class RecordingStore:
    """The recordings folder and its SQLite index (also used by `iseg review`)."""

    def __init__(self, state_dir: Path, log: logging.Logger | None = None, repair: bool = False) -> None:
        """`repair` (the recorder role): a corrupt index is moved aside and a fresh one started;
        without it (`iseg review`) the sqlite3.DatabaseError is raised."""
        self.root = state_dir / "recordings"
        self.tmp = self.root / ".tmp"
        self.log = log or logging.getLogger("iseg.recorder")
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = open_database(state_dir / "recordings.sqlite3", self._setup, self.log, repair=repair)
        self._unreachable_logged = 0.0

    @staticmethod
    def _setup(db: sqlite3.Connection) -> None:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS recordings (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                   "camera TEXT NOT NULL, seq INTEGER NOT NULL, capture_ts REAL NOT NULL, created REAL NOT NULL, "
                   "path TEXT NOT NULL UNIQUE, flagged TEXT NOT NULL, presence TEXT NOT NULL, "
                   "alert_ids TEXT NOT NULL, bytes INTEGER NOT NULL, status TEXT NOT NULL DEFAULT 'unreviewed', "
                   "reviewed_at REAL)")
        db.execute("CREATE INDEX IF NOT EXISTS recordings_created ON recordings (created)")
        db.commit()

    def ensure_folder(self) -> None:
        """Recreate the recordings folder if someone deleted it (OSError when it cannot be)."""
        if not self.root.is_dir():
            self.root.mkdir(parents=True, exist_ok=True)
            self.log.warning("recordings folder %s was missing; recreated it", self.root)

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
                except (ValueError, KeyError, TypeError, sqlite3.Error) as err:
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
        self.ensure_folder()
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
        return shutil.disk_usage(self.root if self.root.is_dir() else self.root.parent).free / 1e6

    def delete(self, recording_id: int) -> None:
        """Remove a recording's files, then its row."""
        row = self.db.execute("SELECT path FROM recordings WHERE id = ?", (recording_id,)).fetchone()
        if row is None:
            return
        shutil.rmtree(self.root / row[0], ignore_errors=True)
        with self.db:
            self.db.execute("DELETE FROM recordings WHERE id = ?", (recording_id,))

    def enforce_retention(self, retention_days: float, min_free_mb: float, needed_mb: float = 0.0,
                          keep_recent_h: float = 24.0, delete_confirmed: bool = False) -> int:
        """Apply the retention policy (see the module docstring); returns how many recordings it deleted."""
        now = time.time()
        statuses = DELETION_ORDER if delete_confirmed else DELETION_ORDER[:2]
        marks = ",".join("?" * len(statuses))
        protected_from = now - keep_recent_h * 3600
        cutoff = min(now - retention_days * 86400, protected_from)
        expired = self.db.execute(f"SELECT id, status FROM recordings WHERE created < ? AND status IN ({marks}) "
                                  "ORDER BY created, id", (cutoff, *statuses)).fetchall()
        self._delete_all(expired, f"older than recorder.retention_days ({retention_days:g})")
        target = min_free_mb + needed_mb
        free = self.free_mb()
        if free >= target:
            return len(expired)
        order = " ".join(f"WHEN '{status}' THEN {i}" for i, status in enumerate(statuses))
        candidates = self.db.execute(
            f"SELECT id, status, bytes FROM recordings WHERE created < ? AND status IN ({marks}) "
            f"ORDER BY CASE status {order} END, created, id", (protected_from, *statuses)).fetchall()
        if free + sum(c[2] for c in candidates) / 1e6 < target:
            if now - self._unreachable_logged > 600:
                self._unreachable_logged = now
                self.log.error("free disk %.1f MB is under recorder.min_free_mb %g, and deleting every recording "
                               "retention may delete (%d, older than %gh, %s) would not reach it: deleting none",
                               free, min_free_mb, len(candidates), keep_recent_h, "/".join(statuses))
            return len(expired)
        chosen = []
        for rid, status, _size in candidates:
            self.delete(rid)
            chosen.append((rid, status))
            if self.free_mb() >= target:
                break
        self._log_deleted(chosen, f"free disk was {free:.1f} MB, under recorder.min_free_mb {min_free_mb:g}"
                          + (f" + {needed_mb:.1f} MB for the next recording" if needed_mb else ""))
        return len(expired) + len(chosen)

    def _delete_all(self, rows: list[tuple[int, str]], reason: str) -> None:
        for rid, _status in rows:
            self.delete(rid)
        if rows:
            self._log_deleted(rows, reason)

    def _log_deleted(self, rows: list[tuple[int, str]], reason: str) -> None:
        counts = {status: sum(1 for _, s in rows if s == status) for status in STATUSES}
        what = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
        ids = ", ".join(str(rid) for rid, _ in rows[:20]) + (", ..." if len(rows) > 20 else "")
        self.log.info("retention deleted %d recording(s) (%s; ids %s): %s", len(rows), what, ids, reason)

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
        self.degraded = ""
        metrics.inc("iseg_recorder_deleted_total", 0)
        for camera in config.cameras:
            for series in ("iseg_recorder_frames_total", "iseg_recorder_disk_full_total",
                           "iseg_recorder_write_errors_total", "iseg_recorder_missed_total"):
                metrics.inc(series, 0, camera=camera.id)

    def retention(self, needed_mb: float = 0.0) -> int:
        """One retention pass with the configured policy; returns how many recordings it deleted."""
        cfg = self.config.recorder
        deleted = self.store.enforce_retention(cfg.retention_days, cfg.min_free_mb, needed_mb,
                                               cfg.keep_recent_h, cfg.delete_confirmed)
        if deleted:
            self.metrics.inc("iseg_recorder_deleted_total", deleted)
        return deleted

    def check_folder(self) -> None:
        """Recreate a deleted recordings folder; degraded while it cannot be."""
        try:
            self.store.ensure_folder()
        except OSError as err:
            self._failed(f"recordings folder {self.store.root} cannot be created: {err}")
            return
        if self.degraded.startswith("recordings folder"):
            self.degraded = ""

    def handle(self, flagged: Flagged) -> int | None:
        """Write one checked flagged frame; None when it was skipped (disk full or write error)."""
        h = flagged.meta
        camera = h["camera"]
        self._count_missed(camera, h["publisher_session"], h["flag_seq"])
        files = {"original.png": encode_png(flagged.frame, rgb=True), "mask.png": flagged.mask_png,
                 "overlay.jpg": flagged.overlay_jpeg, **self.context.before_files(camera, h["seq"])}
        h = {**h, "window": self.context.window(camera, h["seq"], self.config.alerts.k),
             "config_version": self.config_version}
        needed_mb = sum(len(d) for d in files.values()) / 1e6
        cfg = self.config.recorder
        try:
            self.store.ensure_folder()
        except OSError as err:
            self.metrics.inc("iseg_recorder_write_errors_total", camera=camera)
            self._failed(f"recordings folder {self.store.root} cannot be created: {err}")
            return None
        try:
            self.retention(needed_mb)
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
                self._failed(f"recording {camera}/{h['seq']} failed: {err}")
            return None
        except sqlite3.Error as err:
            self.metrics.inc("iseg_recorder_write_errors_total", camera=camera)
            self._failed(f"recording index update for {camera}/{h['seq']} failed: {err}")
            return None
        self.metrics.inc("iseg_recorder_frames_total", camera=camera)
        self.context.expect_after(camera, h["seq"], self.store.root / self.store.path_of(recording_id))
        if self.degraded:
            self.log.info("recording again (was: %s)", self.degraded)
            self.degraded = ""
        return recording_id

    def overlay(self, picture: Picture) -> None:
        """A published overlay: kept as context for the flagged frames around it."""
        self.context.overlay({"camera": picture.camera, "seq": picture.seq, "flagged": list(picture.flagged)},
                             picture.image)

    def _count_missed(self, camera: str, session: str, flag_seq: int) -> None:
        """Flagged frames the PUB socket dropped before we read them (we were too slow)."""
        previous = self.last_flag.get(camera)
        if previous is not None and previous[0] == session and flag_seq > previous[1] + 1:
            missed = flag_seq - previous[1] - 1
            self.metrics.inc("iseg_recorder_missed_total", missed, camera=camera)
            self.log.warning("missed %d flagged frame(s) of camera %s (recorder fell behind)", missed, camera)
        self.last_flag[camera] = (session, flag_seq)

    def _failed(self, reason: str) -> None:
        if reason != self.degraded:
            self.log.error("%s", reason)
        self.degraded = reason

    def _disk_full(self, camera: str, seq: int, reason: str) -> None:
        self.metrics.inc("iseg_recorder_disk_full_total", camera=camera)
        self.degraded = f"disk full: flagged frames are not recorded ({reason})"
        if time.monotonic() - self.last_full_log > 10.0:
            self.last_full_log = time.monotonic()
            self.log.error("disk full: flagged frame %s/%s not recorded (%s); counting until space frees up",
                           camera, seq, reason)


def open_store(config: DaemonConfig, stop: StopFlag, heartbeat: Heartbeat, log: logging.Logger) -> RecordingStore | None:
    """The recording store, retried while the disk or the folder refuses (the role stays up and says
    why instead of crash-looping); None when stopped first."""
    logged = ""
    while not stop.stopping:
        heartbeat.progress()
        try:
            return RecordingStore(config.state_path, log, repair=True)
        except (OSError, sqlite3.Error) as err:
            reason = f"cannot open the recordings store in {config.state_path}: {err}"
            if reason != logged:
                log.error("%s; retrying every %gs", reason, OPEN_RETRY_S)
                logged = reason
            heartbeat.update(ready=True, degraded=reason)
            stop.wait(OPEN_RETRY_S)
    return None


def run_recorder(config: DaemonConfig, stop: StopFlag) -> int:
    """Recorder process body: SUB to flagged frames until stopped (finishing the write in hand)."""
    log = logging.getLogger("iseg.recorder")
    metrics = Registry()
    ctx = zmq.Context()
    heartbeat = Heartbeat(ctx, config.endpoint("telemetry"), "recorder", "recorder", metrics, stop).start()
    store = open_store(config, stop, heartbeat, log)
    if store is None:
        heartbeat.stop()
        ctx.term()
        return 0
    try:
        removed, reindexed = store.recover()
        if removed or reindexed:
            log.info("recovered: removed %d half-written recording(s), re-indexed %d", removed, reindexed)
    except (OSError, sqlite3.Error) as err:
        log.error("recovery of %s failed: %s", store.root, err)
    recorder = Recorder(config, store, metrics, log)
    boundary = Boundary.from_config(config)
    rejections = Rejections(metrics, "recorder", log)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 1000)
    sub.setsockopt(zmq.SUBSCRIBE, b"flagged.")
    sub.setsockopt(zmq.SUBSCRIBE, b"overlay.")
    sub.connect(config.endpoint("publish"))
    log.info("recording flagged frames under %s (retention %g days, min free %g MB, last %gh always kept, "
             "confirmed %s)", store.root, config.recorder.retention_days, config.recorder.min_free_mb,
             config.recorder.keep_recent_h, "deletable" if config.recorder.delete_confirmed else "kept")
    heartbeat.update(ready=True, degraded="")
    next_retention = 0.0
    next_folder_check = 0.0
    try:
        while not stop.stopping:
            heartbeat.progress()
            if time.monotonic() >= next_folder_check:
                recorder.check_folder()
                next_folder_check = time.monotonic() + FOLDER_CHECK_S
            if time.monotonic() >= next_retention:
                try:
                    recorder.retention()
                except (OSError, sqlite3.Error) as err:
                    log.error("retention pass failed: %s", err)
                next_retention = time.monotonic() + config.recorder.retention_check_s
            if heartbeat.state.get("degraded") != recorder.degraded:
                heartbeat.update(degraded=recorder.degraded)
            if not sub.poll(200):
                continue
            frames = sub.recv_multipart(copy=False)
            kind = "overlay" if bytes(frames[0].buffer[:8]) == b"overlay." else "flagged"
            try:
                if kind == "overlay":
                    recorder.overlay(boundary.picture(frames))
                    continue
                recorder.handle(boundary.flagged(frames))
                heartbeat.update(recordings=store.count(), degraded=recorder.degraded)
            except Rejected as err:
                rejections.count(kind, err)
            except Exception as err:  # noqa: BLE001 (one bad recording never stops the recorder)
                rejections.internal(kind, err)
        log.info("recorder stopped (%s)", stop.signal_name or "done")
    finally:
        heartbeat.stop()
        sub.close()
        store.close()
        ctx.term()
    return 0
