"""`iseg sinks status | resend | test`: look at and steer delivery from the command line.

They work on the state directory's files (cursor store, alert store), so they need no
running daemon; a running sinks role notices a resend within a poll (the cursor's
generation changes).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from daemon.config import ConfigError, DaemonConfig
from daemon.sinks.config import SinkConfig
from daemon.sinks.delivery import DeliveryError, SinkSetupError
from daemon.sinks.outbox import AlertReader, CursorStore


def _sink(config: DaemonConfig, name: str) -> SinkConfig:
    for sink in config.sinks:
        if sink.name == name:
            return sink
    known = ", ".join(s.name for s in config.sinks) or "none configured"
    raise ConfigError(f"--sink {name}: no such sink (config has: {known})")


def sink_status(config: DaemonConfig) -> list[dict[str, Any]]:
    """Per configured sink: cursor, alerts behind, lag, state, last error, dead letters."""
    store = CursorStore(config.state_path)
    reader = AlertReader(config.state_path)
    try:
        last_id = reader.last_id()
        rows = []
        for sink in config.sinks:
            row = store.status(sink.name) or {"cursor": None, "delivered": 0, "state": "never started", "last_error": ""}
            cursor = row["cursor"]
            pending = reader.after(cursor, 1) if cursor is not None else []
            lag = time.time() - float(pending[0].get("published_ts") or pending[0].get("capture_ts")) if pending else 0.0
            rows.append({"sink": sink.name, "type": sink.type, "cursor": cursor, "last_alert_id": last_id,
                         "behind": max(0, last_id - cursor) if cursor is not None else None,
                         "lag_seconds": round(max(0.0, lag), 3), "delivered": row["delivered"],
                         "state": row["state"] or "unknown", "last_error": row["last_error"],
                         "dead_letters": store.dead_letters(sink.name)})
        return rows
    finally:
        reader.close()
        store.close()


def print_status(config: DaemonConfig, as_json: bool, out: TextIO = sys.stdout) -> int:
    """`iseg sinks status`."""
    rows = sink_status(config)
    if as_json:
        out.write(json.dumps(rows, indent=1) + "\n")
        return 0
    if not rows:
        out.write("no sinks configured\n")
    for r in rows:
        cursor = "-" if r["cursor"] is None else r["cursor"]
        out.write(f"{r['sink']} ({r['type']}): {r['state']}; cursor {cursor} of {r['last_alert_id']} "
                  f"({r['behind'] if r['behind'] is not None else '-'} behind, lag {r['lag_seconds']:.1f}s); "
                  f"delivered {r['delivered']}; dead letters {len(r['dead_letters'])}\n")
        if r["last_error"]:
            out.write(f"  last error: {r['last_error']}\n")
        for dead in r["dead_letters"][:10]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(dead["ts"]))
            out.write(f"  dead letter: alert {dead['alert_id']} at {when}: {dead['error']}\n")
        if r["dead_letters"]:
            first = r["dead_letters"][0]["alert_id"]
            out.write(f"  re-send with: iseg sinks resend --config {config.path} --sink {r['sink']} --from {first}\n")
    return 0


def resend(config: DaemonConfig, name: str, from_id: int, out: TextIO = sys.stdout) -> int:
    """`iseg sinks resend`: move the sink's cursor back so alerts from `from_id` on go out again."""
    _sink(config, name)
    if from_id < 1:
        raise ConfigError(f"--from {from_id}: alert ids start at 1")
    store = CursorStore(config.state_path)
    try:
        cursor = store.rewind(name, from_id)
    finally:
        store.close()
    out.write(f"sink {name}: alerts from id {from_id} will be sent again (cursor {cursor.alert_id}); "
              "receivers de-duplicate on the Idempotency key\n")
    return 0


def send_test(config: DaemonConfig, name: str, out: TextIO = sys.stdout) -> int:
    """`iseg sinks test`: deliver one alert marked `"test": true` through the real sink code."""
    from daemon.sinks.role import build_sink, instance_id, sink_context

    sink_config = _sink(config, name)
    instance = instance_id(config)
    sink = build_sink(sink_config, sink_context(config, instance, name))
    sink.probe = True
    camera = (sink_config.cameras or [c.id for c in config.cameras])[0]
    if sink_config.type == "modbus" and sink_config.outputs:
        camera = sink_config.outputs[0].camera
    cam = config.camera(camera)
    klass = (sink_config.classes or cam.classes)[0]
    now = time.time()
    alert = {"id": 0, "test": True, "camera": camera, "class": klass, "capture_ts": now, "published_ts": now,
             "classes": {klass: {"presence": 1.0, "threshold": 0.0}}, "message": "test alert from iseg sinks test"}
    started = time.monotonic()
    try:
        sink.start()
        deadline = time.monotonic() + 10.0
        while sink.problem() and time.monotonic() < deadline:
            time.sleep(0.1)
        if sink.problem():
            raise DeliveryError(str(sink.problem()))
        sink.deliver(alert, f"{instance}:test-{int(now)}", None)
        took = (time.monotonic() - started) * 1000
        if sink_config.type == "modbus":
            time.sleep(sink_config.pulse_ms / 1000.0)
    except (DeliveryError, SinkSetupError) as err:
        print(f"error: sink {name}: test alert not delivered: {err}", file=sys.stderr)
        return 1
    finally:
        sink.close()
    out.write(f"sink {name}: test alert (camera {camera}, class {klass}) delivered in {took:.0f} ms "
              f"to {sink.describe()}\n")
    return 0
