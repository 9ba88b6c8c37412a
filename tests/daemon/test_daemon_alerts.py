"""Debouncing (k of n, cooldown per class) and the alert store that outlives subscribers."""

from __future__ import annotations

import json

from daemon.alerts import AlertStore, Debouncer


def test_k_of_n_and_cooldown_per_class():
    debouncer = Debouncer(k=2, n=3, cooldown_s=10)
    feed = [(0, ["scratch"]), (1, []), (2, ["scratch", "dent"]), (3, ["scratch", "dent"]), (4, ["scratch", "dent"])]
    fired = [debouncer.update("cam", ["scratch", "dent"], flagged, ts) for ts, flagged in feed]
    assert fired == [[], [], ["scratch"], ["dent"], []]
    assert debouncer.update("cam", ["scratch", "dent"], ["scratch"], 12.5) == ["scratch"], "cooldown over"
    assert debouncer.update("other", ["scratch"], ["scratch"], 12.6) == [], "cameras are independent"


def test_single_flags_never_alert_when_k_is_two():
    debouncer = Debouncer(k=2, n=3, cooldown_s=0)
    assert not any(debouncer.update("cam", ["x"], ["x"] if i % 3 == 0 else [], i) for i in range(30))


def test_store_persists_and_replays_since(tmp_path):
    store = AlertStore(tmp_path / "alerts.sqlite3")
    ids = [store.add({"camera": "a" if i % 2 else "b", "capture_ts": float(i), "class": "scratch"}) for i in range(5)]
    assert ids == [1, 2, 3, 4, 5]
    store.close()
    reopened = AlertStore(tmp_path / "alerts.sqlite3")
    assert [a["id"] for a in reopened.since(2)] == [3, 4, 5]
    assert [a["id"] for a in reopened.since(0, camera="a")] == [2, 4]
    assert [a["id"] for a in reopened.since(0, limit=2)] == [1, 2]
    assert reopened.last_id() == 5 and reopened.since(5) == []


def test_failing_store_holds_alerts_in_order_and_writes_them_later(tmp_path, monkeypatch):
    import sqlite3

    from daemon import alerts

    store = AlertStore(tmp_path / "alerts.sqlite3")
    assert store.add({"camera": "a", "capture_ts": 1.0}) == 1
    real_insert = store._insert

    def full(alert):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store, "_insert", full)
    monkeypatch.setattr(alerts, "RETRY_S", 0.0)
    ids = [store.add({"camera": "a", "capture_ts": float(i)}) for i in range(2, 6)]
    assert ids == [2, 3, 4, 5] and len(store.pending) == 4 and "disk is full" in store.error
    assert [a["id"] for a in store.since(0)] == [1, 2, 3, 4, 5], "replay includes held alerts"
    assert not store.flush()
    monkeypatch.setattr(store, "_insert", real_insert)
    assert store.add({"camera": "a", "capture_ts": 6.0}) == 6
    assert not store.pending and not store.error
    rows = store.db.execute("SELECT id, ts FROM alerts ORDER BY rowid").fetchall()
    assert rows == [(i, float(i)) for i in range(1, 7)], "written in order, under the ids they were published with"
    store.close()


def test_memory_hold_is_bounded(tmp_path, monkeypatch):
    import sqlite3

    store = AlertStore(tmp_path / "alerts.sqlite3", max_pending=3)
    monkeypatch.setattr(store, "_insert", lambda alert: (_ for _ in ()).throw(sqlite3.OperationalError("full")))
    ids = [store.add({"camera": "a", "capture_ts": float(i)}) for i in range(5)]
    assert ids == [1, 2, 3, 4, 5] and [a["id"] for a in store.pending] == [1, 2, 3] and store.unstored == 2


def test_debounce_and_sequences_survive_a_restart():
    from daemon.publisher import SequenceTracker

    before = Debouncer(k=2, n=3, cooldown_s=120)
    assert before.update("cam", ["scratch"], ["scratch"], 100.0) == []
    assert before.update("cam", ["scratch"], ["scratch"], 101.0) == ["scratch"]
    after = Debouncer(k=2, n=3, cooldown_s=120)
    assert after.restore(json.loads(json.dumps(before.export())), {"cam": ("scratch",)}) == 1
    assert after.update("cam", ["scratch"], ["scratch"], 111.0) == [], "still inside the cooldown"
    assert after.update("cam", ["scratch"], ["scratch"], 222.0) == ["scratch"]
    assert Debouncer(2, 3, 1).restore({"../x": {"scratch": {"window": [True]}}, "cam": "junk"}, {"cam": ("scratch",)}) == 0

    tracker = SequenceTracker()
    assert [tracker.gaps("cam", "s1", seq) for seq in (0, 1, 2)] == [0, 0, 0]
    restarted = SequenceTracker()
    restarted.restore(json.loads(json.dumps(tracker.export())), {"cam"})
    assert restarted.gaps("cam", "s1", 6) == 3, "frames 3, 4, 5 are the only gaps"


def test_corrupt_alert_database_is_moved_aside(tmp_path, caplog):
    import logging

    path = tmp_path / "alerts.sqlite3"
    path.write_bytes(b"this is not a database" * 300)
    with caplog.at_level(logging.ERROR):
        store = AlertStore(path, logging.getLogger("test.corrupt"))
    assert store.add({"camera": "a", "capture_ts": 1.0}) == 1
    moved = list(tmp_path.glob("alerts.sqlite3.corrupt-*"))
    assert len(moved) == 1 and moved[0].read_bytes().startswith(b"this is not")
    assert len([r for r in caplog.records if "corrupt" in r.getMessage()]) == 1


def test_publisher_state_file_overwrites_in_place_and_ignores_garbage(tmp_path, caplog):
    import logging

    from daemon.publisher_state import PublisherState

    state = PublisherState(tmp_path / "publisher-state.json", logging.getLogger("test.state"))
    assert state.load() == {}
    assert state.save({"next_alert_id": 7, "debounce": {"cam": {"scratch": {"window": [True] * 50}}}})
    assert state.save({"next_alert_id": 8})
    assert PublisherState(tmp_path / "publisher-state.json", logging.getLogger("x")).load()["next_alert_id"] == 8
    state.close()
    (tmp_path / "publisher-state.json").write_text('{"next_alert_id": 9, "version": 1}\n{"torn": ')
    assert state.load()["next_alert_id"] == 9, "stale bytes after the document are ignored"
    (tmp_path / "publisher-state.json").write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING, "test.state"):
        assert state.load() == {}
    assert "ignoring unreadable" in caplog.text
