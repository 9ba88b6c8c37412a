"""Console benchmark → JSON: what live viewers get and what they cost the pipeline.

    python scripts/bench_console.py --json out/bench_console.json [--seconds 60] [--viewers 10]

Runs the demo config (real processes, `iseg run`, console enabled) with the camera faster
than the worker can keep up, so the pipeline's frames/s is the worker's capacity. Phase 1:
no viewers. Phase 2: `--viewers` clients read `live.mjpeg` for `--seconds`, plus one client
that connects and never reads (a stalled browser). Reported: capture→receipt latency p50/p99
of live frames (and the console's own share: its receipt of the overlay → the viewer's), frames/s each viewer got, the console process's CPU %, the pipeline's
frames/s with and without viewers, and the readers' frames/s next to the stalled one.
Figures depend on the machine (and on whatever else runs on it): the JSON records the CPU count.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from daemon.console.users import UsersFile  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


class Viewer(threading.Thread):
    """One live client: reads MJPEG parts and notes each frame's capture→receipt latency."""

    def __init__(self, host: str, port: int, token: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.host, self.port, self.token, self.stop = host, port, token, stop
        self.latencies_ms: list[float] = []
        self.console_ms: list[float] = []
        self.frames = 0
        self.error = ""

    def run(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request("GET", "/api/cameras/belt1/live.mjpeg", headers={"Authorization": f"Bearer {self.token}"})
            response = conn.getresponse()
            if response.status != 200:
                self.error = f"HTTP {response.status}"
                return
            while not self.stop.is_set():
                headers: dict[str, str] = {}
                while True:
                    line = response.readline()
                    if not line:
                        return
                    line = line.strip()
                    if not line:
                        if headers:
                            break
                        continue
                    if b":" in line:
                        key, _, value = line.decode().partition(":")
                        headers[key.strip().lower()] = value.strip()
                response.read(int(headers["content-length"]))
                received = time.time()
                self.frames += 1
                self.latencies_ms.append((received - float(headers["x-capture-ts"])) * 1000)
                self.console_ms.append((received - float(headers["x-console-ts"])) * 1000)
        except (OSError, http.client.HTTPException, KeyError, ValueError) as err:
            self.error = str(err)
        finally:
            conn.close()


def stalled_viewer(host: str, port: int, token: str) -> socket.socket:
    """A client that asks for the stream and never reads a byte (tiny receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, port))
    sock.sendall(f"GET /api/cameras/belt1/live.mjpeg HTTP/1.1\r\nHost: {host}:{port}\r\n"
                 f"Authorization: Bearer {token}\r\n\r\n".encode())
    return sock


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def published(metrics_url: str) -> float:
    return float(get_json(metrics_url + "/stats")["cameras"]["belt1"].get("published", 0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each phase")
    parser.add_argument("--viewers", type=int, default=10)
    parser.add_argument("--fps", type=float, default=8.0, help="camera rate (above the worker's capacity)")
    parser.add_argument("--model", default=str(REPO / "models" / "tiny-sd21"), help="model folder (built when missing)")
    parser.add_argument("--size", type=int, help="engine input size (default: the demo config's)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-console-"))
    doc = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    metrics_port, console_port = free_port(), free_port()
    doc.update(state_dir=str(workdir / "state"))
    doc["engine"]["model_dir"] = args.model
    doc["cameras"][0]["fps"] = args.fps
    if args.size:
        doc["engine"]["settings"]["size"] = args.size
    doc["metrics"]["listen"] = f"127.0.0.1:{metrics_port}"
    doc["console"] = {"enabled": True, "listen": f"127.0.0.1:{console_port}"}
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump(doc))
    users = UsersFile(workdir / "state" / "console-users.json")
    users.add("bench", "viewer", "bench-password")
    token = users.new_token("bench")
    metrics_url = f"http://127.0.0.1:{metrics_port}"
    log = open(workdir / "daemon.log", "w")
    daemon = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(config)], cwd=REPO,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 900
        while True:
            try:
                if urllib.request.urlopen(metrics_url + "/readyz", timeout=5).status == 200:
                    break
            except OSError:
                pass
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"daemon did not get ready; see {workdir / 'daemon.log'}")
            time.sleep(1)
        console_pid = get_json(metrics_url + "/stats")["roles"]["console"]["pid"]
        time.sleep(10)  # past the first batches

        start_pub, start_cpu, t0 = published(metrics_url), cpu_seconds(console_pid), time.monotonic()
        time.sleep(args.seconds)
        idle_s = time.monotonic() - t0
        fps_without = (published(metrics_url) - start_pub) / idle_s
        cpu_idle = (cpu_seconds(console_pid) - start_cpu) / idle_s * 100

        stop = threading.Event()
        stalled = stalled_viewer("127.0.0.1", console_port, token)
        viewers = [Viewer("127.0.0.1", console_port, token, stop) for _ in range(args.viewers)]
        for viewer in viewers:
            viewer.start()
        time.sleep(3)
        for viewer in viewers:
            viewer.latencies_ms.clear()
            viewer.console_ms.clear()
            viewer.frames = 0
        start_pub, start_cpu, t0 = published(metrics_url), cpu_seconds(console_pid), time.monotonic()
        time.sleep(args.seconds)
        busy_s = time.monotonic() - t0
        fps_with = (published(metrics_url) - start_pub) / busy_s
        cpu_busy = (cpu_seconds(console_pid) - start_cpu) / busy_s * 100
        per_viewer = [v.frames / busy_s for v in viewers]
        latencies = np.array([ms for v in viewers for ms in v.latencies_ms])
        console_ms = np.array([ms for v in viewers for ms in v.console_ms])
        stop.set()
        stalled.close()
        result = {
            "command": " ".join(["python", "scripts/bench_console.py", *sys.argv[1:]]),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "note": "shared machine: other jobs ran at the same time, figures are noisy"},
            "phase_seconds": args.seconds, "viewers": args.viewers, "camera_fps": args.fps,
            "live_latency_ms": {"p50": float(np.percentile(latencies, 50)) if latencies.size else None,
                                "p99": float(np.percentile(latencies, 99)) if latencies.size else None,
                                "frames": int(latencies.size)},
            "console_to_viewer_ms": {"p50": float(np.percentile(console_ms, 50)) if console_ms.size else None,
                                     "p99": float(np.percentile(console_ms, 99)) if console_ms.size else None,
                                     "note": "from the console receiving an overlay to a viewer having read it"},
            "viewer_fps": {"min": min(per_viewer), "max": max(per_viewer), "mean": float(np.mean(per_viewer)),
                           "each": [round(f, 3) for f in per_viewer]},
            "viewer_errors": [v.error for v in viewers if v.error],
            "console_cpu_percent": {"no_viewers": round(cpu_idle, 2), "with_viewers": round(cpu_busy, 2)},
            "pipeline_fps": {"no_viewers": round(fps_without, 3), "with_viewers": round(fps_with, 3),
                             "cost_percent": round(100 * (1 - fps_with / fps_without), 2) if fps_without else None},
            "stalled_viewer": {"present": True,
                               "readers_fps_vs_pipeline": round(float(np.mean(per_viewer)) / fps_with, 3) if fps_with else None},
        }
    finally:
        daemon.terminate()
        daemon.wait(60)
        log.close()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
