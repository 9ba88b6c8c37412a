"""Debouncing (k of n, cooldown per class) and the alert store that outlives subscribers."""

from __future__ import annotations

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
