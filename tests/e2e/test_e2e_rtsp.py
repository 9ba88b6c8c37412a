"""Capture against a real RTSP server (GStreamer, H.264 over RTP/TCP): the server is
stopped mid-stream and started again; capture logs the reason, reconnects and frames
resume on the same socket."""

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

SYSTEM_PYTHON = "/usr/bin/python3"


def gstreamer_rtsp_available() -> bool:
    if not Path(SYSTEM_PYTHON).exists():
        return False
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import gi; gi.require_version('GstRtspServer', '1.0'); "
                            "from gi.repository import GstRtspServer"], capture_output=True)
    return probe.returncode == 0


def start_server(port: int) -> subprocess.Popen:
    server = subprocess.Popen([SYSTEM_PYTHON, str(Path(__file__).with_name("rtsp_server.py")), str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert server.stdout.readline().strip() == "READY"
    return server


def receive_frames(pull: zmq.Socket, count: int, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    messages = []
    while len(messages) < count and time.monotonic() < deadline:
        if pull.poll(200):
            messages.append(recv(pull))
    return messages


@pytest.mark.skipif(not gstreamer_rtsp_available(),
                    reason="needs GStreamer's RTSP server: apt-get install -y $(cat scripts/ci-apt-packages.txt)")
def test_rtsp_server_stops_and_returns_capture_reconnects(make_config):
    port = free_port()
    config = make_config({"cameras": [{"id": "belt1", "source": f"rtsp://127.0.0.1:{port}/line", "fps": 5,
                                       "open_timeout_s": 3.0, "read_timeout_s": 2.0, "stall_timeout_s": 3.0,
                                       "reconnect_initial_s": 0.5, "reconnect_max_s": 2.0, "roi": [0, 0, 200, 160]}]})
    state = Path(yaml.safe_load(config.read_text())["state_dir"])
    (state / "run").mkdir(parents=True)
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(f"ipc://{state}/run/frames-belt1.sock")
    server = start_server(port)
    log_path = config.with_name("capture.log")
    capture = subprocess.Popen([sys.executable, "-m", "daemon", "capture", "--camera", "belt1", "--config", str(config)],
                               cwd=REPO, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    try:
        first = receive_frames(pull, 5, 30)
        assert len(first) == 5, log_path.read_text()
        frame = frame_from(first[0])
        assert frame.shape == (160, 200, 3) and frame.std() > 5  # ROI applied, a real picture
        seqs = [m.header["seq"] for m in first]
        assert seqs == sorted(seqs)

        server.terminate()
        server.wait(10)
        time.sleep(6)  # read timeout + stall: capture notices and starts reconnecting
        while pull.poll(0):
            recv(pull)
        assert "reconnecting" in log_path.read_text() or "retrying" in log_path.read_text()

        server = start_server(port)
        resumed = receive_frames(pull, 5, 45)
        assert len(resumed) == 5, log_path.read_text()
        assert resumed[0].header["seq"] > seqs[-1]
        assert capture.poll() is None
    finally:
        capture.terminate()
        assert capture.wait(20) == 0
        server.terminate()
        server.wait(10)
        pull.close(0)
        ctx.term()
    log = log_path.read_text()
    assert "source open" in log and log.count("source open") >= 2
