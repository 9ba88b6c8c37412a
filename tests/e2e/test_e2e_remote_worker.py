"""Two workers share one camera's load through the dispatcher: the supervisor's local worker over
ipc, and a second worker connecting over TCP with CurveZMQ (as from another host). Clients
without an authorised key, or without Curve at all, get no frames even when they ask for work."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
import zmq
import zmq.auth

from conftest import REPO, free_port, iseg

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_two_workers_one_over_curve_tcp(make_config, start_daemon, tmp_path):
    keys = tmp_path / "keys"
    assert iseg("gen-keys", str(keys)).returncode == 0
    (keys / "authorized").mkdir()
    shutil.copy(keys / "client.key", keys / "authorized" / "client.key")
    frames_port, results_port = free_port(), free_port()
    config = make_config({
        "cameras": [{"id": "belt1", "source": "synthetic", "fps": 8, "classes": ["scratch", "dent"],
                     "synthetic": {"seed": 3, "width": 160, "height": 120}}],
        "dispatch": {"port": frames_port},
        "sockets": {"remote": {"host": "127.0.0.1", "bind_host": "127.0.0.1", "results_port": results_port,
                               "server_key": str(keys / "server.key_secret"),
                               "client_key": str(keys / "client.key_secret"),
                               "authorized_clients_dir": str(keys / "authorized")}},
    })
    daemon = start_daemon(config)
    daemon.wait_ready(120)
    remote_log = open(tmp_path / "remote.log", "w")
    remote = subprocess.Popen([sys.executable, "-m", "daemon", "worker", "--remote", "--name", "remote.0",
                               "--config", str(config)], cwd=REPO, stdout=remote_log, stderr=subprocess.STDOUT)
    ctx = zmq.Context()
    intruders = []
    (tmp_path / "stranger").mkdir()
    try:
        stranger_public, stranger_secret = zmq.auth.load_certificate(
            zmq.auth.create_certificates(str(tmp_path / "stranger"), "stranger")[1])
        server_public, _ = zmq.auth.load_certificate(str(keys / "server.key"))
        curve_intruder = ctx.socket(zmq.DEALER)
        curve_intruder.setsockopt(zmq.CURVE_SERVERKEY, server_public)
        curve_intruder.setsockopt(zmq.CURVE_PUBLICKEY, stranger_public)
        curve_intruder.setsockopt(zmq.CURVE_SECRETKEY, stranger_secret)
        plain_intruder = ctx.socket(zmq.DEALER)
        for sock in (curve_intruder, plain_intruder):
            sock.connect(f"tcp://127.0.0.1:{frames_port}")
            sock.send_multipart([b"hello", json.dumps({"worker": "intruder", "credits": 8}).encode()], zmq.NOBLOCK)
            intruders.append(sock)

        seen: dict[str, int] = {}
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and not (seen.get("worker.0", 0) >= 3 and seen.get("remote.0", 0) >= 3):
            assert remote.poll() is None, (tmp_path / "remote.log").read_text()
            done = iseg("subscribe", "--config", str(config), "--topic", "overlay.", "--duration", "4")
            for line in done.stdout.splitlines():
                worker = json.loads(line)["header"]["worker"]
                seen[worker] = seen.get(worker, 0) + 1
        assert seen.get("worker.0", 0) >= 3 and seen.get("remote.0", 0) >= 3, (seen, (tmp_path / "remote.log").read_text())
        assert not any(sock.poll(0) for sock in intruders), "an unauthorised client received frames"
        assert "tcp://127.0.0.1" in (tmp_path / "remote.log").read_text()
    finally:
        for sock in intruders:
            sock.close(0)
        ctx.term()
        remote.terminate()
        code = remote.wait(30)
        remote_log.close()
    assert code == 0, "the remote worker must stop cleanly on SIGTERM"
    assert daemon.terminate() == 0
