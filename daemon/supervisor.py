"""`iseg run`: starts every role as its own process from one config and keeps them alive.

A role that exits is restarted (with backoff); one that is hung — silent heartbeat, a
main loop that stopped turning, or an engine batch running past `batch_timeout_s` —
is killed and restarted. More than `max_restarts` in `restart_window_s` means
something is deeply wrong: the supervisor stops everything and exits 1 so systemd's
Restart= takes over. SIGTERM stops the roles in pipeline order (capture first, so
queued frames still drain through worker and publisher) within `stop_timeout_s`.

systemd hears READY=1 only once the model is loaded, embeddings are cached and a
first frame went all the way through; WATCHDOG=1 only while every heartbeat is fresh.
SIGHUP is the same orderly stop as SIGTERM.

It owns the state dir (an exclusive lock, shared with the roles it starts) and trusts a
heartbeat only from a process it started: the kernel's peer pid on the ipc connection,
the pid in the message and a per-start token must all match (daemon/messages.py), so a
forged or malformed heartbeat is counted and dropped, never believed. A role that says
it is `degraded` (alive but unable to do its job, e.g. a full disk) is not `up`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from daemon.config import DaemonConfig
from daemon.health import HealthServer, json_body
from daemon.linestats import api as linestats_api
from daemon.messages import MAX_HEARTBEAT_BYTES, Rejected, Rejections, heartbeat
from daemon.metrics import Registry, merge, parse_labels, quantile_from_histogram, render_labels, render_prometheus
from daemon.model_setup import ensure_model
from daemon.role import EX_CONFIG, StopFlag
from daemon.sdnotify import Notifier
from daemon.sinks.status import sink_stats
from daemon.state_lock import ENV_FD, acquire

STOP_ORDER = ("capture", "dispatch", "worker", "publisher", "recorder", "console", "sinks")
START_ORDER = ("publisher", "recorder", "console", "sinks", "dispatch", "worker", "capture")


def _ms(seconds: float | None) -> float | None:
    """/stats reports milliseconds (operators read it by eye); /metrics keeps seconds."""
    return None if seconds is None else seconds * 1000


@dataclass
class RoleProcess:
    """One supervised role: how to start it and what we last heard from it."""

    name: str
    role: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    heartbeat: dict[str, Any] | None = None
    heard_at: float = 0.0
    restarts: deque[float] = field(default_factory=deque)
    restart_total: int = 0
    restart_due: float | None = None
    token: str = ""
    retired_slot: int | None = None

    @property
    def pid(self) -> int | None:
        """The running process id, if any."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None


class Supervisor:
    """Process manager, telemetry sink, health server and systemd notifier in one loop."""

    def __init__(self, config: DaemonConfig, stop: StopFlag, duration: float | None = None) -> None:
        self.config = config
        self.stop = stop
        self.duration = duration
        self.log = logging.getLogger("iseg.supervisor")
        self.notifier = Notifier()
        self.metrics = Registry()
        self.retired: list[dict[str, Any]] = []
        self.ready = False
        self.ready_at: float | None = None
        self.failed = ""
        self.exit_code = 1
        self.last_loop = time.time()
        self.last_watchdog = 0.0
        self.phase = "starting"
        self.stopped_roles = False
        self.rejections = Rejections(self.metrics, "supervisor", self.log)
        self.lock_fd: int | None = None
        base = [sys.executable, "-m", "daemon"]
        config_arg = ["--config", str(Path(config.path).resolve())]
        self.roles: list[RoleProcess] = [RoleProcess("publisher", "publisher", base + ["publish"] + config_arg)]
        if config.recorder.enabled:
            self.roles.append(RoleProcess("recorder", "recorder", base + ["record"] + config_arg))
        if config.console.enabled:
            self.roles.append(RoleProcess("console", "console", base + ["console"] + config_arg))
        if config.sinks:
            self.roles.append(RoleProcess("sinks", "sinks", base + ["sinks"] + config_arg))
        if config.dispatch.enabled:
            self.roles.append(RoleProcess("dispatch", "dispatch", base + ["dispatch"] + config_arg))
        for i in range(config.worker.count):
            self.roles.append(RoleProcess(f"worker.{i}", "worker", base + ["worker", "--name", f"worker.{i}"] + config_arg))
        for camera in config.cameras:
            self.roles.append(RoleProcess(f"capture.{camera.id}", "capture",
                                          base + ["capture", "--camera", camera.id] + config_arg))
        for role in self.roles:
            self.metrics.inc("iseg_role_restarts_total", 0, role=role.name)

    # -- processes -------------------------------------------------------------------------

    def _spawn(self, role: RoleProcess) -> None:
        role.token = secrets.token_hex(16)
        env = {**os.environ, "ISEG_SUPERVISOR_PID": str(os.getpid()), "PYTHONUNBUFFERED": "1",
               "ISEG_HEARTBEAT_TOKEN": role.token}
        env.pop("NOTIFY_SOCKET", None)
        fds: tuple[int, ...] = ()
        if self.lock_fd is not None:
            env[ENV_FD] = str(self.lock_fd)
            fds = (self.lock_fd,)
        role.proc = subprocess.Popen(role.argv, env=env, start_new_session=True, pass_fds=fds)
        role.started_at = time.time()
        role.heartbeat = None
        role.heard_at = 0.0
        role.restart_due = None
        role.retired_slot = None
        self.log.info("started %s (pid %d)", role.name, role.proc.pid)

    def _retire(self, role: RoleProcess) -> None:
        """Keep a dead instance's counters so /metrics totals survive restarts."""
        if role.heartbeat is not None:
            role.retired_slot = len(self.retired)
            self.retired.append(self._counters_of(role.heartbeat))
            role.heartbeat = None

    @staticmethod
    def _counters_of(beat: dict[str, Any]) -> dict[str, Any]:
        """What outlives an instance: its counters and histograms. A dispatcher's frames in flight at
        its last heartbeat died with it: they count as lost, reason dispatcher_lost, so a camera's
        captured = dropped + published + lost + in_flight still holds across its restart."""
        snapshot = beat.get("metrics", {})
        counters = {name: dict(series) for name, series in snapshot.get("counters", {}).items()}
        if beat.get("role") == "dispatch":
            lost = counters.setdefault("iseg_dispatch_lost_frames_total", {})
            for labels, value in snapshot.get("gauges", {}).get("iseg_dispatch_in_flight_frames", {}).items():
                camera = parse_labels(labels).get("camera", "")
                key = render_labels({"camera": camera, "reason": "dispatcher_lost"})
                lost[key] = lost.get(key, 0.0) + value
        return {"counters": counters, "histograms": snapshot.get("histograms", {})}

    def _schedule_restart(self, role: RoleProcess, reason: str) -> None:
        now = time.time()
        self._retire(role)
        window = self.config.supervisor.restart_window_s
        while role.restarts and now - role.restarts[0] > window:
            role.restarts.popleft()
        if len(role.restarts) >= self.config.supervisor.max_restarts:
            self.failed = (f"{role.name} needed more than {self.config.supervisor.max_restarts} restarts in "
                           f"{window:g}s (last: {reason}); giving up")
            self.log.critical("%s", self.failed)
            self.stop.event.set()
            return
        role.restarts.append(now)
        role.restart_total += 1
        self.metrics.inc("iseg_role_restarts_total", role=role.name)
        delay = min(30.0, self.config.supervisor.restart_backoff_s * 2 ** (len(role.restarts) - 1))
        role.restart_due = now + delay
        self.log.warning("%s %s; restarting in %.1fs (%d in the last %gs)", role.name, reason, delay,
                         len(role.restarts), window)

    def _hung_reason(self, role: RoleProcess, now: float) -> str:
        """Why a running role counts as hung, or '' when it is fine."""
        timeout = self.config.supervisor.heartbeat_timeout_s
        grace = max(timeout, 60.0) if role.role == "worker" else timeout
        if role.heartbeat is None:
            return f"sent no heartbeat within {grace:g}s of starting" if now - role.started_at > grace else ""
        if now - role.heard_at > timeout:
            return f"heartbeat silent for {now - role.heard_at:.1f}s"
        busy_since = role.heartbeat.get("busy_since")
        if busy_since and now - busy_since > self.config.worker.batch_timeout_s:
            return f"batch running for {now - busy_since:.1f}s (worker.batch_timeout_s {self.config.worker.batch_timeout_s:g})"
        loading = role.role == "worker" and not role.heartbeat.get("state", {}).get("ready")
        if not busy_since and not loading and now - float(role.heartbeat.get("progress_at", now)) > timeout:
            return f"main loop stuck for {now - float(role.heartbeat['progress_at']):.1f}s"
        return ""

    def _check_roles(self) -> None:
        now = time.time()
        for role in self.roles:
            if role.proc is None:
                continue
            code = role.proc.poll()
            if code is not None:
                if code == EX_CONFIG and not self.stop.stopping:
                    self.failed = (f"{role.name} cannot start with this configuration (exit {EX_CONFIG}, "
                                   "its error is logged above); fix the config, then start again")
                    self.exit_code = EX_CONFIG
                    self.log.critical("%s", self.failed)
                    self.stop.event.set()
                elif role.restart_due is None:
                    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                    self._schedule_restart(role, how)
                elif now >= role.restart_due and not self.stop.stopping:
                    self._spawn(role)
                continue
            reason = self._hung_reason(role, now)
            if reason:
                self.log.error("%s (pid %d) is hung: %s; killing it", role.name, role.proc.pid, reason)
                role.proc.kill()
                role.proc.wait(5)
                self._schedule_restart(role, f"was hung ({reason})")

    # -- telemetry and readiness -----------------------------------------------------------

    def _expected(self) -> dict[str, tuple[str, int | None, str]]:
        """Who may send heartbeats: each role's kind, the pid this supervisor started last, its token."""
        return {role.name: (role.role, role.proc.pid if role.proc is not None else None, role.token)
                for role in self.roles}

    def _read_telemetry(self, sock: zmq.Socket, wait_ms: int = 0) -> None:
        """Take every queued heartbeat that passes its schema; a running role's becomes its latest,
        an exited one's (its last words, sent as it stopped) replaces the counters it left behind."""
        by_name = {role.name: role for role in self.roles}
        expected = self._expected()
        while sock.poll(wait_ms):
            try:
                beat = heartbeat(sock.recv_multipart(copy=False), expected)
            except Rejected as err:
                self.rejections.count("telemetry", err)
                continue
            role = by_name[beat["name"]]
            if role.pid is not None:
                role.heartbeat = beat
                role.heard_at = time.time()
            elif role.retired_slot is not None:
                self.retired[role.retired_slot] = self._counters_of(beat)
            else:
                role.heartbeat = beat

    def _fresh(self, role: RoleProcess, now: float) -> bool:
        return role.pid is not None and role.heartbeat is not None and now - role.heard_at <= self.config.supervisor.heartbeat_timeout_s

    @staticmethod
    def _degraded(role: RoleProcess) -> str:
        """Why a live role is not doing its job (e.g. a full disk), as its heartbeat says; '' when it is."""
        return str((role.heartbeat or {}).get("state", {}).get("degraded") or "")

    def _update_readiness(self) -> None:
        now = time.time()
        for role in self.roles:
            degraded = self._degraded(role)
            self.metrics.set("iseg_role_up", 1 if self._fresh(role, now) and not degraded else 0, role=role.name)
            self.metrics.set("iseg_role_degraded", 1 if degraded else 0, role=role.name)
            if role.role == "worker":
                loaded = bool(role.heartbeat and role.heartbeat.get("state", {}).get("ready"))
                self.metrics.set("iseg_worker_ready", 1 if loaded and self._fresh(role, now) else 0, worker=role.name)
        if not self.ready:
            workers = [r for r in self.roles if r.role == "worker"]
            publisher = self.roles[0]
            workers_ready = all(r.heartbeat and r.heartbeat.get("state", {}).get("ready") for r in workers)
            first_frame = bool(publisher.heartbeat and publisher.heartbeat.get("state", {}).get("first_frame"))
            if workers_ready and first_frame:
                self.ready = True
                self.ready_at = now
                self.log.info("ready: model loaded, embeddings cached, first frame published")
                self.notifier.notify("READY=1\nSTATUS=inspecting")
        interval = self.notifier.watchdog_interval_s
        if interval and now - self.last_watchdog >= interval:
            stale = [r.name for r in self.roles if not self._fresh(r, now)]
            if not stale:
                self.notifier.notify("WATCHDOG=1")
                self.last_watchdog = now
            else:
                self.notifier.notify(f"STATUS=waiting for heartbeat of {', '.join(stale)}")

    # -- HTTP -----------------------------------------------------------------------------

    def _snapshots(self) -> list[dict[str, Any]]:
        live = [r.heartbeat.get("metrics", {}) for r in self.roles if r.heartbeat is not None]
        return self.retired + live + [self.metrics.snapshot()]

    def stats(self) -> dict[str, Any]:
        """The /stats document: roles, per-camera flow, readiness."""
        now = time.time()
        merged = merge(self._snapshots())
        cameras: dict[str, dict[str, Any]] = {c.id: {} for c in self.config.cameras}
        names = {"iseg_capture_frames_total": "captured", "iseg_capture_dropped_frames_total": "dropped",
                 "iseg_capture_reconnects_total": "reconnects", "iseg_worker_frames_total": "processed",
                 "iseg_worker_failed_frames_total": "failed", "iseg_publisher_frames_total": "published",
                 "iseg_publisher_failed_frames_total": "published_failed", "iseg_publisher_gap_frames_total": "gaps",
                 "iseg_publisher_late_frames_total": "late",
                 "iseg_alerts_total": "alerts", "iseg_flagged_frames_total": "flagged",
                 "iseg_recorder_frames_total": "recorded", "iseg_recorder_disk_full_total": "disk_full",
                 "iseg_capture_frames_per_second": "fps"}
        for metric, key in names.items():
            series = merged["counters"].get(metric) or merged["gauges"].get(metric) or {}
            for labels, value in series.items():
                camera = parse_labels(labels).get("camera")
                if camera in cameras:
                    cameras[camera][key] = cameras[camera].get(key, 0) + value
        for flow in cameras.values():
            flow["gaps"] = flow.get("gaps", 0) - flow.pop("late", 0)
        if self.config.dispatch.enabled:
            self._dispatch_flow(merged, cameras)
        for metric, key in (("iseg_capture_to_publish_seconds", "latency"), ("iseg_worker_inference_seconds", "inference")):
            for labels, hist in merged["histograms"].get(metric, {}).items():
                camera = parse_labels(labels).get("camera")
                if camera in cameras:
                    cameras[camera][f"{key}_ms_p50"] = _ms(quantile_from_histogram(hist, 0.5))
                    cameras[camera][f"{key}_ms_p99"] = _ms(quantile_from_histogram(hist, 0.99))
                    cameras[camera][f"{key}_ms_mean"] = _ms(hist["sum"] / hist["count"] if hist["count"] else None)
        rejected: dict[str, dict[str, float]] = {}
        for labels, value in merged["counters"].get("iseg_rejected_messages_total", {}).items():
            parsed = parse_labels(labels)
            into = rejected.setdefault(parsed.get("role", ""), {})
            into[parsed.get("reason", "")] = into.get(parsed.get("reason", ""), 0) + value
        roles = {}
        for role in self.roles:
            hb = role.heartbeat or {}
            degraded = self._degraded(role)
            roles[role.name] = {"pid": role.pid, "up": self._fresh(role, now) and not degraded, "degraded": degraded,
                                "restarts": role.restart_total,
                                "heartbeat_age_s": round(now - role.heard_at, 2) if role.heard_at else None,
                                "busy_since": hb.get("busy_since"), "state": hb.get("state", {}),
                                "rejected": rejected.get(role.name, {})}
        sinks = sink_stats(merged, [r.heartbeat for r in self.roles if r.role == "sinks"], self.config.sinks)
        return {"ready": self.ready, "failed": self.failed, "state_dir": str(self.config.state_path),
                "roles": roles, "cameras": cameras, "sinks": sinks,
                "health": linestats_api.health(self.config, now)["cameras"],
                "supervisor": {"rejected": rejected.get("supervisor", {})}, "ts": now}

    @staticmethod
    def _dispatch_flow(merged: dict[str, Any], cameras: dict[str, dict[str, Any]]) -> None:
        """With dispatch, a camera's captured / dropped / published / resent / lost / in_flight are the
        dispatcher's: one process counts them all, so captured = dropped + published + lost + in_flight
        holds in every snapshot (published counts acknowledged frames, failed ones included)."""
        names = {"iseg_dispatch_captured_frames_total": "captured", "iseg_dispatch_dropped_frames_total": "dropped",
                 "iseg_dispatch_published_frames_total": "published", "iseg_dispatch_resent_frames_total": "resent",
                 "iseg_dispatch_in_flight_frames": "in_flight"}
        flows: dict[str, dict[str, Any]] = {camera: {"lost": 0, "lost_reasons": {}} for camera in cameras}
        for metric, key in names.items():
            series = merged["counters"].get(metric) or merged["gauges"].get(metric) or {}
            for labels, value in series.items():
                camera = parse_labels(labels).get("camera")
                if camera in flows:
                    flows[camera][key] = int(flows[camera].get(key, 0) + value)
        for labels, value in merged["counters"].get("iseg_dispatch_lost_frames_total", {}).items():
            parsed = parse_labels(labels)
            if parsed.get("camera") in flows:
                flow = flows[parsed["camera"]]
                flow["lost"] += int(value)
                reason = parsed.get("reason", "")
                flow["lost_reasons"][reason] = flow["lost_reasons"].get(reason, 0) + int(value)
        for camera, flow in flows.items():
            if "captured" in flow:
                for key in names.values():
                    flow.setdefault(key, 0)
                cameras[camera]["capture_read"] = cameras[camera].get("captured", 0)
                cameras[camera]["publisher_frames"] = cameras[camera].get("published", 0)
                cameras[camera].update(flow)

    def respond(self, path: str) -> tuple[int, str, bytes]:
        """Answer one HTTP path."""
        now = time.time()
        if path == "/healthz":
            healthy = not self.failed and (self.phase != "running" or now - self.last_loop < 5.0)
            sinks = {name: info["state"] for name, info in self.stats()["sinks"].items()}
            return json_body(200 if healthy else 503, {"healthy": healthy, "phase": self.phase, "failed": self.failed,
                                                       "sinks": sinks})
        if path == "/readyz":
            stale = [r.name for r in self.roles if not self._fresh(r, now)]
            ok = self.ready and not stale and not self.failed
            degraded = {r.name: self._degraded(r) for r in self.roles if self._degraded(r)}
            return json_body(200 if ok else 503, {"ready": ok, "first_frame_done": self.ready, "stale_roles": stale,
                                                  "degraded_roles": degraded})
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", render_prometheus(self._snapshots()).encode()
        if path == "/stats":
            return json_body(200, self.stats())
        return json_body(404, {"error": f"no such path {path}; try /healthz /readyz /metrics /stats"})

    # -- main ------------------------------------------------------------------------------

    def print_banner(self, url: str) -> None:
        """Where everything is, for the operator starting the daemon by hand."""
        c = self.config
        lines = [f"iseg daemon: {len(c.cameras)} camera(s), {c.worker.count} local worker(s)",
                 f"  metrics:   {url}/metrics   (also /healthz /readyz /stats)",
                 f"  publish:   {c.endpoint('publish')}   (topics overlay.<camera> mask.<camera> alert.<camera> stats)",
                 f"  replay:    {c.endpoint('replay')}",
                 *(f"  frames:    {c.endpoint('frames', cam.id)}   (camera {cam.id}: {cam.source_kind})" for cam in c.cameras),
                 *([f"  console:   {'https' if c.console.tls else 'http'}://{c.console.listen}/   "
                    f"(users: iseg users add NAME --role operator --config {c.path})"] if c.console.enabled else []),
                 f"  state dir: {c.state_path}",
                 f"  watch alerts:  iseg subscribe --config {c.path} --topic alert.",
                 f"  review frames: iseg review list --config {c.path}"]
        print("\n".join(lines), flush=True)

    def _stop_roles(self) -> None:
        if self.stopped_roles:
            return
        self.stopped_roles = True
        deadline = time.monotonic() + self.config.supervisor.stop_timeout_s
        self.notifier.notify("STOPPING=1")
        for group in STOP_ORDER:
            members = [r for r in self.roles if r.role == group and r.pid is not None]
            for role in members:
                role.proc.send_signal(signal.SIGTERM)
            for role in members:
                remaining = max(0.1, deadline - time.monotonic())
                try:
                    role.proc.wait(remaining)
                except subprocess.TimeoutExpired:
                    self.log.error("%s did not stop within the stop timeout; killing it", role.name)
                    role.proc.kill()
                    role.proc.wait(5)
        for role in self.roles:
            if role.proc is not None and role.proc.poll() is None:
                role.proc.kill()
                role.proc.wait(5)

    def _drain_final(self, sock: zmq.Socket) -> None:
        """Take the roles' last heartbeats (final counters) sent as they stopped."""
        self._read_telemetry(sock, wait_ms=200)

    def _write(self, path: Path, text: str) -> None:
        """A convenience file for operators; a full disk must not stop supervision."""
        try:
            path.write_text(text)
        except OSError as err:
            self.log.error("cannot write %s: %s", path, err)

    def run(self) -> int:
        """Run until SIGTERM/SIGINT, `duration`, too many restarts (exit 1) or a role that cannot
        start with this configuration (exit EX_CONFIG); 0 after a clean stop."""
        config = self.config
        self.lock_fd = acquire(config.state_path)
        config.run_path.mkdir(parents=True, exist_ok=True)
        ctx = zmq.Context()
        telemetry = ctx.socket(zmq.PULL)
        telemetry.setsockopt(zmq.RCVHWM, 1000)
        telemetry.setsockopt(zmq.MAXMSGSIZE, MAX_HEARTBEAT_BYTES + 1024)
        telemetry.setsockopt(zmq.LINGER, 0)
        telemetry.bind(config.endpoint("telemetry"))
        server = HealthServer(config.metrics.listen, self.respond).start()
        self.print_banner(server.url)
        self._write(config.run_path / "http.url", server.url)
        try:
            if config.worker.count:
                self.phase = "preparing the model"
                ensure_model(config)
            self.phase = "running"
            for group in START_ORDER:
                for role in self.roles:
                    if role.role == group:
                        self._spawn(role)
            started = time.monotonic()
            while not self.stop.stopping:
                self.last_loop = time.time()
                self._read_telemetry(telemetry)
                self._check_roles()
                self._update_readiness()
                if self.duration is not None and time.monotonic() - started >= self.duration:
                    self.log.info("--duration %gs reached", self.duration)
                    break
                self.stop.wait(0.2)
            self.phase = "stopping"
            self.log.info("stopping (%s)", self.stop.signal_name or ("failure" if self.failed else "duration"))
            self._stop_roles()
            self._drain_final(telemetry)
            self._write(config.state_path / "last_stats.json", json.dumps(self.stats(), indent=1))
        finally:
            self._stop_roles()
            server.stop()
            telemetry.close()
            ctx.term()
        self.log.info("stopped")
        return self.exit_code if self.failed else 0
