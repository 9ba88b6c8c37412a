"""Control for the plant fault tests: what today's frame distribution (capture binds a PUSH, remote
workers PULL over Curve TCP) does when a worker host freezes or silently drops off the network.

Hosts `main` (capture + publisher), `gpu1` and `gpu2` (one remote worker each) are network
namespaces (tests/e2e/netns.py); the accounting is plant_roles.measure_fault, which the
dispatcher's tests reuse for the same faults. Measured here, PUSH keeps handing the stuck worker
its round-robin share until the socket buffers fill (about its whole share for 3 s at 6 fps):
- freeze 3 s then thaw, blackhole 3 s then restore: no frame is lost, but the stuck share waits
  for the fault to end, so the camera never fails over (failover >= the fault's duration) and the
  publisher's gap counter is the only sign;
- the same faults ended the way a hang or a dead host usually ends, by replacing the worker (a
  supervisor or systemd restarting a hung process; a host that drops off and reboots): the stuck
  share is lost after admission, and no counter or log names a single frame of it;
- kill: what the dead worker's kernel buffers held is lost (0-2 frames), unrecorded.
"""

from __future__ import annotations

import json
import time

import pytest
import zmq

from plant_roles import (Heartbeats, Overlays, measure_fault, start_capture, start_publisher, start_remote_worker,
                         worker_faults, write_keys, write_plant_config)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

FPS = 6.0
FAULT_S = 3.0


def test_push_pull_fails_on_freeze_and_silent_loss(plant, tiny_model, tmp_path):
    main, gpu1, gpu2 = plant.host("main"), plant.host("gpu1"), plant.host("gpu2")
    config = write_plant_config(tmp_path / "plant.yaml", tiny_model, write_keys(tmp_path / "keys"), main, fps=FPS)
    logs = tmp_path / "logs"
    ctx = zmq.Context()
    readers = [Heartbeats(ctx, host) for host in (main, gpu1, gpu2)]
    overlays = Overlays(ctx, main)
    results = {}
    try:
        roles = {"publisher": start_publisher(main, config, logs), "capture": start_capture(main, config, logs),
                 "gpu1": start_remote_worker(gpu1, config, "gpu1.0", logs),
                 "gpu2": start_remote_worker(gpu2, config, "gpu2.0", logs)}

        def alive() -> str:
            dead = {name: proc.returncode for name, proc in roles.items() if proc.poll() is not None}
            return f"roles exited: {dead}; logs in {logs}" if dead else ""

        faults = worker_faults(gpu1, roles, "gpu1", lambda: start_remote_worker(gpu1, config, "gpu1.0", logs))
        overlays.wait_for_workers(["gpu1.0", "gpu2.0"], 3, timeout=120, alive=alive)
        for name, (inject, recover) in faults.items():
            results[name] = measure_fault(inject, recover, main=readers[0], telemetry=readers, overlays=overlays,
                                          faulted_worker="gpu1.0", fault_s=FAULT_S)
            overlays.wait_for_workers(["gpu1.0", "gpu2.0"], 2, timeout=60, alive=alive, since=time.time())
        (tmp_path / "control.json").write_text(json.dumps(results, indent=1))
        print(json.dumps(results, indent=1))
    finally:
        overlays.close()
        for reader in readers:
            reader.close()
        ctx.term()
    for name, result in results.items():
        assert result["admitted"] > 0, result
        assert result["recorded"] == 0, f"{name}: today nothing records a frame lost after admission: {result}"
        assert result["gaps"] - result["late"] >= result["lost"], f"{name}: only the gap counter sees losses: {result}"
    for name in ("freeze", "blackhole"):
        result = results[name]
        assert result["late"] > 0 and result["max_latency_s"] >= FAULT_S - 1.0, \
            f"{name}: the stuck worker's share must wait for the fault to end: {result}"
        assert result["failover_s"] is None or result["failover_s"] >= FAULT_S, \
            f"{name}: PUSH/PULL does not fail over, the camera is whole only after the fault: {result}"
    for name in ("freeze_then_replace", "blackhole_then_reboot"):
        assert results[name]["lost"] > 0, f"{name}: the stuck worker's share vanishes after admission: {results[name]}"
