"""A worker's side of credit-based dispatch: one DEALER per dispatcher (capture host), credits for
its free batch slots, heartbeats from the inference loop, `done` after each result is sent, and
one result socket per publisher (primary, and the backup when there is one).

It offers `poll` and `recv_multipart` like the PULL socket it replaces, so the worker's batching
loop is the same either way. The worker calls `beat()` on every turn of its loop and never from
a thread: a loop stuck in a batch or frozen by SIGSTOP stops heartbeating, and the dispatcher
re-sends its frames to others.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import zmq

from daemon.config import DaemonConfig
from daemon.messages import Boundary, Rejected, Rejections, _int, _str, control
from daemon.security import connect_endpoint
from daemon.wire import encode_header

FROM_DISPATCHER = ("dbeat", "who")


@dataclass
class Route:
    """Where a frame came from and where its result goes."""

    link: int
    dispatcher: str
    publisher: str
    key: tuple[str, str, int]
    admitted: int


@dataclass
class Link:
    """One dispatcher as this worker sees it."""

    sock: zmq.Socket
    endpoint: str
    instance: str = ""
    hello_at: float = 0.0


class DispatchClient:
    """Frames in from every dispatcher, credits and heartbeats back, results out to the publisher each
    frame's route names."""

    def __init__(self, ctx: zmq.Context, config: DaemonConfig, name: str, remote: bool, window: int,
                 rejections: Rejections, log: logging.Logger) -> None:
        self.config = config
        self.name = name
        self.window = window
        self.rejections = rejections
        self.log = log
        self.boundary = Boundary.from_config(config)
        self.links: list[Link] = []
        self.inbox: deque[tuple[int, list[Any]]] = deque()
        self.results: dict[str, zmq.Socket] = {}
        self.last_route: Route | None = None
        self.next_beat = 0.0
        self.poller = zmq.Poller()
        for endpoint in config.dispatcher_endpoints(remote):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, max(16, window * 4))
            sock.setsockopt(zmq.MAXMSGSIZE, config.limits.max_image_pixels * 3 + 65536)
            self.links.append(Link(sock, connect_endpoint(sock, config, endpoint)))
            self.poller.register(sock, zmq.POLLIN)
        publishers = {"primary": config.endpoint("results")}
        if remote:
            assert config.sockets.remote is not None
            port = config.sockets.remote.results_port
            publishers = {"primary": f"tcp://{config.sockets.remote.host}:{port}"}
            if config.publisher.backup_host:
                publishers["backup"] = f"tcp://{config.publisher.backup_host}:{port}"
        for publisher, endpoint in publishers.items():
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, config.sockets.results_hwm)
            sock.setsockopt(zmq.LINGER, 2000)
            connect_endpoint(sock, config, endpoint)
            self.results[publisher] = sock

    @property
    def endpoints(self) -> list[str]:
        """Where this client connects (for the start-up log line)."""
        return [link.endpoint for link in self.links] + [f"results:{name}" for name in self.results]

    def _send(self, link: Link, topic: str, body: dict[str, Any]) -> None:
        try:
            link.sock.send_multipart([topic.encode(), encode_header(body)], zmq.NOBLOCK)
        except zmq.Again:
            pass

    def hello(self, link: Link) -> None:
        """(Re)register with a dispatcher, offering all this worker's slots (the dispatcher subtracts the
        frames it knows are on their way here)."""
        link.hello_at = time.monotonic()
        self._send(link, "hello", {"worker": self.name, "credits": self.window})

    def start(self) -> None:
        """Say hello to every dispatcher."""
        for link in self.links:
            self.hello(link)

    def beat(self) -> None:
        """A heartbeat to every dispatcher, at most every dispatch.heartbeat_ms (call from the loop)."""
        now = time.monotonic()
        if now < self.next_beat:
            return
        self.next_beat = now + self.config.dispatch.heartbeat_ms / 1000
        for link in self.links:
            self._send(link, "beat", {"worker": self.name})

    def _take(self, index: int, frames: list[Any]) -> None:
        link = self.links[index]
        topic = bytes(frames[0].buffer if isinstance(frames[0], zmq.Frame) else frames[0])
        if topic.startswith(b"frame."):
            self.inbox.append((index, frames))
            return
        try:
            kind, h = control(frames, self.boundary, FROM_DISPATCHER)
        except Rejected as err:
            self.rejections.count("dispatch", err)
            return
        if kind == "who":
            if time.monotonic() - link.hello_at > self.config.dispatch.heartbeat_ms / 1000:
                self.log.info("dispatcher %s does not know this worker (it restarted or declared it lost); "
                              "hello again", link.endpoint)
                self.hello(link)
        elif h["instance"] != link.instance:
            if link.instance:
                self.log.info("dispatcher at %s restarted; hello again", link.endpoint)
                self.hello(link)
            link.instance = h["instance"]

    def poll(self, timeout_ms: float) -> bool:
        """True when a frame is ready; handles dispatcher control messages meanwhile."""
        deadline = time.monotonic() + timeout_ms / 1000
        while not self.inbox:
            remaining = max(0.0, deadline - time.monotonic())
            events = dict(self.poller.poll(remaining * 1000))
            for index, link in enumerate(self.links):
                if link.sock in events:
                    while True:
                        try:
                            self._take(index, link.sock.recv_multipart(zmq.NOBLOCK, copy=False))
                        except zmq.Again:
                            break
            if self.inbox or time.monotonic() >= deadline:
                break
        return bool(self.inbox)

    def recv_multipart(self, copy: bool = False) -> list[Any]:
        """The next frame message; its route is available from `route()` until the next call."""
        index, frames = self.inbox.popleft()
        self.last_route = None
        try:
            header = json.loads(bytes(frames[1].buffer if isinstance(frames[1], zmq.Frame) else frames[1]))
            route = header.get("route") if isinstance(header, dict) else None
            if type(route) is dict:
                self.last_route = Route(index, _str(route.get("dispatcher"), 128, "route.dispatcher"),
                                        _str(route.get("publisher"), 128, "route.publisher"),
                                        (str(header.get("camera")), str(header.get("session", "")),
                                         _int(header.get("seq"), 0, 2 ** 53, "seq")),
                                        _int(route.get("admitted"), 0, 2 ** 53, "route.admitted"))
        except (ValueError, Rejected):
            self.last_route = None
        if self.last_route is None:
            self._send(self.links[index], "credit", {"n": 1})
        return frames

    def route(self) -> Route:
        """The route of the frame last received (Rejected when it had none)."""
        if self.last_route is None:
            raise Rejected("missing", "a dispatched frame lacks its route")
        return self.last_route

    def results_socket(self, route: Route | None) -> zmq.Socket:
        """The result socket of the publisher a route names (the primary's when it names none known)."""
        if route is not None and route.publisher in self.results:
            return self.results[route.publisher]
        return self.results["primary"]

    def done(self, routes: list[Route]) -> None:
        """These frames' results were sent: tell their dispatchers and give the slots back."""
        by_link: dict[int, list[list[Any]]] = {}
        for route in routes:
            by_link.setdefault(route.link, []).append(list(route.key))
        for index, keys in by_link.items():
            self._send(self.links[index], "done", {"frames": keys, "credit": len(keys)})

    def rejected(self, route: Route | None) -> None:
        """A frame that failed its schema still frees its slot."""
        if route is not None:
            self._send(self.links[route.link], "credit", {"n": 1})

    def close(self) -> None:
        """Close every socket (results linger briefly so sent results still leave)."""
        for link in self.links:
            link.sock.close(0)
        for sock in self.results.values():
            sock.close()
