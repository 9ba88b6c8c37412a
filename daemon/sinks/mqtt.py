"""MQTT sink (paho-mqtt 2.x): alerts QoS 1 on `<prefix>/<camera>/alert`, plus line state.

Also published: `<prefix>/available` (`online` retained on connect, `offline` as the
retained last will and on a clean stop), `<prefix>/<camera>/health` (retained, on
change and every stats interval: is the camera being inspected) and `<prefix>/stats`
every `stats_interval_s`. The session is persistent (fixed client id, clean_session
off) and paho keeps unacknowledged QoS 1 messages across reconnects; an alert counts
as delivered only on the broker's PUBACK, and a retry while paho still holds the same
alert waits for that copy instead of publishing another.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from daemon.sinks.config import MqttSinkConfig
from daemon.sinks.delivery import DeliveryError, Sink, SinkContext, SinkSetupError, read_secret

ACK_MEMORY_S = 120.0


@dataclass
class _Pending:
    alert_id: int
    sent: list[tuple[int, float]] = field(default_factory=list)
    waits: int = 0


class MqttSink(Sink):
    """One paho client with its network thread; a ticker thread publishes health and stats."""

    config: MqttSinkConfig

    def __init__(self, config: MqttSinkConfig, context: SinkContext) -> None:
        super().__init__(config, context)
        self.client: mqtt.Client | None = None
        self.connected = False
        self.answered = threading.Event()
        self._problem: str | None = None
        self._acks: dict[int, float] = {}
        self._cond = threading.Condition()
        self._pending: _Pending | None = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._health_sent: dict[str, bool] = {}
        self.prefix = config.prefix

    def describe(self) -> str:
        """Broker address and topic prefix."""
        tls = " (TLS)" if self.config.tls_ca else ""
        return f"MQTT broker {self.config.host}:{self.config.port}{tls}, topics {self.prefix}/<camera>/alert"

    # -- connection ------------------------------------------------------------------------

    def start(self) -> None:
        """Create the client, connect in the background and wait briefly for the first answer."""
        cfg = self.config
        client_id = cfg.client_id or f"iseg-{self.context.instance[:8]}-{self.name}"
        if self.probe:
            client_id += "-test"
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=self.probe,
                             protocol=mqtt.MQTTv311)
        if cfg.username:
            password = read_secret(self.context, cfg.password_file, "password_file") if cfg.password_file else None
            client.username_pw_set(cfg.username, password)
        if cfg.tls_ca:
            ca = self.context.resolve(cfg.tls_ca)
            if not ca.is_file():
                raise SinkSetupError(f"tls_ca {ca} is not a file")
            try:
                client.tls_set(ca_certs=str(ca), tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (ssl.SSLError, OSError, ValueError) as err:
                raise SinkSetupError(f"tls_ca {ca}: {err}") from None
        if not self.probe:
            client.will_set(f"{self.prefix}/available", "offline", qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_publish = self._on_publish
        self.client = client
        self._problem = None
        try:
            client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive_s)
        except (OSError, ValueError) as err:
            raise SinkSetupError(f"MQTT broker {cfg.host}:{cfg.port}: {err}") from None
        client.loop_start()
        self.answered.wait(cfg.connect_timeout_s)
        if not self.answered.is_set():
            self._problem = f"no answer from MQTT broker {cfg.host}:{cfg.port} within {cfg.connect_timeout_s:g}s"
        if not self.probe:
            self._ticker = threading.Thread(target=self._tick, name=f"mqtt-{self.name}", daemon=True)
            self._ticker.start()

    def _on_connect(self, client: mqtt.Client, _userdata: Any, flags: Any, reason: Any, _props: Any) -> None:
        self.answered.set()
        if reason.is_failure:
            self.connected = False
            self._problem = f"MQTT broker {self.config.host}:{self.config.port} refused the connection: {reason}"
            return
        self.connected = True
        self._problem = None
        if self.probe:
            return
        client.publish(f"{self.prefix}/available", "online", qos=1, retain=True)
        self._health_sent.clear()
        self._publish_health()

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        was = self.connected
        self.connected = False
        if was or self._problem is None:
            self._problem = f"lost the connection to MQTT broker {self.config.host}:{self.config.port} ({reason})"

    def _on_connect_fail(self, _client: mqtt.Client, _userdata: Any) -> None:
        self.answered.set()
        self.connected = False
        self._problem = f"cannot connect to MQTT broker {self.config.host}:{self.config.port} (refused or unreachable)"

    def _on_publish(self, _client: mqtt.Client, _userdata: Any, mid: int, _reason: Any, _props: Any) -> None:
        with self._cond:
            now = time.monotonic()
            self._acks[mid] = now
            if len(self._acks) > 1000:
                self._acks = {m: t for m, t in self._acks.items() if now - t < ACK_MEMORY_S}
            self._cond.notify_all()

    def problem(self) -> str | None:
        """Why the broker cannot take messages now (None while connected)."""
        return None if self.connected else self._problem

    # -- alerts ----------------------------------------------------------------------------

    def _acked(self, pending: _Pending) -> bool:
        return any(self._acks.get(mid, -1.0) >= sent for mid, sent in pending.sent)

    def deliver(self, alert: dict[str, Any], key: str, seq: int | None) -> None:
        """Publish QoS 1 and wait for the PUBACK (of this or an earlier copy of the same alert)."""
        assert self.client is not None
        pending = self._pending if self._pending and self._pending.alert_id == alert.get("id") else None
        if pending is None or pending.waits >= 2:
            payload = json.dumps({**alert, "instance": self.context.instance}, separators=(",", ":"))
            sent_at = time.monotonic()
            info = self.client.publish(f"{self.prefix}/{alert['camera']}/alert", payload, qos=1)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                raise DeliveryError(f"publish refused by the client: {mqtt.error_string(info.rc)}")
            pending = pending or _Pending(alert.get("id", 0))
            pending.sent.append((info.mid, sent_at))
            pending.waits = 0
            self._pending = pending
        deadline = time.monotonic() + self.config.ack_timeout_s
        with self._cond:
            while not self._acked(pending):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
            acked = self._acked(pending)
        if acked:
            self._pending = None
            return
        pending.waits += 1
        raise DeliveryError(self.problem() or f"no PUBACK from MQTT broker within {self.config.ack_timeout_s:g}s")

    # -- line state ------------------------------------------------------------------------

    def _publish_health(self) -> None:
        monitor = self.context.monitor
        if monitor is None or self.client is None or not self.connected:
            return
        for camera in self.context.cameras:
            age = monitor.frame_age(camera)
            inspecting = age is not None and age <= self.context.frame_gap_s.get(camera, 2.0)
            if self._health_sent.get(camera) == inspecting:
                continue
            body = {"camera": camera, "inspecting": inspecting, "ts": time.time(),
                    "last_result_age_s": None if age is None else round(age, 3)}
            self.client.publish(f"{self.prefix}/{camera}/health", json.dumps(body), qos=1, retain=True)
            self._health_sent[camera] = inspecting

    def _publish_stats(self) -> None:
        if self.client is None or not self.connected:
            return
        monitor = self.context.monitor
        body = {"ts": time.time(), "instance": self.context.instance, "sinks": self.context.status(),
                "publisher": monitor.publisher_stats if monitor else None}
        self.client.publish(f"{self.prefix}/stats", json.dumps(body), qos=0)

    def _tick(self) -> None:
        next_stats = time.monotonic()
        while not self._stop.wait(0.5):
            self._publish_health()
            if time.monotonic() >= next_stats:
                self._health_sent.clear()
                self._publish_health()
                self._publish_stats()
                next_stats = time.monotonic() + self.config.stats_interval_s

    def close(self) -> None:
        """Say `offline` (retained), disconnect, stop paho's thread."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2.0)
        if self.client is None:
            return
        if self.connected and not self.probe:
            info = self.client.publish(f"{self.prefix}/available", "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(1.0)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
