"""Who is asking: session cookies, bearer tokens, login rate limits and the CSRF origin check.

Sessions live in the console's memory (a restart logs everyone out, which is the safe
direction). A session follows the users file: a removed user's session ends, a changed
role applies at once. Cookie-authenticated requests that change state must come from
this console's own origin; bearer-token clients carry no ambient credentials, so they
need no such check.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import urlsplit

from daemon.console.users import User, UserDirectory

COOKIE = "iseg-session"
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


@dataclass
class Session:
    """One logged-in browser."""

    user: str
    expires: float


class Sessions:
    """Random session ids → user, with expiry."""

    def __init__(self, lifetime_s: float) -> None:
        self.lifetime_s = lifetime_s
        self.by_id: dict[str, Session] = {}

    def create(self, user: str) -> str:
        """A new session id for this user."""
        self._expire()
        sid = secrets.token_urlsafe(32)
        self.by_id[sid] = Session(user, time.time() + self.lifetime_s)
        return sid

    def user(self, sid: str) -> str | None:
        """The user of a live session."""
        session = self.by_id.get(sid)
        if session is None or session.expires < time.time():
            self.by_id.pop(sid, None)
            return None
        return session.user

    def end(self, sid: str) -> None:
        """Log out."""
        self.by_id.pop(sid, None)

    def _expire(self) -> None:
        now = time.time()
        for sid in [s for s, v in self.by_id.items() if v.expires < now]:
            del self.by_id[sid]


class LoginLimiter:
    """At most `per_minute` failed logins per client address and per user name in any 60 s."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self.failures: dict[str, deque[float]] = {}

    def retry_after(self, *keys: str) -> float:
        """Seconds until another attempt is allowed for every key (0 when allowed now)."""
        now = time.monotonic()
        wait = 0.0
        for key in keys:
            window = self.failures.get(key)
            while window and now - window[0] > 60.0:
                window.popleft()
            if window and len(window) >= self.per_minute:
                wait = max(wait, 60.0 - (now - window[0]))
        return wait

    def failed(self, *keys: str) -> None:
        """Count a failed attempt."""
        now = time.monotonic()
        for key in keys:
            self.failures.setdefault(key, deque()).append(now)


def same_origin(headers: Mapping[str, str], scheme: str) -> bool:
    """True when Origin (or, lacking it, Referer) names this very host and scheme."""
    source = headers.get("origin") or headers.get("referer")
    if not source or source == "null":
        return False
    parts = urlsplit(source)
    return parts.scheme == scheme and parts.netloc == headers.get("host", "")


class Authenticator:
    """Resolve a request's user from its bearer token or session cookie."""

    def __init__(self, users: UserDirectory, sessions: Sessions, anonymous_role: str | None) -> None:
        self.users = users
        self.sessions = sessions
        self.anonymous_role = anonymous_role

    def identify(self, headers: Mapping[str, str], cookies: Mapping[str, str]) -> tuple[User | None, str]:
        """(user, how): how is 'token', 'cookie', 'anonymous' or '' when nobody."""
        authorization = headers.get("authorization", "")
        if authorization.lower().startswith("bearer "):
            user = self.users.check_token(authorization[7:].strip())
            return (user, "token") if user else (None, "")
        sid = cookies.get(COOKIE)
        if sid:
            name = self.sessions.user(sid)
            role = self.users.role_of(name) if name else None
            if name and role:
                return User(name, role), "cookie"
        if self.anonymous_role:
            return User("anonymous", self.anonymous_role), "anonymous"
        return None, ""
