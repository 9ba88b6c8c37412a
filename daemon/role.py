"""What every role process shares: logging, a stop flag for SIGTERM, and a heartbeat thread.

The heartbeat carries the role's liveness (`progress_at`: last main-loop turn,
`busy_since`: start of a running engine batch), its state (`ready`, ...) and its
metrics snapshot to the supervisor's telemetry socket. It is a separate thread so a
slow batch is visible as *busy*, while a frozen process is visible as *silent*.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import zmq

from daemon.metrics import Registry
from daemon.wire import send

HEARTBEAT_INTERVAL_S = 1.0

EX_CONFIG = 78
"""Exit status (sysexits' EX_CONFIG) of a role that cannot start with this configuration,
e.g. a model or ONNX export that does not match it: restarting it cannot help, so the
supervisor stops instead of retrying and systemd units list it in RestartPreventExitStatus."""


def setup_logging(level: str = "INFO") -> None:
    """stdlib logging to stdout (journald collects it); one line per record with the logger name."""
    root = logging.getLogger()
    if not any(getattr(h, "_iseg", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"))
        handler._iseg = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)


class StopFlag:
    """Set by SIGTERM, SIGINT or SIGHUP; loops poll it so they finish the message in hand and exit
    cleanly. SIGHUP (a closed terminal, `systemctl kill -s HUP`) is the same orderly stop, exit 0,
    not a config reload: start the daemon again to apply a changed config."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name = ""

    def install(self) -> "StopFlag":
        """Route SIGTERM, SIGINT and SIGHUP here (main thread only)."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name
        self.event.set()

    @property
    def stopping(self) -> bool:
        """True once a stop was asked for."""
        return self.event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking early on stop; True when stopping."""
        return self.event.wait(seconds)


class Heartbeat:
    """Sends this role's liveness, state and metrics to the supervisor once a second."""

    def __init__(self, ctx: zmq.Context, endpoint: str, role: str, name: str, metrics: Registry,
                 stop: StopFlag | None = None) -> None:
        self.ctx = ctx
        self.stop_flag = stop
        supervisor = os.environ.get("ISEG_SUPERVISOR_PID", "")
        self.supervisor_pid = int(supervisor) if supervisor.isdigit() else None
        self.token = os.environ.get("ISEG_HEARTBEAT_TOKEN", "")
        self.endpoint = endpoint
        self.role = role
        self.name = name
        self.metrics = metrics
        self.progress_at = time.time()
        self.busy_since: float | None = None
        self.state: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{name}", daemon=True)

    def start(self) -> "Heartbeat":
        """Begin sending."""
        self._thread.start()
        return self

    def progress(self) -> None:
        """The main loop turned (call at least every heartbeat timeout)."""
        self.progress_at = time.time()

    def busy(self, running: bool) -> None:
        """Mark an engine batch as running / finished (a batch past its timeout is a hang)."""
        self.busy_since = time.time() if running else None
        self.progress_at = time.time()

    def update(self, **state: Any) -> None:
        """Merge JSON-safe state (ready, connected, ...) into the next heartbeat."""
        with self._lock:
            self.state.update(state)

    def message(self) -> dict[str, Any]:
        """The heartbeat as sent."""
        with self._lock:
            state = dict(self.state)
        return {"role": self.role, "name": self.name, "pid": os.getpid(), "token": self.token, "ts": time.time(),
                "progress_at": self.progress_at, "busy_since": self.busy_since, "state": state,
                "metrics": self.metrics.snapshot()}

    def send_now(self, sock: zmq.Socket) -> None:
        """One heartbeat, dropped if the supervisor is not reading (never blocks)."""
        try:
            send(sock, "heartbeat", self.message(), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _run(self) -> None:
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 10)
        sock.setsockopt(zmq.LINGER, 500)
        sock.connect(self.endpoint)
        try:
            while not self._stop.is_set():
                self.send_now(sock)
                if self.supervisor_pid and os.getppid() != self.supervisor_pid and self.stop_flag:
                    logging.getLogger(f"iseg.{self.name}").warning("supervisor is gone; stopping")
                    self.stop_flag.event.set()
                self._stop.wait(HEARTBEAT_INTERVAL_S)
            self.update(stopped=True)
            self.send_now(sock)
        finally:
            sock.close()

    def stop(self) -> None:
        """Send a last heartbeat (final counters) and end the thread."""
        self._stop.set()
        self._thread.join(timeout=2.0)
