"""Sink benchmark → JSON: alert stored → MQTT received, → webhook received, → PLC coil set
(p50/p99 ms on loopback, target p99 <= 100 ms), and the time to drain 1,000 alerts queued
while the sinks role was stopped (target < 10 s), against the same real receivers as the
tests: mosquitto, a stdlib HTTP server, pymodbus's server.

    python scripts/bench_sinks.py [--json out/bench_sinks.json] [--alerts 200] [--backlog 1000]

The sinks role runs as a real process (`iseg sinks --config F`); alerts are written to the
alert store exactly as the publisher writes them, and every time is taken in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "e2e"))

from daemon.alerts import AlertStore  # noqa: E402
from daemon.sinks.outbox import CursorStore  # noqa: E402
from plant_receivers import Broker, HttpReceiver, ModbusServer, MqttCollector  # noqa: E402

COIL, COUNTER = 10, 5


def start_role(config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "daemon", "sinks", "--config", str(config)], cwd=REPO,
                            stdout=open(log, "a"), stderr=subprocess.STDOUT)


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise TimeoutError(f"benchmark: timed out waiting for {what}")


def add(store: AlertStore) -> tuple[int, float]:
    now = time.time()
    alert_id = store.add({"camera": "belt1", "capture_ts": now, "published_ts": now, "class": "scratch",
                          "classes": {"scratch": {"presence": 0.7}}})
    return alert_id, time.monotonic()


def quantiles(values: list[float]) -> dict[str, float]:
    ms = np.array(values) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "max_ms": round(float(ms.max()), 2), "count": len(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--alerts", type=int, default=200, help="alerts for the latency run (20 per second)")
    parser.add_argument("--backlog", type=int, default=1000, help="alerts queued while the role is stopped")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-sinks-"))
    broker = Broker(work / "broker").start()
    collector = MqttCollector(broker.port, "iseg/+/alert", client_id="bench-collector")
    http = HttpReceiver()
    plc = ModbusServer()
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(work / "state"), "engine": {"model_dir": str(work / "none")}, "worker": {"count": 0},
        "cameras": [{"id": "belt1", "source": "synthetic"}],
        "sinks": [{"type": "mqtt", "name": "mqtt", "host": "127.0.0.1", "port": broker.port},
                  {"type": "webhook", "name": "webhook", "url": http.url},
                  {"type": "modbus", "name": "plc", "host": "127.0.0.1", "port": plc.port, "pulse_ms": 20,
                   "pulse_max_age_s": 3600, "outputs": [{"camera": "belt1", "coil": COIL}], "counter_register": COUNTER}],
    }))
    log = work / "sinks.log"
    store = AlertStore(work / "state" / "alerts.sqlite3")
    role = start_role(config, log)
    try:
        cursors = CursorStore(work / "state")
        wait(lambda: all(cursors.status(n) for n in ("mqtt", "webhook", "plc")), 60, "the sinks role")
        time.sleep(1.0)
        stored: dict[int, float] = {}
        for _ in range(args.alerts):
            alert_id, at = add(store)
            stored[alert_id] = at
            time.sleep(0.05)
        last = max(stored)
        wait(lambda: {b["id"] for b in collector.bodies()} >= set(stored) and set(http.ids()) >= set(stored)
             and len([v for _, v in plc.of("register", COUNTER)]) >= len(stored), 60, "the latency run")
        mqtt_at = {}
        for _, body, t in collector.messages:
            mqtt_at.setdefault(body["id"], t)
        http_at = {}
        for alert, _, t in http.delivered:
            http_at.setdefault(alert["id"], t)
        coil_on = [t for t, v in plc.of("coil", COIL) if v == 1]
        ordered = sorted(stored)
        latency = {"mqtt": quantiles([mqtt_at[i] - stored[i] for i in ordered]),
                   "webhook": quantiles([http_at[i] - stored[i] for i in ordered]),
                   "modbus_coil": quantiles([t - stored[i] for i, t in zip(ordered, coil_on)])}

        role.send_signal(signal.SIGTERM)
        role.wait(30)
        queued_start = time.monotonic()
        backlog = [add(store)[0] for _ in range(args.backlog)]
        queue_s = time.monotonic() - queued_start
        http_before, plc_before = len(http.delivered), len(plc.of("register", COUNTER))
        restarted = time.monotonic()
        role = start_role(config, log)
        target = set(backlog)
        wait(lambda: {b["id"] for b in collector.bodies()} >= target and set(http.ids()) >= target
             and (plc.of("register", COUNTER) or [(0, 0)])[-1][1] >= (last + args.backlog) % 65536, 120, "the drain")
        mqtt_times = [t for _, body, t in collector.messages if body["id"] in target]
        http_times = [t for alert, _, t in http.delivered[http_before:] if alert["id"] in target]
        plc_times = [t for t, _ in plc.of("register", COUNTER)[plc_before:]]
        drain = {name: {"first_to_last_s": round(max(ts) - min(ts), 3), "from_role_start_s": round(max(ts) - restarted, 3),
                        "alerts_per_s": round(len(target) / max(1e-6, max(ts) - min(ts)), 1)}
                 for name, ts in (("mqtt", mqtt_times), ("webhook", http_times), ("modbus", plc_times))}
        order_ok = {"mqtt": [i for i in dict.fromkeys(b["id"] for b in collector.bodies())] == ordered + backlog,
                    "webhook": list(dict.fromkeys(http.ids())) == ordered + backlog}
        result = {"benchmark": "sinks", "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                    "platform": platform.platform()},
                  "latency_stored_to_received": latency, "latency_alerts": args.alerts,
                  "backlog": {"alerts": args.backlog, "queued_in_s": round(queue_s, 3), "drain": drain},
                  "in_order_none_missing": order_ok,
                  "targets": {"p99_ms": 100, "drain_s": 10}}
    finally:
        if role.poll() is None:
            role.send_signal(signal.SIGTERM)
            role.wait(30)
        store.close()
        collector.close()
        http.close()
        plc.close()
        broker.stop()
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
