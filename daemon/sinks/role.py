"""The `sinks` role: one runner thread per configured sink, a heartbeat to the supervisor.

Started by `iseg run` when the config has sinks, or alone with `iseg sinks --config F`;
alone on another host it has its own state directory (cursors) and reads alerts through
the publisher's replay socket and frame results through its PUB socket (sockets.replay,
sockets.publish set to tcp:// endpoints the publisher binds). Its heartbeat state carries each sink's
snapshot (state, lag, last error, counters) for `/stats`; its metrics registry feeds
`/metrics`.
"""

from __future__ import annotations

import logging
from typing import Any

import zmq

from daemon.config import DaemonConfig
from daemon.metrics import Registry
from daemon.role import Heartbeat, StopFlag
from daemon.sinks.config import SinkConfig
from daemon.sinks.delivery import Sink, SinkContext
from daemon.sinks.inspection import InspectionMonitor
from daemon.sinks.outbox import CursorStore
from daemon.sinks.runner import SinkRunner
from daemon.sinks.status import heartbeat_fields

STOP_JOIN_S = 10.0


def build_sink(config: SinkConfig, context: SinkContext) -> Sink:
    """The sink object for one config entry (receiver libraries are imported only when used)."""
    if config.type == "mqtt":
        from daemon.sinks.mqtt import MqttSink

        return MqttSink(config, context)
    if config.type == "webhook":
        from daemon.sinks.webhook import WebhookSink

        return WebhookSink(config, context)
    from daemon.sinks.modbus import ModbusSink

    return ModbusSink(config, context)


def sink_context(config: DaemonConfig, instance: str, name: str, monitor: InspectionMonitor | None = None,
                 status: Any = None) -> SinkContext:
    """Context shared by one sink: instance id, path resolution, cameras and their result gaps."""
    gaps = {c.id: max(2.0, 3.0 / c.fps) for c in config.cameras}
    context = SinkContext(instance=instance, resolve=config.resolve, cameras=tuple(c.id for c in config.cameras),
                          frame_gap_s=gaps, monitor=monitor, log=logging.getLogger(f"iseg.sinks.{name}"))
    if status is not None:
        context.status = status
    return context


def instance_id(config: DaemonConfig) -> str:
    """The state directory's daemon instance id (created on first use)."""
    store = CursorStore(config.state_path)
    try:
        return store.instance_id()
    finally:
        store.close()


def run_sinks(config: DaemonConfig, stop: StopFlag) -> int:
    """Process body: deliver until SIGTERM; exit 1 if a runner dies on an unexpected error."""
    log = logging.getLogger("iseg.sinks")
    if not config.sinks:
        log.error("no sinks in %s: add a sinks: list (see README, 'Sending alerts to the plant')", config.path)
        return 1
    metrics = Registry()
    ctx = zmq.Context()
    heartbeat = Heartbeat(ctx, config.endpoint("telemetry"), "sinks", "sinks", metrics, stop).start()
    instance = instance_id(config)
    monitor = InspectionMonitor(ctx, config.endpoint("publish")).start()
    runners: list[SinkRunner] = []

    def status() -> dict[str, Any]:
        return {r.name: r.snapshot() for r in runners}

    for sink_config in config.sinks:
        context = sink_context(config, instance, sink_config.name, monitor, status)
        runners.append(SinkRunner(build_sink(sink_config, context), config.state_path, instance, metrics, stop.event,
                                  ctx, config.endpoint("replay")))
    log.info("delivering alerts from %s to %d sink(s): %s (instance %s)", config.state_path / "alerts.sqlite3",
             len(runners), ", ".join(f"{r.name} ({r.config.type})" for r in runners), instance)
    for runner in runners:
        monitor.wakers.append(runner.wake)
        runner.start()
    code = 0
    try:
        while not stop.stopping:
            heartbeat.progress()
            heartbeat.update(ready=True, **heartbeat_fields(status()))
            broken = [r for r in runners if not r.alive]
            if broken:
                log.error("sink runner %s ended on an unexpected error; restarting the role", broken[0].name)
                code = 1
                break
            stop.wait(0.2)
    finally:
        stop.event.set()
        for runner in runners:
            runner.wake.set()
        for runner in runners:
            runner.join(STOP_JOIN_S)
        heartbeat.update(**heartbeat_fields(status()))
        monitor.stop()
        heartbeat.stop()
        ctx.term()
    log.info("sinks stopped (%s)", stop.signal_name or ("error" if code else "done"))
    return code
