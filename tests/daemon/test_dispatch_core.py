"""The dispatcher's rules on hand-made events: credits, admission drops, re-sends newest first,
lost frames with reasons, fencing by epoch, and the accounting identity at every step."""

from __future__ import annotations

import pytest

from daemon.dispatch_core import DispatchCore


class Clock:
    """Wall time for frame ages, advanced by hand."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def balanced(core: DispatchCore) -> None:
    for camera, flow in core.accounting().items():
        assert flow["captured"] == flow["dropped"] + flow["published"] + flow["lost"] + flow["in_flight"], (camera, flow)


@pytest.fixture
def setup():
    clock = Clock()
    core = DispatchCore(["a", "b"], worker_timeout_s=2.0, max_frame_age_s=5.0, ack_timeout_s=3.0, queue_frames=2,
                        wall=clock)
    return core, clock


def frame(core: DispatchCore, clock: Clock, camera: str, seq: int, session: str = "s1") -> None:
    core.intake(camera, session, seq, clock.now, [b"frame." + camera.encode(), b"{}", b"px"])
    balanced(core)


def test_no_leader_no_sends_and_queue_keeps_newest(setup):
    core, clock = setup
    core.worker_hello(b"w1", "w1", 4, 0.0)
    for seq in range(5):
        frame(core, clock, "a", seq)
    assert core.assign(0.0) == []
    flow = core.accounting()["a"]
    assert (flow["captured"], flow["dropped"], flow["in_flight"]) == (5, 3, 2)
    assert [f.key[2] for f in core.waiting["a"]] == [3, 4]


def test_capture_skips_count_as_captured_and_dropped(setup):
    core, clock = setup
    frame(core, clock, "a", 0)
    frame(core, clock, "a", 4)
    assert core.accounting()["a"]["captured"] == 5 and core.accounting()["a"]["dropped"] == 3
    frame(core, clock, "a", 0, session="s2")
    assert core.accounting()["a"]["captured"] == 6


def test_credits_bound_what_a_worker_holds_and_ack_publishes(setup):
    core, clock = setup
    core.leader_beat(b"p", "primary", 1, "i1", 0.0)
    core.worker_hello(b"w1", "w1", 1, 0.0)
    frame(core, clock, "a", 0)
    frame(core, clock, "a", 1)
    sends = core.assign(0.0)
    assert [(peer, f.key[2]) for peer, f in sends] == [(b"w1", 0)]
    assert core.assign(0.0) == []
    core.worker_done(b"w1", [("a", "s1", 0)], 0.1)
    core.worker_credit(b"w1", 1, 0.1)
    assert core.ack([("a", "s1", 0)], 1) == 1
    balanced(core)
    assert [f.key[2] for _, f in core.assign(0.2)] == [1]
    assert core.accounting()["a"]["published"] == 1


def test_silent_worker_frames_go_to_another_newest_first(setup):
    core, clock = setup
    core.leader_beat(b"p", "primary", 1, "i1", 0.0)
    core.worker_hello(b"w1", "w1", 3, 0.0)
    for seq in range(2):
        frame(core, clock, "a", seq)
    frame(core, clock, "b", 0)
    held = core.assign(0.0)
    assert len(held) == 3
    core.worker_hello(b"w2", "w2", 3, 0.0)
    for t in (1.0, 2.0):
        core.worker_beat(b"w2", t)
    gone, lost = core.tick(2.5)
    assert gone == ["w1"] and lost == []
    clock.now += 0.001
    resent = core.assign(2.5)
    assert {f.key for _, f in resent} == {("a", "s1", 0), ("a", "s1", 1), ("b", "s1", 0)}
    assert all(peer == b"w2" for peer, _ in resent)
    assert core.accounting()["a"]["resent"] == 2
    balanced(core)


def test_frames_too_old_to_resend_are_lost_with_reason(setup):
    core, clock = setup
    core.leader_beat(b"p", "primary", 1, "i1", 0.0)
    core.worker_hello(b"w1", "w1", 1, 0.0)
    frame(core, clock, "a", 0)
    core.assign(0.0)
    clock.now += 6.0
    gone, lost = core.tick(3.0)
    assert gone == ["w1"]
    assert [(item.key, item.reason) for item in lost] == [(("a", "s1", 0), "worker_lost")]
    flow = core.accounting()["a"]
    assert flow["lost"] == 1 and flow["lost_reasons"]["worker_lost"] == 1
    balanced(core)


def test_waiting_frames_expire_as_dropped_not_lost(setup):
    core, clock = setup
    frame(core, clock, "a", 0)
    clock.now += 6.0
    core.tick(0.0)
    flow = core.accounting()["a"]
    assert flow["dropped"] == 1 and flow["lost"] == 0
    balanced(core)


def test_new_leader_resends_unacknowledged_results_and_fences_older_epoch(setup):
    core, clock = setup
    assert core.leader_beat(b"p1", "primary", 1, "i1", 0.0)[0]
    core.worker_hello(b"w1", "w1", 2, 0.0)
    frame(core, clock, "a", 0)
    core.assign(0.0)
    core.worker_done(b"w1", [("a", "s1", 0)], 0.1)
    accepted, epoch, requeued = core.leader_beat(b"p2", "backup", 2, "i2", 0.2)
    assert accepted and epoch == 2 and [f.key for f in requeued] == [("a", "s1", 0)]
    assert core.leader_beat(b"p1", "primary", 1, "i1", 0.3)[:2] == (False, 2)
    assert core.ack([("a", "s1", 0)], 1) == 0
    core.worker_credit(b"w1", 1, 0.3)
    (peer, resent), = core.assign(0.3)
    assert resent.route == ("backup", 2, "i2")
    core.worker_done(b"w1", [resent.key], 0.4)
    assert core.ack([resent.key], 2) == 1
    balanced(core)


def test_done_under_an_old_route_is_requeued_at_once(setup):
    core, clock = setup
    core.leader_beat(b"p1", "primary", 1, "i1", 0.0)
    core.worker_hello(b"w1", "w1", 1, 0.0)
    frame(core, clock, "a", 0)
    core.assign(0.0)
    core.leader_beat(b"p1", "primary", 1, "i1-restarted", 0.5)
    requeued = core.worker_done(b"w1", [("a", "s1", 0)], 0.6)
    assert [f.key for f in requeued] == [("a", "s1", 0)]


def test_unacknowledged_result_is_resent_after_ack_timeout(setup):
    core, clock = setup
    core.leader_beat(b"p1", "primary", 1, "i1", 0.0)
    core.worker_hello(b"w1", "w1", 1, 0.0)
    frame(core, clock, "a", 0)
    core.assign(0.0)
    core.worker_done(b"w1", [("a", "s1", 0)], 0.1)
    for t in (1.0, 2.0, 3.0):
        core.leader_beat(b"p1", "primary", 1, "i1", t)
        core.worker_beat(b"w1", t)
    core.tick(3.2)
    assert core.resend and core.resend[0].requeue_reason == "result_unacknowledged"


def test_shutdown_records_admitted_frames_as_lost(setup):
    core, clock = setup
    core.leader_beat(b"p1", "primary", 1, "i1", 0.0)
    core.worker_hello(b"w1", "w1", 1, 0.0)
    frame(core, clock, "a", 0)
    frame(core, clock, "a", 1)
    core.assign(0.0)
    lost = core.shutdown()
    assert [item.reason for item in lost] == ["shutdown"]
    flow = core.accounting()["a"]
    assert (flow["dropped"], flow["lost"], flow["in_flight"]) == (1, 1, 0)
    balanced(core)


def test_frame_a_live_worker_never_reports_is_taken_back_with_its_slot(setup):
    core, clock = setup
    core.leader_beat(b"p1", "primary", 1, "i1", 0.0)
    core.worker_hello(b"w1", "w1", 1, 0.0)
    frame(core, clock, "a", 0)
    core.assign(0.0)
    for t in (1.0, 2.0, 3.0, 4.0, 5.0, 5.5):
        core.worker_beat(b"w1", t)
        core.leader_beat(b"p1", "primary", 1, "i1", t)
    core.tick(5.5)
    assert core.workers[b"w1"].credits == 1 and core.resend
    (peer, again), = core.assign(5.6)
    assert again.key == ("a", "s1", 0) and core.accounting()["a"]["resent"] == 1


def test_late_done_from_a_lost_worker_leaves_the_frame_with_its_new_worker(setup):
    core, clock = setup
    core.leader_beat(b"p1", "primary", 1, "i1", 0.0)
    core.worker_hello(b"w1", "w1", 1, 0.0)
    frame(core, clock, "a", 0)
    core.assign(0.0)
    core.worker_hello(b"w2", "w2", 1, 2.5)
    core.tick(2.5)
    (peer, moved), = core.assign(2.5)
    assert peer == b"w2"
    core.worker_done(b"w1", [moved.key], 2.6)
    assert moved.worker == "w2" and moved.done_at is None
    assert core.worker_hello(b"w2", "w2", 1, 2.7) is False and core.workers[b"w2"].credits == 0


def test_turns_go_round_and_late_credits_never_inflate_a_share(setup):
    core, clock = setup
    core.leader_beat(b"p1", "primary", 1, "i1", 0.0)
    core.worker_hello(b"w1", "w1", 1, 0.0)
    core.worker_hello(b"w2", "w2", 1, 0.0)
    core.worker_credit(b"w1", 5, 0.1)
    assert core.workers[b"w1"].credits == 1
    owners = []
    for seq in range(6):
        frame(core, clock, "a", seq)
        (peer, sent), = core.assign(1.0 + seq)
        owners.append(peer)
        core.worker_done(peer, [sent.key], 1.5 + seq)
        core.worker_credit(peer, 1, 1.5 + seq)
        core.ack([sent.key], 1)
    assert owners == [b"w1", b"w2"] * 3
    balanced(core)


def test_a_dead_dispatchers_frames_in_flight_count_as_lost():
    from daemon.supervisor import Supervisor

    beat = {"role": "dispatch", "metrics": {
        "counters": {"iseg_dispatch_captured_frames_total": {'camera="a"': 10.0},
                     "iseg_dispatch_lost_frames_total": {'camera="a",reason="worker_lost"': 1.0}},
        "gauges": {"iseg_dispatch_in_flight_frames": {'camera="a"': 3.0}}, "histograms": {}}}
    kept = Supervisor._counters_of(beat)
    assert kept["counters"]["iseg_dispatch_lost_frames_total"] == {'camera="a",reason="worker_lost"': 1.0,
                                                                   'camera="a",reason="dispatcher_lost"': 3.0}
    assert beat["metrics"]["counters"]["iseg_dispatch_lost_frames_total"] == {'camera="a",reason="worker_lost"': 1.0}
    worker = {"role": "worker", "metrics": beat["metrics"]}
    assert "reason=\"dispatcher_lost\"" not in str(Supervisor._counters_of(worker)["counters"])
