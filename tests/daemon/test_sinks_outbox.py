"""Cursor store and the read-only alert reader: at-least-once bookkeeping."""

from __future__ import annotations

import os

from daemon.alerts import AlertStore
from daemon.sinks.outbox import AlertReader, CursorStore
from daemon.sinks.runner import backoff_s


def add_alerts(state, count):
    store = AlertStore(state / "alerts.sqlite3")
    ids = [store.add({"camera": "c", "capture_ts": float(i), "class": "x"}) for i in range(count)]
    store.close()
    return ids


def test_reader_is_read_only_and_waits_for_the_store(tmp_path):
    reader = AlertReader(tmp_path)
    assert reader.after(0) == [] and reader.last_id() == 0, "no store yet: nothing, no error"
    ids = add_alerts(tmp_path, 5)
    assert [a["id"] for a in reader.after(2)] == ids[2:]
    assert reader.last_id() == 5
    before = os.stat(tmp_path / "alerts.sqlite3").st_mtime_ns
    try:
        reader.db.execute("DELETE FROM alerts")
        raise AssertionError("a write through the reader must fail")
    except Exception as err:  # sqlite3.OperationalError: attempt to write a readonly database
        assert "readonly" in str(err)
    assert os.stat(tmp_path / "alerts.sqlite3").st_mtime_ns == before
    reader.close()


def test_cursor_starts_at_given_id_and_survives_reopen(tmp_path):
    store = CursorStore(tmp_path)
    instance = store.instance_id()
    cursor = store.cursor("a", start_at=7)
    assert (cursor.alert_id, cursor.delivered) == (7, 0)
    assert store.advance("a", cursor, 8, delivered=True)
    assert store.advance("a", cursor, 9, dead_error="HTTP 400")
    store.close()
    again = CursorStore(tmp_path)
    assert again.instance_id() == instance, "the instance id (half the idempotency key) is stable"
    cursor = again.cursor("a", start_at=0)
    assert (cursor.alert_id, cursor.delivered) == (9, 1)
    assert [d["alert_id"] for d in again.dead_letters("a")] == [9]


def test_rewind_invalidates_a_running_cursor_and_resolves_dead_letters_on_success(tmp_path):
    store = CursorStore(tmp_path)
    running = store.cursor("a", start_at=0)
    store.advance("a", running, 5, dead_error="HTTP 404")
    other = CursorStore(tmp_path)  # `iseg sinks resend` in another process
    rewound = other.rewind("a", 5)
    assert rewound.alert_id == 4 and rewound.generation == running.generation + 1
    assert not store.advance("a", running, 6, delivered=True), "a stale runner must not overwrite the rewind"
    assert store.generation("a") == rewound.generation
    fresh = store.cursor("a")
    assert store.advance("a", fresh, 5, delivered=True)
    assert store.dead_letter_count("a") == 0
    assert store.dead_letters("a", include_resolved=True)[0]["resolved_ts"] is not None


def test_backoff_doubles_caps_and_jitters():
    import random

    rng = random.Random(1)
    delays = [backoff_s(n, 0.5, 4.0, rng) for n in range(1, 8)]
    for n, delay in zip(range(1, 8), delays):
        cap = min(4.0, 0.5 * 2 ** (n - 1))
        assert cap / 2 <= delay <= cap
    assert len({round(backoff_s(3, 0.5, 4.0, rng), 6) for _ in range(20)}) > 10, "jitter spreads retries"
