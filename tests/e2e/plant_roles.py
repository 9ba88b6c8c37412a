"""Daemon roles on emulated plant hosts (tests/e2e/netns.py) and the frame accounting of a fault.

One YAML config serves every host: `state_dir: ${ISEG_STATE_DIR}` and `sockets.run_dir:
${ISEG_RUN_DIR}` point each role at its own state dir (the state lock allows one socket-binding
role per state dir) and each host at its own run dir, so roles on different hosts meet only over
TCP. The test process, in the root namespace, reads a host's ipc:// sockets directly: heartbeats
(bound PULL on the run dir's telemetry socket) and the publisher's PUB.

`measure_fault` is the accounting both the control test (today's PUSH/PULL) and the dispatcher's
tests use: over a window of capture sequence numbers around a fault it compares frames admitted
by capture with frames published, and finds how long the camera took to recover.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
import zmq

from conftest import fast_config, merge
from daemon.security import generate_keys
from netns import Host

CAMERA = "belt1"
FRAMES_PORT = 7201
RESULTS_PORT = 7200
DISPATCH_PORT = 7202
PEER_PORT = 7203


def write_keys(directory: Path) -> Path:
    """CurveZMQ server and client key pairs, the client's public key authorised; returns `directory`."""
    generate_keys(directory)
    (directory / "authorized").mkdir()
    shutil.copy(directory / "client.key", directory / "authorized" / "client.key")
    return directory


def _document(model_dir: Path, keys: Path, results_host: Host, fps: float, frames_hwm: int,
              batch_size: int) -> dict[str, Any]:
    """What every plant config shares: the e2e tests' fast config (`fast_config`) with no local worker,
    per-role state dirs and per-host run dirs from the environment (see `role_env`), Curve keys,
    results on `results_host`."""
    document = fast_config("${ISEG_STATE_DIR}", model_dir, {
        "worker": {"count": 0, "batch_size": batch_size},
        "sockets": {"run_dir": "${ISEG_RUN_DIR}", "frames_hwm": frames_hwm,
                    "remote": {"host": results_host.ip, "bind_host": "0.0.0.0", "results_port": RESULTS_PORT,
                               "server_key": str(keys / "server.key_secret"),
                               "client_key": str(keys / "client.key_secret"),
                               "authorized_clients_dir": str(keys / "authorized")}}})
    document["cameras"][0]["fps"] = fps
    return document


def write_plant_config(path: Path, model_dir: Path, keys: Path, main: Host, fps: float = 6.0, frames_hwm: int = 1,
                       batch_size: int = 1, changes: dict[str, Any] | None = None) -> Path:
    """The one config of every host for the bare PUSH/PULL of earlier versions (`dispatch.enabled:
    false`): capture on `main` serves frames over Curve TCP on the camera's tcp_port, the publisher
    runs on `main` too; `changes` are deep-merged in."""
    document = _document(model_dir, keys, main, fps, frames_hwm, batch_size)
    document["cameras"][0]["tcp_port"] = FRAMES_PORT
    document["dispatch"] = {"enabled": False}
    path.write_text(yaml.safe_dump(merge(document, changes or {})))
    return path


def camera_ids(count: int) -> list[str]:
    """belt1, belt2, ... (belt1 is CAMERA)."""
    return [f"belt{i + 1}" for i in range(count)]


def write_dispatch_config(path: Path, model_dir: Path, keys: Path, capture: Host, primary: Host,
                          backup: Host | None = None, fps: float = 4.0, batch_size: int = 1, cameras: int = 1,
                          changes: dict[str, Any] | None = None) -> Path:
    """The one config of every host with credit-based dispatch: `cameras` synthetic cameras, the
    dispatcher on `capture` (workers and publishers reach it on DISPATCH_PORT), the primary publisher
    on `primary`, a backup on `backup`. Dispatch and takeover timings are the defaults. Every frame
    flags `scratch` and alerts (k 1 of 1, no cooldown), so alerts map one to one onto published
    frames; `changes` are deep-merged in."""
    document = _document(model_dir, keys, primary, fps, 1, batch_size)
    template = document["cameras"][0]
    document["cameras"] = [{**template, "id": camera, "synthetic": {**template["synthetic"], "seed": 3 + i}}
                           for i, camera in enumerate(camera_ids(cameras))]
    document["alerts"] = {"k": 1, "n": 1, "cooldown_s": 0.0}
    document["dispatch"] = {"port": DISPATCH_PORT, "hosts": [capture.ip]}
    if backup is not None:
        document["publisher"] = {"backup_host": backup.ip, "peer_port": PEER_PORT}
    path.write_text(yaml.safe_dump(merge(document, changes or {})))
    return path


def run_dir(host: Host) -> Path:
    """The host's ipc socket directory (shared by the roles on that host)."""
    return host.home / "run"


def role_env(host: Host, state_name: str) -> dict[str, str]:
    """Environment of a role: its own state dir on the host, the host's run dir."""
    run_dir(host).mkdir(parents=True, exist_ok=True)
    return {"ISEG_STATE_DIR": str(host.home / state_name), "ISEG_RUN_DIR": str(run_dir(host)),
            "PYTHONUNBUFFERED": "1"}


def start_role(host: Host, config: Path, args: list[str], state_name: str, logs: Path) -> subprocess.Popen:
    """`python -m daemon ARGS --config CONFIG` in `host`, logging to logs/<host>-<state_name>[-N].log
    (a restarted role gets the next N, so the first run's log stays)."""
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{host.name}-{state_name}.log"
    runs = 1
    while log.exists():
        runs += 1
        log = logs / f"{host.name}-{state_name}-{runs}.log"
    return host.popen([sys.executable, "-m", "daemon", *args, "--config", str(config)], log,
                      env=role_env(host, state_name))


def start_capture(host: Host, config: Path, logs: Path, camera: str = CAMERA) -> subprocess.Popen:
    """The camera's capture role (binds the frames PUSH, Curve TCP on the camera's tcp_port)."""
    return start_role(host, config, ["capture", "--camera", camera], f"capture-{camera}", logs)


def start_publisher(host: Host, config: Path, logs: Path, backup: bool = False) -> subprocess.Popen:
    """The publisher role (binds the results PULL, Curve TCP on sockets.remote.results_port); `backup`:
    the backup of a publisher pair."""
    return start_role(host, config, ["publish", "--backup"] if backup else ["publish"], "publisher", logs)


def start_dispatcher(host: Host, config: Path, logs: Path) -> subprocess.Popen:
    """The capture host's dispatcher (intake over ipc, ROUTER on DISPATCH_PORT)."""
    return start_role(host, config, ["dispatch"], "dispatch", logs)


def dispatcher_stats(ctx: zmq.Context, host: Host, timeout_ms: int = 3000) -> dict[str, Any]:
    """The dispatcher's accounting, asked over its ipc socket (what `iseg dispatch stats` prints); the
    identity captured = dropped + published + lost + in_flight is checked on every read."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"ipc://{run_dir(host)}/dispatch.sock")
        sock.send_multipart([b"stats", b"{}"])
        assert sock.poll(timeout_ms), f"the dispatcher on {host.name} did not answer within {timeout_ms} ms"
        stats = json.loads(sock.recv_multipart()[1])
    finally:
        sock.close(0)
    for camera, flow in stats["cameras"].items():
        assert flow["captured"] == flow["dropped"] + flow["published"] + flow["lost"] + flow["in_flight"], (camera, flow)
    return stats


def stored_alerts(host: Host) -> list[dict[str, Any]]:
    """Every alert in the publisher's store on `host` (its state dir is `publisher`)."""
    path = host.home / "publisher" / "alerts.sqlite3"
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        return [json.loads(body) for (body,) in db.execute("SELECT body FROM alerts ORDER BY id")]


def start_remote_worker(host: Host, config: Path, name: str, logs: Path) -> subprocess.Popen:
    """A `worker --remote` that connects to the main host over Curve TCP."""
    return start_role(host, config, ["worker", "--remote", "--name", name], name, logs)


def _series_key(labels: dict[str, str]) -> str:
    return ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))


class Heartbeats:
    """Every heartbeat the roles of one host send, read by binding that host's telemetry socket."""

    def __init__(self, ctx: zmq.Context, host: Host) -> None:
        run_dir(host).mkdir(parents=True, exist_ok=True)
        self.sock = ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(f"ipc://{run_dir(host)}/telemetry.sock")
        self.history: dict[str, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeats-{host.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(100):
                continue
            parts = self.sock.recv_multipart()
            if len(parts) == 2 and parts[0] == b"heartbeat":
                beat = json.loads(parts[1])
                with self._lock:
                    self.history.setdefault(beat["name"], []).append(beat)

    def latest(self, name: str) -> dict[str, Any] | None:
        """The newest heartbeat of role `name` (None before its first)."""
        with self._lock:
            beats = self.history.get(name)
            return beats[-1] if beats else None

    def names(self) -> list[str]:
        """Roles heard from so far."""
        with self._lock:
            return list(self.history)

    def next(self, name: str, timeout: float = 5.0) -> dict[str, Any]:
        """The first heartbeat of `name` sent after this call."""
        called = time.time()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            beat = self.latest(name)
            if beat is not None and beat["ts"] >= called:
                return beat
            time.sleep(0.02)
        raise AssertionError(f"no heartbeat from {name} within {timeout:g}s (heard: {self.names()})")

    def counter(self, name: str, series: str, **labels: str) -> float:
        """A counter from the newest heartbeat of `name` (0 when absent)."""
        beat = self.latest(name)
        if beat is None:
            return 0.0
        return beat["metrics"]["counters"].get(series, {}).get(_series_key(labels), 0.0)

    def close(self) -> None:
        """Stop reading and close the socket."""
        self._stop.set()
        self._thread.join(2)
        self.sock.close(0)


@dataclass(frozen=True)
class Published:
    """One overlay the publisher sent: which frame, who segmented it, when."""

    seq: int
    worker: str
    capture_ts: float
    published_ts: float


class Overlays:
    """Records every `overlay.<camera>` the publisher on `host` sends (a SUB on its ipc PUB)."""

    def __init__(self, ctx: zmq.Context, host: Host, camera: str = CAMERA) -> None:
        run_dir(host).mkdir(parents=True, exist_ok=True)
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock.setsockopt(zmq.SUBSCRIBE, f"overlay.{camera}".encode())
        self.sock.connect(f"ipc://{run_dir(host)}/publish.sock")
        self.frames: list[Published] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"overlays-{camera}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(100):
                continue
            header = json.loads(self.sock.recv_multipart()[1])
            with self._lock:
                self.frames.append(Published(header["seq"], header["worker"], header["capture_ts"],
                                             header["published_ts"]))

    def snapshot(self) -> list[Published]:
        """Everything published so far, in publishing order."""
        with self._lock:
            return list(self.frames)

    def seqs(self, first: int, end: int) -> set[int]:
        """Distinct sequence numbers in [first, end) published so far."""
        return {frame.seq for frame in self.snapshot() if first <= frame.seq < end}

    def per_worker(self, since: float = 0.0) -> dict[str, int]:
        """Frames published per worker so far, of those captured at or after `since` (wall clock)."""
        counts: dict[str, int] = {}
        for frame in self.snapshot():
            if frame.capture_ts >= since:
                counts[frame.worker] = counts.get(frame.worker, 0) + 1
        return counts

    def wait_for_workers(self, workers: list[str], count: int, timeout: float, alive: Callable[[], str],
                         since: float = 0.0) -> None:
        """Until every worker in `workers` has published `count` frames captured since `since`;
        `alive()` returns a reason to give up ('' while all is well)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            problem = alive()
            assert not problem, problem
            seen = self.per_worker(since)
            if all(seen.get(worker, 0) >= count for worker in workers):
                return
            time.sleep(0.2)
        raise AssertionError(f"workers {workers} did not each publish {count} frames in {timeout:g}s: "
                             f"{self.per_worker(since)}")

    def close(self) -> None:
        """Stop reading and close the socket."""
        self._stop.set()
        self._thread.join(2)
        self.sock.close(0)


def failover_s(published: list[Published], window: tuple[int, int], fault_start: float, faulted_worker: str,
               dropped: int, late_s: float) -> float | None:
    """Seconds from the fault's start until the camera's output is whole and on time again.

    That is the publish time of the first frame F captured after the fault started and segmented
    by a healthy worker (not `faulted_worker`) such that, within the window's sequence range,
    every frame published after F arrives within `late_s` of its capture and no more frames after
    F are missing than capture dropped at admission in the window. A stuck worker's backlog
    published later, or frames after F that never come, push the failover past F. None when the
    output never becomes whole again inside the window."""
    first, end = window
    frames: dict[int, Published] = {}
    for frame in published:
        if first <= frame.seq < end:
            frames.setdefault(frame.seq, frame)
    candidates = sorted((f for f in frames.values() if f.capture_ts >= fault_start and f.worker != faulted_worker),
                        key=lambda frame: frame.published_ts)
    for candidate in candidates:
        missing = sum(1 for seq in range(candidate.seq + 1, end) if seq not in frames)
        late = any(f.published_ts > candidate.published_ts and f.published_ts - f.capture_ts > late_s
                   for f in frames.values())
        if missing <= dropped and not late:
            return candidate.published_ts - fault_start
    return None


Fault = tuple[Callable[[], None], Callable[[], None]]
"""(inject, recover) for measure_fault."""


def worker_faults(host: Host, roles: dict[str, subprocess.Popen], role: str,
                  restart: Callable[[], subprocess.Popen]) -> dict[str, Fault]:
    """The faults of the worker process `roles[role]` on `host`, by name; `restart` starts a new one
    (it replaces `roles[role]`).

    freeze / blackhole: the process stops, or the host's network silently drops everything, until
    recovery thaws or restores it. kill: the process dies (its kernel closes its connections), a new
    one starts at recovery. freeze_then_replace: a hang ended the way supervisors end hangs, by
    killing the stuck process and starting another. blackhole_then_reboot: the host falls silent and
    its processes die (power loss); it comes back with a fresh worker."""
    def kill() -> None:
        host.kill(roles[role])

    def start() -> None:
        roles[role] = restart()

    def replace() -> None:
        kill()
        start()

    def crash() -> None:
        host.blackhole()
        kill()

    def reboot() -> None:
        start()
        host.restore()

    return {
        "freeze": (lambda: host.freeze(roles[role]), lambda: host.thaw(roles[role])),
        "blackhole": (host.blackhole, host.restore),
        "kill": (kill, start),
        "freeze_then_replace": (lambda: host.freeze(roles[role]), replace),
        "blackhole_then_reboot": (crash, reboot),
    }


LOSS_RECORDS = ("iseg_worker_failed_frames_total", "iseg_worker_unsent_results_total",
                "iseg_publisher_failed_frames_total")
"""Counters that record a frame lost after admission (today none names the frame)."""


def _recorded(telemetry: list[Heartbeats], camera: str) -> float:
    total = 0.0
    for beats in telemetry:
        for name in beats.names():
            beat = beats.latest(name) or {}
            counters = beat.get("metrics", {}).get("counters", {})
            for series in LOSS_RECORDS:
                for key, value in counters.get(series, {}).items():
                    if f'camera="{camera}"' in key:
                        total += value
    return total


def measure_fault(inject: Callable[[], None], recover: Callable[[], None], *, main: Heartbeats,
                  telemetry: list[Heartbeats], overlays: Overlays, faulted_worker: str,
                  fault_s: float = 3.0, lead_s: float = 1.0, settle_s: float = 3.0, quiet_s: float = 4.0,
                  late_s: float = 1.0, camera: str = CAMERA, capture_name: str = f"capture.{CAMERA}",
                  publisher_name: str = "publisher") -> dict[str, Any]:
    """Inject a fault for `fault_s`, recover, and account for every frame captured in the window.

    The window is a range of capture sequence numbers: from the capture heartbeat `lead_s` before
    the fault (so frames already queued when it struck count) to the one `settle_s` after recovery.
    Each heartbeat carries capture's (seq, sent, dropped) as one consistent triple, so
    captured = seq range, dropped = drops at admission, admitted = sent. Frames of the window keep
    being awaited until all are published or none has arrived for `quiet_s` (a TCP retransmission
    after a blackhole comes within one back-off step, under 4 s here); lost = admitted - published.
    `recorded` is how many frames the counters in LOSS_RECORDS attribute to this camera in the
    window; `gaps` and `late` are the publisher's anonymous gap counters over the same time;
    `failover_s` is defined in `failover_s` (frames later than `late_s` are not on time).
    """
    labels = {"camera": camera}
    start = main.next(capture_name)
    assert main.latest(publisher_name) is not None, f"no heartbeat from {publisher_name}"
    gaps_before = main.counter(publisher_name, "iseg_publisher_gap_frames_total", **labels)
    late_before = main.counter(publisher_name, "iseg_publisher_late_frames_total", **labels)
    recorded_before = _recorded(telemetry, camera)
    time.sleep(lead_s)
    fault_start = time.time()
    inject()
    time.sleep(fault_s)
    recover()
    recovered_at = time.time()
    time.sleep(settle_s)
    end = main.next(capture_name)
    first, last = start["state"]["seq"], end["state"]["seq"]
    admitted = end["state"]["sent"] - start["state"]["sent"]
    dropped = end["state"]["dropped"] - start["state"]["dropped"]
    quiet_since, count = time.monotonic(), len(overlays.seqs(first, last))
    while count < admitted and time.monotonic() - quiet_since < quiet_s:
        time.sleep(0.1)
        now_count = len(overlays.seqs(first, last))
        if now_count != count:
            quiet_since, count = time.monotonic(), now_count
    main.next(publisher_name)
    frames = [f for f in overlays.snapshot() if first <= f.seq < last]
    published = {f.seq for f in frames}
    return {
        "seq_range": [first, last],
        "captured": last - first,
        "dropped": dropped,
        "admitted": admitted,
        "published": len(published),
        "lost": admitted - len(published),
        "recorded": _recorded(telemetry, camera) - recorded_before,
        "gaps": main.counter(publisher_name, "iseg_publisher_gap_frames_total", **labels) - gaps_before,
        "late": main.counter(publisher_name, "iseg_publisher_late_frames_total", **labels) - late_before,
        "by_faulted_worker": sum(1 for f in frames if f.worker == faulted_worker),
        "max_latency_s": max((f.published_ts - f.capture_ts for f in frames), default=None),
        "fault_start": fault_start,
        "recovered_at": recovered_at,
        "failover_s": failover_s(frames, (first, last), fault_start, faulted_worker, dropped, late_s),
    }


def measure_dispatch_fault(ctx: zmq.Context, inject: Callable[[], None], recover: Callable[[], None], *,
                           capture_host: Host, main: Heartbeats, overlays: dict[str, list[Overlays]],
                           faulted_worker: str, fault_s: float = 3.0, lead_s: float = 1.0, settle_s: float = 3.0,
                           late_s: float = 1.5, quiet_s: float = 8.0) -> dict[str, Any]:
    """`measure_fault` for credit-based dispatch and any number of cameras (`overlays`: camera -> its
    subscribers on every publisher). The dispatcher does the accounting, so a camera's figures are
    differences of its counters over the fault (read with the identity checked every 0.25 s
    throughout), and frames published by either publisher count; each window's frames are awaited
    (at most `quiet_s`) until published or dropped at admission. Per camera, `failover_s` as in
    `failover_s` over its capture sequence window, with the dispatcher's drops at admission as the
    allowance, and `first_after_s`: the fault's start to the camera's first frame captured after it
    and published. The top level sums the counts and takes the worst camera's times (None when a
    camera never recovered)."""
    cameras = list(overlays)

    def flows() -> dict[str, Any]:
        return dispatcher_stats(ctx, capture_host)["cameras"]

    def watch(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            flows()
            time.sleep(0.25)

    def window_frames(camera: str, first: int, last: int) -> list[Published]:
        return sorted((f for o in overlays[camera] for f in o.snapshot() if first <= f.seq < last),
                      key=lambda f: f.published_ts)

    starts = {camera: main.next(f"capture.{camera}") for camera in cameras}
    before = flows()
    watch(lead_s)
    fault_start = time.time()
    inject()
    watch(fault_s)
    recover()
    recovered_at = time.time()
    watch(settle_s)
    ends = {camera: main.next(f"capture.{camera}") for camera in cameras}
    windows = {camera: (starts[camera]["state"]["seq"], ends[camera]["state"]["seq"]) for camera in cameras}
    deadline = time.monotonic() + quiet_s
    while time.monotonic() < deadline:
        now_flows = flows()
        if all(len({f.seq for f in window_frames(camera, *windows[camera])})
               + now_flows[camera]["dropped"] - before[camera]["dropped"] >= windows[camera][1] - windows[camera][0]
               for camera in cameras):
            break
        time.sleep(0.2)
    after = flows()
    per_camera = {}
    for camera in cameras:
        first, last = windows[camera]
        frames = window_frames(camera, first, last)
        delta = {key: after[camera][key] - before[camera][key]
                 for key in ("captured", "dropped", "published", "resent", "lost")}
        after_fault = [f for f in frames if f.capture_ts >= fault_start]
        per_camera[camera] = {
            "seq_range": [first, last], **delta,
            "lost_reasons": {reason: count - before[camera]["lost_reasons"].get(reason, 0)
                             for reason, count in after[camera]["lost_reasons"].items()},
            "in_flight": after[camera]["in_flight"],
            "by_faulted_worker": sum(1 for f in frames if f.worker == faulted_worker),
            "max_latency_s": max((f.published_ts - f.capture_ts for f in frames), default=None),
            "first_after_s": (min(f.published_ts for f in after_fault) - fault_start) if after_fault else None,
            "failover_s": failover_s(frames, (first, last), fault_start, faulted_worker, delta["dropped"], late_s),
        }

    def worst(key: str) -> float | None:
        values = [c[key] for c in per_camera.values()]
        return None if any(v is None for v in values) else max(values)

    return {**{key: sum(c[key] for c in per_camera.values())
               for key in ("captured", "dropped", "published", "resent", "lost", "in_flight", "by_faulted_worker")},
            "first_after_s": worst("first_after_s"), "failover_s": worst("failover_s"),
            "max_latency_s": worst("max_latency_s"), "fault_start": fault_start, "recovered_at": recovered_at,
            "cameras": per_camera}
