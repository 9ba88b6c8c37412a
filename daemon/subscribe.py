"""`iseg subscribe`: one JSON line per published message, binary payloads summarised.

With `--since ID` it first replays stored alerts newer than ID from the publisher's
replay socket (subscribing to live messages *before* asking, and skipping live
alerts already replayed), so a client that was away misses nothing.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from typing import Any, TextIO

import zmq

from daemon.config import DaemonConfig
from daemon.role import StopFlag
from daemon.wire import Message, WireError, recv


def summarise(payload: memoryview) -> dict[str, Any]:
    """Size, detected format and a short digest of a binary payload."""
    data = bytes(payload[:8])
    kind = "jpeg" if data.startswith(b"\xff\xd8") else "png" if data.startswith(b"\x89PNG") else "raw"
    return {"bytes": len(payload), "format": kind, "sha1": hashlib.sha1(payload).hexdigest()[:12]}


def line(message: Message, replayed: bool = False) -> str:
    """The JSON line printed for one message."""
    record: dict[str, Any] = {"topic": message.topic, "header": message.header,
                              "payloads": [summarise(p) for p in message.payloads]}
    if replayed:
        record["replayed"] = True
    return json.dumps(record, separators=(",", ":"))


def replay(ctx: zmq.Context, config: DaemonConfig, since: int, camera: str | None, timeout_s: float) -> list[dict[str, Any]]:
    """Stored alerts with id > since, from the publisher's replay socket."""
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    req.connect(config.endpoint("replay"))
    alerts: list[dict[str, Any]] = []
    try:
        while True:
            req.send(json.dumps({"since": since, "limit": 1000, "camera": camera}).encode())
            try:
                answer = json.loads(req.recv())
            except zmq.Again:
                raise TimeoutError(f"replay: no answer from {config.endpoint('replay')} within {timeout_s:g}s (is the publisher running?)") from None
            if not answer.get("ok"):
                raise ValueError(answer.get("error", "replay failed"))
            batch = answer["alerts"]
            alerts += batch
            if len(batch) < 1000:
                return alerts
            since = batch[-1]["id"]
    finally:
        req.close()


def run_subscribe(config: DaemonConfig, topics: list[str], since: int | None, count: int | None,
                  duration: float | None, stop: StopFlag, out: TextIO = sys.stdout) -> int:
    """Print messages until stopped, `count` messages, or `duration` seconds."""
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    for topic in topics or [""]:
        sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
    sub.connect(config.endpoint("publish"))
    printed = 0
    replayed_up_to = 0
    started = time.monotonic()
    try:
        if since is not None:
            time.sleep(0.2)
            for alert in replay(ctx, config, since, None, 10.0):
                if count is not None and printed >= count:
                    break
                if topics and not any(f"alert.{alert['camera']}".startswith(t) for t in topics):
                    continue
                out.write(line(Message(f"alert.{alert['camera']}", alert), replayed=True) + "\n")
                replayed_up_to = max(replayed_up_to, alert["id"])
                printed += 1
            out.flush()
        while not stop.stopping and (count is None or printed < count):
            if duration is not None and time.monotonic() - started > duration:
                break
            if not sub.poll(200):
                continue
            try:
                message = recv(sub)
            except WireError as err:
                print(f"skipped a malformed message: {err}", file=sys.stderr)
                continue
            if message.topic.startswith("alert.") and int(message.header.get("id", 0)) <= replayed_up_to:
                continue
            out.write(line(message) + "\n")
            out.flush()
            printed += 1
    finally:
        sub.close()
        ctx.term()
    return 0
