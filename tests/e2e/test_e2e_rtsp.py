"""Capture against a real RTSP server (GStreamer, H.264 over RTP/TCP): the server is
stopped mid-stream and started again; capture logs the reason, reconnects and frames
resume on the same socket."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from conftest import free_port

from daemon.wire import frame_from

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


@pytest.mark.skipif(not gstreamer_rtsp_available(),
                    reason="needs GStreamer's RTSP server: apt-get install -y $(cat scripts/ci-apt-packages.txt)")
def test_rtsp_server_stops_and_returns_capture_reconnects(make_config, start_capture):
    port = free_port()
    config = make_config({"cameras": [{"id": "belt1", "source": f"rtsp://127.0.0.1:{port}/line", "fps": 5,
                                       "open_timeout_s": 3.0, "read_timeout_s": 2.0, "stall_timeout_s": 3.0,
                                       "reconnect_initial_s": 0.5, "reconnect_max_s": 2.0, "roi": [0, 0, 200, 160]}]})
    server = start_server(port)
    capture = start_capture(config)
    try:
        first = capture.frames(5, 30)
        assert len(first) == 5, capture.log()
        frame = frame_from(first[0])
        assert frame.shape == (160, 200, 3) and frame.std() > 5  # ROI applied, a real picture
        seqs = [m.header["seq"] for m in first]
        assert seqs == sorted(seqs)

        server.terminate()
        server.wait(10)
        time.sleep(6)  # read timeout + stall: capture notices and starts reconnecting
        capture.drain()
        assert "reconnecting" in capture.log() or "retrying" in capture.log()

        server = start_server(port)
        resumed = capture.frames(5, 45)
        assert len(resumed) == 5, capture.log()
        assert resumed[0].header["seq"] > seqs[-1]
        assert capture.proc.poll() is None
    finally:
        assert capture.stop() == 0
        server.terminate()
        server.wait(10)
    log = capture.log()
    assert "source open" in log and log.count("source open") >= 2
