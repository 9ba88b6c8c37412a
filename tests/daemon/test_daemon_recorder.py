"""Recorder: atomic recordings with an SQLite index, crash recovery, retention by age and by
free disk, and a disk that really fills up (a tiny tmpfs) — logged and counted, never a crash."""

from __future__ import annotations

import json
import logging
import subprocess
import time
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest

from daemon.config import parse_config
from daemon.messages import Boundary, Flagged
from daemon.metrics import Registry
from daemon.recorder import Recorder, RecordingStore
from daemon.render import encode_jpeg, encode_png
from daemon.wire import array_header


def config_for(state: Path, **recorder):
    return parse_config({"state_dir": str(state), "engine": {"model_dir": "m"},
                         "cameras": [{"id": "cam", "source": "synthetic"}], "recorder": recorder})


def flagged_message(seq: int, size: int = 64, ts: float | None = None) -> Flagged:
    rng = np.random.default_rng(seq)
    frame = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    labels = (rng.random((size, size)) > 0.5).astype(np.uint8)
    header = {"camera": "cam", "seq": seq, "capture_ts": ts or time.time(), "flagged": ["scratch"],
              "presence": {"scratch": 0.9}, "alert_ids": [], "frame": array_header(frame),
              "publisher_session": "p", "flag_seq": seq + 1}
    return Boundary({"cam": ("scratch", "dent")}).flagged(
        [b"flagged.cam", json.dumps(header).encode(), frame.tobytes(), encode_png(labels), encode_jpeg(frame)])


def test_recordings_are_complete_indexed_and_reviewable(tmp_path):
    config = config_for(tmp_path, min_free_mb=0)
    store = RecordingStore(tmp_path)
    metrics = Registry()
    recorder = Recorder(config, store, metrics, logging.getLogger("test"))
    ids = [recorder.handle(flagged_message(seq)) for seq in (0, 1, 3)]
    assert ids == [1, 2, 3] and metrics.counter("iseg_recorder_frames_total", camera="cam") == 3
    assert metrics.counter("iseg_recorder_missed_total", camera="cam") == 1, "flag_seq 3 -> 4 skipped one"
    record = store.get(2)
    assert sorted(Path(record["folder"]).iterdir()) == sorted(Path(p) for p in record["files"].values())
    original = cv2.imread(record["files"]["original.png"])[:, :, ::-1]
    expected = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert np.array_equal(original, expected), "original is lossless RGB"
    assert store.mark(2, "confirmed") and store.get(2)["status"] == "confirmed"
    assert not store.mark(99, "confirmed")
    assert [r["id"] for r in store.list(status="unreviewed")] == [3, 1]


def test_recover_removes_half_written_and_reindexes(tmp_path):
    store = RecordingStore(tmp_path)
    store.write({"camera": "cam", "seq": 1, "capture_ts": time.time(), "flagged": ["x"], "presence": {"x": 1.0}},
                {"original.png": b"a", "mask.png": b"b", "overlay.jpg": b"c"})
    half = store.tmp / uuid.uuid4().hex
    half.mkdir(parents=True)
    (half / "original.png").write_bytes(b"partial")
    with store.db:
        store.db.execute("DELETE FROM recordings")  # a crash between rename and index
    assert store.recover() == (1, 1)
    assert not any(store.tmp.iterdir()) and store.count() == 1


def five_recordings(store: RecordingStore, days_old: list[float]) -> None:
    for seq, age in enumerate(days_old):
        store.write({"camera": "cam", "seq": seq, "capture_ts": time.time(), "flagged": [], "presence": {}},
                    {"original.png": b"a" * 1000, "mask.png": b"b", "overlay.jpg": b"c"})
        with store.db:
            store.db.execute("UPDATE recordings SET created = created - ? WHERE seq = ?", (age * 86400, seq))


def test_retention_by_age_keeps_confirmed_and_recent(tmp_path):
    store = RecordingStore(tmp_path)
    five_recordings(store, [10, 10, 10, 0.5, 0])
    store.mark(2, "confirmed")
    assert store.enforce_retention(retention_days=5, min_free_mb=0) == 2, "unreviewed 1 and 3 only"
    assert [r["seq"] for r in store.list()] == [4, 3, 1]
    assert store.enforce_retention(retention_days=0.1, min_free_mb=0, keep_recent_h=24) == 0, "the last 24 h stay"
    assert store.enforce_retention(retention_days=5, min_free_mb=0, delete_confirmed=True) == 1


def test_retention_by_free_disk_deletes_unreviewed_first_and_never_everything(tmp_path, caplog):
    store = RecordingStore(tmp_path, logging.getLogger("test.retention"))
    five_recordings(store, [9, 8, 7, 6, 0])
    store.mark(1, "confirmed")
    store.mark(2, "false-alarm")
    disk = {"free": 0.0}
    store.free_mb = lambda: disk["free"] + (5 - store.count()) * 0.001  # each deletion frees ~1 kB
    with caplog.at_level(logging.INFO, "test.retention"):
        assert store.enforce_retention(retention_days=30, min_free_mb=0.0015) == 2
    assert sorted(r["id"] for r in store.list()) == [1, 2, 5], "unreviewed 3 and 4 (oldest first) went first"
    assert "2 unreviewed" in caplog.text and "ids 3, 4" in caplog.text and "min_free_mb" in caplog.text
    assert store.enforce_retention(retention_days=30, min_free_mb=0.0025) == 1
    assert sorted(r["id"] for r in store.list()) == [1, 5], "then the false alarm; confirmed and recent stay"
    caplog.clear()
    with caplog.at_level(logging.INFO, "test.retention"):
        assert store.enforce_retention(retention_days=30, min_free_mb=1e9) == 0
    assert store.count() == 2 and "deleting none" in caplog.text, "an unreachable floor deletes nothing"
    assert store.enforce_retention(retention_days=30, min_free_mb=0.004, keep_recent_h=0, delete_confirmed=True) == 1
    assert [r["id"] for r in store.list()] == [1], "unreviewed goes before confirmed, even when recent is allowed"


def test_free_disk_floor_counts_disk_full_and_keeps_going(tmp_path):
    store = RecordingStore(tmp_path)
    metrics = Registry()
    recorder = Recorder(config_for(tmp_path, min_free_mb=1e12), store, metrics, logging.getLogger("test"))
    assert recorder.handle(flagged_message(0)) is None
    assert recorder.handle(flagged_message(1)) is None
    assert metrics.counter("iseg_recorder_disk_full_total", camera="cam") == 2 and store.count() == 0


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the min_free_mb test covers the policy")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_really_full_disk_is_counted_not_a_crash(tiny_disk):
    store = RecordingStore(tiny_disk)
    metrics = Registry()
    recorder = Recorder(config_for(tiny_disk, min_free_mb=0), store, metrics, logging.getLogger("test"))
    outcomes = [recorder.handle(flagged_message(seq, size=160)) for seq in range(12)]
    written = [o for o in outcomes if o is not None]
    assert written and len(written) < 12, "the 600 kB disk holds some recordings, not all"
    assert metrics.counter("iseg_recorder_disk_full_total", camera="cam") + \
        metrics.counter("iseg_recorder_write_errors_total", camera="cam") == 12 - len(written)
    assert not any(store.tmp.iterdir()), "failed writes leave no half recordings"
    for row in store.list(100):
        assert sorted(p.name for p in Path(row["path"]).iterdir()) == ["mask.png", "meta.json", "original.png", "overlay.jpg"]
        json.loads((Path(row["path"]) / "meta.json").read_text())
