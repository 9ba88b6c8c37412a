"""The daemon under attack, as real processes: generated hostile messages on the results,
replay and telemetry sockets (the frames socket is fuzzed in test_e2e_bad_input.py);
forged heartbeats for a frozen worker; corrupt databases at start; a second `iseg run`;
a publisher restart inside a cooldown; a deleted recordings folder; SIGHUP; a state dir
on a disk that fills up. Nothing may raise a role's restart count; everything is counted."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import zmq

from conftest import Daemon, iseg
from tests.hostile_messages import hostile_heartbeats, hostile_replays, hostile_results

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def published(stats: dict) -> float:
    return stats["cameras"]["belt1"].get("published", 0)


def rejected(stats: dict, role: str) -> float:
    where = stats["supervisor"] if role == "supervisor" else stats["roles"][role]
    return sum(where["rejected"].values())


def pids(stats: dict) -> dict[str, int]:
    return {name: role["pid"] for name, role in stats["roles"].items()}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, tiny_model):
    """One daemon shared by the socket fuzz tests (they run in file order; the frozen worker is last)."""
    import yaml

    from conftest import fast_config

    tmp = tmp_path_factory.mktemp("fuzz")
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(fast_config(str(tmp / "state"), tiny_model)))
    daemon = Daemon(config)
    ctx = zmq.Context()
    try:
        daemon.wait_ready(150)
        yield daemon, ctx
    finally:
        ctx.destroy(linger=0)
        daemon.close()


def test_hostile_results_are_rejected_and_counted_by_the_running_publisher(fuzzed):
    daemon, ctx = fuzzed
    before = daemon.stats()
    push = ctx.socket(zmq.PUSH)
    push.connect(f"ipc://{daemon.state}/run/results.sock")
    cases = hostile_results()
    for _what, parts in cases:
        push.send_multipart(parts)
    stats = daemon.wait_for(lambda s: rejected(s, "publisher") >= len(cases) and published(s) > published(before) + 4,
                            60, "every hostile result counted and frames still published")
    assert rejected(stats, "publisher") == len(cases)
    assert {"camera", "parts", "json", "range", "type", "class", "shape", "size", "missing"} <= set(
        stats["roles"]["publisher"]["rejected"]), stats["roles"]["publisher"]["rejected"]
    assert pids(stats) == pids(before) and all(r["restarts"] == 0 for r in stats["roles"].values())
    metrics = daemon.get("/metrics")[1]
    assert 'iseg_rejected_messages_total{reason="camera",role="publisher",socket="results"}' in metrics
    cameras = {line.split('camera="')[1].split('"')[0] for line in metrics.splitlines() if 'camera="' in line}
    assert cameras == {"belt1"}, f"unconfigured names made metric series: {cameras}"
    assert not Path("/tmp/iseg-escape").exists()
    push.close(0)


def test_hostile_replay_requests_get_an_error_and_the_publisher_stays(fuzzed):
    daemon, ctx = fuzzed
    before = daemon.stats()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.RCVTIMEO, 10000)
    req.connect(f"ipc://{daemon.state}/run/replay.sock")
    cases = hostile_replays()
    for what, parts in cases:
        req.send_multipart(parts)
        answer = json.loads(req.recv())
        assert answer["ok"] is False and "bad replay request" in answer["error"], (what, answer)
    daemon.wait_for(lambda s: s["cameras"]["belt1"].get("alerts", 0) >= 1, 60, "an alert")
    req.send(b'{"since": 0, "limit": 5, "camera": "belt1"}')
    answer = json.loads(req.recv())
    assert answer["ok"] and answer["alerts"] and answer["alerts"][0]["id"] == 1
    stats = daemon.wait_for(lambda s: s["roles"]["publisher"]["rejected"].get("range", 0) > 0
                            and rejected(s, "publisher") >= rejected(before, "publisher") + len(cases), 30, "replay rejects")
    assert pids(stats) == pids(before) and stats["roles"]["publisher"]["restarts"] == 0
    req.close(0)


def test_hostile_and_forged_heartbeats_cannot_crash_the_supervisor_or_hide_a_frozen_worker(fuzzed):
    daemon, ctx = fuzzed
    stats = daemon.stats()
    worker_pid = stats["roles"]["worker.0"]["pid"]
    push = ctx.socket(zmq.PUSH)
    push.connect(f"ipc://{daemon.state}/run/telemetry.sock")
    cases = hostile_heartbeats("worker.0", "worker", worker_pid)
    for _what, parts in cases:
        push.send_multipart(parts)
    stats = daemon.wait_for(lambda s: rejected(s, "supervisor") >= len(cases), 30, "supervisor counted every bad heartbeat")
    assert {"pid", "role", "json", "parts", "type", "range"} <= set(stats["supervisor"]["rejected"])
    status, metrics = daemon.get("/metrics")
    assert status == 200 and "forged_metric" not in metrics
    assert all(r["restarts"] == 0 and r["up"] for r in stats["roles"].values()), stats["roles"]

    # Freeze the worker and keep "its" heartbeats coming from here: the supervisor must not be fooled.
    os.kill(worker_pid, signal.SIGSTOP)
    forged = {"role": "worker", "name": "worker.0", "pid": worker_pid, "busy_since": None, "state": {"ready": True},
              "metrics": {"counters": {}, "gauges": {}, "histograms": {}}}
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            push.send_multipart([b"heartbeat", json.dumps({**forged, "ts": time.time(), "progress_at": time.time()}).encode()])
            status, body = daemon.get("/stats")
            worker = json.loads(body)["roles"]["worker.0"] if status == 200 else {}
            if worker and worker["pid"] != worker_pid and worker["restarts"] >= 1:  # killed and restart scheduled
                break
            time.sleep(0.3)
    finally:
        try:
            os.kill(worker_pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    stats = daemon.stats()
    assert stats["roles"]["worker.0"]["pid"] != worker_pid and stats["roles"]["worker.0"]["restarts"] == 1, \
        f"forged heartbeats kept a frozen worker alive: {stats['roles']['worker.0']}\n{daemon.tail()}"
    assert "worker.0 (pid %d) is hung" % worker_pid in daemon.log_path.read_text()
    push.close(0)


def corrupt(path: Path) -> None:
    path.write_bytes(b"SQLite format 3\x00" + os.urandom(4000))


def test_corrupt_databases_second_instance_publisher_restart_deleted_folder_and_sighup(make_config, start_daemon):
    config = make_config({"alerts": {"k": 2, "n": 3, "cooldown_s": 120}, "recorder": {"min_free_mb": 1}})
    state = config.parent / "state"
    state.mkdir()
    corrupt(state / "alerts.sqlite3")
    corrupt(state / "recordings.sqlite3")
    daemon = start_daemon(config)
    stats = daemon.wait_ready(150)

    # Corrupt databases were moved aside with one log line each, and nothing restarted.
    log = daemon.log_path.read_text()
    for name in ("alerts.sqlite3", "recordings.sqlite3"):
        assert len(list(state.glob(f"{name}.corrupt-*"))) == 1, sorted(p.name for p in state.iterdir())
        assert sum(f"{name} is corrupt" in line for line in log.splitlines()) == 1, log
    assert all(r["restarts"] == 0 for r in stats["roles"].values())

    # A second `iseg run` (and a second publisher) on the same state dir is refused and touches nothing.
    sockets = {p.name: p.stat().st_ino for p in (state / "run").iterdir()}
    second = iseg("run", "--config", str(config), "--duration", "5", timeout=60)
    assert second.returncode != 0 and f"state dir {state} in use by pid {daemon.proc.pid}" in second.stderr, second
    publisher = iseg("publish", "--config", str(config), timeout=60)
    assert publisher.returncode != 0 and "in use by pid" in publisher.stderr
    assert {p.name: p.stat().st_ino for p in (state / "run").iterdir()} == sockets
    assert daemon.proc.poll() is None

    # A publisher restart inside the 120 s cooldown: no second alert, no invented gaps.
    stats = daemon.wait_for(lambda s: s["cameras"]["belt1"].get("alerts", 0) >= 1, 60, "first alert")
    old_pid = stats["roles"]["publisher"]["pid"]
    os.kill(old_pid, signal.SIGTERM)
    stats = daemon.wait_for(lambda s: s["roles"]["publisher"]["pid"] not in (None, old_pid), 60, "publisher restarted")
    base = published(stats)
    stats = daemon.wait_for(lambda s: published(s) >= base + 8, 60, "frames published after the restart")
    assert stats["cameras"]["belt1"]["alerts"] == 1, stats["cameras"]["belt1"]
    flow = stats["cameras"]["belt1"]
    assert flow.get("gaps", 0) <= flow.get("dropped", 0) + 1, f"gaps beyond the frames capture dropped: {flow}"
    assert "restored publisher state" in daemon.log_path.read_text()

    # A deleted recordings folder: recreated; while it cannot be, the recorder is reported down, not up.
    recordings = state / "recordings"
    for attempt in range(10):  # the recorder may recreate the folder between the two steps
        os.rename(recordings, state / f"deleted-{attempt}")
        try:
            recordings.write_text("not a folder")
            break
        except IsADirectoryError:
            continue
    subprocess.run(["rm", "-rf", *map(str, state.glob("deleted-*"))], check=True)
    stats = daemon.wait_for(lambda s: not s["roles"]["recorder"]["up"], 30, "recorder reported degraded")
    assert "recordings folder" in stats["roles"]["recorder"]["degraded"]
    recorded = stats["cameras"]["belt1"].get("recorded", 0)
    recordings.unlink()
    daemon.wait_for(lambda s: s["roles"]["recorder"]["up"] and s["cameras"]["belt1"].get("recorded", 0) > recorded + 1,
                    60, "recording again in a recreated folder")
    assert any(recordings.glob("*/belt1/*/meta.json"))

    # SIGHUP is an orderly stop.
    daemon.proc.send_signal(signal.SIGHUP)
    assert daemon.proc.wait(60) == 0, daemon.tail()
    assert "stopping (SIGHUP)" in daemon.log_path.read_text()
    final = json.loads((state / "last_stats.json").read_text())
    assert all(r["restarts"] == (1 if name == "publisher" else 0) for name, r in final["roles"].items()), final["roles"]
    with sqlite3.connect(state / "alerts.sqlite3") as db:
        assert db.execute("SELECT id FROM alerts").fetchall() == [(1,)]


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the disk refuses even 512 bytes more."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as handle:
        for size in (1 << 20, 1 << 16, 1 << 12, 512):
            try:
                while True:
                    handle.write(b"\0" * size)
            except OSError:
                pass
    return filler


def test_full_disk_alerts_still_flow_and_are_all_stored_after(make_config, start_daemon, small_disk):
    config = make_config({"state_dir": str(small_disk / "state"), "recorder": {"enabled": False}})
    daemon = start_daemon(config)
    daemon.wait_ready(150)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"alert.")
    sub.connect(f"ipc://{small_disk}/state/run/publish.sock")
    seen: list[int] = []
    try:
        filler = fill(small_disk)
        stats = daemon.wait_for(lambda s: "alert store failing" in s["roles"]["publisher"]["degraded"], 60,
                                "publisher reports the failing store")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(seen) < 4:
            if sub.poll(500):
                seen.append(json.loads(sub.recv_multipart()[1])["id"])
        assert len(seen) >= 4, "alerts must still be published while the disk is full"
        metrics = daemon.get("/metrics")[1]
        pending = [line for line in metrics.splitlines() if line.startswith("iseg_alerts_pending ")]
        assert pending and float(pending[0].split()[1]) > 0, pending
        assert "iseg_alert_store_errors_total" in metrics
        assert all(r["restarts"] == 0 for r in stats["roles"].values())
        filler.unlink()
        daemon.wait_for(lambda s: not s["roles"]["publisher"]["degraded"], 60, "store writable again")
        assert daemon.terminate() == 0, daemon.tail()
    finally:
        sub.close(0)
        ctx.term()
    final = json.loads((small_disk / "state" / "last_stats.json").read_text())
    total = int(final["cameras"]["belt1"]["alerts"])
    with sqlite3.connect(small_disk / "state" / "alerts.sqlite3") as db:
        ids = [row[0] for row in db.execute("SELECT id FROM alerts ORDER BY rowid")]
    assert ids == list(range(1, total + 1)), f"stored {ids}, published {total}"
    assert set(seen) <= set(ids)
    log = daemon.log_path.read_text()
    assert "alert store" in log and "writable again" in log
    assert all(r["restarts"] == 0 for r in final["roles"].values()), final["roles"]
