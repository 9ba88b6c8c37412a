"""Real receivers for the sink tests and the sink benchmark, on free loopback ports.

- `Broker`: Debian's mosquitto (/usr/sbin/mosquitto) with a minimal config written here:
  one loopback listener, anonymous or a password file, persistence in a temp folder.
- `MqttCollector`: a QoS 1 subscriber with a persistent session that records arrivals.
- `HttpReceiver`: a stdlib HTTP server whose answer is switchable: ok, 500, hang,
  close (drops the connection mid-request); chosen alert ids answer 400.
- `ModbusServer`: pymodbus's own TCP server in a thread, recording every write with its time.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Until something accepts connections on the port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:g}s")


class Broker:
    """A mosquitto process; start/stop/kill it to make outages."""

    def __init__(self, folder: Path, port: int | None = None, users: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        # `user`: started as root, mosquitto would drop to user mosquitto and fail to write its files here.
        lines = [f"listener {self.port} 127.0.0.1", f"user {getpass.getuser()}", "persistence true", f"persistence_location {folder}/",
                 f"log_dest file {folder}/mosquitto.log", "log_type error", "log_type warning", "log_type notice"]
        if users:
            password_file = folder / "passwords"
            password_file.write_text("")
            for user, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(password_file), user, password], check=True,
                               capture_output=True)
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        else:
            lines.append("allow_anonymous true")
        self.config = folder / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Broker":
        """Start and wait until it listens."""
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the broker (SIGTERM saves its persistence file, as a service stop does)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None


class MqttCollector:
    """Subscribes with QoS 1 and a persistent session; `messages` are (topic, body, monotonic time)."""

    def __init__(self, port: int, topic: str, client_id: str = "test-collector") -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, Any, float]] = []
        self.lock = threading.Lock()
        self.topic = topic
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        try:
            body: Any = json.loads(message.payload)
        except ValueError:
            body = message.payload.decode(errors="replace")
        with self.lock:
            self.messages.append((message.topic, body, time.monotonic()))

    def bodies(self, suffix: str = "/alert") -> list[Any]:
        """Bodies of messages on topics ending with suffix, in arrival order."""
        with self.lock:
            return [body for topic, body, _ in self.messages if topic.endswith(suffix)]

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


class HttpReceiver:
    """A webhook receiver; `mode` is ok | 500 | hang | close; ids in `reject` answer 400."""

    def __init__(self, port: int | None = None) -> None:
        self.mode = "ok"
        self.reject: set[int] = set()
        self.delivered: list[tuple[dict[str, Any], dict[str, str], float]] = []
        self.attempts: dict[str, int] = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in two writes; Nagle would hold the body 40 ms

            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                mode = outer.mode
                with outer.lock:
                    outer.attempts[mode] = outer.attempts.get(mode, 0) + 1
                if mode == "close":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if mode == "hang":
                    deadline = time.monotonic() + 30
                    while outer.mode == "hang" and time.monotonic() < deadline:
                        time.sleep(0.05)
                    self.close_connection = True
                    return
                alert = json.loads(body)
                status = 400 if alert.get("id") in outer.reject else 500 if mode == "500" else 200
                if status == 200:
                    with outer.lock:
                        outer.delivered.append((alert, dict(self.headers), time.monotonic()))
                reply = b'{"ok": true}' if status == 200 else b"no"
                self.send_response(status)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *_args: Any) -> None:
                """Quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", port or 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def ids(self) -> list[int]:
        """Alert ids answered 2xx, in arrival order."""
        with self.lock:
            return [alert["id"] for alert, _, _ in self.delivered]

    def close(self) -> None:
        """Stop serving."""
        self.mode = "ok"
        self.server.shutdown()
        self.server.server_close()


class ModbusServer:
    """pymodbus TCP server (coils and holding registers 0..255) recording writes as (time, kind, address, value)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.writes: list[tuple[float, str, int, int]] = []
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.server: Any = None
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        if not ready.wait(10):
            raise TimeoutError("modbus server did not start")

    def _trace(self, sending: bool, pdu: Any) -> Any:
        if not sending:
            kind = type(pdu).__name__
            if kind == "WriteSingleCoilRequest":
                with self.lock:
                    self.writes.append((time.monotonic(), "coil", pdu.address, int(pdu.bits[0])))
            elif kind == "WriteSingleRegisterRequest":
                with self.lock:
                    self.writes.append((time.monotonic(), "register", pdu.address, int(pdu.registers[0])))
        return pdu

    def _run(self, ready: threading.Event) -> None:
        import logging

        from pymodbus.server import ModbusTcpServer
        from pymodbus.simulator import SimData, SimDevice
        from pymodbus.simulator.simutils import DataType

        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            blocks = ([SimData(0, count=256, values=False, datatype=DataType.BITS)],
                      [SimData(0, count=1, values=False, datatype=DataType.BITS)],
                      [SimData(0, count=256, values=0, datatype=DataType.REGISTERS)],
                      [SimData(0, count=1, values=0, datatype=DataType.REGISTERS)])
            self.server = ModbusTcpServer(SimDevice(id=0, simdata=blocks), address=("127.0.0.1", self.port),
                                          trace_pdu=self._trace)
            await self.server.serve_forever(background=True)
            ready.set()
            await self.server.serving

        self.loop.run_until_complete(main())

    def of(self, kind: str, address: int) -> list[tuple[float, int]]:
        """(time, value) of every write to one coil or register."""
        with self.lock:
            return [(t, v) for t, k, a, v in self.writes if k == kind and a == address]

    def close(self) -> None:
        """Stop the server."""
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(5)
        self.thread.join(5)
