"""Console without a browser or a pipeline: users file and password hashing, sessions, login
limits, the API's auth rules and bad-input answers over seeded stores, verdicts shared with
`iseg review mark`, and the recorder's context frames."""

from __future__ import annotations

import io
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from daemon.alerts import AlertStore
from daemon.cli import main as iseg_main
from daemon.config import parse_config
from daemon.console.api import Console
from daemon.console.app import build_app
from daemon.console.auth import LoginLimiter, same_origin
from daemon.console.users import UserDirectory, UsersError, UsersFile, hash_password, verify_password
from daemon.metrics import Registry
from daemon.recorder import Recorder, RecordingStore
from daemon.recording_context import ContextFrames
from daemon.render import encode_jpeg, encode_png
from daemon.messages import Boundary, Rejected
from daemon.wire import array_header

ORIGIN = {"origin": "http://testserver"}


def config_for(state: Path, **console):
    return parse_config({"state_dir": str(state), "engine": {"model_dir": "m"},
                         "cameras": [{"id": "cam", "source": "synthetic", "classes": ["scratch", "dent"]}],
                         "metrics": {"listen": "127.0.0.1:1"}, "console": {"enabled": True, **console}})


def seed(state: Path) -> None:
    """Two alerts (one scratch, one dent) and two recordings with context frames."""
    alerts = AlertStore(state / "alerts.sqlite3")
    for i, cls in enumerate(("scratch", "dent")):
        alerts.add({"camera": "cam", "seq": i, "capture_ts": 1000.0 + i, "class": cls,
                    "classes": {cls: {"presence": 0.9, "threshold": 0.5}}})
    alerts.close()
    store = RecordingStore(state)
    frame = np.zeros((8, 8), np.uint8)
    frame[2:4, 2:4] = 1
    for i in range(2):
        store.write({"camera": "cam", "seq": i, "capture_ts": 1000.0 + i, "flagged": ["scratch"], "classes": ["scratch", "dent"],
                     "presence": {"scratch": 0.9, "dent": 0.1}, "thresholds": {"scratch": 0.5, "dent": 0.5},
                     "regions": {"scratch": {"area_px": 4, "area_frac": 0.06, "boxes": [[2, 2, 2, 2]]}},
                     "window": {"k": 2, "n": 3, "frames": [{"seq": i, "flagged": ["scratch"]}]},
                     "model": "abc-float32", "config_version": "0123456789ab"},
                    {"original.png": encode_png(np.zeros((8, 8, 3), np.uint8)), "mask.png": encode_png(frame),
                     "overlay.jpg": encode_jpeg(np.zeros((8, 8, 3), np.uint8)), "before-1.jpg": b"\xff\xd8before"})
    store.close()


@pytest.fixture
def client(tmp_path):
    seed(tmp_path)
    users = UsersFile(tmp_path / "console-users.json")
    users.add("olga", "operator", "operator-pw")
    users.add("vic", "viewer", "viewer-pw1")
    console = Console(config_for(tmp_path), Registry(), logging.getLogger("test.console"))
    with TestClient(build_app(console)) as test_client:
        test_client.console = console
        yield test_client


def login(client, user="olga", password="operator-pw"):
    response = client.post("/api/login", json={"user": user, "password": password}, headers=ORIGIN)
    assert response.status_code == 200, response.text
    return response


def test_passwords_are_scrypt_hashed_and_the_users_file_is_private(tmp_path):
    stored = hash_password("correct horse")
    assert stored.startswith("scrypt$16384$8$1$") and "correct" not in stored
    assert verify_password("correct horse", stored) and not verify_password("wrong horse", stored)
    assert stored != hash_password("correct horse"), "a fresh salt each time"
    users = UsersFile(tmp_path / "u.json")
    users.add("ann", "admin", "long-enough")
    assert (tmp_path / "u.json").stat().st_mode & 0o777 == 0o600
    token = users.new_token("ann")
    assert token not in (tmp_path / "u.json").read_text(), "tokens are stored hashed"
    directory = UserDirectory(tmp_path / "u.json", logging.getLogger("t"))
    assert directory.check_token(token).name == "ann" and directory.check_token(token + "x") is None
    with pytest.raises(UsersError, match="at least 8"):
        users.add("bob", "viewer", "short")
    with pytest.raises(UsersError, match="user name"):
        users.add("../bob", "viewer", "long-enough")
    users.remove("ann")
    assert users.listing() == []


def test_missing_or_corrupt_users_file_refuses_logins_with_one_log_line(tmp_path, caplog):
    (tmp_path / "console-users.json").write_text("{not json")
    console = Console(config_for(tmp_path), Registry(), logging.getLogger("test.corrupt"))
    with caplog.at_level(logging.ERROR), TestClient(build_app(console)) as client:
        for _ in range(3):
            response = client.post("/api/login", json={"user": "x", "password": "whatever1"})
            assert response.status_code == 401 and "no users" in response.json()["error"]
        assert client.get("/login").status_code == 200
    refused = [r for r in caplog.records if "logins refused" in r.getMessage()]
    assert len(refused) == 1 and "unreadable users file" in refused[0].getMessage()


def test_login_limit_and_origin_check():
    limiter = LoginLimiter(2)
    limiter.failed("ip:a")
    assert limiter.retry_after("ip:a") == 0
    limiter.failed("ip:a")
    assert 55 < limiter.retry_after("ip:a", "user:z") <= 60
    assert same_origin({"origin": "http://h:1", "host": "h:1"}, "http")
    assert not same_origin({"origin": "http://evil:1", "host": "h:1"}, "http")
    assert not same_origin({"origin": "https://h:1", "host": "h:1"}, "http")
    assert same_origin({"referer": "http://h:1/review", "host": "h:1"}, "http")
    assert not same_origin({"host": "h:1"}, "http")


def test_every_api_route_needs_a_user_and_pages_redirect_to_login(client):
    for path in ("/api/me", "/api/cameras", "/api/alerts", "/api/recordings", "/api/recordings/1",
                 "/api/recordings/1/original", "/api/health", "/api/audit", "/api/events", "/api/cameras/cam/latest.jpg"):
        assert client.get(path).status_code == 401, path
    assert client.post("/api/recordings/1/verdict", json={"verdict": "confirmed"}, headers=ORIGIN).status_code == 401
    for path in ("/live", "/alerts", "/review", "/review/1", "/health", "/cameras/cam"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == f"/login?next={path}"
    csp = client.get("/login").headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe" not in csp


def test_session_cookie_flags_and_logout(client):
    cookie = login(client).headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie
    assert client.get("/api/me").json() == {"user": "olga", "role": "operator"}
    assert client.post("/api/logout", headers=ORIGIN).status_code == 200
    assert client.get("/api/me").status_code == 401


def test_alerts_filters_ack_and_audit(client):
    login(client)
    everything = client.get("/api/alerts").json()["alerts"]
    assert [a["id"] for a in everything] == [2, 1] and everything[1]["recording_id"] == 1
    assert [a["id"] for a in client.get("/api/alerts?cls=dent").json()["alerts"]] == [2]
    assert [a["id"] for a in client.get("/api/alerts?since=1").json()["alerts"]] == [2]
    assert [a["id"] for a in client.get("/api/alerts?from=1000.5").json()["alerts"]] == [2]
    assert client.get("/api/alerts?camera=other").json()["alerts"] == []
    done = client.post("/api/alerts/1/ack", json={"note": "pulled the part"}, headers=ORIGIN).json()
    assert done["user"] == "olga" and done["old"] is None
    assert [a["id"] for a in client.get("/api/alerts?state=acked").json()["alerts"]] == [1]
    assert [a["id"] for a in client.get("/api/alerts?state=unacked").json()["alerts"]] == [2]
    entry = client.get("/api/audit").json()["audit"][0]
    assert (entry["user"], entry["target"], entry["old"], entry["new"], entry["note"]) == \
        ("olga", "alert:1", "unacknowledged", "acked by olga", "pulled the part")
    assert client.post("/api/alerts/99/ack", json={}, headers=ORIGIN).status_code == 404


def test_verdict_is_the_review_mark_code_and_is_audited(client, tmp_path, capsys):
    login(client)
    response = client.post("/api/recordings/1/verdict", json={"verdict": "unsure", "note": "blurry"}, headers=ORIGIN)
    assert response.json() == {"id": 1, "old": "unreviewed", "new": "unsure", "user": "olga"}
    store = RecordingStore(tmp_path)
    assert store.get(1)["status"] == "unsure"
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"state_dir": str(tmp_path), "engine": {"model_dir": "m"},
                                  "cameras": [{"id": "cam", "source": "synthetic"}]}))
    assert iseg_main(["review", "mark", "1", "confirmed", "--config", str(config), "--user", "cli-user", "--note", "checked"]) == 0
    assert "was unsure" in capsys.readouterr().out
    assert client.get("/api/recordings/1").json()["status"] == "confirmed"
    trail = client.get("/api/recordings/1").json()["audit"]
    assert [(a["user"], a["old"], a["new"]) for a in trail] == [("cli-user", "unsure", "confirmed"), ("olga", "unreviewed", "unsure")]
    assert iseg_main(["review", "list", "--config", str(config), "--status", "confirmed"]) == 0
    assert " confirmed " in capsys.readouterr().out


def test_recording_detail_images_and_path_tricks(client):
    login(client)
    record = client.get("/api/recordings/1").json()
    why = record["why"]
    assert why["classes"][0] == {"class": "scratch", "presence": 0.9, "threshold": 0.5, "flagged": True, "area_px": 4,
                                 "area_frac": 0.06, "boxes": [[2, 2, 2, 2]]}
    assert why["window"]["k"] == 2 and why["model"] == "abc-float32" and why["config_version"] == "0123456789ab"
    assert record["context"] == {"before": [1], "after": []}
    assert client.get("/api/recordings/1/original").headers["content-type"] == "image/png"
    assert client.get("/api/recordings/1/before-1").content == b"\xff\xd8before"
    mask = client.get("/api/recordings/1/mask")
    assert mask.status_code == 200 and mask.content.startswith(b"\x89PNG")
    for path in ("/api/recordings/1/after-1", "/api/recordings/1/meta.json", "/api/recordings/1/before-0",
                 "/api/recordings/1/..%2F..%2Frecordings.sqlite3", "/api/recordings/..%2Frecordings.sqlite3",
                 "/api/recordings/%2e%2e/original", "/api/recordings/3", "/api/recordings/1/original%00",
                 "/static/..%2Fapi.py", "/nope"):
        response = client.get(path)
        assert response.status_code == 404 and "error" in response.json(), path


def test_bad_input_answers_name_the_field(client):
    login(client)
    bad = {"/api/alerts?limit=lots": "limit", "/api/alerts?limit=0": "limit", "/api/alerts?since=-1": "since",
           "/api/alerts?state=maybe": "state", "/api/alerts?from=yesterday": "from",
           "/api/recordings?status=great": "status", "/api/recordings?order=up": "order"}
    for path, field in bad.items():
        response = client.get(path)
        assert response.status_code == 400 and response.json()["error"].startswith(field), (path, response.text)
    post = lambda body, **kw: client.post("/api/recordings/1/verdict", content=body,
                                          headers={**ORIGIN, "content-type": "application/json"}, **kw)
    assert post(b"{oops").json()["error"].startswith("body: not valid JSON")
    assert post(b"[1]").json()["error"] == "body: expected a JSON object"
    assert post(b'{"verdict": "maybe"}').json()["error"].startswith("verdict: 'maybe' must be one of")
    assert post(b'{"verdict": "confirmed", "note": 5}').json()["error"].startswith("note:")
    assert post(b'{"verdict": "confirmed", "note": "' + b"x" * 600 + b'"}').json()["error"].startswith("note:")
    assert post(b"x" * 20_000).status_code == 413
    assert client.get("/api/alerts?camera=" + "c" * 5000).status_code == 414
    assert client.post("/api/login", json={"user": "olga"}, headers=ORIGIN).json()["error"].startswith("password")


def test_viewer_reads_but_cannot_change_and_anonymous_needs_the_config(client, tmp_path):
    login(client, "vic", "viewer-pw1")
    assert client.get("/api/recordings").status_code == 200
    assert client.post("/api/recordings/1/verdict", json={"verdict": "confirmed"}, headers=ORIGIN).status_code == 403
    assert client.post("/api/alerts/1/ack", json={}, headers=ORIGIN).status_code == 403
    console = Console(config_for(tmp_path, anonymous_role="viewer"), Registry(), logging.getLogger("t"))
    with TestClient(build_app(console)) as anonymous:
        assert anonymous.get("/api/me").json() == {"user": "anonymous", "role": "viewer"}
        assert anonymous.post("/api/alerts/1/ack", json={}, headers=ORIGIN).status_code == 403


def test_bearer_token_skips_csrf_but_a_foreign_origin_with_a_cookie_does_not(client, tmp_path):
    token = UsersFile(tmp_path / "console-users.json").new_token("olga")
    auth = {"authorization": f"Bearer {token}"}
    assert client.post("/api/recordings/2/verdict", json={"verdict": "confirmed"}, headers=auth).status_code == 200
    login(client)
    response = client.post("/api/recordings/2/verdict", json={"verdict": "unsure"}, headers={"origin": "http://evil.example"})
    assert response.status_code == 403 and "cross-site" in response.json()["error"]
    assert client.post("/api/login", json={"user": "olga", "password": "operator-pw"},
                       headers={"origin": "http://evil.example"}).status_code == 403


def test_login_is_rate_limited(client):
    for _ in range(5):
        assert client.post("/api/login", json={"user": "olga", "password": "wrong-wrong"}).status_code == 401
    response = client.post("/api/login", json={"user": "olga", "password": "operator-pw"})
    assert response.status_code == 429 and int(response.headers["retry-after"]) > 0


def test_users_cli_add_list_token_remove(tmp_path, monkeypatch, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"state_dir": str(tmp_path), "engine": {"model_dir": "m"},
                                  "cameras": [{"id": "cam", "source": "synthetic"}]}))
    monkeypatch.setattr("sys.stdin", io.StringIO("from-stdin-pw\n"))
    assert iseg_main(["users", "add", "ines", "--role", "operator", "--password-stdin", "--config", str(config)]) == 0
    assert iseg_main(["users", "add", "rand", "--role", "viewer", "--random-password", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    password = out.split("password: ")[1].split()[0]
    directory = UserDirectory(tmp_path / "console-users.json", logging.getLogger("t"))
    assert directory.check_password("ines", "from-stdin-pw").role == "operator"
    assert directory.check_password("rand", password).role == "viewer"
    assert iseg_main(["users", "token", "ines", "--config", str(config)]) == 0
    assert capsys.readouterr().out.startswith("iseg_")
    assert iseg_main(["users", "list", "--config", str(config)]) == 0
    listing = capsys.readouterr().out
    assert "ines" in listing and "operator" in listing and "1 token(s)" in listing
    assert iseg_main(["users", "remove", "rand", "--config", str(config)]) == 0
    assert iseg_main(["users", "remove", "rand", "--config", str(config)]) == 1
    assert "no user 'rand'" in capsys.readouterr().err
    assert os.stat(tmp_path / "console-users.json").st_mode & 0o777 == 0o600


def overlay_header(seq: int, flagged: list[str]) -> dict:
    return {"camera": "cam", "seq": seq, "capture_ts": 1000.0 + seq, "flagged": flagged}


def test_context_frames_before_after_and_window(tmp_path):
    context = ContextFrames(before=2, after=2, window_n=3)
    for seq in range(4):
        context.overlay(overlay_header(seq, ["scratch"] if seq % 2 else []), f"jpeg{seq}".encode())
    assert context.before_files("cam", 3) == {"before-1.jpg": b"jpeg2", "before-2.jpg": b"jpeg1"}
    assert context.window("cam", 3, 2) == {"k": 2, "n": 3, "frames": [
        {"seq": 1, "flagged": ["scratch"]}, {"seq": 2, "flagged": []}, {"seq": 3, "flagged": ["scratch"]}]}
    folder = tmp_path / "rec"
    folder.mkdir()
    context.expect_after("cam", 3, folder)
    assert [context.overlay(overlay_header(seq, []), f"jpeg{seq}".encode()) for seq in (4, 5, 6)] == [1, 1, 0]
    assert (folder / "after-1.jpg").read_bytes() == b"jpeg4" and (folder / "after-2.jpg").read_bytes() == b"jpeg5"
    assert not (folder / "after-3.jpg").exists() and not context.pending["cam"]
    assert ContextFrames(0, 0, 3).before_files("cam", 3) == {}


def test_recorder_writes_context_frames_into_the_recording(tmp_path):
    config = parse_config({"state_dir": str(tmp_path), "engine": {"model_dir": "m"}, "recorder": {"min_free_mb": 0},
                           "cameras": [{"id": "cam", "source": "synthetic", "classes": ["scratch", "dent"]}]})
    store = RecordingStore(tmp_path)
    recorder = Recorder(config, store, Registry(), logging.getLogger("t"))
    boundary = Boundary.from_config(config)
    frame = np.zeros((16, 16, 3), np.uint8)
    jpeg = encode_jpeg(frame)
    now = time.time()
    for seq in range(5):
        header = {"camera": "cam", "seq": seq, "capture_ts": now + seq, "flagged": ["scratch"],
                  "presence": {"scratch": 0.9, "dent": 0.1}, "thresholds": {"scratch": 0.5, "dent": 0.5}}
        recorder.overlay(boundary.picture([b"overlay.cam", json.dumps(header).encode(), jpeg]))
        if seq == 2:
            meta = {**header, "frame": array_header(frame), "publisher_session": "p", "flag_seq": 1, "alert_ids": []}
            recorder.handle(boundary.flagged([b"flagged.cam", json.dumps(meta).encode(), frame.tobytes(),
                                              encode_png(frame[..., 0]), jpeg]))
    record = store.get(1)
    names = sorted(p.name for p in Path(record["folder"]).iterdir())
    assert names == ["after-1.jpg", "after-2.jpg", "before-1.jpg", "before-2.jpg", "mask.png", "meta.json",
                     "original.png", "overlay.jpg"]
    assert record["meta"]["window"]["frames"][-1] == {"seq": 2, "flagged": ["scratch"]}
    assert record["meta"]["config_version"] == "", "built from a mapping: no file to hash"
    with pytest.raises(Rejected):
        boundary.picture([b"overlay.cam", json.dumps({"camera": "cam", "seq": 1, "capture_ts": now,
                                                      "flagged": ["rust"]}).encode(), jpeg])
