"""The session's scheduler: one worker thread with per-channel request coalescing (or inline, for tests).

Every request carries an increasing id per *channel*; a newer request replaces a pending older one before it starts,
and :meth:`_Worker.is_latest` lets the caller drop answers that are no longer the latest.
"""
from __future__ import annotations

import threading
import time
import traceback
from collections import OrderedDict
from typing import Any, Callable

__all__ = ["_Worker", "_Inline"]


# ----------------------------------------------------------------------------------------------- worker
class _Worker:
    """One daemon thread running the latest request of each channel; older pending requests are replaced."""

    def __init__(self, name: str = "dinf-session"):
        self._cv = threading.Condition()
        self._pending: "OrderedDict[str, tuple[int, Callable[[], Any], Callable[[int, Any, BaseException | None], None]]]" = OrderedDict()
        self._latest: dict[str, int] = {}
        self._running = 0
        self._next_id = 0
        self._closed = False
        self.dropped = 0  # answers computed but dropped because a newer request came
        self.replaced = 0  # requests replaced before they started
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, channel: str, fn: Callable[[], Any],
               done: Callable[[int, Any, BaseException | None], None]) -> int:
        with self._cv:
            self._next_id += 1
            rid = self._next_id
            self._latest[channel] = rid
            if channel in self._pending:
                self.replaced += 1
            self._pending[channel] = (rid, fn, done)
            self._pending.move_to_end(channel)
            self._cv.notify_all()
            return rid

    def is_latest(self, channel: str, rid: int) -> bool:
        with self._cv:
            return self._latest.get(channel) == rid

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                channel, (rid, fn, done) = self._pending.popitem(last=False)
                self._running += 1
            try:
                try:
                    out, err = fn(), None
                except BaseException as e:  # noqa: BLE001 - reported to the widget, not raised on a thread
                    out, err = None, e
                if not self.is_latest(channel, rid):
                    self.dropped += 1
                else:
                    try:
                        done(rid, out, err)
                    except Exception:  # a failing observer must not kill the worker
                        traceback.print_exc()
            finally:
                with self._cv:
                    self._running -= 1
                    self._cv.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until nothing is pending or running; False on timeout."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._pending or self._running:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._pending.clear()
            self._cv.notify_all()


class _Inline:
    """Runs requests at once on the calling thread (``threaded=False``: scripts, tests, static reports)."""

    def __init__(self):
        self._next_id = 0
        self._latest: dict[str, int] = {}
        self.dropped = self.replaced = 0

    def submit(self, channel, fn, done):
        self._next_id += 1
        rid = self._latest[channel] = self._next_id
        try:
            out, err = fn(), None
        except BaseException as e:  # noqa: BLE001
            out, err = None, e
        if self._latest.get(channel) == rid:
            done(rid, out, err)
        return rid

    def is_latest(self, channel, rid):
        return self._latest.get(channel) == rid

    def wait(self, timeout=None):
        return True

    def close(self):
        pass
