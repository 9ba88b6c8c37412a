"""Plant benchmark: N cameras x M workers on emulated hosts (Linux network namespaces, as in the
fault tests), the tiny model at a small size.

  sudo .venv/bin/python scripts/bench_plant.py --json plant.json [--cameras 2] [--workers 2]

Measures, with credit-based dispatch and a publisher pair:
- per fault (worker freeze, blackhole, kill, partition from the capture host; primary publisher
  killed), `--repeats` times: frames lost after admission (target 0), failover time p50/p99 (the
  fault's start to the camera's output being whole and on time again; and to its first frame
  published after the fault), frames re-sent;
- steady state, dispatch against today's bare PUSH/PULL on the same hosts with the workers
  saturated: published frames per second, capture-to-publish latency, and the dispatcher's own
  CPU time per frame (target: overhead within 5 %).
Progress goes to stderr; the JSON is rewritten after every section, so an interrupted run keeps
what it measured. Needs root, `ip`, `nft` and `tc` (Debian: iproute2, nftables).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "e2e"), str(REPO)]

import yaml  # noqa: E402
import zmq  # noqa: E402

from netns import Plant, missing_requirements  # noqa: E402
from plant_roles import (Heartbeats, Overlays, camera_ids, dispatcher_stats, measure_dispatch_fault,  # noqa: E402
                         start_capture, start_dispatcher, start_publisher, start_remote_worker, write_dispatch_config,
                         write_keys, write_plant_config)

TINY_MODEL = REPO / "models" / "tiny-sd21"


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def ensure_model(path: Path) -> Path:
    """The tiny SD 2.1-topology model the demo uses, built on first run (seeded, a few MB)."""
    if not (path / "model_index.json").exists():
        say(f"building the tiny model in {path}")
        subprocess.run([sys.executable, "-m", "daemon", "make-tiny-model", str(path), "--family", "sd21", "--seed", "0"],
                       cwd=REPO, check=True)
    return path


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_every_worker(subscribers: list[Overlays], names: list[str], timeout: float = 180.0) -> None:
    """Until every worker has published frames (of any camera: turns may pair a camera with a worker)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen: set[str] = set()
        for sub in subscribers:
            seen.update(sub.per_worker())
        if set(names) <= seen:
            return
        time.sleep(0.5)
    raise RuntimeError(f"not every worker published within {timeout:g}s: saw {sorted(seen)} of {names}")


class Report:
    """The JSON document, written after every section."""

    def __init__(self, path: Path, args: argparse.Namespace) -> None:
        self.path = path
        self.doc: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    "command": " ".join(sys.argv), "cameras": args.cameras, "workers": args.workers,
                                    "fps_per_camera": args.fps, "fault_s": args.fault_s, "repeats": args.repeats,
                                    "machine": {"cpus": os.cpu_count()}, "faults": {}, "steady": {}}
        self.write()

    def write(self) -> None:
        self.path.write_text(json.dumps(self.doc, indent=1))


def run_faults(args: argparse.Namespace, report: Report, model: Path, work: Path) -> None:
    """The fault section: one plant, every fault `repeats` times."""
    plant = Plant()
    ctx = zmq.Context()
    readers: list[Heartbeats] = []
    subs: list[Overlays] = []
    try:
        capture = plant.host("cap")
        gpus = [plant.host(f"gpu{i + 1}") for i in range(args.workers)]
        pub1, pub2 = plant.host("pub1"), plant.host("pub2")
        config = write_dispatch_config(work / "faults.yaml", model, write_keys(work / "keys-faults"), capture, pub1,
                                       pub2, fps=args.fps, cameras=args.cameras)
        logs = work / "logs-faults"
        cameras = camera_ids(args.cameras)
        readers = [Heartbeats(ctx, capture)]
        overlays = {camera: [Overlays(ctx, pub1, camera), Overlays(ctx, pub2, camera)] for camera in cameras}
        subs = [o for pair in overlays.values() for o in pair]
        roles: dict[str, subprocess.Popen] = {
            "pub1": start_publisher(pub1, config, logs), "pub2": start_publisher(pub2, config, logs, backup=True),
            "dispatch": start_dispatcher(capture, config, logs)}
        for camera in cameras:
            roles[f"capture-{camera}"] = start_capture(capture, config, logs, camera)
        names = []
        for i, host in enumerate(gpus):
            names.append(f"gpu{i + 1}.0")
            roles[names[-1]] = start_remote_worker(host, config, names[-1], logs)
        say(f"fault plant up: {args.cameras} camera(s), {args.workers} worker(s), publisher pair; waiting for frames")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and sorted(dispatcher_stats(ctx, capture)["workers"]) != sorted(names):
            time.sleep(1)
        wait_for_every_worker([o for pair in overlays.values() for o in pair], names)
        victim = gpus[0]

        def restart_worker() -> None:
            roles[names[0]] = start_remote_worker(victim, config, names[0], logs)

        leader = {"pub": "pub1"}

        def kill_leader() -> None:
            host = pub1 if leader["pub"] == "pub1" else pub2
            host.kill(roles[leader["pub"]])

        def restart_publisher() -> None:
            was = leader["pub"]
            host = pub1 if was == "pub1" else pub2
            roles[was] = start_publisher(host, config, logs, backup=was == "pub2")
            leader["pub"] = "pub2" if was == "pub1" else "pub1"

        faults: dict[str, tuple[Callable[[], None], Callable[[], None], str]] = {
            "worker_freeze": (lambda: victim.freeze(roles[names[0]]), lambda: victim.thaw(roles[names[0]]), names[0]),
            "worker_blackhole": (victim.blackhole, victim.restore, names[0]),
            "worker_kill": (lambda: victim.kill(roles[names[0]]), restart_worker, names[0]),
            "worker_partition": (lambda: victim.partition(capture), lambda: victim.heal(capture), names[0]),
            "publisher_kill": (kill_leader, restart_publisher, ""),
        }
        for name, (inject, recover, faulted) in faults.items():
            if args.faults and name not in args.faults:
                continue
            runs = []
            for repeat in range(args.repeats):
                say(f"{name} {repeat + 1}/{args.repeats}")
                result = measure_dispatch_fault(ctx, inject, recover, capture_host=capture, main=readers[0],
                                                overlays=overlays, faulted_worker=faulted,
                                                fault_s=args.fault_s + (2.0 if name == "publisher_kill" else 0.0),
                                                settle_s=4.0)
                runs.append(result)
                say(f"  lost {result['lost']}, resent {result['resent']}, failover {result['failover_s']}, "
                    f"first frame after {result['first_after_s']}")
                time.sleep(2.0)
            failovers = [r["failover_s"] for r in runs if r["failover_s"] is not None]
            firsts = [c["first_after_s"] for r in runs for c in r["cameras"].values() if c["first_after_s"] is not None]
            report.doc["faults"][name] = {
                "lost": sum(r["lost"] for r in runs), "resent": sum(r["resent"] for r in runs),
                "published": sum(r["published"] for r in runs), "dropped": sum(r["dropped"] for r in runs),
                "failover_s_p50": percentile(failovers, 50), "failover_s_p99": percentile(failovers, 99),
                "not_recovered": sum(1 for r in runs if r["failover_s"] is None),
                "first_frame_after_s_p50": percentile(firsts, 50), "first_frame_after_s_p99": percentile(firsts, 99),
                "runs": runs}
            report.write()
        final = dispatcher_stats(ctx, capture)
        report.doc["faults_final_accounting"] = final["cameras"]
        report.doc["faults_final_leader"] = {"leader": final["leader"], "epoch": final["epoch"]}
        report.write()
    finally:
        for sub in subs:
            sub.close()
        for reader in readers:
            reader.close()
        ctx.term()
        plant.close()


def run_steady(args: argparse.Namespace, report: Report, model: Path, work: Path, dispatch: bool) -> None:
    """Workers saturated for `steady_s` on the same hosts, with dispatch or with today's PUSH/PULL."""
    mode = "dispatch" if dispatch else "push_pull"
    plant = Plant()
    ctx = zmq.Context()
    subs: list[Overlays] = []
    try:
        main = plant.host("main")
        gpus = [plant.host(f"gpu{i + 1}") for i in range(args.workers)]
        keys = write_keys(work / f"keys-{mode}")
        cameras = camera_ids(args.cameras)
        if dispatch:
            config = write_dispatch_config(work / f"{mode}.yaml", model, keys, main, main, fps=args.steady_fps,
                                           cameras=args.cameras, changes={"alerts": {"k": 2, "n": 3, "cooldown_s": 1.0}})
        else:
            config = write_plant_config(work / f"{mode}.yaml", model, keys, main, fps=args.steady_fps)
            document = yaml.safe_load(config.read_text())
            template = document["cameras"][0]
            document["cameras"] = [{**template, "id": camera, "tcp_port": template["tcp_port"] + 100 + i,
                                    "synthetic": {**template["synthetic"], "seed": 3 + i}}
                                   for i, camera in enumerate(cameras)]
            config.write_text(yaml.safe_dump(document))
        logs = work / f"logs-{mode}"
        subs = [Overlays(ctx, main, camera) for camera in cameras]
        roles = {"publisher": start_publisher(main, config, logs)}
        if dispatch:
            roles["dispatch"] = start_dispatcher(main, config, logs)
        for camera in cameras:
            roles[camera] = start_capture(main, config, logs, camera)
        names = [f"gpu{i + 1}.0" for i in range(args.workers)]
        for name, host in zip(names, gpus):
            roles[name] = start_remote_worker(host, config, name, logs)
        say(f"steady state, {mode}: waiting for every worker")
        wait_for_every_worker(subs, names)
        time.sleep(args.warmup_s)
        started = time.time()
        cpu0 = cpu_seconds(roles["dispatch"].pid) if dispatch else None  # `ip netns exec` execs the role
        time.sleep(args.steady_s)
        ended = time.time()
        cpu1 = cpu_seconds(roles["dispatch"].pid) if dispatch else None
        frames = [f for sub in subs for f in sub.snapshot() if started <= f.published_ts < ended]
        latencies = [f.published_ts - f.capture_ts for f in frames]
        result = {"frames": len(frames), "frames_per_s": len(frames) / (ended - started),
                  "latency_ms_p50": 1000 * statistics.median(latencies) if latencies else None,
                  "latency_ms_p99": 1000 * percentile(latencies, 99) if latencies else None}
        if dispatch:
            result["dispatcher_cpu_ms_per_frame"] = 1000 * (cpu1 - cpu0) / max(1, len(frames))
        report.doc["steady"][mode] = result
        say(f"  {mode}: {result['frames_per_s']:.2f} frames/s, latency p50 {result['latency_ms_p50']:.0f} ms")
        steady = report.doc["steady"]
        if "dispatch" in steady and "push_pull" in steady and steady["push_pull"]["frames_per_s"]:
            steady["throughput_overhead_pct"] = 100 * (1 - steady["dispatch"]["frames_per_s"]
                                                       / steady["push_pull"]["frames_per_s"])
        report.write()
    finally:
        for sub in subs:
            sub.close()
        ctx.term()
        plant.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, type=Path, help="write the results here")
    parser.add_argument("--cameras", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fps", type=float, default=2.0, help="frames per second per camera in the fault runs")
    parser.add_argument("--steady-fps", type=float, default=40.0,
                        help="frames per second per camera in the steady runs (above what the workers take)")
    parser.add_argument("--fault-s", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--faults", nargs="*", help="only these faults (default: all)")
    parser.add_argument("--steady-s", type=float, default=20.0)
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--model", type=Path, default=TINY_MODEL)
    parser.add_argument("--work", type=Path, default=REPO / "out" / "bench_plant",
                        help="a fresh folder per run is made in here")
    parser.add_argument("--skip-steady", action="store_true")
    parser.add_argument("--skip-faults", action="store_true")
    args = parser.parse_args()
    reason = missing_requirements()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 1
    args.work = args.work / time.strftime("%Y%m%d-%H%M%S")
    args.work.mkdir(parents=True)
    say(f"configs, keys and role logs in {args.work}")
    model = ensure_model(args.model)
    report = Report(args.json, args)
    if not args.skip_faults:
        run_faults(args, report, model, args.work)
    if not args.skip_steady:
        run_steady(args, report, model, args.work, dispatch=False)
        run_steady(args, report, model, args.work, dispatch=True)
    report.doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report.write()
    say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
