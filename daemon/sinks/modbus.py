"""Modbus TCP PLC output (pymodbus): reject coils, an alert counter, a "vision OK" heartbeat.

Per alert: each matching output coil is set and switched off `pulse_ms` later (an alert
for a coil that is still on extends the pulse: the reject gate stays open while
defects keep coming), and `counter_register` is written with the sink's delivered
count (mod 65536), which the PLC watches for changes. The count comes from the cursor
store, so re-sending an alert after a crash writes the same value again. An alert older
than `pulse_max_age_s` when it gets out (after a PLC or daemon outage) still moves the
counter but pulses no coil: the part it was about has left the reject station.

Heartbeat: every `heartbeat_ms` the sink toggles `heartbeat_coil` and/or increments
`heartbeat_register` — only while every watched camera had a published result within
`max_frame_gap_ms` (default: heartbeat_ms). Camera stalled, worker or publisher dead,
this process dead, PLC link down: the heartbeat stops, and the PLC's watchdog on it
can stop the line. Nothing here ever keeps a heartbeat going on its own.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from pymodbus.client import ModbusTcpClient
from pymodbus.exceptions import ModbusException

from daemon.sinks.config import ModbusSinkConfig
from daemon.sinks.delivery import DeliveryError, Sink, SinkContext

RECONNECT_MAX_S = 30.0


class ModbusSink(Sink):
    """A synchronous Modbus TCP client shared (under a lock) by deliveries and the I/O thread."""

    config: ModbusSinkConfig

    def __init__(self, config: ModbusSinkConfig, context: SinkContext) -> None:
        super().__init__(config, context)
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        self.client = ModbusTcpClient(config.host, port=config.port, timeout=config.timeout_s, retries=0,
                                      reconnect_delay=0, reconnect_delay_max=0)
        self.lock = threading.Lock()
        self.connected = False
        self._problem: str | None = None
        self.pulses: dict[int, float] = {}
        self.heartbeat_value = 0
        self.heartbeats = 0
        self.watched = tuple(config.cameras) or context.cameras
        self._reconnect_s = 1.0
        self._next_connect = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def describe(self) -> str:
        """PLC address and what the sink drives."""
        parts = [f"{len(self.config.outputs)} output coil(s)"]
        if self.config.counter_register is not None:
            parts.append(f"counter register {self.config.counter_register}")
        if self.config.heartbeat_coil is not None or self.config.heartbeat_register is not None:
            parts.append(f"heartbeat every {self.config.heartbeat_ms} ms")
        return f"Modbus TCP {self.config.host}:{self.config.port} unit {self.config.unit_id}: {', '.join(parts)}"

    # -- connection ------------------------------------------------------------------------

    def _write_coil(self, address: int, value: bool) -> None:
        self._check(self.client.write_coil(address, value, device_id=self.config.unit_id), f"coil {address}")

    def _write_register(self, address: int, value: int) -> None:
        self._check(self.client.write_register(address, value % 65536, device_id=self.config.unit_id),
                    f"register {address}")

    def _check(self, response: Any, what: str) -> None:
        if response.isError():
            raise DeliveryError(f"PLC refused the write to {what}: {response}")

    def _connect_locked(self) -> bool:
        if self.connected:
            return True
        if time.monotonic() < self._next_connect:
            return False
        try:
            ok = self.client.connect()
        except (ModbusException, OSError):
            ok = False
        if not ok:
            self._problem = f"cannot reach PLC at {self.config.host}:{self.config.port} (Modbus TCP)"
            self._next_connect = time.monotonic() + self._reconnect_s
            self._reconnect_s = min(RECONNECT_MAX_S, self._reconnect_s * 2)
            return False
        self.connected = True
        self._problem = None
        self._reconnect_s = 1.0
        try:
            # A pulse cut short by a lost link must not leave a coil on.
            for coil in sorted(set(self.pulses) | ({o.coil for o in self.config.outputs} if not self.probe else set())):
                self._write_coil(coil, False)
            self.pulses.clear()
        except (DeliveryError, ModbusException, OSError) as err:
            self._drop_locked(str(err))
            return False
        return True

    def _drop_locked(self, error: str) -> None:
        self.connected = False
        self._problem = f"PLC at {self.config.host}:{self.config.port}: {error}"
        self.client.close()
        self._next_connect = time.monotonic() + self._reconnect_s

    def start(self) -> None:
        """First connection attempt, then the I/O thread (pulse ends, heartbeat, reconnects)."""
        with self.lock:
            self._connect_locked()
        self._thread = threading.Thread(target=self._io, name=f"modbus-{self.name}", daemon=True)
        self._thread.start()

    def problem(self) -> str | None:
        """Why the PLC cannot be written now (None while connected)."""
        return None if self.connected else self._problem

    # -- alerts ----------------------------------------------------------------------------

    def deliver(self, alert: dict[str, Any], key: str, seq: int | None) -> None:
        """Pulse the alert's coils and write the counter; DeliveryError on any failed write."""
        with self.lock:
            if not self._connect_locked():
                raise DeliveryError(self._problem or "PLC not connected")
            stored = float(alert.get("published_ts") or alert.get("capture_ts") or time.time())
            fresh = time.time() - stored <= self.config.pulse_max_age_s
            try:
                for coil in self.config.coils_for(alert) if fresh else []:
                    self._write_coil(coil, True)
                    self.pulses[coil] = time.monotonic() + self.config.pulse_ms / 1000.0
                if seq is not None and self.config.counter_register is not None:
                    self._write_register(self.config.counter_register, seq)
            except DeliveryError:
                raise
            except (ModbusException, OSError) as err:
                self._drop_locked(str(err))
                raise DeliveryError(self._problem or str(err)) from None

    # -- I/O thread ------------------------------------------------------------------------

    def _io(self) -> None:
        period = self.config.heartbeat_ms / 1000.0
        has_heartbeat = self.config.heartbeat_coil is not None or self.config.heartbeat_register is not None
        next_beat = time.monotonic() + period
        while not self._stop.is_set():
            now = time.monotonic()
            with self.lock:
                try:
                    if self._connect_locked():
                        for coil, until in sorted(self.pulses.items()):
                            if until <= now:
                                self._write_coil(coil, False)
                                del self.pulses[coil]
                        if has_heartbeat and now >= next_beat:
                            next_beat = now + period
                            if self.context.monitor is not None and self.context.monitor.inspecting(
                                    self.watched, self.config.frame_gap_s):
                                self._beat()
                except (DeliveryError, ModbusException, OSError) as err:
                    self._drop_locked(str(err))
            waits = [next_beat] + list(self.pulses.values())
            self._stop.wait(max(0.005, min(0.1, min(waits) - time.monotonic())))

    def _beat(self) -> None:
        self.heartbeat_value ^= 1
        self.heartbeats += 1
        if self.config.heartbeat_coil is not None:
            self._write_coil(self.config.heartbeat_coil, bool(self.heartbeat_value))
        if self.config.heartbeat_register is not None:
            self._write_register(self.config.heartbeat_register, self.heartbeats)

    def close(self) -> None:
        """End pulses early (coils off), stop the heartbeat, close the link."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        with self.lock:
            if self.connected:
                try:
                    for coil in list(self.pulses):
                        self._write_coil(coil, False)
                except (DeliveryError, ModbusException, OSError):
                    pass
            self.pulses.clear()
            self.client.close()
            self.connected = False
