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

from conftest import free_port

from daemon.wire import frame_from

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

PASSWORD = "s3cret-Pa55"


def start_camera(port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("mjpeg_server.py")), str(port),
                               "inspect", PASSWORD], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert server.stdout.readline().strip() == "READY"
    return server


def camera_config(make_config, source: str, name: str) -> Path:
    return make_config({"cameras": [{"id": "belt1", "source": source, "fps": 5, "open_timeout_s": 3.0,
                                     "read_timeout_s": 2.0, "stall_timeout_s": 3.0, "reconnect_initial_s": 0.5,
                                     "reconnect_max_s": 2.0, "roi": [40, 20, 200, 160]}]}, name=f"{name}.yaml")


class Camera:
    """The MJPEG camera process on a fixed free port, killable and restartable."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = start_camera(self.port)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def restart(self) -> None:
        self.proc = start_camera(self.port)


@pytest.fixture
def camera():
    """A running camera, killed at the end of the test."""
    running = Camera()
    yield running
    running.kill()


def test_mjpeg_camera_goes_away_and_returns_capture_reconnects(make_config, start_capture, camera):
    config = camera_config(make_config, f"http://inspect:{PASSWORD}@127.0.0.1:{camera.port}/stream.mjpg", "capture")
    capture = start_capture(config)
    first = capture.frames(5, 30)
    assert len(first) == 5, capture.log()
    frames = [frame_from(m) for m in first]
    assert frames[0].shape == (160, 200, 3) and frames[0].std() > 5  # ROI applied, a real picture
    assert any(abs(a.astype(int) - b).mean() > 1 for a, b in zip(frames, frames[1:]))  # a live stream
    seqs = [m.header["seq"] for m in first]
    assert seqs == sorted(seqs)

    camera.kill()
    time.sleep(5)  # read timeout + stall: capture notices and starts reconnecting
    capture.drain()
    camera.restart()
    resumed = capture.frames(5, 45)
    assert len(resumed) == 5, capture.log()
    assert resumed[0].header["seq"] > seqs[-1]
    assert capture.proc.poll() is None
    assert capture.stop() == 0
    log = capture.log()
    assert log.count("source open") >= 2, log
    assert PASSWORD not in log


def test_wrong_password_is_a_redacted_error_and_capture_keeps_trying(make_config, start_capture, camera):
    config = camera_config(make_config, f"http://inspect:wrong-{PASSWORD}@127.0.0.1:{camera.port}/stream.mjpg", "badauth")
    capture = start_capture(config, "badauth")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and capture.log().count("cannot open") < 2:
        time.sleep(0.5)
    assert capture.proc.poll() is None
    assert not capture.frames(1, 0)
    assert capture.stop() == 0
    log = capture.log()
    assert log.count("cannot open http://***@127.0.0.1") >= 2 and "wrong user or password" in log, log
    assert PASSWORD not in log


def test_mjpeg_frames_over_the_pixel_limit_are_refused_at_open(camera):
    from daemon.config import parse_config
    from daemon.sources import SourceError, open_source

    source_url = f"http://inspect:{PASSWORD}@127.0.0.1:{camera.port}/video"
    settings = parse_config({"state_dir": "s", "engine": {"model_dir": "m"},
                             "cameras": [{"id": "belt1", "source": source_url, "open_timeout_s": 3.0}]}).cameras[0]
    refused = open_source(settings, max_pixels=320 * 240 - 1)
    with pytest.raises(SourceError, match=r"frames are 320×240 \(0.1 MP\), over the limit of 0.076799 MP") as err:
        refused.open()
    assert PASSWORD not in str(err.value)
    accepted = open_source(settings, max_pixels=320 * 240)
    accepted.open()
    try:
        assert accepted.read().shape == (240, 320, 3)
    finally:
        accepted.close()
