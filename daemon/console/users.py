"""The console's users file: names, roles, scrypt password hashes and hashed bearer tokens.

One JSON file (mode 0600), replaced atomically on every change, so `iseg users add` on
the command line and a running console never see half a file; the console re-reads it
when it changes. Passwords are hashed with scrypt (memory-hard); tokens are 256-bit
random strings, so a plain SHA-256 of each is enough to store.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("viewer", "operator", "admin")
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1
TOKEN_PREFIX = "iseg_"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


class UsersError(ValueError):
    """A users-file problem or a bad user request; the message is one line saying what is wrong."""


@dataclass(frozen=True)
class User:
    """Who is logged in and what they may do."""

    name: str
    role: str

    def may(self, needed: str) -> bool:
        """True when this user's role is at least `needed` (viewer < operator < admin)."""
        return ROLES.index(self.role) >= ROLES.index(needed)


def hash_password(password: str) -> str:
    """scrypt$N$r$p$salt$hash (base64), a fresh salt each time."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return "$".join(["scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P),
                     base64.b64encode(salt).decode(), base64.b64encode(digest).decode()])


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check of a password against a stored scrypt hash (False for a malformed one)."""
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(expected), maxmem=256 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def token_digest(token: str) -> str:
    """How a bearer token is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


class UsersFile:
    """Read and change the users file; every change rewrites it atomically with mode 0600."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, dict[str, Any]]:
        """{name: {role, password, tokens}}; UsersError when missing or unreadable."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsersError(f"{self.path}: no users file (create a user with `iseg users add NAME --role operator --config ...`)") from None
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise UsersError(f"{self.path}: unreadable users file ({err})") from None
        users = data.get("users") if isinstance(data, dict) else None
        if not isinstance(users, dict) or not all(isinstance(u, dict) and u.get("role") in ROLES for u in users.values()):
            raise UsersError(f"{self.path}: not a users file (expected {{\"users\": {{name: {{\"role\": ...}}}}}})")
        return users

    def _load_or_empty(self) -> dict[str, dict[str, Any]]:
        return self.load() if self.path.exists() else {}

    def _save(self, users: dict[str, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"version": 1, "users": users}, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, self.path)

    def add(self, name: str, role: str, password: str) -> None:
        """Create or replace a user (a new password; tokens of a replaced user are kept)."""
        if not NAME_PATTERN.fullmatch(name):
            raise UsersError(f"user name {name!r}: use 1-64 letters, digits, '.', '_', '-' or '@'")
        if role not in ROLES:
            raise UsersError(f"--role {role!r}: must be one of {', '.join(ROLES)}")
        if len(password) < 8:
            raise UsersError("password: at least 8 characters")
        users = self._load_or_empty()
        tokens = users.get(name, {}).get("tokens", [])
        users[name] = {"role": role, "password": hash_password(password), "tokens": tokens, "created": time.time()}
        self._save(users)

    def remove(self, name: str) -> None:
        """Delete a user (and with it their tokens)."""
        users = self.load()
        if name not in users:
            raise UsersError(f"no user {name!r} (users: {', '.join(sorted(users)) or 'none'})")
        del users[name]
        self._save(users)

    def new_token(self, name: str) -> str:
        """A new bearer token for a user; only its hash is stored, so it is shown once."""
        users = self.load()
        if name not in users:
            raise UsersError(f"no user {name!r} (users: {', '.join(sorted(users)) or 'none'})")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        users[name].setdefault("tokens", []).append({"sha256": token_digest(token), "created": time.time()})
        self._save(users)
        return token

    def listing(self) -> list[dict[str, Any]]:
        """Name, role and token count of every user, sorted by name."""
        return [{"name": n, "role": u["role"], "tokens": len(u.get("tokens", []))} for n, u in sorted(self.load().items())]


class UserDirectory:
    """The running console's view of the users file: re-read when it changes; empty (no login) when broken."""

    def __init__(self, path: Path, log: Any) -> None:
        self.file = UsersFile(path)
        self.log = log
        self.users: dict[str, dict[str, Any]] = {}
        self.stamp: tuple[float, int] | None = None
        self.error = ""
        self.refresh()

    def refresh(self) -> None:
        """Reload when the file's mtime or size changed; log once per new problem."""
        try:
            st = self.file.path.stat()
            stamp: tuple[float, int] | None = (st.st_mtime, st.st_size)
        except OSError:
            stamp = None
        if stamp == self.stamp and (stamp is not None or self.error):
            return
        self.stamp = stamp
        try:
            self.users = self.file.load()
            self.error = ""
            self.log.info("users file %s: %d user(s)", self.file.path, len(self.users))
        except UsersError as err:
            self.users = {}
            if str(err) != self.error:
                self.log.error("console logins refused: %s", err)
            self.error = str(err)

    def check_password(self, name: str, password: str) -> User | None:
        """The user when name and password match; None otherwise (same cost either way)."""
        self.refresh()
        record = self.users.get(name)
        stored = record.get("password", "") if record else _DUMMY_HASH
        ok = verify_password(password, stored)
        return User(name, record["role"]) if ok and record else None

    def check_token(self, token: str) -> User | None:
        """The user owning this bearer token, if any."""
        self.refresh()
        digest = token_digest(token)
        for name, record in self.users.items():
            if any(hmac.compare_digest(t.get("sha256", ""), digest) for t in record.get("tokens", [])):
                return User(name, record["role"])
        return None

    def role_of(self, name: str) -> str | None:
        """A user's current role (None once removed): sessions follow changes to the file."""
        self.refresh()
        record = self.users.get(name)
        return record["role"] if record else None


_DUMMY_HASH = hash_password(secrets.token_hex(8))
