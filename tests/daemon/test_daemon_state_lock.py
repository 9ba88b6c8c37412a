"""The state dir lock: a second owner is refused with the first one's pid and touches nothing;
a role started under the supervisor runs under its inherited lock; a dead owner leaves no lock."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from daemon.health import HealthServer, json_body
from daemon.state_lock import ENV_FD, LOCK_NAME

HOLD = ("import sys, time; from pathlib import Path; from daemon.state_lock import acquire; "
        "acquire(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)")
TRY = ("import sys; from pathlib import Path; from daemon.state_lock import acquire, StateDirInUse\n"
       "try:\n    acquire(Path(sys.argv[1])); print('acquired')\nexcept StateDirInUse as err:\n    print(err)")


def python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, **kwargs)


def test_second_owner_is_refused_and_a_dead_owner_leaves_no_lock(tmp_path):
    holder = python(HOLD, str(tmp_path))
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.name for p in tmp_path.iterdir())
        second = python(TRY, str(tmp_path))
        out = second.communicate(timeout=30)[0]
        assert f"state dir {tmp_path} in use by pid {holder.pid}" in out
        assert sorted(p.name for p in tmp_path.iterdir()) == before == [LOCK_NAME]
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(holder.pid)
    finally:
        holder.kill()
        holder.wait()
    assert python(TRY, str(tmp_path)).communicate(timeout=30)[0].strip() == "acquired"


def test_children_run_under_the_inherited_lock(tmp_path):
    from daemon.state_lock import acquire

    fd = acquire(tmp_path)
    child = python(TRY, str(tmp_path), env={**os.environ, ENV_FD: str(fd)}, pass_fds=(fd,))
    assert child.communicate(timeout=30)[0].strip() == "acquired"
    stranger = python(TRY, str(tmp_path), env={**os.environ, ENV_FD: "0"})
    assert "in use by pid" in stranger.communicate(timeout=30)[0], "a forged fd number is no lock"


def test_http_server_closes_idle_connections():
    server = HealthServer("127.0.0.1:0", lambda path: json_body(200, {"path": path}), idle_timeout_s=0.5).start()
    try:
        host, port = server.server.server_address[:2]
        idle = socket.create_connection((host, port))
        started = time.monotonic()
        idle.settimeout(10)
        assert idle.recv(1) == b"", "the server must close a connection that sends nothing"
        assert time.monotonic() - started < 5
        idle.close()
    finally:
        server.stop()
