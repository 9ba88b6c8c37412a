"""The message schemas at the socket boundary: every generated hostile message is a `Rejected`
with a reason from the fixed set (never another exception), the valid ones pass with only
configured names, and rejects are counted by reason and logged at a limited rate."""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import pytest

from daemon.messages import REASONS, Boundary, Rejected, Rejections, check_metrics, heartbeat
from daemon.metrics import Registry, render_prometheus
from tests.hostile_messages import (encode, good_frame, good_result, hostile_frames, hostile_heartbeats,
                                    hostile_replays, hostile_results)

BOUNDARY = Boundary({"belt1": ("scratch", "dent")})


def rejected(check, parts) -> Rejected:
    with pytest.raises(Rejected) as info:
        check(parts)
    assert info.value.reason in REASONS
    return info.value


def test_valid_frame_passes_with_checked_fields():
    header, payload = good_frame()
    frame = BOUNDARY.frame([b"frame.belt1", encode(header), payload])
    assert frame.camera == "belt1" and frame.image.shape == (96, 128, 3) and frame.image.dtype == np.uint8
    assert frame.header() == {"camera": "belt1", "seq": 0, "ts": header["ts"], "session": "fuzz", "roi": [0, 0]}


@pytest.mark.parametrize("what, parts", hostile_frames(), ids=lambda v: v if isinstance(v, str) else "")
def test_hostile_frames_are_rejected(what, parts):
    rejected(BOUNDARY.frame, parts)


def test_valid_result_and_failed_result_pass():
    header, payloads = good_result()
    result = BOUNDARY.result([b"result", encode(header), *payloads])
    assert result.ok and result.flagged == ("scratch",) and result.labels.shape == (96, 128)
    failed = BOUNDARY.result([b"result", encode({**{k: header[k] for k in ("camera", "seq", "ts")}, "ok": False,
                                                 "error": "e" * 10000})])
    assert not failed.ok and len(failed.error) == 2000


@pytest.mark.parametrize("what, parts", hostile_results(), ids=lambda v: v if isinstance(v, str) else "")
def test_hostile_results_are_rejected(what, parts):
    rejected(BOUNDARY.result, parts)


def test_path_characters_in_camera_names_never_pass():
    for name in ("../../x", "belt1/../x", "belt1\x00"):
        header, payloads = good_result(camera=name)
        assert rejected(BOUNDARY.result, [b"result", encode(header), *payloads]).reason == "camera"


def test_frame_byte_count_cannot_overflow():
    header, payload = good_frame()
    header["shape"] = [2 ** 31 + 1, 2 ** 31 + 1, 3]  # np.prod of this in int64 wraps; the check must not
    assert rejected(BOUNDARY.frame, [b"frame.belt1", encode(header), payload]).reason in ("range", "shape")


def test_replay_requests():
    assert BOUNDARY.replay([b'{"since": 3, "limit": 5, "camera": "belt1"}']).since == 3
    assert BOUNDARY.replay([b"{}"]).limit == 1000
    for what, parts in hostile_replays():
        rejected(BOUNDARY.replay, parts)


def test_heartbeats_only_from_the_started_pid_with_its_token():
    expected = {"worker.0": ("worker", os.getpid(), "t0k")}
    now = time.time()
    good = {"role": "worker", "name": "worker.0", "pid": os.getpid(), "token": "t0k", "ts": now, "progress_at": now,
            "busy_since": now, "state": {"ready": True, "backend": "torch"},
            "metrics": {"counters": {"iseg_worker_frames_total": {'camera="belt1",worker="worker.0"': 3.0}},
                        "gauges": {}, "histograms": {"iseg_worker_inference_seconds": {'camera="belt1"': {
                            "bounds": [0.005, 0.01], "counts": [1, 2], "sum": 0.012, "count": 2}}}}}
    beat = heartbeat([b"heartbeat", encode(good)], expected)
    assert beat["busy_since"] == now and beat["metrics"]["counters"]["iseg_worker_frames_total"]
    for what, parts in hostile_heartbeats("worker.0", "worker", os.getpid(), "t0k"):
        with pytest.raises(Rejected):
            heartbeat(parts, expected)


def test_metrics_snapshot_cannot_inject_exposition_lines():
    forged = {"counters": {"iseg_x_total": {'a="1"} 5\niseg_role_up{role="worker.0"} 1 #': 1.0}}}
    with pytest.raises(Rejected):
        check_metrics(forged)
    fine = check_metrics({"counters": {"iseg_x_total": {'a="x\\"y"': 1.0}}})
    assert 'iseg_x_total{a="x\\"y"} 1' in render_prometheus([fine])


def test_rejections_are_counted_by_reason_and_logged_rate_limited(caplog):
    metrics = Registry()
    rejections = Rejections(metrics, "publisher", logging.getLogger("test.rejects"))
    with caplog.at_level(logging.WARNING, "test.rejects"):
        for _ in range(50):
            rejections.count("results", Rejected("camera", "camera 'x' is not in the config"))
        rejections.count("results", Rejected("range", "seq out of range"))
    assert metrics.counter("iseg_rejected_messages_total", role="publisher", socket="results", reason="camera") == 50
    assert len(caplog.records) == 2, "one line per reason per 10 s, not one per message"


def test_validation_cost_is_small():
    """Not a benchmark (scripts/bench_messages.py is); a guard that the hot-path checks stay cheap."""
    header, payload = good_frame(h=1080, w=1920)
    parts = [b"frame.belt1", json.dumps(header).encode(), payload]
    started = time.perf_counter()
    for _ in range(200):
        BOUNDARY.frame(parts)
    assert (time.perf_counter() - started) / 200 < 0.002


def test_pixel_limit_comes_from_the_config():
    from daemon.config import parse_config

    config = parse_config({"state_dir": "/tmp/s", "engine": {"model_dir": "m"}, "limits": {"max_image_pixels": 10_000},
                           "cameras": [{"id": "belt1", "source": "synthetic"}]})
    header, payload = good_frame()  # 96 x 128 = 12 288 pixels
    assert rejected(Boundary.from_config(config).frame, [b"frame.belt1", encode(header), payload]).reason == "range"


def test_dispatch_control_messages_are_checked_field_by_field():
    from daemon.dispatcher import FROM_PEERS
    from daemon.messages import control
    from tests.hostile_messages import encode, hostile_controls

    boundary = Boundary({"belt1": ("scratch", "dent")})
    topic, header = control([b"done", encode({"frames": [["belt1", "s", 3], ["elsewhere", "s", 4]], "credit": 2})],
                            boundary, FROM_PEERS)
    assert topic == "done" and header == {"frames": [("belt1", "s", 3), ("elsewhere", "s", 4)], "credit": 2}
    assert control([b"leader", encode({"publisher": "backup", "epoch": 2, "instance": "h:1:ab"})], boundary,
                   FROM_PEERS)[1]["epoch"] == 2
    with pytest.raises(Rejected) as err:
        control([b"lease", encode({})], boundary, FROM_PEERS)
    assert err.value.reason == "topic"
    for what, parts in hostile_controls():
        with pytest.raises(Rejected):
            control(parts, boundary, FROM_PEERS)
            pytest.fail(f"accepted: {what}")
