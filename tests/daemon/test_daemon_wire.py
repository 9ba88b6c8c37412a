"""Wire format: multipart [topic, header JSON, raw bytes], checked on receipt, never pickled;
the bounded pusher drops (and counts) instead of blocking."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import zmq

from daemon.wire import BoundedPusher, WireError, decode, frame_from, frame_header, recv, send


@pytest.fixture
def pair():
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    pull.bind("inproc://wire")
    push.connect("inproc://wire")
    yield push, pull
    push.close(0)
    pull.close(0)
    ctx.term()


def test_frame_round_trip_large_and_small(pair):
    push, pull = pair
    for shape in ((1080, 1920, 3), (10, 12, 3)):
        frame = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        send(push, "frame.cam", frame_header("cam", 7, 123.5, frame, session="x"), [frame])
        message = recv(pull)
        assert message.topic == "frame.cam" and message.header["seq"] == 7 and message.header["ts"] == 123.5
        assert np.array_equal(frame_from(message), frame)


@pytest.mark.parametrize("parts, why", [
    ([b"frame.cam"], "part"),
    ([b"frame.cam", b"{oops"], "unreadable"),
    ([b"frame.cam", b"[1, 2]"], "not a JSON object"),
])
def test_malformed_messages_are_wire_errors(parts, why):
    with pytest.raises(WireError, match=why):
        decode(parts)


@pytest.mark.parametrize("change, why", [
    ({"dtype": "object"}, "not allowed"),
    ({"shape": [2, 2, 3]}, "bytes"),
    ({"shape": "big"}, "bad shape"),
])
def test_frame_headers_are_checked_against_payloads(change, why):
    frame = np.zeros((4, 5, 3), np.uint8)
    header = {**frame_header("cam", 0, 0.0, frame), **change}
    message = decode([b"frame.cam", json.dumps(header).encode(), frame.tobytes()])
    with pytest.raises(WireError, match=why):
        frame_from(message)


def test_pusher_never_blocks_and_counts_drops():
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 2)
    push.bind("inproc://slow")
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 2)
    pull.connect("inproc://slow")
    pusher = BoundedPusher(push)
    frame = np.zeros((64, 64, 3), np.uint8)
    started = time.monotonic()
    outcomes = [pusher.push("frame.cam", frame_header("cam", i, 0.0, frame), [frame]) for i in range(50)]
    assert time.monotonic() - started < 1.0
    assert pusher.sent + pusher.dropped == 50 and pusher.dropped >= 40 and outcomes.count(False) == pusher.dropped
    received = []
    while pull.poll(100):
        received.append(recv(pull).header["seq"])
    assert len(received) == pusher.sent and received == sorted(received)
    push.close(0)
    pull.close(0)
    ctx.term()
