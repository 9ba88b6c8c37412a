"""One schema per message type that crosses a socket, checked at the receiving boundary.

Every message from a socket is untrusted: a field of the wrong type, a number out of
range (1e400, NaN, -1, 2**70), a declared shape whose byte count differs from the
payload, a camera the config does not list, or missing / extra parts is a `Rejected`
with a reason from a fixed vocabulary, which the receiving role counts
(`iseg_rejected_messages_total{role, socket, reason}`) and logs at a limited rate
(`Rejections`). Only what a schema returns reaches the rest of the daemon, so names
that end up in file paths or metric labels are always configured camera ids and
class names.

The checks are plain Python: about 30-50 us per frame or result message including the
JSON parse and the payload check (scripts/bench_messages.py; the header alone as a
pydantic v2 model measures 10-20 us), under 0.1 % of one inference either way, and they
return the numpy views the roles need without a second pass.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import zmq

REASONS = ("parts", "json", "missing", "type", "range", "camera", "class", "shape", "size", "topic",
           "unknown_key", "role", "pid", "token", "internal")
"""The reasons a message is rejected: the `reason` label's complete set (bounded metric series)."""

MAX_FRAME_PIXELS = 100_000_000
"""Largest frame a message may declare (H * W) by default; the config's `limits.max_image_pixels` sets it."""
MAX_SIDE = 65_535
MAX_SEQ = 2 ** 53
MIN_TS = 946_684_800.0
"""Capture timestamps before 2000-01-01 are absurd (and overflow date and path formatting)."""
MAX_FUTURE_S = 86_400.0
"""Capture timestamps may run ahead of this host's clock by a day at most (another host's clock)."""
MAX_HEADER_BYTES = 64 * 1024
MAX_HEARTBEAT_BYTES = 4 * 1024 * 1024
MAX_REPLAY_BYTES = 4096
MAX_REPLAY_LIMIT = 10_000
MAX_NAME = 128
MAX_ERROR_TEXT = 2000
MAX_ROI_OFFSET = 1_000_000
MAX_SERIES = 20_000
MAX_STATE_KEYS = 64
REPLAY_KEYS = frozenset({"since", "limit", "camera"})
LOG_EVERY_S = 10.0

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,199}")
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]{0,63}="(?:[^"\\\n]|\\[\\"n]){0,256}"'
_LABEL_KEY = re.compile(rf"(?:{_LABEL}(?:,{_LABEL}){{0,7}})?")
_MISSING = object()


class Rejected(ValueError):
    """A message that fails its schema; `reason` is one of REASONS, `detail` says what was wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(detail)
        self.reason = reason


# -- field checks -----------------------------------------------------------------------------

def _field(header: Mapping[str, Any], key: str, where: str) -> Any:
    value = header.get(key, _MISSING)
    if value is _MISSING:
        raise Rejected("missing", f"{where} lacks {key!r}")
    return value


def _int(value: Any, lo: int, hi: int, what: str) -> int:
    if type(value) is not int:
        raise Rejected("type", f"{what} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise Rejected("range", f"{what} {value} is outside [{lo}, {hi}]")
    return value


def _float(value: Any, lo: float, hi: float, what: str) -> float:
    if type(value) is not float and type(value) is not int:
        raise Rejected("type", f"{what} must be a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or not lo <= number <= hi:
        raise Rejected("range", f"{what} {number!r} is outside [{lo:g}, {hi:g}]")
    return number


def _str(value: Any, max_len: int, what: str) -> str:
    if type(value) is not str:
        raise Rejected("type", f"{what} must be a string, got {type(value).__name__}")
    if len(value) > max_len:
        raise Rejected("range", f"{what} is longer than {max_len} characters")
    return value


def _ts(value: Any, what: str) -> float:
    return _float(value, MIN_TS, time.time() + MAX_FUTURE_S, what)


def _roi(value: Any) -> list[int]:
    if value is None:
        return [0, 0]
    if type(value) is not list or len(value) != 2:
        raise Rejected("type", "roi must be [x, y]")
    return [_int(value[0], 0, MAX_ROI_OFFSET, "roi x"), _int(value[1], 0, MAX_ROI_OFFSET, "roi y")]


def _array_spec(value: Any, payload: memoryview, channels: int | None, what: str,
                max_pixels: int = MAX_FRAME_PIXELS) -> tuple[int, ...]:
    """Shape of an HxWx3 (channels=3) or HxW (None) uint8 payload; the byte count is computed with
    Python integers (no overflow) and must equal the payload's length."""
    if type(value) is not dict:
        raise Rejected("type", f"{what} must be an object with shape and dtype")
    shape, dtype = value.get("shape"), value.get("dtype")
    if dtype != "uint8":
        raise Rejected("type", f"{what} dtype must be uint8, got {str(dtype)[:20]!r}")
    rank = 2 if channels is None else 3
    if type(shape) is not list or len(shape) != rank:
        raise Rejected("shape", f"{what} shape must be a list of {rank} integers")
    height = _int(shape[0], 1, MAX_SIDE, f"{what} height")
    width = _int(shape[1], 1, MAX_SIDE, f"{what} width")
    if channels is not None and shape[2] != channels or type(shape[-1]) is not int:
        raise Rejected("shape", f"{what} must have {channels} channels")
    if height * width > max_pixels:
        raise Rejected("range", f"{what} {height}x{width} is over {max_pixels} pixels (limits.max_image_pixels)")
    expected = height * width * (channels or 1)
    if len(payload) != expected:
        raise Rejected("size", f"{what} payload has {len(payload)} bytes, its header says {shape} uint8 = {expected}")
    return (height, width) if channels is None else (height, width, channels)


def _parts(frames: Sequence[Any], counts: tuple[int, ...], max_header: int) -> tuple[str, dict[str, Any], list[memoryview]]:
    """Topic, header object and payloads of a raw multipart message with an allowed part count."""
    if len(frames) not in counts:
        raise Rejected("parts", f"expected {' or '.join(map(str, counts))} parts, got {len(frames)}")
    raw = [f.buffer if isinstance(f, zmq.Frame) else memoryview(f) for f in frames]
    if len(raw[0]) > 2 * MAX_NAME or len(raw[1]) > max_header:
        raise Rejected("size", f"topic or header too long ({len(raw[0])}, {len(raw[1])} bytes)")
    try:
        topic = bytes(raw[0]).decode()
        header = json.loads(bytes(raw[1]))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise Rejected("json", f"unreadable topic or header: {str(err)[:200]}") from None
    if type(header) is not dict:
        raise Rejected("json", "header is not a JSON object")
    return topic, header, raw[2:]


# -- message schemas -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Frame:
    """A `frame.<camera>` message from a capture role: header fields checked, pixels as an array."""

    camera: str
    seq: int
    ts: float
    session: str
    roi: list[int]
    image: np.ndarray

    def header(self) -> dict[str, Any]:
        """The checked header fields the worker passes on."""
        return {"camera": self.camera, "seq": self.seq, "ts": self.ts, "session": self.session, "roi": self.roi}


@dataclass(frozen=True)
class Result:
    """A `result` message from a worker; frame and labels present only when `ok`."""

    camera: str
    seq: int
    ts: float
    session: str
    roi: list[int]
    worker: str
    ok: bool
    error: str = ""
    classes: tuple[str, ...] = ()
    presence: dict[str, float] | None = None
    thresholds: dict[str, float] | None = None
    flagged: tuple[str, ...] = ()
    infer_ms: float | None = None
    model: str = ""
    frame: np.ndarray | None = None
    labels: np.ndarray | None = None
    frame_spec: dict[str, Any] | None = None
    dispatch: tuple[str, int] | None = None
    """(dispatcher instance, admission number) of a dispatched frame: what the publisher counts gaps in."""


@dataclass(frozen=True)
class Flagged:
    """A `flagged.<camera>` message from the publisher to the recorder."""

    meta: dict[str, Any]
    frame: np.ndarray
    mask_png: bytes
    overlay_jpeg: bytes


@dataclass(frozen=True)
class Picture:
    """An `overlay.<camera>` (JPEG) or `mask.<camera>` (label PNG) message from the publisher."""

    kind: str
    camera: str
    seq: int
    capture_ts: float
    flagged: tuple[str, ...]
    presence: dict[str, float]
    thresholds: dict[str, float]
    image: bytes


@dataclass(frozen=True)
class SelfTest:
    """A `selftest` message from a worker: the outcome of its golden-sample self-test."""

    worker: str
    camera: str
    ok: bool
    detail: str
    ts: float


@dataclass(frozen=True)
class ReplayRequest:
    """`{"since": id, "limit": n, "camera": id or null}` on the replay socket."""

    since: int
    limit: int
    camera: str | None


class Boundary:
    """The schemas bound to one config: which cameras exist and which classes each one has."""

    def __init__(self, cameras: Mapping[str, Sequence[str]], max_pixels: int = MAX_FRAME_PIXELS) -> None:
        self.classes = {camera: tuple(names) for camera, names in cameras.items()}
        self.max_pixels = max_pixels

    @classmethod
    def from_config(cls, config: Any) -> "Boundary":
        """Cameras and classes of a DaemonConfig, and its pixel limit."""
        return cls({camera.id: camera.classes for camera in config.cameras}, config.limits.max_image_pixels)

    def _camera(self, value: Any) -> str:
        if type(value) is not str or value not in self.classes:
            shown = value[:40] if isinstance(value, str) else type(value).__name__
            raise Rejected("camera", f"camera {shown!r} is not in the config")
        return value

    def frame(self, frames: Sequence[Any]) -> Frame:
        """`[frame.<camera>, header, pixels]` from a capture role."""
        topic, h, payloads = _parts(frames, (3,), MAX_HEADER_BYTES)
        camera = self._camera(_field(h, "camera", "frame header"))
        if topic != "frame." + camera:
            raise Rejected("topic", f"topic {topic[:60]!r} does not match camera {camera!r}")
        shape = _array_spec({"shape": _field(h, "shape", "frame header"), "dtype": _field(h, "dtype", "frame header")},
                            payloads[0], 3, "frame", self.max_pixels)
        image = np.frombuffer(payloads[0], dtype=np.uint8).reshape(shape)
        return Frame(camera, _int(_field(h, "seq", "frame header"), 0, MAX_SEQ, "seq"),
                     _ts(_field(h, "ts", "frame header"), "ts"), _str(h.get("session", ""), MAX_NAME, "session"),
                     _roi(h.get("roi")), image)

    def result(self, frames: Sequence[Any]) -> Result:
        """`[result, header]` (failed frame) or `[result, header, frame, labels]` from a worker."""
        topic, h, payloads = _parts(frames, (2, 4), MAX_HEADER_BYTES)
        if topic != "result":
            raise Rejected("topic", f"topic {topic[:60]!r} is not 'result'")
        camera = self._camera(_field(h, "camera", "result"))
        ok = _field(h, "ok", "result")
        if type(ok) is not bool:
            raise Rejected("type", "ok must be true or false")
        dispatch = h.get("dispatch")
        if dispatch is not None:
            if type(dispatch) is not dict:
                raise Rejected("type", "dispatch must be {session, seq}")
            dispatch = (_str(_field(dispatch, "session", "result dispatch"), MAX_NAME, "dispatch.session"),
                        _int(_field(dispatch, "seq", "result dispatch"), 0, MAX_SEQ, "dispatch.seq"))
        common = dict(camera=camera, seq=_int(_field(h, "seq", "result"), 0, MAX_SEQ, "seq"),
                      ts=_ts(_field(h, "ts", "result"), "ts"), session=_str(h.get("session") or "", MAX_NAME, "session"),
                      roi=_roi(h.get("roi")), worker=_str(h.get("worker") or "", MAX_NAME, "worker"), dispatch=dispatch)
        if not ok:
            if payloads:
                raise Rejected("parts", "a failed result carries no payload")
            error = h.get("error") or ""
            return Result(ok=False, error=error[:MAX_ERROR_TEXT] if type(error) is str else "unreadable error", **common)
        if len(payloads) != 2:
            raise Rejected("parts", "an ok result needs frame and labels payloads")
        classes = self.classes[camera]
        if _field(h, "classes", "result") != list(classes):
            raise Rejected("class", f"classes must be camera {camera}'s configured {list(classes)}")
        presence = self._per_class(_field(h, "presence", "result"), classes, "presence")
        thresholds = self._per_class(_field(h, "thresholds", "result"), classes, "thresholds")
        flagged = _field(h, "flagged", "result")
        if type(flagged) is not list or any(type(f) is not str or f not in classes for f in flagged) \
                or len(set(flagged)) != len(flagged):
            raise Rejected("class", f"flagged must list distinct classes of camera {camera}")
        infer = h.get("infer_ms")
        frame_spec = _field(h, "frame", "result")
        frame_shape = _array_spec(frame_spec, payloads[0], 3, "frame", self.max_pixels)
        labels_shape = _array_spec(_field(h, "labels", "result"), payloads[1], None, "labels", self.max_pixels)
        if labels_shape != frame_shape[:2]:
            raise Rejected("shape", f"labels {list(labels_shape)} do not match frame {list(frame_shape)}")
        return Result(ok=True, classes=classes, presence=presence, thresholds=thresholds, flagged=tuple(flagged),
                      infer_ms=None if infer is None else _float(infer, 0.0, 1e9, "infer_ms"),
                      model=_str(h.get("model") or "", MAX_NAME, "model"),
                      frame=np.frombuffer(payloads[0], dtype=np.uint8).reshape(frame_shape),
                      labels=np.frombuffer(payloads[1], dtype=np.uint8).reshape(labels_shape),
                      frame_spec={"shape": list(frame_shape), "dtype": "uint8"}, **common)

    def self_test(self, frames: Sequence[Any]) -> SelfTest:
        """`[selftest, header]` from a worker: worker, a configured camera, ok, detail text, ts."""
        topic, h, _ = _parts(frames, (2,), MAX_HEADER_BYTES)
        if topic != "selftest":
            raise Rejected("topic", f"topic {topic[:60]!r} is not 'selftest'")
        ok = _field(h, "ok", "selftest")
        if type(ok) is not bool:
            raise Rejected("type", "ok must be true or false")
        return SelfTest(_str(_field(h, "worker", "selftest"), MAX_NAME, "worker"),
                        self._camera(_field(h, "camera", "selftest")), ok,
                        _str(h.get("detail") or "", MAX_ERROR_TEXT, "detail"), _ts(_field(h, "ts", "selftest"), "ts"))

    @staticmethod
    def _per_class(value: Any, classes: tuple[str, ...], what: str) -> dict[str, float]:
        if type(value) is not dict or len(value) != len(classes):
            raise Rejected("class", f"{what} must map each class to a score")
        try:
            return {name: _float(value[name], 0.0, 1.0, f"{what}.{name}") for name in classes}
        except KeyError as err:
            raise Rejected("class", f"{what} lacks class {err}") from None

    def flagged(self, frames: Sequence[Any]) -> Flagged:
        """`[flagged.<camera>, meta, frame, mask PNG, overlay JPEG]` from the publisher."""
        topic, h, payloads = _parts(frames, (5,), MAX_HEADER_BYTES)
        camera = self._camera(_field(h, "camera", "flagged frame"))
        if topic != "flagged." + camera:
            raise Rejected("topic", f"topic {topic[:60]!r} does not match camera {camera!r}")
        classes = self.classes[camera]
        flagged = _field(h, "flagged", "flagged frame")
        if type(flagged) is not list or any(f not in classes for f in flagged if type(f) is str) \
                or any(type(f) is not str for f in flagged):
            raise Rejected("class", f"flagged must list classes of camera {camera}")
        presence = h.get("presence") or {}
        if type(presence) is not dict or any(k not in classes for k in presence):
            raise Rejected("class", "presence must map this camera's classes to scores")
        alert_ids = h.get("alert_ids") or []
        if type(alert_ids) is not list or len(alert_ids) > len(classes):
            raise Rejected("type", "alert_ids must be a short list of ids")
        meta = {**h, "camera": camera, "seq": _int(_field(h, "seq", "flagged frame"), 0, MAX_SEQ, "seq"),
                "capture_ts": _ts(_field(h, "capture_ts", "flagged frame"), "capture_ts"), "flagged": flagged,
                "presence": {k: _float(v, 0.0, 1.0, f"presence.{k}") for k, v in presence.items()},
                "alert_ids": [_int(i, 1, MAX_SEQ, "alert id") for i in alert_ids],
                "flag_seq": _int(h.get("flag_seq", 0), 0, MAX_SEQ, "flag_seq"),
                "publisher_session": _str(h.get("publisher_session") or "", MAX_NAME, "publisher_session")}
        shape = _array_spec(_field(h, "frame", "flagged frame"), payloads[0], 3, "frame", self.max_pixels)
        return Flagged(meta, np.frombuffer(payloads[0], dtype=np.uint8).reshape(shape), bytes(payloads[1]),
                       bytes(payloads[2]))

    def picture(self, frames: Sequence[Any]) -> Picture:
        """`[overlay.<camera>|mask.<camera>, header, image]` from the publisher (console, recorder)."""
        topic, h, payloads = _parts(frames, (3,), MAX_HEADER_BYTES)
        kind, _, named = topic.partition(".")
        camera = self._camera(_field(h, "camera", "picture"))
        if kind not in ("overlay", "mask") or named != camera:
            raise Rejected("topic", f"topic {topic[:60]!r} is not overlay.{camera} or mask.{camera}")
        classes = self.classes[camera]
        flagged = h.get("flagged") or []
        if type(flagged) is not list or any(type(f) is not str or f not in classes for f in flagged):
            raise Rejected("class", f"flagged must list classes of camera {camera}")
        scores = {}
        for key in ("presence", "thresholds"):
            value = h.get(key) or {}
            if type(value) is not dict or any(k not in classes for k in value):
                raise Rejected("class", f"{key} must map this camera's classes to scores")
            scores[key] = {k: _float(v, 0.0, 1.0, f"{key}.{k}") for k, v in value.items()}
        if len(payloads[0]) > 3 * self.max_pixels:
            raise Rejected("size", f"{kind} image of {len(payloads[0])} bytes is more than raw RGB at "
                                   "limits.max_image_pixels")
        return Picture(kind, camera, _int(_field(h, "seq", "picture"), 0, MAX_SEQ, "seq"),
                       _ts(_field(h, "capture_ts", "picture"), "capture_ts"), tuple(flagged), scores["presence"],
                       scores["thresholds"], bytes(payloads[0]))

    def replay(self, frames: Sequence[Any]) -> ReplayRequest:
        """One JSON object in one part: since >= 0, 1 <= limit <= 10000, camera null or configured."""
        if len(frames) != 1:
            raise Rejected("parts", f"a replay request is one part, got {len(frames)}")
        raw = frames[0].buffer if isinstance(frames[0], zmq.Frame) else memoryview(frames[0])
        if len(raw) > MAX_REPLAY_BYTES:
            raise Rejected("size", f"replay request over {MAX_REPLAY_BYTES} bytes")
        try:
            query = json.loads(bytes(raw))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            raise Rejected("json", f"replay request is not JSON: {str(err)[:200]}") from None
        if type(query) is not dict:
            raise Rejected("json", "replay request must be a JSON object")
        unknown = set(query) - REPLAY_KEYS
        if unknown:
            raise Rejected("unknown_key", f"unknown key(s) {sorted(unknown)[:5]} (known: {sorted(REPLAY_KEYS)})")
        camera = query.get("camera")
        return ReplayRequest(_int(query.get("since", 0), 0, MAX_SEQ, "since"),
                             _int(query.get("limit", 1000), 1, MAX_REPLAY_LIMIT, "limit"),
                             None if camera is None else self._camera(camera))


# -- dispatch control messages -------------------------------------------------------------------

MAX_KEYS = 4096
MAX_CREDITS = 4096
MAX_EPOCH = 2 ** 53

CONTROL_FIELDS: dict[str, dict[str, str]] = {
    "hello": {"worker": "name", "credits": "count"},
    "beat": {"worker": "name"},
    "credit": {"n": "count"},
    "done": {"frames": "keys", "credit": "count"},
    "leader": {"publisher": "name", "epoch": "epoch", "instance": "name"},
    "watch": {"publisher": "name", "epoch": "epoch"},
    "ack": {"epoch": "epoch", "frames": "keys"},
    "stats": {},
    "dbeat": {"instance": "name"},
    "who": {},
    "lease": {"epoch": "epoch", "instance": "name", "leader": "name", "leader_age_ms": "ms"},
    "fenced": {"epoch": "epoch", "instance": "name", "leader": "name", "leader_age_ms": "ms"},
    "status": {"epoch": "epoch", "instance": "name", "leader": "name", "leader_age_ms": "ms"},
    "repl": {"epoch": "epoch", "state": "object", "alerts": "alerts", "seq": "count"},
    "confirm": {"seq": "count", "epoch": "epoch"},
    "pbeat": {"epoch": "epoch", "role": "name", "leading": "bool"},
}
"""The control messages of credit-based dispatch and the publisher pair, each `[topic, header]`:
worker to dispatcher (hello, beat, credit, done), publisher to dispatcher (leader, watch, ack),
a local tool to dispatcher (stats), dispatcher to worker (dbeat, who), dispatcher to publisher
(lease, fenced, status), publisher to publisher (repl, confirm, pbeat). A header holds exactly
these keys (`leader_age_ms` may be null)."""


def _keys(value: Any) -> list[tuple[str, str, int]]:
    """Frame keys of an ack or done. A camera need not be configured here: a publisher acks to every
    dispatcher and each one only looks up the frames it holds (a key is never a path or a label)."""
    if type(value) is not list or len(value) > MAX_KEYS:
        raise Rejected("type", f"frames must be a list of at most {MAX_KEYS} [camera, session, seq]")
    keys = []
    for item in value:
        if type(item) is not list or len(item) != 3:
            raise Rejected("type", "each frame key is [camera, session, seq]")
        keys.append((_str(item[0], MAX_NAME, "camera"), _str(item[1], MAX_NAME, "session"),
                     _int(item[2], 0, MAX_SEQ, "seq")))
    return keys


def control(frames: Sequence[Any], boundary: "Boundary", allowed: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """A dispatch or publisher-pair control message with one of the `allowed` topics, its header
    checked field by field against CONTROL_FIELDS (unknown keys refused)."""
    topic, h, payloads = _parts(frames, (2,), MAX_HEADER_BYTES)
    if topic not in allowed:
        raise Rejected("topic", f"topic {topic[:60]!r} is not one of {', '.join(allowed)}")
    fields = CONTROL_FIELDS[topic]
    unknown = set(h) - set(fields)
    if unknown:
        raise Rejected("unknown_key", f"{topic}: unknown key(s) {sorted(unknown)[:5]}")
    out: dict[str, Any] = {}
    for key, kind in fields.items():
        value = _field(h, key, topic)
        if kind == "name":
            out[key] = _str(value, MAX_NAME, f"{topic}.{key}")
        elif kind == "count":
            out[key] = _int(value, 0, MAX_CREDITS if key in ("credits", "n", "credit") else MAX_SEQ, f"{topic}.{key}")
        elif kind == "epoch":
            out[key] = _int(value, 0, MAX_EPOCH, f"{topic}.{key}")
        elif kind == "ms":
            out[key] = None if value is None else _float(value, 0.0, 1e12, f"{topic}.{key}")
        elif kind == "bool":
            if type(value) is not bool:
                raise Rejected("type", f"{topic}.{key} must be true or false")
            out[key] = value
        elif kind == "keys":
            out[key] = _keys(value)
        elif kind == "object":
            if type(value) is not dict:
                raise Rejected("type", f"{topic}.{key} must be an object")
            out[key] = value
        elif kind == "alerts":
            if type(value) is not list or any(type(a) is not dict or type(a.get("id")) is not int
                                              or a.get("camera") not in boundary.classes for a in value):
                raise Rejected("type", f"{topic}.{key} must be a list of alerts with an id and a configured camera")
            out[key] = value
    return topic, out


# -- heartbeats ------------------------------------------------------------------------------------

def peer_pid(frame: Any) -> int | None:
    """The pid of the process on the other end of an ipc:// connection, as the kernel reports it
    (ZeroMQ's Peer-Address is `...:uid:gid:pid` there); None on other transports."""
    try:
        address = frame.get("Peer-Address")
    except (zmq.ZMQError, AttributeError):
        return None
    parts = str(address).rsplit(":", 3)
    return int(parts[-1]) if len(parts) == 4 and parts[-1].isdigit() else None


def _series(section: Any, what: str, check: Any) -> dict[str, dict[str, Any]]:
    if type(section) is not dict:
        raise Rejected("type", f"{what} must be an object")
    out: dict[str, dict[str, Any]] = {}
    for name, series in section.items():
        if not _METRIC_NAME.fullmatch(name) or type(series) is not dict:
            raise Rejected("type", f"{what}: bad metric {str(name)[:60]!r}")
        for key, value in series.items():
            if not _LABEL_KEY.fullmatch(key):
                raise Rejected("type", f"{what}.{name}: bad label set {key[:80]!r}")
            check(value, f"{name}{{{key[:60]}}}")
        out[name] = series
    return out


def _histogram(value: Any, what: str) -> None:
    if type(value) is not dict:
        raise Rejected("type", f"{what} must be an object")
    bounds, counts = value.get("bounds"), value.get("counts")
    if type(bounds) is not list or type(counts) is not list or len(bounds) != len(counts) or len(bounds) > 64:
        raise Rejected("type", f"{what}: bounds and counts must be lists of the same length")
    for bound in bounds:
        _float(bound, -1e300, 1e300, f"{what} bound")
    for count in counts:
        _int(count, 0, MAX_SEQ, f"{what} count")
    _float(value.get("sum"), -1e300, 1e300, f"{what} sum")
    _int(value.get("count"), 0, MAX_SEQ, f"{what} count")


def check_metrics(snapshot: Any) -> dict[str, Any]:
    """A Registry snapshot from a heartbeat: metric names and label sets the exposition format
    allows, finite numbers, consistent histograms, at most MAX_SERIES series."""
    if type(snapshot) is not dict or set(snapshot) - {"counters", "gauges", "histograms"}:
        raise Rejected("type", "metrics must hold counters, gauges and histograms only")

    def number(value: Any, what: str) -> None:
        _float(value, -1e300, 1e300, what)

    out = {"counters": _series(snapshot.get("counters", {}), "counters", number),
           "gauges": _series(snapshot.get("gauges", {}), "gauges", number),
           "histograms": _series(snapshot.get("histograms", {}), "histograms", _histogram)}
    if sum(len(s) for section in out.values() for s in section.values()) > MAX_SERIES:
        raise Rejected("range", f"more than {MAX_SERIES} metric series")
    return out


def _state(value: Any) -> dict[str, Any]:
    if type(value) is not dict or len(value) > MAX_STATE_KEYS:
        raise Rejected("type", f"state must be an object of at most {MAX_STATE_KEYS} keys")
    for key, item in value.items():
        if len(key) > MAX_NAME:
            raise Rejected("range", "state key too long")
        if item is None or type(item) is bool:
            continue
        if type(item) is str:
            _str(item, MAX_ERROR_TEXT, f"state.{key}")
        elif type(item) is int:
            _int(item, -MAX_SEQ, MAX_SEQ, f"state.{key}")
        else:
            _float(item, -1e300, 1e300, f"state.{key}")
    return value


def heartbeat(frames: Sequence[Any], expected: Mapping[str, tuple[str, int | None, str]]) -> dict[str, Any]:
    """A role's heartbeat, accepted only from a role this supervisor runs: `expected` maps each role
    name to (role kind, pid it started, token it gave). The pid must match both the header and the
    kernel's peer credentials (ipc), and the token must match, so another local process cannot
    speak for a role (and keep a frozen worker looking alive)."""
    topic, h, payloads = _parts(frames, (2,), MAX_HEARTBEAT_BYTES)
    if topic != "heartbeat" or payloads:
        raise Rejected("topic", f"telemetry topic {topic[:40]!r} is not 'heartbeat'")
    name = _str(_field(h, "name", "heartbeat"), MAX_NAME, "name")
    if name not in expected:
        raise Rejected("role", f"heartbeat from {name[:60]!r}, which this supervisor does not run")
    kind, pid, token = expected[name]
    if h.get("role") != kind:
        raise Rejected("role", f"{name} is a {kind}, the heartbeat says {str(h.get('role'))[:30]!r}")
    claimed = _int(_field(h, "pid", "heartbeat"), 1, 2 ** 31, "pid")
    sender = peer_pid(frames[0])
    if pid is None or claimed != pid or (sender is not None and sender != pid):
        raise Rejected("pid", f"heartbeat for {name} from pid {sender or claimed}, not from the pid started ({pid})")
    if type(h.get("token")) is not str or h["token"] != token:
        raise Rejected("token", f"heartbeat for {name} without the token its process was given")
    busy = h.get("busy_since")
    return {"role": kind, "name": name, "pid": pid, "ts": _float(_field(h, "ts", "heartbeat"), 0.0, 1e11, "ts"),
            "progress_at": _float(_field(h, "progress_at", "heartbeat"), 0.0, 1e11, "progress_at"),
            "busy_since": None if busy is None else _float(busy, 0.0, 1e11, "busy_since"),
            "state": _state(h.get("state", {})), "metrics": check_metrics(h.get("metrics", {}))}


# -- counting and logging rejects --------------------------------------------------------------

class Rejections:
    """Counts rejected messages per socket and reason in a role's Registry, and logs them: the first
    of each reason at once, then one line per LOG_EVERY_S with how many were not logged."""

    def __init__(self, metrics: Any, role: str, log: logging.Logger) -> None:
        self.metrics = metrics
        self.role = role
        self.log = log
        self._last: dict[tuple[str, str], float] = {}
        self._quiet: dict[tuple[str, str], int] = {}

    def count(self, socket: str, err: Rejected) -> None:
        """Count one reject and maybe log it."""
        self.metrics.inc("iseg_rejected_messages_total", role=self.role, socket=socket, reason=err.reason)
        key = (socket, err.reason)
        now = time.monotonic()
        if now - self._last.get(key, -LOG_EVERY_S) >= LOG_EVERY_S:
            quiet = self._quiet.pop(key, 0)
            more = f" (+{quiet} more since the last line)" if quiet else ""
            self.log.warning("rejected a %s message (%s): %s%s", socket, err.reason, err, more)
            self._last[key] = now
        else:
            self._quiet[key] = self._quiet.get(key, 0) + 1

    def internal(self, socket: str, err: Exception) -> None:
        """A message that passed its schema but still raised: counted as `internal`, logged with the
        traceback (rate-limited), and the loop goes on."""
        self.metrics.inc("iseg_rejected_messages_total", role=self.role, socket=socket, reason="internal")
        key = (socket, "internal")
        now = time.monotonic()
        if now - self._last.get(key, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._last[key] = now
            self.log.error("a %s message could not be handled (%s: %s); skipped it", socket, type(err).__name__, err,
                           exc_info=err)
