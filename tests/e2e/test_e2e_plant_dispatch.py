"""Plant faults with credit-based dispatch, on emulated hosts (network namespaces, tests/e2e/netns.py):
the same faults that make today's PUSH/PULL stall or lose frames (test_e2e_plant_control.py), and
the publisher pair's failover and split brain.

For every fault: no frame is lost after admission (the dispatcher's accounting, with
captured = dropped + published + lost + in_flight checked on every read), the camera is whole
and on time again within 5 s of the fault (`failover_s`), and at the end every alert is stored
exactly once and the publisher counts no gap.
"""

from __future__ import annotations

import json
import time

import pytest
import zmq

from plant_roles import (CAMERA, Heartbeats, Overlays, dispatcher_stats, measure_dispatch_fault, start_capture,
                         start_dispatcher, start_publisher, start_remote_worker, stored_alerts, worker_faults,
                         write_dispatch_config, write_keys)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

FAULT_S = 3.0
FAILOVER_LIMIT_S = 5.0


def alive_check(roles: dict, logs) -> callable:
    def alive() -> str:
        dead = {name: proc.returncode for name, proc in roles.items() if proc.poll() is not None}
        return f"roles exited: {dead}; logs in {logs}" if dead else ""
    return alive


def drain(ctx: zmq.Context, capture_host, roles: dict, timeout: float = 40.0) -> dict:
    """Stop the capture, then wait until the dispatcher holds nothing: the final accounting."""
    roles["capture"].terminate()
    roles["capture"].wait(20)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        flow = dispatcher_stats(ctx, capture_host)["cameras"][CAMERA]
        if flow["in_flight"] == 0:
            return flow
        time.sleep(0.3)
    raise AssertionError(f"frames still in flight {timeout:g}s after capture stopped: {flow}")


def publisher_gaps(beats: Heartbeats) -> dict:
    """The leading publisher's gap and late counters (gaps minus late: frames it never saw)."""
    return {key: beats.counter("publisher", f"iseg_publisher_{metric}_frames_total", camera=CAMERA)
            for key, metric in (("gaps", "gap"), ("late", "late"))}


def close_all(ctx: zmq.Context, subscribers: list, readers: dict) -> None:
    for sub in [*subscribers, *readers.values()]:
        sub.close()
    ctx.term()


def assert_every_fault(results: dict) -> None:
    """Per fault: no frame lost after admission, frames published, the camera whole and on time within
    5 s; at the end: nothing in flight, nothing lost, no gap at the publisher."""
    for name, result in results.items():
        if name == "final":
            continue
        assert result["lost"] == 0, f"{name}: a frame was lost after admission: {result}"
        assert result["published"] > 0, result
        assert result["failover_s"] is not None and result["failover_s"] <= FAILOVER_LIMIT_S, \
            f"{name}: the camera was not whole and on time within {FAILOVER_LIMIT_S}s: {result}"
    final = results["final"]
    assert final["lost"] == 0 and final["captured"] == final["dropped"] + final["published"], final
    assert final["gaps"] - final["late"] == 0, f"the publisher saw a gap: {final}"


def assert_alerts_once(stores: list[list[dict]], final: list[dict], published: int) -> None:
    """Each frame's alert is in the final leader's store exactly once, and no id names two different
    alerts across the stores (k 1 of 1, no cooldown: one alert per published frame)."""
    keys = [(a["camera"], a["seq"], a["class"]) for a in final if a.get("kind") == "defect"]
    assert len(keys) == len(set(keys)), "an alert was stored twice"
    assert len(keys) == published, f"{len(keys)} alerts stored for {published} published frames"
    by_id: dict[int, tuple] = {}
    for store in stores:
        for alert in store:
            key = (alert["camera"], alert["seq"], alert.get("class"))
            assert by_id.setdefault(alert["id"], key) == key, f"alert id {alert['id']} names two alerts"


def test_worker_faults_lose_nothing_and_fail_over_fast(plant, tiny_model, tmp_path):
    capture, gpu1, gpu2, pub = plant.host("cap"), plant.host("gpu1"), plant.host("gpu2"), plant.host("pub")
    config = write_dispatch_config(tmp_path / "plant.yaml", tiny_model, write_keys(tmp_path / "keys"), capture, pub)
    logs = tmp_path / "logs"
    ctx = zmq.Context()
    readers = {"cap": Heartbeats(ctx, capture), "pub": Heartbeats(ctx, pub)}
    overlays = Overlays(ctx, pub)
    results = {}
    try:
        roles = {"publisher": start_publisher(pub, config, logs), "dispatch": start_dispatcher(capture, config, logs),
                 "capture": start_capture(capture, config, logs),
                 "gpu1": start_remote_worker(gpu1, config, "gpu1.0", logs),
                 "gpu2": start_remote_worker(gpu2, config, "gpu2.0", logs)}
        alive = alive_check(roles, logs)
        faults = worker_faults(gpu1, roles, "gpu1", lambda: start_remote_worker(gpu1, config, "gpu1.0", logs))
        faults["partition"] = (lambda: gpu1.partition(capture), lambda: gpu1.heal(capture))
        flapping = []
        faults["flap"] = (lambda: flapping.append(gpu1.flap(0.4, FAULT_S)), lambda: flapping.pop().join())
        faults["throttle"] = (lambda: gpu1.throttle("1mbit"), gpu1.unthrottle)
        overlays.wait_for_workers(["gpu1.0", "gpu2.0"], 3, timeout=150, alive=alive)
        for name, (inject, recover) in faults.items():
            results[name] = measure_dispatch_fault(ctx, inject, recover, capture_host=capture, main=readers["cap"],
                                                   overlays={CAMERA: [overlays]}, faulted_worker="gpu1.0",
                                                   fault_s=FAULT_S, lead_s=0.5, settle_s=2.0)
            overlays.wait_for_workers(["gpu1.0", "gpu2.0"], 2, timeout=60, alive=alive, since=time.time())
        final = drain(ctx, capture, roles)
        time.sleep(1.5)
        results["final"] = {**final, **publisher_gaps(readers["pub"])}
        (tmp_path / "dispatch-worker-faults.json").write_text(json.dumps(results, indent=1))
        print(json.dumps(results, indent=1))
    finally:
        close_all(ctx, [overlays], readers)
    assert_every_fault(results)
    assert_alerts_once([stored_alerts(pub)], stored_alerts(pub), final["published"])


def test_publisher_pair_fails_over_and_fences_without_split_brain(plant, tiny_model, tmp_path):
    capture, gpu1, primary, backup = (plant.host("cap"), plant.host("gpu1"), plant.host("pub1"),
                                      plant.host("pub2"))
    config = write_dispatch_config(tmp_path / "plant.yaml", tiny_model, write_keys(tmp_path / "keys"), capture,
                                   primary, backup, fps=3.0)
    logs = tmp_path / "logs"
    ctx = zmq.Context()
    readers = {"cap": Heartbeats(ctx, capture), "pub1": Heartbeats(ctx, primary), "pub2": Heartbeats(ctx, backup)}
    overlays = [Overlays(ctx, primary), Overlays(ctx, backup)]
    results = {}

    def leader() -> tuple[str, int]:
        stats = dispatcher_stats(ctx, capture)
        return stats["leader"], stats["epoch"]

    try:
        roles = {"pub1": start_publisher(primary, config, logs), "pub2": start_publisher(backup, config, logs, backup=True),
                 "dispatch": start_dispatcher(capture, config, logs), "capture": start_capture(capture, config, logs),
                 "gpu1": start_remote_worker(gpu1, config, "gpu1.0", logs)}
        alive = alive_check(roles, logs)
        overlays[0].wait_for_workers(["gpu1.0"], 3, timeout=150, alive=alive)
        assert leader() == ("primary", 1)

        results["split_link"] = measure_dispatch_fault(
            ctx, lambda: primary.partition(backup), lambda: primary.heal(backup), capture_host=capture,
            main=readers["cap"], overlays={CAMERA: overlays}, faulted_worker="", fault_s=FAULT_S + 2.0)
        assert leader() == ("primary", 1), "the backup took over although the dispatchers still heard the primary"
        assert not overlays[1].snapshot(), "the backup published while the primary led"

        results["freeze_primary"] = measure_dispatch_fault(
            ctx, lambda: primary.freeze(roles["pub1"]), lambda: primary.thaw(roles["pub1"]), capture_host=capture,
            main=readers["cap"], overlays={CAMERA: overlays}, faulted_worker="", fault_s=FAULT_S + 2.0, settle_s=4.0)
        assert leader() == ("backup", 2), "the backup did not take over from the frozen primary"
        assert readers["pub1"].next("publisher")["state"]["leading"] is False, "the thawed primary did not step down"

        def kill_backup() -> None:
            backup.kill(roles["pub2"])

        def restart_backup() -> None:
            roles["pub2"] = start_publisher(backup, config, logs, backup=True)

        results["kill_leader"] = measure_dispatch_fault(
            ctx, kill_backup, restart_backup, capture_host=capture, main=readers["cap"],
            overlays={CAMERA: overlays}, faulted_worker="", fault_s=FAULT_S + 2.0, settle_s=4.0)
        assert leader() == ("primary", 3), "the primary did not take the lead back from the killed backup"
        final = drain(ctx, capture, roles)
        time.sleep(1.5)
        results["final"] = {**final, **publisher_gaps(readers["pub1"])}
        (tmp_path / "dispatch-publisher-faults.json").write_text(json.dumps(results, indent=1))
        print(json.dumps(results, indent=1))
    finally:
        close_all(ctx, overlays, readers)
    assert_every_fault(results)
    final = results["final"]
    leader_store, other_store = stored_alerts(primary), stored_alerts(backup)
    assert_alerts_once([leader_store, other_store], leader_store, final["published"])
    published_order = [a["published_ts"] for a in leader_store]
    assert published_order == sorted(published_order), "alert ids are not in publishing order across the failovers"
