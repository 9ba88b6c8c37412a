"""Capture against a real MJPEG-over-HTTP camera (tests/e2e/mjpeg_server.py, a separate
process behind HTTP Basic auth): frames arrive with the ROI applied; the camera goes
away and comes back and capture reconnects; the password never reaches the log; a
wrong password is a clear, redacted error and capture keeps retrying."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
import zmq

from conftest import REPO, free_port

from daemon.wire import frame_from, recv

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

PASSWORD = "s3cret-Pa55"


def start_camera(port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("mjpeg_server.py")), str(port),
                               "inspect", PASSWORD], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert server.stdout.readline().strip() == "READY"
    return server


def receive_frames(pull: zmq.Socket, count: int, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    messages = []
    while len(messages) < count and time.monotonic() < deadline:
        if pull.poll(200):
            messages.append(recv(pull))
    return messages


def start_capture(make_config, source: str, name: str) -> tuple[subprocess.Popen, Path, zmq.Context, zmq.Socket]:
    config = make_config({"cameras": [{"id": "belt1", "source": source, "fps": 5, "open_timeout_s": 3.0,
                                       "read_timeout_s": 2.0, "stall_timeout_s": 3.0, "reconnect_initial_s": 0.5,
                                       "reconnect_max_s": 2.0, "roi": [40, 20, 200, 160]}]}, name=f"{name}.yaml")
    state = Path(yaml.safe_load(config.read_text())["state_dir"])
    (state / "run").mkdir(parents=True, exist_ok=True)
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(f"ipc://{state}/run/frames-belt1.sock")
    log_path = config.with_name(f"{name}.log")
    capture = subprocess.Popen([sys.executable, "-m", "daemon", "capture", "--camera", "belt1", "--config", str(config)],
                               cwd=REPO, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    return capture, log_path, ctx, pull


def test_mjpeg_camera_goes_away_and_returns_capture_reconnects(make_config):
    port = free_port()
    camera = start_camera(port)
    capture, log_path, ctx, pull = start_capture(
        make_config, f"http://inspect:{PASSWORD}@127.0.0.1:{port}/stream.mjpg", "capture")
    try:
        first = receive_frames(pull, 5, 30)
        assert len(first) == 5, log_path.read_text()
        frames = [frame_from(m) for m in first]
        assert frames[0].shape == (160, 200, 3) and frames[0].std() > 5  # ROI applied, a real picture
        assert any(abs(a.astype(int) - b).mean() > 1 for a, b in zip(frames, frames[1:]))  # a live stream
        seqs = [m.header["seq"] for m in first]
        assert seqs == sorted(seqs)

        camera.kill()
        camera.wait(10)
        time.sleep(5)  # read timeout + stall: capture notices and starts reconnecting
        while pull.poll(0):
            recv(pull)
        camera = start_camera(port)
        resumed = receive_frames(pull, 5, 45)
        assert len(resumed) == 5, log_path.read_text()
        assert resumed[0].header["seq"] > seqs[-1]
        assert capture.poll() is None
    finally:
        capture.terminate()
        assert capture.wait(20) == 0
        camera.kill()
        camera.wait(10)
        pull.close(0)
        ctx.term()
    log = log_path.read_text()
    assert log.count("source open") >= 2, log
    assert PASSWORD not in log


def test_wrong_password_is_a_redacted_error_and_capture_keeps_trying(make_config):
    port = free_port()
    camera = start_camera(port)
    capture, log_path, ctx, pull = start_capture(
        make_config, f"http://inspect:wrong-{PASSWORD}@127.0.0.1:{port}/stream.mjpg", "badauth")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and log_path.read_text().count("cannot open") < 2:
            time.sleep(0.5)
        assert capture.poll() is None
        assert not pull.poll(0)
    finally:
        capture.terminate()
        assert capture.wait(20) == 0
        camera.kill()
        camera.wait(10)
        pull.close(0)
        ctx.term()
    log = log_path.read_text()
    assert log.count("cannot open http://***@127.0.0.1") >= 2 and "wrong user or password" in log, log
    assert PASSWORD not in log
