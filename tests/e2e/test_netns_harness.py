"""The plant harness itself: hosts reach each other, every fault does what it says (checked with
plain sockets between namespaces) and teardown leaves nothing behind, stale runs included."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from netns import Host, Plant, missing_requirements

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

PORT = 7100

SERVER = r"""
import socket, sys, threading
def serve(conn):
    with conn, conn.makefile("rb") as stream:
        for line in stream:
            cmd, count = line.split()
            count = int(count)
            if cmd == b"ping":
                conn.sendall(b"pong\n")
            elif cmd == b"up":
                left = count
                while left:
                    left -= len(stream.read(min(left, 65536)))
                conn.sendall(b"done\n")
            elif cmd == b"down":
                conn.sendall(b"x" * count)
srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("listening", flush=True)
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"""

CLIENT = r"""
import json, socket, sys, time
ip, port, cmd, count, timeout, repeat_s = sys.argv[1:]
count, timeout, repeat_s = int(count), float(timeout), float(repeat_s)
def once():
    started = time.monotonic()
    try:
        with socket.create_connection((ip, int(port)), timeout=timeout) as conn:
            conn.settimeout(timeout)
            conn.sendall(f"{cmd} {count}\n".encode())
            if cmd == "up":
                conn.sendall(b"x" * count)
            want = count if cmd == "down" else 5
            got = 0
            while got < want:
                chunk = conn.recv(65536)
                if not chunk:
                    return "closed", started
                got += len(chunk)
        return "ok", started
    except ConnectionRefusedError:
        return "refused", started
    except (socket.timeout, TimeoutError):
        return "timeout", started
    except OSError as err:
        return f"error {err.errno}", started
end = time.monotonic() + repeat_s
while True:
    outcome, started = once()
    print(json.dumps({"outcome": outcome, "at": started, "seconds": time.monotonic() - started}), flush=True)
    if time.monotonic() >= end:
        break
    time.sleep(0.05)
"""

TICKER = "import time\nwhile True:\n    print('tick', flush=True)\n    time.sleep(0.05)\n"


def start_server(host: Host, tmp_path: Path) -> None:
    """A TCP server on PORT in `host` (ping, upload and download commands)."""
    log = tmp_path / f"server-{host.name}.log"
    host.popen([sys.executable, "-u", "-c", SERVER, str(PORT)], log)
    deadline = time.monotonic() + 10
    while "listening" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


def attempts(client: Host, server: Host, cmd: str = "ping", count: int = 0, timeout: float = 1.0,
             repeat_s: float = 0.0) -> list[dict]:
    """Run the client in `client` against `server`; one dict (outcome, at, seconds) per attempt."""
    done = client.run([sys.executable, "-c", CLIENT, server.ip, str(PORT), cmd, str(count), str(timeout),
                       str(repeat_s)], timeout=repeat_s + timeout * 3 + 20)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def outcome(client: Host, server: Host, timeout: float = 1.0) -> str:
    """How one ping from `client` to `server` ends: ok, timeout, refused, ..."""
    return attempts(client, server, timeout=timeout)[0]["outcome"]


def transfer_s(client: Host, server: Host, cmd: str, count: int) -> float:
    """Seconds to move `count` bytes up (client → server) or down."""
    result = attempts(client, server, cmd, count, timeout=8.0)[0]
    assert result["outcome"] == "ok", result
    return result["seconds"]


def test_hosts_talk_and_teardown_removes_everything(tmp_path):
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    stale = "isgfff0"
    subprocess.run(["ip", "netns", "add", f"{stale}-old"], check=True)
    subprocess.run(["ip", "link", "add", f"{stale}br", "type", "bridge"], check=True)
    built = Plant()
    try:
        listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert stale not in listing, "a crashed run's namespace was left behind"
        assert stale not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        a, b = built.host("a"), built.host("b")
        assert a.ip != b.ip and a.ip.rsplit(".", 1)[0] == b.ip.rsplit(".", 1)[0]
        start_server(a, tmp_path)
        assert outcome(b, a) == "ok"
        assert outcome(a, a) == "ok"
        sleeper = b.popen(["sleep", "600"], tmp_path / "sleep.log")
        prefix, root = built.prefix, built.root
        assert root.is_dir() and str(root).startswith(tempfile.gettempdir())
    finally:
        built.close()
    assert sleeper.poll() is not None, "teardown left a host process running"
    assert prefix not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert not root.exists()


def test_blackhole_times_out_and_restore_reconnects(plant, tmp_path):
    a, b = plant.host("a"), plant.host("b")
    start_server(a, tmp_path)
    assert outcome(b, a) == "ok"
    a.blackhole()
    a.blackhole()
    assert outcome(b, a) == "timeout", "a blackholed host must not answer (no RST, no ICMP)"
    start_server(b, tmp_path)
    assert outcome(a, b) == "timeout", "a blackholed host must not reach out either"
    assert outcome(a, a) == "ok", "loopback inside the host keeps working"
    a.restore()
    a.restore()
    assert outcome(b, a) == "ok" and outcome(a, b) == "ok"


def test_partition_blocks_only_the_pair(plant, tmp_path):
    a, b, c = plant.host("a"), plant.host("b"), plant.host("c")
    start_server(a, tmp_path)
    start_server(c, tmp_path)
    a.partition(b)
    a.partition(b)
    assert outcome(b, a) == "timeout"
    assert outcome(c, a) == "ok" and outcome(a, c) == "ok" and outcome(b, c) == "ok"
    a.heal(b)
    a.heal(b)
    assert outcome(b, a) == "ok"


def test_throttle_slows_both_directions(plant, tmp_path):
    a, b = plant.host("a"), plant.host("b")
    start_server(a, tmp_path)
    size = 1_000_000
    free_up = transfer_s(b, a, "up", size)
    b.throttle("8mbit")
    b.throttle("8mbit")
    up, down = transfer_s(b, a, "up", size), transfer_s(b, a, "down", size)
    b.unthrottle()
    b.unthrottle()
    again = transfer_s(b, a, "up", size)
    assert up > 0.8 and down > 0.8, f"1 MB at 8 Mbit/s must take about 1 s: up {up:.2f}s, down {down:.2f}s"
    assert free_up < 0.4 and again < 0.4, f"unthrottled 1 MB took {free_up:.2f}s / {again:.2f}s"


def test_freeze_stops_a_process_group_and_thaw_resumes_it(plant, tmp_path):
    a = plant.host("a")
    log = tmp_path / "ticks.log"
    proc = a.popen(["sh", "-c", f'{sys.executable} -c "{TICKER}" & exec {sys.executable} -c "{TICKER}"'], log)
    time.sleep(0.5)
    a.freeze(proc)
    a.freeze(proc)
    time.sleep(0.2)
    frozen = log.stat().st_size
    time.sleep(0.6)
    assert log.stat().st_size == frozen, "a frozen process group still writes"
    a.thaw(proc)
    a.thaw(proc)
    time.sleep(0.5)
    assert log.stat().st_size > frozen, "a thawed process group must run again"
    a.kill(proc)
    time.sleep(0.2)
    left = subprocess.run(["ip", "netns", "pids", a.ns], capture_output=True, text=True).stdout.split()
    assert proc.returncode is not None and not left, f"kill left processes in the host: {left}"


def test_flap_takes_the_link_down_and_up(plant, tmp_path):
    a, b = plant.host("a"), plant.host("b")
    start_server(a, tmp_path)
    flap = a.flap(period_s=0.5, duration_s=3.0)
    probes = attempts(b, a, timeout=0.3, repeat_s=3.0)
    flap.join(5)
    assert not flap.running and not a.blackholed
    outcomes = {p["outcome"] for p in probes}
    assert outcomes == {"ok", "timeout"}, probes
    assert flap.toggles >= 4
    assert outcome(b, a) == "ok"
