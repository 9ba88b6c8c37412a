"""Generated hostile messages for every socket (frames, results, replay, telemetry): wrong types,
out-of-range numbers (1e400, NaN, -1, 2**70), missing and extra parts and keys, huge declared
shapes, names with path characters. Shared by the unit tests of daemon/messages.py and the
fuzz tests that send them to the real role processes."""

from __future__ import annotations

import copy
import json
import time
from typing import Any, Iterator

import numpy as np

OVERFLOW = "__1e400__"
"""Stands for the JSON number 1e400 (parses as inf in Python; no Python float encodes to it)."""

BAD_NUMBERS = [OVERFLOW, float("nan"), float("inf"), -1, 2 ** 70, -(2 ** 70), 1e20, "7", None, True, [1], {"a": 1}]
BAD_NAMES = ["../../../../tmp/iseg-escape", "belt1/../../x", "nope", "", "x" * 5000, 5, None, ["belt1"], "-rf", "belt1\n"]


def encode(header: Any) -> bytes:
    """JSON with NaN/Infinity literals allowed and OVERFLOW written as the number 1e400."""
    return json.dumps(header).replace(f'"{OVERFLOW}"', "1e400").encode()


def _mutations(header: dict[str, Any], fields: dict[str, list[Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for key in header:
        broken = dict(header)
        del broken[key]
        yield f"missing {key}", broken
    for key, values in fields.items():
        for value in values:
            broken = copy.deepcopy(header)
            broken[key] = value
            yield f"{key}={str(value)[:30]!r}", broken


def good_frame(camera: str = "belt1", seq: int = 0, h: int = 96, w: int = 128) -> tuple[dict[str, Any], bytes]:
    """A valid frame header and payload."""
    image = np.full((h, w, 3), 128, np.uint8)
    image[h // 3: h // 2, w // 3: w // 2] = 220
    return ({"camera": camera, "seq": seq, "ts": time.time(), "shape": [h, w, 3], "dtype": "uint8",
             "session": "fuzz", "roi": [0, 0]}, image.tobytes())


def hostile_frames(camera: str = "belt1") -> list[tuple[str, list[bytes]]]:
    """(what, parts) of frame messages a worker must reject."""
    header, payload = good_frame(camera)
    topic = f"frame.{camera}".encode()
    out: list[tuple[str, list[bytes]]] = [
        ("one part", [topic]), ("no payload", [topic, encode(header)]),
        ("extra part", [topic, encode(header), payload, b"extra"]),
        ("not json", [topic, b"{not json", payload]), ("json list", [topic, b"[1, 2]", payload]),
        ("deep json", [topic, b"[" * 50000 + b"]" * 50000, payload]), ("binary topic", [b"\xff\xfe", encode(header), payload]),
        ("wrong topic", [b"frame.other", encode(header), payload]),
        ("truncated payload", [topic, encode(header), payload[:-7]]), ("long payload", [topic, encode(header), payload + b"x"]),
    ]
    fields = {"camera": BAD_NAMES, "seq": BAD_NUMBERS, "ts": BAD_NUMBERS + [0.0, time.time() + 10 * 86400],
              "session": [5, "s" * 1000, ["x"]], "roi": [[-1, 0], [0], "x", [2 ** 70, 0], [0.5, 0]],
              "dtype": ["float64", "uint16", 5, None],
              "shape": [[2 ** 40, 2 ** 40, 3], [2 ** 62, 2, 3], [-96, -128, 3], [96, 128, 4], [96, 128], [96, 128, 3, 1],
                        [96.0, 128, 3], [OVERFLOW, 128, 3], "96x128x3", [0, 128, 3], [96, 128, True], [65536, 65536, 3]]}
    for what, broken in _mutations(header, fields):
        if what in ("missing session", "missing roi"):
            continue  # optional fields
        parts = [topic, encode(broken), payload]
        if what.startswith("camera=") and isinstance(broken["camera"], str):
            parts[0] = f"frame.{broken['camera']}".encode()
        out.append((what, parts))
    return out


def good_result(camera: str = "belt1", seq: int = 0, classes: tuple[str, ...] = ("scratch", "dent"), h: int = 96,
                w: int = 128) -> tuple[dict[str, Any], list[bytes]]:
    """A valid ok result (first class flagged) and its two payloads."""
    image = np.full((h, w, 3), 90, np.uint8)
    labels = np.zeros((h, w), np.uint8)
    labels[20:50, 30:80] = 1
    header = {"camera": camera, "seq": seq, "ts": time.time(), "session": "fuzz", "roi": [0, 0], "worker": "fuzz",
              "done_ts": time.time(), "ok": True, "classes": list(classes),
              "presence": {c: (0.9 if i == 0 else 0.1) for i, c in enumerate(classes)},
              "thresholds": {c: 0.5 for c in classes}, "flagged": [classes[0]], "infer_ms": 12.5,
              "frame": {"shape": [h, w, 3], "dtype": "uint8"}, "labels": {"shape": [h, w], "dtype": "uint8"}}
    return header, [image.tobytes(), labels.tobytes()]


def hostile_results(camera: str = "belt1") -> list[tuple[str, list[bytes]]]:
    """(what, parts) of result messages a publisher must reject."""
    header, payloads = good_result(camera)
    head = encode(header)
    out: list[tuple[str, list[bytes]]] = [
        ("one part", [b"result"]), ("ok without payloads", [b"result", head]),
        ("ok with one payload", [b"result", head, payloads[0]]), ("extra part", [b"result", head, *payloads, b"x"]),
        ("not json", [b"result", b"nope", *payloads]), ("deep json", [b"result", b"{\"a\":" * 30000, *payloads]),
        ("wrong topic", [b"frame.belt1", head, *payloads]),
        ("failed with payloads", [b"result", encode({**header, "ok": False, "error": "x"}), *payloads]),
        ("labels shorter", [b"result", head, payloads[0], payloads[1][:-1]]),
        ("frame shorter", [b"result", head, payloads[0][:-3], payloads[1]]),
        ("huge header", [b"result", encode({**header, "pad": "x" * 200_000}), *payloads]),
    ]
    fields = {"camera": BAD_NAMES, "seq": BAD_NUMBERS, "ts": BAD_NUMBERS + [1e12, 0.5], "ok": ["yes", 1, None],
              "session": [7, "s" * 1000], "worker": [7, "w" * 1000], "roi": [[-5, 0], "x", [2 ** 70, 2]],
              "classes": [["scratch"], ["scratch", "dent", "crack"], ["dent", "scratch"], "scratch", [1, 2]],
              "presence": [{"scratch": v, "dent": 0.1} for v in BAD_NUMBERS] + [{"scratch": 0.9}, [0.9, 0.1],
                                                                                 {"scratch": 0.9, "dent": 0.1, "x": 1}],
              "thresholds": [{"scratch": OVERFLOW, "dent": 0.5}, {"scratch": "0.5", "dent": 0.5}, None],
              "flagged": [["crack"], ["../x"], ["scratch", "scratch"], "scratch", [5]],
              "infer_ms": [OVERFLOW, -1, float("nan"), "fast"],
              "frame": [{"shape": [2 ** 40, 2 ** 40, 3], "dtype": "uint8"}, {"shape": [96, 128, 3], "dtype": "float32"},
                        {"shape": [96, 128], "dtype": "uint8"}, "x", None],
              "labels": [{"shape": [96, 127], "dtype": "uint8"}, {"shape": [2 ** 33, 2 ** 33], "dtype": "uint8"},
                         {"shape": [96, 128, 1], "dtype": "uint8"}]}
    for what, broken in _mutations(header, fields):
        if what in ("missing session", "missing roi", "missing worker", "missing done_ts", "missing infer_ms"):
            continue  # optional fields
        out.append((what, [b"result", encode(broken), *payloads]))
    return out


def hostile_replays(camera: str = "belt1") -> list[tuple[str, list[bytes]]]:
    """(what, parts) of replay requests a publisher must answer with ok: false."""
    out: list[tuple[str, list[bytes]]] = [
        ("not json", [b"since=0"]), ("json list", [b"[0]"]), ("deep json", [b"[" * 3000 + b"]" * 3000]),
        ("two parts", [b'{"since": 0}', b'{"since": 0}']), ("huge", [encode({"since": 0, "camera": "x" * 10000})]),
        ("extra key", [encode({"since": 0, "drop": "table"})]), ("binary", [b"\xff\x00\xfe"]),
    ]
    for value in BAD_NUMBERS:
        out.append((f"since={str(value)[:20]}", [encode({"since": value})]))
    for value in [0, -1, 10 ** 9, OVERFLOW, float("nan"), "10", None]:
        out.append((f"limit={str(value)[:20]}", [encode({"since": 0, "limit": value})]))
    for value in BAD_NAMES:
        if value is not None:
            out.append((f"camera={str(value)[:20]!r}", [encode({"since": 0, "camera": value})]))
    return out


def hostile_heartbeats(name: str, role: str, pid: int, token: str = "") -> list[tuple[str, list[bytes]]]:
    """(what, parts) of heartbeats a supervisor must reject; `name`/`role`/`pid` are a real role's, so
    several of these are forgeries that would pass a check of the claimed pid alone."""
    now = time.time()
    header = {"role": role, "name": name, "pid": pid, "token": token, "ts": now, "progress_at": now, "busy_since": None,
              "state": {"ready": True}, "metrics": {"counters": {"iseg_capture_frames_total": {'camera="belt1"': 1.0}},
                                                    "gauges": {}, "histograms": {}}}
    out: list[tuple[str, list[bytes]]] = [
        ("one part", [b"heartbeat"]), ("extra part", [b"heartbeat", encode(header), b"x"]),
        ("not json", [b"heartbeat", b"{"]), ("deep json", [b"heartbeat", b"[" * 50000]),
        ("wrong topic", [b"stats", encode(header)]),
    ]
    fields = {"name": ["nobody", "../x", 5, None, "x" * 1000], "role": ["publisher" if role != "publisher" else "worker", 3],
              "pid": [pid + 1, 0, -1, 2 ** 70, str(pid), float(pid), OVERFLOW], "token": ["forged", None, 5],
              "ts": [OVERFLOW, float("nan"), "now", -5], "progress_at": [OVERFLOW, float("nan"), None, "x"],
              "busy_since": [OVERFLOW, "x", float("inf")],
              "state": ["ready", [1], {"k": "v" * 5000}, {"k": OVERFLOW}, {f"k{i}": 1 for i in range(100)}, {"k": [1]}],
              "metrics": ["x", {"counters": {"bad name": {"": 1}}},
                          {"counters": {"iseg_x_total": {'camera="a"} 1\nforged_metric{a="b"': 1}}},
                          {"counters": {"iseg_x_total": {"": float("nan")}}},
                          {"counters": {"iseg_x_total": {"": OVERFLOW}}}, {"counters": {"iseg_x_total": {"": "1"}}},
                          {"histograms": {"iseg_h": {"": {"bounds": [1, 2], "counts": [1], "sum": 0, "count": 1}}}},
                          {"histograms": {"iseg_h": {"": {"bounds": [1], "counts": [1], "sum": OVERFLOW, "count": 1}}}},
                          {"gauges": {"iseg_g": {f'n="{i}"': 1 for i in range(30000)}}}, {"other": {}}]}
    for what, broken in _mutations(header, fields):
        if what in ("missing busy_since", "missing state", "missing metrics"):
            continue  # optional fields
        out.append((what, [b"heartbeat", encode(broken)]))
    return out


def hostile_controls(camera: str = "belt1") -> list[tuple[str, list[bytes]]]:
    """(what, parts) of dispatch control messages (worker and publisher to dispatcher) a dispatcher must
    reject: every field of every topic broken, keys missing, unknown keys, bad frame keys."""
    bad_names = [5, None, ["x"], "x" * 5000]
    bad_counts = [OVERFLOW, float("nan"), -1, 2 ** 70, 1e20, "7", None, True, [1]]
    bad_keys = ["x", [[1, 2]], [[camera, "s", -1]], [[camera, 5, 1]], [["x" * 5000, "s", 1]],
                [[camera, "s", 1]] * 5000, [[camera, "s", 1.5]], [{"camera": camera}]]
    headers = {"hello": {"worker": "w", "credits": 1}, "beat": {"worker": "w"}, "credit": {"n": 1},
               "done": {"frames": [[camera, "s", 1]], "credit": 1},
               "leader": {"publisher": "primary", "epoch": 1, "instance": "i"},
               "watch": {"publisher": "backup", "epoch": 0}, "ack": {"epoch": 1, "frames": [[camera, "s", 1]]}}
    kinds = {"worker": bad_names, "publisher": bad_names, "instance": bad_names, "credits": bad_counts,
             "n": bad_counts, "credit": bad_counts, "epoch": bad_counts, "frames": bad_keys}
    out: list[tuple[str, list[bytes]]] = [
        ("one part", [b"hello"]), ("extra part", [b"beat", encode({"worker": "w"}), b"x"]),
        ("not json", [b"hello", b"{"]), ("deep json", [b"credit", b"[" * 50000]),
        ("unknown topic", [b"frame.belt1", encode({})]), ("json list", [b"ack", b"[1]"]),
    ]
    for topic, header in headers.items():
        out.append((f"{topic} unknown key", [topic.encode(), encode({**header, "extra": 1})]))
        fields = {key: kinds[key] for key in header}
        for what, broken in _mutations(header, fields):
            out.append((f"{topic} {what}", [topic.encode(), encode(broken)]))
    return out
