"""Daemon benchmark → JSON: end-to-end frames/s and capture-to-alert latency on the demo
config, engine-only frames/s on the same frames, their ratio (transport overhead), and the
capture→worker transport alone with 1920×1080 frames.

    python scripts/bench_daemon.py [--json out/bench_daemon.json] [--seconds 40]
    python scripts/bench_daemon.py --model DIR --device cuda --dtype float16 --cameras 4 --fps 30
        (a line setup: N synthetic cameras at F fps on a given model, 512×512; the GPU script uses it)

The demo runs as real processes (`iseg run`); numbers depend on the machine, so the JSON
records its CPU count and the torch thread setting.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml
import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from daemon.config import load_config  # noqa: E402
from daemon.model_setup import ensure_model  # noqa: E402
from daemon.wire import frame_from, frame_header, recv, send  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LINE: dict = {}
"""Overrides for a line setup (--model/--device/--dtype/--cameras); empty for the demo."""


def demo_config(workdir: Path, fps: float | None) -> Path:
    """The demo config with its own state dir and port; the model stays the repo's demo model
    unless a line setup replaces model, device, dtype, size and the camera list."""
    doc = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    doc["state_dir"] = str(workdir / "state")
    doc["engine"]["model_dir"] = str(REPO / "models" / "tiny-sd21")
    doc["metrics"]["listen"] = f"127.0.0.1:{free_port()}"
    if fps is not None:
        doc["cameras"][0]["fps"] = fps
    if LINE:
        doc["engine"].update(model_dir=LINE["model"], device=LINE["device"], dtype=LINE["dtype"],
                             cuda_graphs=LINE["cuda_graphs"], build_tiny_if_missing=False)
        doc["engine"]["settings"]["size"] = 512
        doc["worker"].update(batch_size=LINE["batch"], max_wait_ms=20)
        template = doc["cameras"][0]
        template["synthetic"].update(width=1280, height=720)
        doc["cameras"] = [dict(template, id=f"belt{i + 1}", fps=fps or LINE["fps"],
                               synthetic=dict(template["synthetic"], seed=i + 1)) for i in range(LINE["cameras"])]
    path = workdir / "demo.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def run_demo(seconds: float, fps: float | None, warmup: float = 8.0) -> dict:
    """Run `iseg run` on the demo config; count what a subscriber receives after warm-up."""
    with tempfile.TemporaryDirectory(prefix="iseg-bench-") as tmp:
        workdir = Path(tmp)
        config_path = demo_config(workdir, fps)
        config = load_config(config_path)
        log = open(workdir / "daemon.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "run", "--config", str(config_path)], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        for topic in (b"overlay.", b"alert."):
            sub.setsockopt(zmq.SUBSCRIBE, topic)
        sub.connect(config.endpoint("publish"))
        frame_latency: list[float] = []
        alert_latency: list[float] = []
        first_at = None
        try:
            deadline = time.monotonic() + 180
            while first_at is None and time.monotonic() < deadline:
                if sub.poll(500):
                    recv(sub)
                    first_at = time.monotonic()
            if first_at is None:
                raise RuntimeError("the demo published nothing in 180 s; see " + str(workdir / "daemon.log"))
            while time.monotonic() < first_at + warmup:
                if sub.poll(200):
                    recv(sub)
            start = time.monotonic()
            while time.monotonic() < start + seconds:
                if sub.poll(200):
                    message = recv(sub)
                    (alert_latency if message.topic.startswith("alert.") else frame_latency).append(message.header["latency_ms"])
            elapsed = time.monotonic() - start
        finally:
            proc.terminate()
            proc.wait(60)
            sub.close(0)
            ctx.term()
            log.close()
        cameras = json.loads((workdir / "state" / "last_stats.json").read_text())["cameras"]
        final = {key: sum(c.get(key) or 0 for c in cameras.values()) for key in ("captured", "dropped", "published")}
    return {"camera_fps_limit": fps, "seconds": round(elapsed, 1), "frames": len(frame_latency),
            "frames_per_s": len(frame_latency) / elapsed,
            "capture_to_publish_ms": {"p50": percentile(frame_latency, 50), "p99": percentile(frame_latency, 99)},
            "alerts": len(alert_latency),
            "capture_to_alert_ms": {"p50": percentile(alert_latency, 50), "p99": percentile(alert_latency, 99)},
            "captured": final.get("captured"), "dropped": final.get("dropped"), "published": final.get("published")}


def engine_only(frames: int) -> dict:
    """The same engine, settings, frames and batch size as the demo worker, with no daemon around it."""
    from daemon.sources import SyntheticSource
    from daemon.model_setup import load_segmenter

    with tempfile.TemporaryDirectory(prefix="iseg-bench-") as tmp:
        config = load_config(demo_config(Path(tmp), None))
        segmenter, class_sets = load_segmenter(config, logging.getLogger("bench"))
        camera = config.cameras[0]
        source = SyntheticSource(camera)
        images = [source.read() for _ in range(frames)]
        batch = config.worker.batch_size
        segmenter.segment(images[:batch], class_sets[camera.id])
        start = time.perf_counter()
        for i in range(0, frames, batch):
            segmenter.segment(images[i:i + batch], class_sets[camera.id])
        elapsed = time.perf_counter() - start
    return {"frames": frames, "batch_size": batch, "size": config.engine.settings.size,
            "frame_shape": list(images[0].shape), "frames_per_s": frames / elapsed}


def transport(frames: int, endpoint: str) -> dict:
    """PUSH→PULL of 1920×1080 RGB frames with the daemon's wire format (zero-copy sends, checked decode)."""
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    push.setsockopt(zmq.SNDHWM, 4)
    pull.setsockopt(zmq.RCVHWM, 4)
    pull.bind(endpoint)
    if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
        endpoint = pull.getsockopt(zmq.LAST_ENDPOINT).decode()
    push.connect(endpoint)
    frame = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    received = []

    def consume() -> None:
        for _ in range(frames):
            received.append(frame_from(recv(pull)).shape)

    consumer = threading.Thread(target=consume)
    consumer.start()
    start = time.perf_counter()
    for seq in range(frames):
        send(push, "frame.bench", frame_header("bench", seq, time.time(), frame), [frame])
    consumer.join()
    elapsed = time.perf_counter() - start
    push.close(0)
    pull.close(0)
    ctx.term()
    assert len(received) == frames
    return {"endpoint": endpoint.split("://")[0], "frames": frames, "frames_per_s": frames / elapsed,
            "GB_per_s": frames * frame.nbytes / elapsed / 1e9}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=str(REPO / "out" / "bench_daemon.json"))
    parser.add_argument("--seconds", type=float, default=40.0, help="measurement window per demo run")
    parser.add_argument("--engine-frames", type=int, default=40)
    parser.add_argument("--transport-frames", type=int, default=300)
    parser.add_argument("--model", help="line setup: a model folder instead of the demo's tiny model")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--cameras", type=int, default=4)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--batch", type=int, default=8, help="worker batch size in a line setup (8)")
    parser.add_argument("--cuda-graphs", action="store_true", help="line setup: engine.cuda_graphs on")
    args = parser.parse_args()
    if args.model:
        LINE.update(model=args.model, device=args.device, dtype=args.dtype, cameras=args.cameras,
                    fps=args.fps, batch=args.batch, cuda_graphs=args.cuda_graphs)
    config = load_config(demo_config(Path(tempfile.mkdtemp(prefix="iseg-bench-")), None))
    ensure_model(config)
    with tempfile.TemporaryDirectory(prefix="iseg-ipc-") as tmp:
        ipc = transport(args.transport_frames, f"ipc://{tmp}/bench.sock")
    tcp = transport(args.transport_frames, "tcp://127.0.0.1:0")
    engine = engine_only(args.engine_frames)
    demo = run_demo(args.seconds, None)
    saturated = run_demo(args.seconds, 50.0) if not LINE else demo
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "device": config.engine.device},
        "demo_config": {"description": "configs/demo.yaml as shipped (camera at its fps limit)", **demo},
        "demo_saturated": {"description": "demo config with the camera at 50 fps, so the worker is the bottleneck",
                           **saturated},
        "engine_only": engine,
        "e2e_over_engine_ratio": saturated["frames_per_s"] / engine["frames_per_s"],
        "transport_1080p": {"ipc": ipc, "tcp": tcp},
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
