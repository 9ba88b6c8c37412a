"""The operator console in a real headless Chromium against a real daemon (tiny model, synthetic
camera): login, a live wall that moves, alerts arriving without reload, keyboard triage that
`iseg review list` sees, viewers refused, no access without login, no browser errors.

One daemon and one browser serve the whole module (CI time); screenshots of every page go to
the module's tmp folder (printed at the end)."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any, Iterator

import pytest
import yaml

from conftest import Daemon, fast_config, free_port, iseg

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

OPERATOR = ("olivia", "operator-pass-1")
VIEWER = ("victor", "viewer-pass-1")
API_ROUTES = [("GET", "/api/me"), ("GET", "/api/cameras"), ("GET", "/api/cameras/belt1/latest.jpg"),
              ("GET", "/api/cameras/belt1/live.mjpeg"), ("GET", "/api/cameras/belt1/mask.png"),
              ("GET", "/api/alerts"), ("POST", "/api/alerts/1/ack"), ("GET", "/api/events"),
              ("GET", "/api/recordings"), ("GET", "/api/recordings/1"), ("GET", "/api/recordings/1/original"),
              ("GET", "/api/recordings/1/before-1"), ("POST", "/api/recordings/1/verdict"), ("GET", "/api/health"),
              ("GET", "/api/audit"), ("GET", "/api/stats"), ("GET", "/api/thresholds"),
              ("GET", "/api/thresholds/belt1/scratch/whatif"), ("PUT", "/api/thresholds/belt1/scratch")]
LOGIN_URL = re.compile(r"/login\?next=")
PAGES = ["/live", "/cameras/belt1", "/alerts", "/review", "/review/1", "/health", "/trends", "/thresholds"]


class Console:
    """The daemon under test and how to reach its console."""

    def __init__(self, daemon: Daemon, config: Path, url: str, shots: Path) -> None:
        self.daemon, self.config, self.url, self.shots = daemon, config, url, shots

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """One plain HTTP request (no cookies); (status, headers, body)."""
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read(2000)
        except urllib.error.HTTPError as err:
            return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()
        except (urllib.error.URLError, ConnectionError):
            return 0, {}, b""


@pytest.fixture(scope="module")
def console(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    root = tmp_path_factory.mktemp("console")
    port = free_port()
    settings = fast_config(str(root / "state"), tiny_model, {
        "alerts": {"cooldown_s": 2.0}, "supervisor": {"heartbeat_timeout_s": 10},
        "console": {"enabled": True, "listen": f"127.0.0.1:{port}", "login_attempts_per_minute": 3}})
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(settings))
    for (name, password), role in ((OPERATOR, "operator"), (VIEWER, "viewer")):
        done = iseg("users", "add", name, "--role", role, "--password-stdin", "--config", str(config), input=password + "\n")
        assert done.returncode == 0, done.stderr
    daemon = Daemon(config)
    try:
        daemon.wait_ready(180)
        daemon.wait_for(lambda s: s["roles"]["console"]["up"] and s["roles"]["console"]["state"].get("ready"), 30, "console up")
        shots = root / "screenshots"
        shots.mkdir()
        yield Console(daemon, config, f"http://127.0.0.1:{port}", shots)
        print(f"\nconsole screenshots: {shots}")
    finally:
        daemon.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        yield chromium
        chromium.close()


def wait_js(page: Any, expression: str, timeout: float = 30) -> None:
    """Poll a JS expression until true (page.wait_for_function would need 'unsafe-eval', which the CSP forbids)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(f"() => Boolean({expression})"):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        page.wait_for_timeout(200)


class Tab:
    """A browser context + page that records every console error and page error."""

    def __init__(self, browser: Any, console: Console) -> None:
        self.context = browser.new_context(viewport={"width": 1400, "height": 900}, base_url=console.url)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda msg: self.errors.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
        self.page.on("pageerror", lambda err: self.errors.append(f"page error: {err}"))

    def login(self, user: str, password: str, start: str = "/live") -> None:
        self.page.goto(start)
        self.page.wait_for_url(LOGIN_URL)
        self.page.fill("#user", user)
        self.page.fill("#password", password)
        self.page.click("button[type=submit]")
        self.page.wait_for_url(lambda url: urlsplit(url).path == start)

    def fetch(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """A same-origin fetch from the page (cookies and Origin as a browser sends them)."""
        return self.page.evaluate("""async ([method, path, body]) => {
            const init = {method, headers: {"Content-Type": "application/json"}};
            if (body !== null) init.body = JSON.stringify(body);
            const r = await fetch(path, init);
            return {status: r.status, body: await r.json().catch(() => null)};
        }""", [method, path, body])

    def close(self) -> None:
        self.context.close()


def test_no_login_gets_401_on_every_api_route_and_the_login_page_on_every_page(console, browser):
    for method, path in API_ROUTES:
        status, _, body = console.request(method, path, b"{}" if method == "POST" else None,
                                          {"Content-Type": "application/json"} if method == "POST" else {})
        assert status == 401, (method, path, status)
        assert "error" in json.loads(body)
    tab = Tab(browser, console)
    try:
        for path in PAGES:
            tab.page.goto(path)
            tab.page.wait_for_url(LOGIN_URL)
            assert tab.page.locator("form#login").is_visible(), path
        assert not tab.errors, tab.errors
    finally:
        tab.close()


def test_live_wall_moves_and_every_page_renders_without_errors(console, browser):
    tab = Tab(browser, console)
    page = tab.page
    try:
        tab.login(*OPERATOR)
        badge = page.locator(".cam[data-camera=belt1] .badge")
        badge.wait_for()
        wait_js(page, "document.querySelector('.cam[data-camera=belt1] .badge').dataset.status === 'live'", 30)
        wait_js(page, "document.querySelector('img.live').naturalWidth > 0", 30)
        snapshot = """() => { const img = document.querySelector('img.live'); const c = document.createElement('canvas');
            c.width = img.naturalWidth; c.height = img.naturalHeight; c.getContext('2d').drawImage(img, 0, 0);
            return c.toDataURL('image/png'); }"""
        first = page.evaluate(snapshot)
        seen = {first}
        deadline = time.monotonic() + 30
        while len(seen) < 2 and time.monotonic() < deadline:
            page.wait_for_timeout(300)
            seen.add(page.evaluate(snapshot))
        assert len(seen) >= 2, "the live image never changed"
        assert page.locator(".cam[data-camera=belt1] .bar-row").count() == 2
        page.screenshot(path=str(console.shots / "live.png"))

        page.click(".cam[data-camera=belt1] a.cam-name")
        page.wait_for_url("**/cameras/belt1")
        page.wait_for_selector(".alert-list li", timeout=30000)
        wait_js(page, "document.querySelector('canvas.mask-layer').width > 0", 30)
        page.uncheck("input[data-cls=scratch]")
        page.fill("#opacity", "80")
        page.screenshot(path=str(console.shots / "camera.png"))

        page.goto("/health")
        page.wait_for_selector("#roles tbody tr")
        roles = page.locator("#roles tbody td:first-child").all_inner_texts()
        assert {"publisher", "recorder", "console", "dispatch", "worker.0", "capture.belt1"} <= set(roles), roles
        headers = page.locator("#flow thead th").all_inner_texts()
        assert {"Re-sent", "Lost", "In flight"} <= set(headers), headers
        lost = page.locator("#flow tbody tr td.lost").first
        assert lost.inner_text() == "0" and lost.get_attribute("title") == "none lost"
        page.screenshot(path=str(console.shots / "health.png"))
        assert not tab.errors, tab.errors
    finally:
        tab.close()


def test_alert_appears_without_reload_and_is_acknowledged(console, browser):
    tab = Tab(browser, console)
    page = tab.page
    try:
        tab.login(*OPERATOR, start="/alerts")
        page.wait_for_selector("#alerts-table tbody tr", timeout=60000)
        newest = int(page.locator("#alerts-table tbody tr").first.get_attribute("data-id"))
        page.evaluate("window.__noReload = true")
        wait_js(page, f"[...document.querySelectorAll('#alerts-table tbody tr')].some(r => Number(r.dataset.id) > {newest})", 60)
        assert page.evaluate("window.__noReload") is True, "the page reloaded"
        fresh = page.locator("#alerts-table tbody tr.fresh").first
        alert_id = int(fresh.get_attribute("data-id"))
        fresh.locator("button.ack").click()
        wait_js(page, f"document.querySelector('#alerts-table tr[data-id=\"{alert_id}\"]').classList.contains('acked')")
        assert OPERATOR[0] in page.locator(f"#alerts-table tr[data-id='{alert_id}'] .ack-cell").inner_text()
        page.screenshot(path=str(console.shots / "alerts.png"))
        audit = tab.fetch("GET", "/api/audit")["body"]["audit"]
        assert audit[0]["target"] == f"alert:{alert_id}" and audit[0]["user"] == OPERATOR[0]
        assert (audit[0]["old"], audit[0]["new"]) == ("unacknowledged", f"acked by {OPERATOR[0]}")
        assert not tab.errors, tab.errors
    finally:
        tab.close()


def review_list(console: Console, *args: str) -> list[list[str]]:
    done = iseg("review", "list", "--config", str(console.config), "--limit", "1000", *args)
    assert done.returncode == 0, done.stderr
    return [line.split() for line in done.stdout.splitlines()]


def test_keyboard_triage_shows_in_review_list_and_back(console, browser):
    console.daemon.wait_for(lambda s: s["cameras"]["belt1"].get("recorded", 0) >= 4, 90, "four recordings")
    tab = Tab(browser, console)
    page = tab.page
    try:
        tab.login(*OPERATOR, start="/review")
        page.wait_for_selector("#review-status")
        first = int(page.url.rstrip("/").split("/")[-1])
        page.keyboard.press("n")
        page.keyboard.type("deep scratch near the edge")
        page.keyboard.press("Escape")
        page.keyboard.press("c")
        wait_js(page, f"!location.pathname.endsWith('/{first}')")
        second = int(page.url.split("/")[-1])
        assert second != first
        page.keyboard.press("f")
        wait_js(page, f"!location.pathname.endsWith('/{second}')")
        page.keyboard.press("j")
        page.keyboard.press("k")
        page.keyboard.press("u")
        page.wait_for_timeout(500)
        rows = {int(r[0]): r for r in review_list(console)}
        assert "confirmed" in rows[first] and "false-alarm" in rows[second]
        assert len([r for r in rows.values() if "unsure" in r]) == 1
        audit = tab.fetch("GET", "/api/audit?limit=10")["body"]["audit"]
        noted = next(a for a in audit if a["target"] == f"recording:{first}")
        assert (noted["old"], noted["new"], noted["note"], noted["user"]) == ("unreviewed", "confirmed", "deep scratch near the edge", OPERATOR[0])

        # The other way round: a verdict from the CLI shows in the console.
        assert iseg("review", "mark", str(second), "confirmed", "--config", str(console.config)).returncode == 0
        assert tab.fetch("GET", f"/api/recordings/{second}")["body"]["status"] == "confirmed"

        # Why flagged, the view toggle and the frames around the flagged one.
        # (a recording with three newer ones: every frame flags here, so its after-frames are in)
        console.daemon.wait_for(lambda s: s["cameras"]["belt1"].get("recorded", 0) >= 8, 90, "eight recordings")
        middle = tab.fetch("GET", "/api/recordings?limit=4")["body"]["recordings"][-1]["id"]
        page.goto(f"/review/{middle}?status=")
        page.wait_for_selector("#why table")
        record = tab.fetch("GET", f"/api/recordings/{middle}")["body"]
        why = record["why"]
        assert why["window"]["k"] == 2 and why["window"]["n"] == 3 and why["window"]["frames"]
        assert why["model"] and why["config_version"] and why["classes"][0]["threshold"] == 0.0
        assert record["context"]["before"] == [1, 2] and record["context"]["after"] == [1, 2], record["context"]
        page.keyboard.press("3")
        wait_js(page, "document.querySelector('#review-image').src.endsWith('/mask')")
        wait_js(page, "document.querySelector('#review-image').naturalWidth > 0")
        page.keyboard.press("2")
        wait_js(page, "[...document.querySelectorAll('#context img')].every(i => i.complete && i.naturalWidth > 0)")
        page.screenshot(path=str(console.shots / "review.png"))
        assert not tab.errors, tab.errors
    finally:
        tab.close()


def test_viewer_cannot_ack_or_judge_and_cross_site_posts_are_refused(console, browser):
    tab = Tab(browser, console)
    try:
        tab.login(*VIEWER)
        assert tab.fetch("POST", "/api/recordings/1/verdict", {"verdict": "confirmed"})["status"] == 403
        assert tab.fetch("POST", "/api/alerts/1/ack", {})["status"] == 403
        assert tab.fetch("GET", "/api/recordings/1")["status"] == 200
        # A cookie without a same-origin Origin header (what a forged cross-site form would send) is refused.
        cookie = next(c for c in tab.context.cookies() if c["name"] == "iseg-session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and not cookie["secure"]
    finally:
        tab.close()
    tab = Tab(browser, console)
    try:
        tab.login(*OPERATOR)
        cookie = next(c for c in tab.context.cookies() if c["name"] == "iseg-session")
        status, _, body = console.request("POST", "/api/recordings/1/verdict", b'{"verdict": "unsure"}',
                                          {"Cookie": f"iseg-session={cookie['value']}", "Origin": "http://evil.example",
                                           "Content-Type": "application/json"})
        assert status == 403 and b"cross-site" in body
    finally:
        tab.close()


def test_trends_thresholds_and_health_badges(console, browser):
    deadline = time.monotonic() + 60
    applied = False
    tab = Tab(browser, console)
    page = tab.page
    try:
        tab.login(*OPERATOR)
        wait_js(page, "document.querySelector('.cam[data-camera=belt1] .health')?.dataset.health === 'ok'", 30)
        while not tab.fetch("GET", "/api/stats?since=1h")["body"]["rows"]:
            assert time.monotonic() < deadline, "no statistics written"
            page.wait_for_timeout(500)

        page.goto("/trends")
        page.wait_for_selector(".trend[data-series='belt1 / scratch'] svg.pchart circle")
        frames = int(page.locator(".trend[data-series='belt1 / scratch'] tbody tr td:nth-child(2)").first.inner_text())
        fail = int(page.locator(".trend[data-series='belt1 / scratch'] tbody tr td.fail").first.inner_text())
        assert frames > 0 and fail > 0  # scratch threshold 0.0: every frame fails
        page.select_option("#trend-by", "shift")
        wait_js(page, "document.querySelector('.trend tbody td').textContent.endsWith('all day')")
        page.screenshot(path=str(console.shots / "trends.png"))

        page.goto("/thresholds")
        page.wait_for_selector("#thresholds tr[data-cls=scratch]")
        assert page.locator("#thresholds tr[data-cls=scratch] .source").inner_text() == "config"
        page.click("#thresholds tr[data-cls=scratch] a.pick")
        page.wait_for_selector("svg.whatif-plot polyline.whatif-curve")
        assert "frames would flag" in page.locator("#whatif-facts").inner_text()
        page.fill("#new-value", "0.99")
        page.fill("#new-reason", "browser test")
        page.click("#apply")
        applied = True
        wait_js(page, "document.querySelector('#thresholds tr[data-cls=scratch] .source').textContent === 'override'")
        shown = {t["class"]: t for t in tab.fetch("GET", "/api/thresholds")["body"]["thresholds"]}
        assert shown["scratch"]["value"] == 0.99 and shown["scratch"]["override"]["user"] == OPERATOR[0]
        assert shown["scratch"]["override"]["reason"] == "browser test"
        page.screenshot(path=str(console.shots / "thresholds.png"))

        assert not tab.errors, tab.errors
        # Bad input: 400s that name the problem (the browser logs each 400 as a console error, expected here).
        bad = [("/api/thresholds/belt1/scratch", {"value": "nan"}, "outside [0, 1]"),
               ("/api/thresholds/belt1/scratch", {"value": 1.5}, "outside [0, 1]"),
               ("/api/thresholds/belt9/scratch", {"value": 0.5}, "known: belt1"),
               ("/api/thresholds/belt1/rust", {"value": 0.5}, "known: scratch, dent"),
               ("/api/thresholds/belt1/scratch", {"value": 0.5, "by": "me"}, "unknown field")]
        for path, body, text in bad:
            answer = tab.fetch("PUT", path, body)
            assert answer["status"] == 400 and text in answer["body"]["error"], (path, answer)
        answer = tab.fetch("GET", "/api/thresholds/belt1/scratch/whatif?range=0.9:0.1:0.1")
        assert answer["status"] == 400 and "--range" in answer["body"]["error"]
        health = tab.fetch("GET", "/api/health")["body"]["cameras"]["belt1"]
        assert health["state"] == "ok" and health["camera"] == "belt1"
    finally:
        tab.close()
        if applied:  # the module's other tests need scratch at 0.0 (every frame flags)
            done = iseg("thresholds", "revert", "--camera", "belt1", "--cls", "scratch", "--config", str(console.config))
            assert done.returncode == 0, done.stderr
    tab = Tab(browser, console)
    try:
        tab.login(*VIEWER, start="/thresholds")
        page = tab.page
        page.click("#thresholds tr[data-cls=scratch] a.pick")
        page.wait_for_selector("svg.whatif-plot")
        assert page.locator("#apply").is_hidden()
        assert not tab.errors, tab.errors
        assert tab.fetch("PUT", "/api/thresholds/belt1/scratch", {"value": 0.5})["status"] == 403
    finally:
        tab.close()


def test_bad_input_token_login_limit_and_metrics(console):
    done = iseg("users", "token", OPERATOR[0], "--config", str(console.config))
    assert done.returncode == 0, done.stderr
    auth = {"Authorization": f"Bearer {done.stdout.strip()}", "Content-Type": "application/json"}
    assert console.request("GET", "/api/cameras", headers=auth)[0] == 200
    for path in ("/api/recordings/999999", "/api/recordings/999999/original", "/api/alerts/999999/ack",
                 "/api/cameras/nope/latest.jpg", "/api/recordings/1/..%2F..%2Fconfig.yaml",
                 "/api/recordings/..%2F..%2Fetc%2Fpasswd", "/api/recordings/1/before-0", "/static/..%2F..%2Fapp.py"):
        method = "POST" if path.endswith("/ack") else "GET"
        status, headers, body = console.request(method, path, b"{}" if method == "POST" else None, auth)
        assert status == 404 and headers["content-type"].startswith("application/json"), (path, status, body)
    assert console.request("GET", "/api/alerts?camera=" + "x" * 5000, headers=auth)[0] == 414
    assert console.request("POST", "/api/recordings/1/verdict", b"x" * 100_000, auth)[0] == 413
    status, _, body = console.request("POST", "/api/recordings/1/verdict", b'{"verdict": 3}', auth)
    assert status == 400 and b"verdict" in body
    status, _, body = console.request("POST", "/api/login", b'{"user": "x"}', {"Content-Type": "application/json"})
    assert status == 400 and b"password" in body
    for _ in range(3):
        assert console.request("POST", "/api/login", json.dumps({"user": "mallory", "password": "guess-guess"}).encode(),
                               {"Content-Type": "application/json"})[0] == 401
    status, headers, _ = console.request("POST", "/api/login", json.dumps({"user": "mallory", "password": "guess-guess"}).encode(),
                                         {"Content-Type": "application/json"})
    assert status == 429 and int(headers["retry-after"]) > 0
    status, headers, _ = console.request("GET", "/login")
    assert "script-src 'self'" in headers["content-security-policy"] and "unsafe-inline" not in headers["content-security-policy"]
    deadline = time.monotonic() + 10
    while 'result="limited"' not in (metrics := console.daemon.get("/metrics")[1]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert 'iseg_console_logins_total{result="limited"}' in metrics
    assert "iseg_console_requests_total" in metrics and 'iseg_role_up{role="console"} 1' in metrics


def test_console_alone_with_a_corrupt_users_file_starts_and_refuses_logins(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    port = free_port()
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "console-users.json").write_text('{"users": {"x": {"role": "king"}}}')
    config = tmp_path / "split.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "engine": {"model_dir": str(tmp_path)},
                                      "cameras": [{"id": "belt1", "source": "synthetic"}],
                                      "metrics": {"listen": f"127.0.0.1:{free_port()}"},
                                      "console": {"enabled": True, "listen": f"127.0.0.1:{port}"}}))
    log = tmp_path / "console.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "console", "--config", str(config)], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        site = Console(None, config, f"http://127.0.0.1:{port}", tmp_path)  # type: ignore[arg-type]
        deadline = time.monotonic() + 30
        while (status := site.request("GET", "/login")[0]) != 200:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        for _ in range(2):
            status, _, body = site.request("POST", "/api/login", b'{"user": "x", "password": "whatever1"}',
                                           {"Content-Type": "application/json"})
            assert status == 401 and b"no users" in body
        assert site.request("GET", "/api/cameras")[0] == 401
        assert proc.poll() is None
    finally:
        proc.terminate()
        assert proc.wait(20) == 0, log.read_text()
    refused = [line for line in log.read_text().splitlines() if "logins refused" in line]
    assert len(refused) == 1 and "not a users file" in refused[0], log.read_text()
