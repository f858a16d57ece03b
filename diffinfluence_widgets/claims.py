"""Claiming jobs on a shared filesystem: how ranks (processes on one or many machines) split a content-addressed
job list without a scheduler.

A job is claimed by creating ``<root>/<key>.claim`` with ``O_CREAT | O_EXCL`` (atomic on POSIX filesystems and
on NFSv3+), holding the owner's host, pid, process start time and a random token. While a claim is held, a daemon
thread refreshes its modification time every ``lease_s / 4`` seconds (the heartbeat). A claim may be taken over
when its owner is gone:

* same host: the owner pid no longer runs (or runs a different process: the start time differs) — immediately;
* another host: the claim's heartbeat is older than ``lease_s`` (so clocks of the machines must roughly agree).

Take-over is itself exclusive: the taker first creates ``<key>.steal-<token>`` with ``O_EXCL`` for the stale
claim's token, so two ranks never both replace the same dead claim; then it removes the stale claim and claims the
job normally. A job whose result appears (the caller's ``is_done``) is never redone. A live but slow owner whose
lease expired may end up computing the job twice; results are content-addressed and published atomically, so the
second copy is simply discarded.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, TypeVar

__all__ = ["JobClaims", "drain", "DEFAULT_LEASE_S"]

#: seconds without a heartbeat after which another host may take a claim over (env ``DIFFINFLUENCE_CLAIM_LEASE_S``)
DEFAULT_LEASE_S = 300.0

T = TypeVar("T")


def _start_time(pid: int) -> str | None:
    """The process start time (clock ticks since boot) from /proc, or None if the process does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of stat; fields after the ")" of the command name


class JobClaims:
    """Exclusive, leased claims on job keys under ``root`` (see the module docstring)."""

    def __init__(self, root: str | Path, *, lease_s: float | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        env = os.environ.get("DIFFINFLUENCE_CLAIM_LEASE_S")
        self.lease_s = float(lease_s if lease_s is not None else (env or DEFAULT_LEASE_S))
        if not self.lease_s > 0:
            raise ValueError(f"lease_s must be positive, got {self.lease_s!r}")
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._start = _start_time(self.pid)
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"job key must be a plain file name, got {key!r}")
        return self.root / f"{key}.claim"

    # -------------------------------------------------------------- claiming
    def try_claim(self, key: str) -> bool:
        """Claim ``key``; False if another live owner holds it."""
        path = self._path(key)
        for _ in range(2):  # second round after taking over a dead claim
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._take_over(path):
                    return False
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"host": self.host, "pid": self.pid, "start": self._start, "token": uuid.uuid4().hex,
                           "claimed_at": time.time()}, f)
            with self._lock:
                self._held.add(key)
            self._ensure_heartbeat()
            return True
        return False

    def _owner_alive(self, owner: dict, mtime: float) -> bool:
        if owner.get("host") == self.host:
            pid = owner.get("pid")
            return isinstance(pid, int) and _start_time(pid) is not None and _start_time(pid) == owner.get("start")
        return time.time() - mtime < self.lease_s

    def _take_over(self, path: Path) -> bool:
        try:
            st = path.stat()
            owner = json.loads(path.read_text() or "{}")
        except FileNotFoundError:
            return True  # released meanwhile: try again
        except (OSError, ValueError):
            # being written right now (empty / partial): alive unless it stays unreadable past the lease
            return time.time() - path.stat().st_mtime >= self.lease_s if path.exists() else True
        if self._owner_alive(owner, st.st_mtime):
            return False
        steal = path.with_name(f"{path.name}.steal-{owner.get('token', 'none')}")
        try:
            os.close(os.open(steal, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return False  # another rank is taking this dead claim over
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return True

    def release(self, key: str) -> None:
        with self._lock:
            self._held.discard(key)
        try:  # (``.steal-<token>`` markers stay: removing one could let a late taker remove a fresh claim)
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass

    def is_claimed(self, key: str) -> bool:
        return self._path(key).exists()

    # -------------------------------------------------------------- heartbeat
    def _ensure_heartbeat(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="claims-heartbeat", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            with self._lock:
                keys = list(self._held)
            for key in keys:
                try:
                    os.utime(self._path(key))
                except FileNotFoundError:
                    pass

    def close(self) -> None:
        """Stop the heartbeat and release every claim still held."""
        self._stop.set()
        with self._lock:
            keys = list(self._held)
        for key in keys:
            self.release(key)


def drain(items: Iterable[T], key: Callable[[T], str], is_done: Callable[[T], bool], work: Callable[[T], None],
          claims: JobClaims, *, start: int = 0, poll_s: float = 0.5,
          on_done: Callable[[T, bool], None] | None = None) -> None:
    """Run ``work`` on every item that is not done, claiming each first; return once every item is done.

    Items claimed by live owners elsewhere are waited for (polling every ``poll_s`` seconds) and taken over if their
    owner dies. ``start`` rotates where this caller begins in the list (e.g. its rank), so ranks start on different
    jobs. ``on_done(item, by_me)`` is called once per item as it is found finished.
    """
    pending = list(items)
    if pending:
        s = start % len(pending)
        pending = pending[s:] + pending[:s]
    while pending:
        progressed = False
        for item in list(pending):
            k = key(item)
            mine = False
            if not is_done(item):
                if not claims.try_claim(k):
                    continue
                try:
                    if not is_done(item):  # finished by someone between the check and the claim
                        work(item)
                        mine = True
                finally:
                    claims.release(k)
                if not is_done(item):
                    raise RuntimeError(f"job {k} ran but produced no result")
            pending.remove(item)
            progressed = True
            if on_done is not None:
                on_done(item, mine)
        if pending and not progressed:
            time.sleep(poll_s)
