"""The publisher's side of dispatch: acknowledgements and leader heartbeats to every dispatcher,
and, with `publisher.backup_host`, the primary/backup pair.

**One publisher.** It heartbeats `leader` (name `primary`, epoch 1, its process instance) to every
dispatcher and acknowledges each frame once its result is stored. A restarted publisher is a new
instance: the dispatchers re-send every frame whose result went to the old one unacknowledged.

**A pair.** The primary (`iseg publish`) and the backup (`iseg publish --backup`) each hold an
epoch: the primary's are odd, the backup's even, so two publishers never claim the same one. The
leader replicates every result's outcome to the other (its state document: next alert id,
cooldowns, sequence numbers, frames done; and the alerts it raised) and, when the result raised
alerts, publishes them only after the follower confirmed, so the follower's store holds every
alert anyone saw, under the same id. The follower asks every dispatcher how long ago the leader
last spoke; when a majority of the configured dispatchers report it silent for
`publisher.takeover_ms`, it takes over with the next epoch of its parity. Dispatchers answer an
older epoch with `fenced`, and a leader acts only while a majority of dispatchers confirmed its
epoch within half the takeover time (its *lease*).

The split brain this prevents: the link between primary and backup fails while both still reach
the dispatchers. Were the backup to decide on the peer link alone, both would lead and hand out
the same alert ids. Here the dispatchers are the witnesses: they still hear the primary, so the
backup stays a follower. A primary frozen (SIGSTOP) past the takeover finds its lease expired when
it wakes and handles nothing until a dispatcher answers, which answers `fenced`. What is not
prevented: dispatchers split between two partitions, each side with one publisher, when neither
side holds a majority of dispatchers nobody leads (frames wait, then count as lost, reason
no_publisher); with an odd number of capture hosts one side always can.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

import zmq

from daemon.config import DaemonConfig
from daemon.messages import Boundary, Rejected, Rejections, control
from daemon.metrics import Registry
from daemon.security import bind_curve_server, connect_curve_client, connect_endpoint
from daemon.wire import encode_header

FROM_DISPATCHER = ("lease", "fenced", "status")
FROM_PEER = ("repl", "confirm", "pbeat")
CONFIRM_WAIT_S = 1.0


@dataclass
class DispatcherLink:
    """One dispatcher as the publisher sees it."""

    sock: zmq.Socket
    endpoint: str
    confirmed_at: float = 0.0
    answered_at: float = 0.0
    leader_age_s: float | None = None


def _parity_epoch(above: int, backup: bool) -> int:
    """The smallest epoch above `above` with this publisher's parity (primary odd, backup even)."""
    epoch = above + 1
    if (epoch % 2 == 0) != backup:
        epoch += 1
    return epoch


class PublisherLink:
    """Leader or follower; acks and heartbeats to the dispatchers; replication to the peer."""

    def __init__(self, ctx: zmq.Context, config: DaemonConfig, backup: bool, saved_epoch: int, metrics: Registry,
                 rejections: Rejections, log: logging.Logger) -> None:
        self.config = config
        self.backup = backup
        self.name = "backup" if backup else "primary"
        self.pair = config.publisher.backup_host is not None
        self.instance = f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(3)}"
        self.metrics = metrics
        self.rejections = rejections
        self.log = log
        self.boundary = Boundary.from_config(config)
        self.heartbeat_s = config.dispatch.heartbeat_ms / 1000
        self.takeover_s = config.publisher.takeover_ms / 1000
        self.lease_s = self.takeover_s / 2
        self.max_epoch = saved_epoch
        self.epoch = saved_epoch if saved_epoch % 2 == (0 if backup else 1) and saved_epoch else _parity_epoch(saved_epoch, backup)
        self.leading = not backup
        self.started = time.monotonic()
        self.next_beat = 0.0
        self.links: list[DispatcherLink] = []
        self.peer_in: zmq.Socket | None = None
        self.peer_out: zmq.Socket | None = None
        self.repl_seq = 0
        self.confirmed_seq = 0
        self.peer_confirms = False
        for endpoint in config.dispatcher_endpoints(config.dispatch.port is not None and bool(config.dispatch_hosts)):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.setsockopt(zmq.SNDHWM, 10_000)
            sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
            self.links.append(DispatcherLink(sock, connect_endpoint(sock, config, endpoint)))
        if self.pair:
            remote_cfg = config.sockets.remote
            assert remote_cfg is not None and config.publisher.backup_host is not None
            self.peer_in = ctx.socket(zmq.PULL)
            self.peer_in.setsockopt(zmq.MAXMSGSIZE, 16 << 20)
            bind_curve_server(ctx, self.peer_in, config, config.publisher.peer_port)
            self.peer_out = ctx.socket(zmq.PUSH)
            self.peer_out.setsockopt(zmq.SNDHWM, 1000)
            self.peer_out.setsockopt(zmq.LINGER, 0)
            other = remote_cfg.host if backup else config.publisher.backup_host
            connect_curve_client(self.peer_out, config, config.publisher.peer_port, host=other)
        metrics.set("iseg_publisher_leading", 1 if self.leading else 0)
        metrics.set("iseg_publisher_epoch", self.epoch)

    @property
    def sockets(self) -> list[zmq.Socket]:
        """Sockets the publisher's poller watches."""
        return [link.sock for link in self.links] + ([self.peer_in] if self.peer_in is not None else [])

    # -- leading -------------------------------------------------------------------------------

    def may_publish(self, now: float) -> bool:
        """Whether results may be handled now: a single publisher always; in a pair, the leader while a
        majority of dispatchers confirmed its epoch within the lease."""
        if not self.pair:
            return True
        if not self.leading:
            return False
        fresh = sum(1 for link in self.links if now - link.confirmed_at <= self.lease_s)
        return fresh * 2 > len(self.links)

    def _set_leading(self, leading: bool, why: str) -> None:
        if leading == self.leading:
            return
        self.leading = leading
        self.metrics.set("iseg_publisher_leading", 1 if leading else 0)
        self.metrics.set("iseg_publisher_epoch", self.epoch)
        (self.log.warning if leading else self.log.error)(
            "publisher %s %s (epoch %d): %s", self.name, "takes the lead" if leading else "steps down", self.epoch, why)

    def _consider_takeover(self, now: float) -> bool:
        """A follower takes over when a majority of dispatchers report the leader silent (or never
        heard) for the takeover time. True when it just did."""
        if self.leading or not self.pair:
            return False
        if now - self.started < self.takeover_s:
            return False
        silent = 0
        for link in self.links:
            if now - link.answered_at > self.takeover_s:
                continue
            if link.leader_age_s is None or link.leader_age_s >= self.takeover_s:
                silent += 1
        if silent * 2 <= len(self.links):
            return False
        self.epoch = _parity_epoch(self.max_epoch, self.backup)
        self.max_epoch = self.epoch
        self._set_leading(True, f"{silent} of {len(self.links)} dispatcher(s) report no leader for "
                                f"{self.takeover_s * 1000:.0f} ms")
        self.next_beat = 0.0
        return True

    def tick(self, now: float) -> bool:
        """Heartbeats to dispatchers (and the peer) every dispatch.heartbeat_ms; True when this
        publisher just took the lead (the caller adopts the replicated state)."""
        took = self._consider_takeover(now)
        if now < self.next_beat:
            return took
        self.next_beat = now + self.heartbeat_s
        for link in self.links:
            if self.leading:
                self._send(link.sock, "leader", {"publisher": self.name, "epoch": self.epoch, "instance": self.instance})
            else:
                self._send(link.sock, "watch", {"publisher": self.name, "epoch": self.epoch})
        if self.peer_out is not None:
            self._send(self.peer_out, "pbeat", {"epoch": self.epoch, "role": self.name, "leading": self.leading})
        return took

    @staticmethod
    def _send(sock: zmq.Socket, topic: str, body: dict[str, Any]) -> bool:
        try:
            sock.send_multipart([topic.encode(), encode_header(body)], zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def ack(self, keys: list[tuple[str, str, int]]) -> None:
        """Tell every dispatcher these frames' results are stored (each ignores keys it does not hold)."""
        if not keys:
            return
        body = {"epoch": self.epoch, "frames": [list(key) for key in keys]}
        for link in self.links:
            self._send(link.sock, "ack", body)

    # -- incoming ----------------------------------------------------------------------------

    def take(self, sock: zmq.Socket, now: float, apply: Any) -> None:
        """Read what is queued on one of `sockets`; `apply(state, alerts)` stores a replicated result."""
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                if sock is self.peer_in:
                    self._from_peer(frames, now, apply)
                else:
                    link = next(link for link in self.links if link.sock is sock)
                    self._from_dispatcher(link, frames, now)
            except Rejected as err:
                self.rejections.count("peer" if sock is self.peer_in else "dispatch", err)

    def _from_dispatcher(self, link: DispatcherLink, frames: list[Any], now: float) -> None:
        topic, h = control(frames, self.boundary, FROM_DISPATCHER)
        link.answered_at = now
        link.leader_age_s = None if h["leader_age_ms"] is None else h["leader_age_ms"] / 1000
        self.max_epoch = max(self.max_epoch, h["epoch"])
        if topic == "lease" and h["epoch"] == self.epoch and h["leader"] == self.name:
            link.confirmed_at = now
        elif topic == "fenced" and self.leading:
            self._set_leading(False, f"dispatcher {h['instance']} answers that epoch {h['epoch']} "
                                     f"({h['leader']}) is in force")

    def _from_peer(self, frames: list[Any], now: float, apply: Any) -> None:
        topic, h = control(frames, self.boundary, FROM_PEER)
        self.max_epoch = max(self.max_epoch, h["epoch"])
        if topic == "pbeat":
            if h["leading"] and self.leading and h["epoch"] > self.epoch:
                self._set_leading(False, f"the {h['role']} leads with the newer epoch {h['epoch']}")
        elif topic == "repl":
            if self.leading and h["epoch"] <= self.epoch:
                return
            apply(h["state"], h["alerts"])
            self._send(self.peer_out, "confirm", {"seq": h["seq"], "epoch": h["epoch"]})
        elif topic == "confirm" and h["epoch"] == self.epoch:
            self.confirmed_seq = max(self.confirmed_seq, h["seq"])
            self.peer_confirms = True

    # -- replication -------------------------------------------------------------------------

    def replicate(self, state: dict[str, Any], alerts: list[dict[str, Any]], wait: bool) -> bool:
        """Send this result's outcome to the follower; with `wait` (the result raised alerts) block until
        it confirms, at most CONFIRM_WAIT_S while it has been confirming. False when it did not confirm
        (the follower is away: the leader carries on alone and says so in its log)."""
        if self.peer_out is None or not self.leading:
            return True
        self.repl_seq += 1
        seq = self.repl_seq
        self._send(self.peer_out, "repl", {"epoch": self.epoch, "state": state, "alerts": alerts, "seq": seq})
        if not wait or not self.peer_confirms:
            return False
        deadline = time.monotonic() + CONFIRM_WAIT_S
        assert self.peer_in is not None
        while self.confirmed_seq < seq and time.monotonic() < deadline:
            if self.peer_in.poll(20):
                self.take(self.peer_in, time.monotonic(), lambda *_: None)
        if self.confirmed_seq < seq:
            self.peer_confirms = False
            self.log.error("the %s did not confirm alert replication within %.1fs; carrying on alone",
                           "backup" if not self.backup else "primary", CONFIRM_WAIT_S)
            return False
        return True

    def close(self) -> None:
        """Close every socket."""
        for sock in self.sockets + ([self.peer_out] if self.peer_out is not None else []):
            sock.close(0)
