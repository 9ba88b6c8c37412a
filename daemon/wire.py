"""The wire format between roles: multipart `[topic, header JSON, payload bytes...]`.

Arrays travel as raw bytes with shape and dtype in the header; nothing is ever
pickled, so a message from another host can at worst be rejected, never execute code.
Every frame header carries camera, seq and capture time (`ts`), so every stage can
measure latency and see gaps.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import zmq

ZERO_COPY_MIN_BYTES = 64 * 1024
ALLOWED_DTYPES = {"uint8", "uint16", "float32"}


class WireError(ValueError):
    """A message that does not follow the wire format (counted and skipped by receivers)."""


@dataclass
class Message:
    """One decoded multipart message."""

    topic: str
    header: dict[str, Any]
    payloads: list[memoryview] = field(default_factory=list)


def encode_header(header: dict[str, Any]) -> bytes:
    """Compact JSON; the header must hold only JSON types."""
    return json.dumps(header, separators=(",", ":")).encode()


def send(sock: zmq.Socket, topic: str, header: dict[str, Any], payloads: Sequence[bytes | memoryview | np.ndarray] = (),
         flags: int = 0) -> None:
    """Send one message; large payloads go zero-copy (ZeroMQ holds the buffer, not a copy)."""
    parts: list[Any] = [topic.encode(), encode_header(header)]
    parts.extend(np.ascontiguousarray(p) if isinstance(p, np.ndarray) else p for p in payloads)
    last = len(parts) - 1
    for i, part in enumerate(parts):
        more = zmq.SNDMORE if i < last else 0
        size = part.nbytes if isinstance(part, (np.ndarray, memoryview)) else len(part)
        sock.send(part, flags | more, copy=size < ZERO_COPY_MIN_BYTES, track=False)


def recv(sock: zmq.Socket, flags: int = 0) -> Message:
    """Receive one message; raises WireError when it is not `[topic, header JSON, ...]`."""
    frames = sock.recv_multipart(flags, copy=False)
    return decode(frames)


def decode(frames: Sequence[Any]) -> Message:
    """Decode raw zmq frames (bytes or zmq.Frame)."""
    if len(frames) < 2:
        raise WireError(f"expected [topic, header, payload...], got {len(frames)} part(s)")
    raw = [f.buffer if isinstance(f, zmq.Frame) else memoryview(f) for f in frames]
    try:
        topic = bytes(raw[0]).decode()
        header = json.loads(bytes(raw[1]))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise WireError(f"unreadable topic or header: {err}") from None
    if not isinstance(header, dict):
        raise WireError("header is not a JSON object")
    return Message(topic, header, raw[2:])


def array_header(array: np.ndarray) -> dict[str, Any]:
    """Shape and dtype of an array payload, for the header."""
    return {"shape": list(array.shape), "dtype": str(array.dtype)}


def array_from(payload: memoryview | bytes, shape: Any, dtype: Any) -> np.ndarray:
    """Rebuild an array from a payload, checking the header against the byte count."""
    if dtype not in ALLOWED_DTYPES:
        raise WireError(f"dtype {dtype!r} not allowed (one of {sorted(ALLOWED_DTYPES)})")
    if not isinstance(shape, list) or not shape or not all(isinstance(s, int) and s > 0 for s in shape):
        raise WireError(f"bad shape {shape!r}")
    expected = math.prod(shape) * np.dtype(dtype).itemsize  # Python ints: a huge shape cannot overflow
    if len(payload) != expected:
        raise WireError(f"payload has {len(payload)} bytes, header says {shape} {dtype} = {expected}")
    return np.frombuffer(payload, dtype=dtype).reshape(shape)


def frame_header(camera: str, seq: int, ts: float, frame: np.ndarray, **extra: Any) -> dict[str, Any]:
    """Header of a captured frame."""
    return {"camera": camera, "seq": seq, "ts": ts, **array_header(frame), **extra}


def frame_from(message: Message) -> np.ndarray:
    """The frame of a `frame.<camera>` message: an RGB uint8 HxWx3 array (checked)."""
    header = message.header
    for key in ("camera", "seq", "ts", "shape", "dtype"):
        if key not in header:
            raise WireError(f"frame header lacks {key!r}")
    if not message.payloads:
        raise WireError("frame message has no payload")
    frame = array_from(message.payloads[0], header["shape"], header["dtype"])
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise WireError(f"frame must be HxWx3 uint8, got {header['shape']} {header['dtype']}")
    return frame


class BoundedPusher:
    """A PUSH socket that never blocks its caller: when every peer's queue is full the
    message is dropped and counted, because a live camera wants the newest frame, not a backlog."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self.sent = 0
        self.dropped = 0

    def push(self, topic: str, header: dict[str, Any], payloads: Sequence[Any] = ()) -> bool:
        """True when queued, False when dropped."""
        try:
            send(self.sock, topic, header, payloads, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        return True


def now() -> float:
    """Wall-clock seconds, the clock every header's `ts` uses (comparable across processes)."""
    return time.time()
