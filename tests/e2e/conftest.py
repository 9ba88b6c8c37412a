"""Fixtures for end-to-end tests: a tiny model built once, configs in tmp dirs, and a
running `iseg run` daemon (a real process tree) with helpers to read its HTTP endpoints."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_model(tiny_sd21: Path) -> Path:
    """The shared tiny SD 2.1-topology model (tests/conftest.py builds it once)."""
    return tiny_sd21


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `changes` into a copy of `base`."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def fast_config(state_dir: str, model_dir: Path, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """A fast test config (synthetic camera, size 128, 4 fps, one worker) with `changes` deep-merged in."""
    base = {
        "state_dir": state_dir,
        "engine": {"model_dir": str(model_dir), "settings": {"size": 128, "iters": 3, "cluster": False,
                                                             "bg_context": "metal surface, background"}},
        "worker": {"count": 1, "batch_size": 2, "max_wait_ms": 30, "torch_threads": 1},
        "cameras": [{"id": "belt1", "source": "synthetic", "fps": 4, "classes": ["scratch", "dent"],
                     "bg_context": "metal surface, background",
                     "thresholds": {"scratch": 0.0, "dent": 1.0},
                     "synthetic": {"seed": 3, "width": 160, "height": 120}}],
        "alerts": {"k": 2, "n": 3, "cooldown_s": 1.0},
        "recorder": {"min_free_mb": 1, "retention_days": 1},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "supervisor": {"heartbeat_timeout_s": 6, "stop_timeout_s": 20, "restart_backoff_s": 0.2},
    }
    return merge(base, changes or {})


@pytest.fixture
def make_config(tmp_path: Path, tiny_model: Path) -> Callable[..., Path]:
    """Write `fast_config` with overrides under the test's tmp dir; returns its path."""
    def write(changes: dict[str, Any] | None = None, name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(fast_config(str(tmp_path / "state"), tiny_model, changes)))
        return path
    return write


def iseg(*args: str, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run `python -m daemon ...` to completion."""
    kwargs.setdefault("timeout", 120)
    return subprocess.run([sys.executable, "-m", "daemon", *args], cwd=REPO, capture_output=True, text=True, **kwargs)


class Daemon:
    """A running `iseg run` process tree."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        settings = yaml.safe_load(config.read_text())
        self.url = "http://" + settings["metrics"]["listen"]
        self.state = Path(settings["state_dir"])
        self.log_path = config.with_suffix(".log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(config)], cwd=REPO,
                                     stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def get(self, path: str) -> tuple[int, str]:
        """HTTP GET on the supervisor; (status, body); (0, '') when not listening yet."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0, ""

    def stats(self) -> dict[str, Any]:
        """The /stats document."""
        status, body = self.get("/stats")
        assert status == 200, f"/stats answered {status}; log:\n{self.tail()}"
        return json.loads(body)

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        """Poll /stats until predicate holds; fail with the log tail otherwise."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"daemon exited ({self.proc.returncode}) waiting for {what}:\n{self.tail()}"
            status, body = self.get("/stats")
            if status == 200:
                last = json.loads(body)
                if predicate(last):
                    return last
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}; last stats {json.dumps(last)[:1500]}\nlog:\n{self.tail()}")

    def wait_ready(self, timeout: float = 90) -> dict[str, Any]:
        """Until /readyz is 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"daemon exited ({self.proc.returncode}):\n{self.tail()}"
            if self.get("/readyz")[0] == 200:
                return self.stats()
            time.sleep(0.3)
        raise AssertionError(f"daemon not ready in {timeout}s:\n{self.tail()}")

    def terminate(self, timeout: float = 40) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def tail(self, lines: int = 60) -> str:
        """The end of the daemon's log."""
        self.log.flush()
        return "\n".join(self.log_path.read_text().splitlines()[-lines:])

    def close(self) -> None:
        """Make sure the whole tree is gone."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@pytest.fixture
def start_daemon() -> Callable[..., Daemon]:
    """Start daemons; all are stopped at the end of the test."""
    started: list[Daemon] = []

    def start(config: Path, env: dict[str, str] | None = None) -> Daemon:
        daemon = Daemon(config, env)
        started.append(daemon)
        return daemon
    yield start
    for daemon in started:
        daemon.close()


class CaptureRun:
    """A running `iseg capture --camera belt1` and a PULL socket on its frame queue (bound where the
    dispatcher would be, or connected to the capture's own socket without dispatch)."""

    def __init__(self, config: Path, name: str) -> None:
        import zmq

        settings = yaml.safe_load(config.read_text())
        state = Path(settings["state_dir"])
        (state / "run").mkdir(parents=True, exist_ok=True)
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        if settings.get("dispatch", {}).get("enabled", True):
            self.pull.bind(f"ipc://{state}/run/intake.sock")  # stands in for the dispatcher
        else:
            self.pull.connect(f"ipc://{state}/run/frames-belt1.sock")
        self.log_path = config.with_name(f"{name}.log")
        self.proc = subprocess.Popen([sys.executable, "-m", "daemon", "capture", "--camera", "belt1", "--config", str(config)],
                                     cwd=REPO, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)

    def frames(self, count: int, timeout: float) -> list:
        """Up to `count` frame messages, waiting at most `timeout` seconds."""
        from daemon.wire import recv

        deadline = time.monotonic() + timeout
        messages = []
        while len(messages) < count and time.monotonic() < deadline:
            if self.pull.poll(200):
                messages.append(recv(self.pull))
        return messages

    def drain(self) -> None:
        """Drop whatever is queued."""
        while self.frames(1, 0):
            pass

    def log(self) -> str:
        """Everything the capture process printed so far."""
        return self.log_path.read_text()

    def stop(self) -> int:
        """SIGTERM, wait, close the socket (once); the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(20)
        if not self.ctx.closed:
            self.pull.close(0)
            self.ctx.term()
        return code


@pytest.fixture
def start_capture() -> Callable[[Path, str], CaptureRun]:
    """Start capture roles; each must stop with exit code 0 by the end of the test."""
    started: list[CaptureRun] = []

    def start(config: Path, name: str = "capture") -> CaptureRun:
        run = CaptureRun(config, name)
        started.append(run)
        return run
    yield start
    codes = [run.stop() for run in started]
    assert codes == [0] * len(codes), codes

from netns import plant  # noqa: E402,F401  (the emulated-hosts fixture, for every e2e test)
