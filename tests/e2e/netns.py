"""Emulated plant hosts for fault tests: Linux network namespaces joined by veth pairs and one bridge.

Each `Host` is a namespace with `lo` and one interface in a shared /24, so roles on different
hosts can only reach each other over TCP (ipc:// sockets are files, not isolated by network
namespaces: every host gets its own `home` directory for state and run dirs). Faults are
reversible methods on the host: kill / freeze / thaw a process group, blackhole (all traffic
silently dropped by nftables inside the namespace), partition from one other host, flap, and
throttle (tbf). Every name carries a prefix `isg` + 4 hex digits whose lock file marks it live,
so parallel runs never collide and leftovers of crashed runs are removed on the next start.
Needs root and the `ip`, `nft` and `tc` tools; the `plant` fixture skips otherwise.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("ip", "nft", "tc")
PREFIX_RE = re.compile(r"^(isg[0-9a-f]{4})")
LOCK_SUFFIX = ".plant.lock"
STALE_UNLOCKED_S = 10.0
"""An unheld lock file younger than this may belong to a plant that is still starting up."""
FAULT_TABLE = "isg_fault"
BRIDGE_PORT = "eth0"
"""Name of each host's interface inside its namespace (names are per namespace)."""


def missing_requirements() -> str:
    """Why namespaces cannot be built here ('' when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    return f"missing {', '.join(missing)} (install iproute2 and nftables)" if missing else ""


def _run(argv: list[str], check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if check and done.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _netns_names() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _link_names() -> list[str]:
    out = _run(["ip", "-o", "link", "show"], check=False).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.count(":") >= 2]


def _kill_netns_processes(ns: str) -> None:
    """SIGKILL whatever still runs in a namespace (a role's children or a crashed run's)."""
    pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _lock_is_stale(prefix: str) -> bool:
    lock_path = Path(tempfile.gettempdir()) / f"{prefix}{LOCK_SUFFIX}"
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        if time.time() - os.fstat(fd).st_mtime < STALE_UNLOCKED_S:
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def remove_stale() -> list[str]:
    """Delete namespaces, links, dirs and lock files of crashed runs (prefixes whose lock nobody holds);
    returns the prefixes removed. Live plants hold their lock and are left alone."""
    tmp = Path(tempfile.gettempdir())
    names = _netns_names() + _link_names() + [p.name for p in tmp.glob("isg*")]
    prefixes = sorted({m.group(1) for m in map(PREFIX_RE.match, names) if m})
    removed = []
    for prefix in prefixes:
        if not _lock_is_stale(prefix):
            continue
        for ns in _netns_names():
            if ns.startswith(prefix):
                _kill_netns_processes(ns)
                _run(["ip", "netns", "delete", ns], check=False)
        for link in _link_names():
            if link.startswith(prefix):
                _run(["ip", "link", "delete", link], check=False)
        shutil.rmtree(tmp / prefix, ignore_errors=True)
        (tmp / f"{prefix}{LOCK_SUFFIX}").unlink(missing_ok=True)
        removed.append(prefix)
    return removed


class Flap:
    """A link that goes down and up: blackhole for `period_s`, restore for `period_s`, until
    `duration_s` is over or `stop()`; the host ends restored."""

    def __init__(self, host: "Host", period_s: float, duration_s: float) -> None:
        self.host = host
        self.period_s = period_s
        self.deadline = time.monotonic() + duration_s
        self.toggles = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"flap-{host.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and time.monotonic() < self.deadline:
                self.host.blackhole()
                self.toggles += 1
                if self._stop.wait(min(self.period_s, max(0.0, self.deadline - time.monotonic()))):
                    break
                self.host.restore()
                self.toggles += 1
                self._stop.wait(min(self.period_s, max(0.0, self.deadline - time.monotonic())))
        finally:
            self.host.restore()

    def stop(self) -> None:
        """End the flapping now (the host is restored)."""
        self._stop.set()
        self.join()

    def join(self, timeout: float | None = None) -> None:
        """Wait until the flapping is over."""
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        """True while the thread still toggles."""
        return self._thread.is_alive()


class Host:
    """One emulated machine: a namespace, its address, its own home dir, its processes and its faults."""

    def __init__(self, plant: "Plant", name: str, index: int) -> None:
        self.plant = plant
        self.name = name
        self.ns = f"{plant.prefix}-{name}"
        self.index = index
        self.outer = f"{plant.prefix}v{index}"
        self.ip = f"{plant.subnet}.{index + 1}"
        self.home = plant.root / name
        self.procs: list[subprocess.Popen] = []
        self.blackholed = False
        self.partitioned: set[str] = set()
        self.throttled = ""
        self._logs: list[IO[str]] = []
        self._fault_lock = threading.Lock()

    def _create(self) -> None:
        inner_tmp = f"{self.plant.prefix}i{self.index}"
        self.home.mkdir(parents=True)
        _run(["ip", "netns", "add", self.ns])
        _run(["ip", "link", "add", self.outer, "type", "veth", "peer", "name", inner_tmp])
        _run(["ip", "link", "set", inner_tmp, "netns", self.ns])
        _run(["ip", "link", "set", self.outer, "master", self.plant.bridge, "up"])
        for argv in (["ip", "link", "set", inner_tmp, "name", BRIDGE_PORT],
                     ["ip", "addr", "add", f"{self.ip}/24", "dev", BRIDGE_PORT],
                     ["ip", "link", "set", BRIDGE_PORT, "up"],
                     ["ip", "link", "set", "lo", "up"]):
            self._exec(argv)

    def _exec(self, argv: list[str], check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
        """Run a short command in the namespace to completion."""
        return _run(["ip", "netns", "exec", self.ns, *argv], check=check, stdin=stdin)

    def run(self, argv: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a command in the namespace (cwd = repo root) and wait for it; text output captured."""
        return subprocess.run(["ip", "netns", "exec", self.ns, *argv], cwd=REPO, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, **(env or {})})

    def popen(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start a command in the namespace in its own process group, stdout+stderr to `log_path`;
        the plant kills it at teardown."""
        log = open(log_path, "w")
        self._logs.append(log)
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL the process group (a crash: no clean shutdown, though its kernel still closes its connections)."""
        _signal_group(proc, signal.SIGKILL)
        proc.wait(10)

    def freeze(self, proc: subprocess.Popen) -> None:
        """SIGSTOP the process group: sockets stay open, the kernel keeps accepting data, nothing reads it."""
        _signal_group(proc, signal.SIGSTOP)

    def thaw(self, proc: subprocess.Popen) -> None:
        """SIGCONT the process group."""
        _signal_group(proc, signal.SIGCONT)

    def blackhole(self) -> None:
        """Silently drop every packet to and from this host (loopback excepted): no RST, no ICMP."""
        with self._fault_lock:
            self.blackholed = True
            self._apply_rules()

    def restore(self) -> None:
        """Undo `blackhole` (partitions stay)."""
        with self._fault_lock:
            self.blackholed = False
            self._apply_rules()

    def partition(self, other: "Host") -> None:
        """Silently drop traffic between this host and `other` only."""
        with self._fault_lock:
            self.partitioned.add(other.ip)
            self._apply_rules()

    def heal(self, other: "Host") -> None:
        """Undo `partition(other)`."""
        with self._fault_lock:
            self.partitioned.discard(other.ip)
            self._apply_rules()

    def flap(self, period_s: float, duration_s: float) -> Flap:
        """Toggle blackhole/restore every `period_s` for `duration_s` in a thread; stop() or join() it."""
        flap = Flap(self, period_s, duration_s)
        self.plant.flaps.append(flap)
        return flap

    def throttle(self, rate: str = "1mbit") -> None:
        """Limit this host's link to `rate` in each direction: a tbf on the inner veth shapes what the
        host sends, one on the outer (bridge-side) veth what it receives."""
        burst = "32kb"
        self._exec(["tc", "qdisc", "replace", "dev", BRIDGE_PORT, "root", "tbf", "rate", rate, "burst", burst,
                    "latency", "200ms"])
        _run(["tc", "qdisc", "replace", "dev", self.outer, "root", "tbf", "rate", rate, "burst", burst,
              "latency", "200ms"])
        self.throttled = rate

    def unthrottle(self) -> None:
        """Remove the rate limit (nothing to do when there is none)."""
        if not self.throttled:
            return
        self._exec(["tc", "qdisc", "del", "dev", BRIDGE_PORT, "root"], check=False)
        _run(["tc", "qdisc", "del", "dev", self.outer, "root"], check=False)
        self.throttled = ""

    def _apply_rules(self) -> None:
        """Replace the namespace's fault table in one nft transaction with what the flags say."""
        inbound, outbound = [], []
        if self.blackholed:
            inbound.append('iifname != "lo" drop')
            outbound.append('oifname != "lo" drop')
        for ip in sorted(self.partitioned):
            inbound.append(f"ip saddr {ip} drop")
            outbound.append(f"ip daddr {ip} drop")
        chains = "".join(f"  chain {hook} {{\n    type filter hook {hook} priority -100; policy accept;\n"
                         + "".join(f"    {rule}\n" for rule in rules) + "  }\n"
                         for hook, rules in (("input", inbound), ("output", outbound)))
        script = (f"table inet {FAULT_TABLE}\ndelete table inet {FAULT_TABLE}\n"
                  f"table inet {FAULT_TABLE} {{\n{chains}}}\n")
        self._exec(["nft", "-f", "-"], stdin=script)

    def _close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGKILL)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass
        for log in self._logs:
            log.close()
        _kill_netns_processes(self.ns)
        _run(["ip", "netns", "delete", self.ns], check=False)
        _run(["ip", "link", "delete", self.outer], check=False)


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass


class Plant:
    """A bridge and the hosts on it; `close()` removes all of it (the `plant` fixture calls it)."""

    def __init__(self) -> None:
        remove_stale()
        tmp = Path(tempfile.gettempdir())
        while True:
            self.prefix = f"isg{secrets.token_hex(2)}"
            lock_path = tmp / f"{self.prefix}{LOCK_SUFFIX}"
            try:
                self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            break
        self._lock_path = lock_path
        self.root = tmp / self.prefix
        self.root.mkdir()
        self.bridge = f"{self.prefix}br"
        self.subnet = f"10.{int(self.prefix[3:5], 16)}.{int(self.prefix[5:7], 16)}"
        self.hosts: dict[str, Host] = {}
        self.flaps: list[Flap] = []
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "link", "set", self.bridge, "up"])

    def host(self, name: str) -> Host:
        """The host called `name`, created on first use (names: letters and digits, short)."""
        if name in self.hosts:
            return self.hosts[name]
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", name):
            raise ValueError(f"host name {name!r}: use 1-8 lowercase letters and digits, starting with a letter")
        if len(self.hosts) >= 250:
            raise ValueError("a plant holds at most 250 hosts (one /24)")
        host = Host(self, name, len(self.hosts))
        self.hosts[name] = host
        host._create()
        return host

    def close(self) -> None:
        """Stop flaps, kill every process, delete namespaces, veths, bridge, dirs and the lock."""
        for flap in self.flaps:
            flap.stop()
        for host in self.hosts.values():
            host._close()
        _run(["ip", "link", "delete", self.bridge], check=False)
        shutil.rmtree(self.root, ignore_errors=True)
        self._lock_path.unlink(missing_ok=True)
        os.close(self._lock_fd)


@pytest.fixture
def plant() -> Iterator[Plant]:
    """A fresh plant (skipped without root or the ip/nft/tc tools); torn down even when the test fails."""
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    built = Plant()
    try:
        yield built
    finally:
        built.close()
