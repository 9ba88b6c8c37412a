"""Bad input against real role processes: malformed, corrupt and generated hostile frames into a
worker, cameras that are unreachable or absent. Nothing may crash; everything is counted."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zmq

from conftest import REPO, free_port

from daemon.wire import frame_header, recv, send
from tests.hostile_messages import hostile_frames

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def role(config: Path, *args: str) -> subprocess.Popen:
    log = open(config.with_name(f"{args[0]}.log"), "w")
    return subprocess.Popen([sys.executable, "-m", "daemon", *args, "--config", str(config)], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)


def last_heartbeat(telemetry: zmq.Socket, name: str, until, timeout: float) -> dict:
    """Read heartbeats of `name` until `until(heartbeat)` holds."""
    deadline = time.monotonic() + timeout
    heartbeat: dict = {}
    while time.monotonic() < deadline:
        if telemetry.poll(500):
            message = recv(telemetry)
            if message.header.get("name") == name:
                heartbeat = message.header
                if until(heartbeat):
                    return heartbeat
    raise AssertionError(f"no matching heartbeat from {name} within {timeout}s; last: {json.dumps(heartbeat)[:800]}")


def counter(heartbeat: dict, name: str) -> float:
    return sum(heartbeat["metrics"]["counters"].get(name, {}).values())


def test_worker_survives_malformed_and_corrupt_frames(make_config):
    # The worker's own frame socket (dispatch off): this test stands in for the capture. Hostile
    # messages through a dispatcher are in test_e2e_dispatch.py.
    config = make_config({"worker": {"batch_size": 1}, "dispatch": {"enabled": False}})
    state = Path(yaml.safe_load(config.read_text())["state_dir"])
    run = state / "run"
    run.mkdir(parents=True)
    ctx = zmq.Context()
    frames = ctx.socket(zmq.PUSH)
    frames.bind(f"ipc://{run}/frames-belt1.sock")
    results = ctx.socket(zmq.PULL)
    results.bind(f"ipc://{run}/results.sock")
    telemetry = ctx.socket(zmq.PULL)
    telemetry.bind(f"ipc://{run}/telemetry.sock")
    worker = role(config, "worker", "--name", "worker.t")
    try:
        last_heartbeat(telemetry, "worker.t", lambda h: h["state"].get("ready"), 90)
        good = np.full((96, 128, 3), 128, np.uint8)
        good[30:60, 40:90] = 220
        send(frames, "frame.belt1", frame_header("belt1", 0, time.time(), good, session="s"), [good])
        frames.send_multipart([b"frame.belt1"])  # one part only
        frames.send_multipart([b"frame.belt1", b"{not json", b"x"])
        short = frame_header("belt1", 1, time.time(), good, session="s")
        frames.send_multipart([b"frame.belt1", json.dumps(short).encode(), good.tobytes()[:-7]])  # truncated payload
        floats = frame_header("belt1", 2, time.time(), good.astype(np.float64), session="s")
        frames.send_multipart([b"frame.belt1", json.dumps(floats).encode(), good.astype(np.float64).tobytes()])
        stranger = frame_header("nope", 3, time.time(), good, session="s")
        frames.send_multipart([b"frame.nope", json.dumps(stranger).encode(), good.tobytes()])
        hostile = hostile_frames()
        for _what, parts in hostile:
            frames.send_multipart(parts)
        scrap = np.zeros((4, 4, 3), np.uint8)  # a frame the engine cannot take
        send(frames, "frame.belt1", frame_header("belt1", 4, time.time(), scrap, session="s"), [scrap])
        send(frames, "frame.belt1", frame_header("belt1", 5, time.time(), good, session="s"), [good])

        outcomes = []
        while len(outcomes) < 3 and results.poll(60000):
            outcomes.append(recv(results))
        assert [(m.header["seq"], m.header["ok"]) for m in outcomes] == [(0, True), (4, False), (5, True)]
        assert "too small" in outcomes[1].header["error"]
        labels = np.frombuffer(outcomes[2].payloads[1], np.uint8).reshape(outcomes[2].header["labels"]["shape"])
        assert labels.shape == (96, 128)
        assert set(outcomes[2].header["presence"]) == {"scratch", "dent"}
        heartbeat = last_heartbeat(telemetry, "worker.t", lambda h: counter(h, "iseg_worker_frames_total") == 2, 10)
        heartbeat = last_heartbeat(telemetry, "worker.t",
                                   lambda h: counter(h, "iseg_rejected_messages_total") >= 5 + len(hostile), 10)
        assert counter(heartbeat, "iseg_rejected_messages_total") == 5 + len(hostile)
        reasons = {k.split('reason="')[1].split('"')[0] for k in heartbeat["metrics"]["counters"]["iseg_rejected_messages_total"]}
        assert {"parts", "json", "camera", "shape", "size", "range", "type", "missing"} <= reasons, reasons
        assert counter(heartbeat, "iseg_worker_failed_frames_total") == 1
        assert worker.poll() is None
    finally:
        worker.terminate()
        assert worker.wait(30) == 0
        for sock in (frames, results, telemetry):
            sock.close(0)
        ctx.term()


@pytest.mark.parametrize("source, reason", [
    ("rtsp://127.0.0.1:{port}/line", "cannot open rtsp://127.0.0.1"),
    ("/dev/video97", "USB camera /dev/video97 is absent"),
    ("/nonexistent/clip.mp4", "video file /nonexistent/clip.mp4 does not exist"),
])
def test_unreachable_camera_is_retried_with_a_logged_reason(make_config, source, reason):
    source = source.format(port=free_port())
    config = make_config({"cameras": [{"id": "belt1", "source": source, "open_timeout_s": 1.0,
                                       "reconnect_initial_s": 0.2, "reconnect_max_s": 0.8}]})
    state = Path(yaml.safe_load(config.read_text())["state_dir"])
    (state / "run").mkdir(parents=True)
    ctx = zmq.Context()
    telemetry = ctx.socket(zmq.PULL)
    telemetry.bind(f"ipc://{state}/run/telemetry.sock")
    capture = role(config, "capture", "--camera", "belt1")
    try:
        heartbeat = last_heartbeat(telemetry, "capture.belt1",
                                   lambda h: counter(h, "iseg_capture_reconnects_total") >= 3, 30)
        assert heartbeat["state"]["connected"] is False
        assert reason in heartbeat["state"]["last_error"]
        assert capture.poll() is None, "capture must keep retrying, not exit"
    finally:
        capture.terminate()
        assert capture.wait(15) == 0
        telemetry.close(0)
        ctx.term()
    assert reason in config.with_name("capture.log").read_text()
