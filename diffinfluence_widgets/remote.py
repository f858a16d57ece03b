"""One influence backend per server, shared by every page: :class:`BackendServer` and its client :class:`RemoteBackend`.

``diffinfluence serve`` / ``demo`` start **one** backend process (``python -m diffinfluence_widgets.remote``, a child
of the command line) that loads the demo backend once and answers the
:class:`~diffinfluence_widgets.backend.InfluenceBackend` calls over :mod:`multiprocessing.connection`: a Unix
socket in a private (0700) folder, authenticated with a random key. The address and the key reach the Voila kernels
through environment variables (:data:`~diffinfluence_widgets.demo_names.BACKEND_ADDRESS_ENV`,
:data:`~diffinfluence_widgets.demo_names.BACKEND_KEY_ENV`), never a command line. Each page's kernel is then thin:
it holds an :class:`~diffinfluence_widgets.session.AttributionSession` over a :class:`RemoteBackend` and imports
neither torch, diffusers nor FAISS (~0.1 GB instead of ~0.8 GB), so a preheated spare kernel always fits.

- The prepared queries (``PreparedQuery.payload``: the rotated query gradient, ~40 MB on the demo) stay in the
  server, in one bounded LRU shared by all pages: a query one page prepared is instant for the next. The client's
  ``PreparedQuery`` names it by ``(query_id, measurement, method, band)``; the server prepares it again if it was
  evicted meanwhile.
- Results (``SearchResult``, NumPy arrays, ``QueryItem``) travel pickled, so they are bit-identical to the local
  backend's. Backend exceptions are re-raised in the client (same type and message).
- One lock in the server serialises the backend calls (torch runs at the command line's ``--threads``); each
  connection is served by its own thread.
- When the server process goes, every call of its clients raises :class:`BackendStopped` ("the influence backend
  stopped: …"), which the session shows as that one line; the command line notices the exit and stops the whole
  server with a non-zero status (it does not restart the backend).
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any, Callable, Sequence

from .backend import PreparedCache, PreparedQuery
from .demo_names import BACKEND_ADDRESS_ENV, BACKEND_KEY_ENV
from .serving import BACKEND_READY  # the line the command line waits for

__all__ = ["BackendServer", "RemoteBackend", "BackendStopped", "BACKEND_READY", "FORWARDED"]

#: the backend methods a client may call (nothing else is reachable through the socket)
FORWARDED = ("train_images", "queries", "generate_query", "scores", "search", "refine", "band_profile", "map_2d",
             "map_2d_query")
#: optional methods of the Protocol: the client has them only where the served backend has them
OPTIONAL = ("refine", "map_2d_query")
#: prepared queries the server keeps for all pages together (each up to ~40 MB on the demo: the rotated query, its
#: bands, the exact stage's state); an evicted one is prepared again on its next use (2-4 s on the demo)
SERVER_PREPARE_CACHE = 4


class BackendStopped(RuntimeError):
    """The backend process is gone (or never answered). The session shows the message alone, as one line."""

    #: read by the session: show ``str(err)``, not ``"BackendStopped: …"``
    plain = True


def _prepared_key(query_id, measurement, method, band) -> tuple:
    return (int(query_id), str(measurement), str(method), None if band is None else (int(band[0]), int(band[1])))


# ---------------------------------------------------------------------------------------------- server
class BackendServer:
    """Serve one backend to many :class:`RemoteBackend` clients on a Unix socket.

    ``backend``: the backend itself, or a function returning it (called on a thread once the socket listens, so
    clients may connect while it loads; they wait for it). ``authkey``: bytes every client must know. ``warm``:
    prepare the session's default query (first query, measurement and method) before answering anyone.
    """

    def __init__(self, backend: Any | Callable[[], Any], address: str | Path, authkey: bytes, *,
                 prepare_cache_size: int = SERVER_PREPARE_CACHE, after_call: Callable[[], None] | None = None,
                 warm: bool = False):
        if not isinstance(authkey, bytes) or len(authkey) < 16:
            raise ValueError(f"authkey must be at least 16 random bytes, got {type(authkey).__name__} "
                             f"of length {len(authkey) if hasattr(authkey, '__len__') else '?'}")
        if prepare_cache_size < 1:
            raise ValueError(f"prepare_cache_size must be ≥ 1, got {prepare_cache_size!r}")
        self.address, self._authkey = str(address), authkey
        self._factory = backend if callable(backend) and not hasattr(backend, "prepare") else None
        self.backend = None if self._factory is not None else backend
        self.load_error: BaseException | None = None
        self.loaded = threading.Event()
        self._lock = threading.Lock()  # one backend call at a time (torch at the server's thread setting)
        self._after_call = after_call
        self._warm = bool(warm)
        self._listener: Listener | None = None
        self._closed = threading.Event()
        self.stats = {"connections": 0, "refused": 0, "calls": 0, "prepare_calls": 0, "prepare_hits": 0}
        self._prepared = PreparedCache(prepare_cache_size, self.stats)  # shared by every page

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "BackendServer":
        """Listen, load the backend (when given a function) and accept clients, all on daemon threads."""
        self._listener = Listener(self.address, family="AF_UNIX", authkey=self._authkey)
        os.chmod(self.address, 0o600)
        if self._factory is None:
            self._warm_up()
            self.loaded.set()
        else:
            threading.Thread(target=self._load, name="backend-load", daemon=True).start()
        threading.Thread(target=self._accept, name="backend-accept", daemon=True).start()
        return self

    def _load(self) -> None:
        try:
            self.backend = self._factory()
        except BaseException as e:  # reported to every client and to the process's main loop
            self.load_error = e
            self.loaded.set()
            return
        self._warm_up()
        self.loaded.set()

    def _warm_up(self) -> None:
        """With ``warm``: prepare the query every new page opens on, and refine it once (a backend with exact
        answers then keeps its damping profile), so that its first answers, instant and exact, take milliseconds."""
        if not self._warm:
            return
        b = self.backend
        try:
            qs = b.queries()
            if qs:
                p = self._prepare(_prepared_key(qs[0].id, b.measurements[0], b.methods[0], None))
                if callable(getattr(b, "refine", None)):
                    with self._lock:
                        b.refine(p, float(b.default_damping[b.methods[0]]), 10)
        except Exception:  # not fatal: the page that asks for it gets the error
            pass

    def close(self) -> None:
        self._closed.set()
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn = self._listener.accept()
            except AuthenticationError:  # a client without the key: refused, the server goes on
                self.stats["refused"] += 1
                continue
            except (EOFError, OSError):  # closed by close(), or a client that hung up during the handshake
                if self._closed.is_set():
                    return
                time.sleep(0.01)
                continue
            self.stats["connections"] += 1
            threading.Thread(target=self._serve, args=(conn,), name="backend-conn", daemon=True).start()

    def _serve(self, conn) -> None:
        with conn:
            while True:
                try:
                    name, args = conn.recv()
                except (EOFError, OSError):
                    return
                except Exception as e:  # an unreadable request: say so, keep the connection
                    self._reply(conn, "err", ValueError(f"unreadable request: {e}"))
                    continue
                try:
                    value, status = self._call(name, args), "ok"
                except Exception as e:
                    value, status = e, "err"
                if not self._reply(conn, status, value):
                    return

    @staticmethod
    def _reply(conn, status: str, value) -> bool:
        try:
            conn.send((status, value))
        except (OSError, EOFError):
            return False
        except Exception:  # an exception that does not pickle: its type and message
            try:
                conn.send(("err", RuntimeError(f"{type(value).__name__}: {value}")))
            except (OSError, EOFError):
                return False
        return True

    # ------------------------------------------------------------------ calls
    def _call(self, name: str, args: tuple):
        self.loaded.wait()
        if self.load_error is not None:
            raise BackendStopped(f"the influence backend could not load: {type(self.load_error).__name__}: "
                                 f"{self.load_error}")
        self.stats["calls"] += 1
        b = self.backend
        if name == "info":
            return self._info()
        if name == "stats":
            return {**self.stats, "prepared": len(self._prepared)}
        if name == "prepare":
            key = _prepared_key(*args)
            self._prepare(key)
            return key
        if name == "train_labels":
            from .widgets.reading import train_labels  # the one reading of a backend's labels (numpy only)

            return train_labels(b, args[0])
        if name not in FORWARDED or not callable(getattr(b, name, None)):
            raise AttributeError(f"the served backend has no call {name!r}; expected one of "
                                 f"{[n for n in FORWARDED if callable(getattr(b, n, None))]}")
        if name in ("scores", "search", "refine", "band_profile"):
            args = (self._prepare(_prepared_key(*args[0])), *args[1:])
        try:
            with self._lock:
                return getattr(b, name)(*args)
        finally:
            if name in ("refine", "generate_query") and self._after_call is not None:
                self._after_call()

    def _prepare(self, key: tuple) -> PreparedQuery:
        with self._lock:
            hit = self._prepared.get(key)
            if hit is not None:
                return hit
            self.stats["prepare_calls"] += 1
            p = self.backend.prepare(*key)
            self._prepared.put(key, p)
        if self._after_call is not None:
            self._after_call()
        return p

    def _info(self) -> dict:
        from .widgets.reading import curvature_scale  # the one reading of τ (numpy only)

        b = self.backend
        return {"name": type(b).__name__, "train_ids": b.train_ids, "measurements": list(b.measurements),
                "methods": list(b.methods), "bands": [tuple(x) for x in getattr(b, "bands", [])],
                "default_damping": dict(getattr(b, "default_damping", {}) or {}),
                "curvature_scale": {m: curvature_scale(b, m) for m in b.methods},
                "optional": [n for n in OPTIONAL if callable(getattr(b, n, None))]}


# ---------------------------------------------------------------------------------------------- client
class RemoteBackend:
    """An :class:`~diffinfluence_widgets.backend.InfluenceBackend` whose calls run in a :class:`BackendServer`.

    Connecting waits (up to ``timeout`` seconds) for the server's socket and for its backend to load. A wrong key
    is a ``PermissionError``; a server that is gone is a :class:`BackendStopped` on this and every later call, and
    so is one that leaves a call unanswered for ``call_timeout`` seconds (calls of all pages queue at the server,
    so this is generous; ``None`` waits forever): the connection is then closed, since a late answer would be read
    as the next call's.
    """

    def __init__(self, address: str | Path, authkey: bytes, *, timeout: float = 600.0,
                 call_timeout: float | None = 600.0):
        if call_timeout is not None and not call_timeout > 0:
            raise ValueError(f"call_timeout must be a positive number of seconds or None, got {call_timeout!r}")
        self.call_timeout = call_timeout
        self.address = str(address)
        self._lock = threading.Lock()  # one request at a time on the connection (worker and kernel threads)
        self._stopped = ""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._conn = Client(self.address, family="AF_UNIX", authkey=authkey)
                break
            except AuthenticationError:
                raise PermissionError(f"the influence backend at {self.address} refused this kernel's key") from None
            except (FileNotFoundError, ConnectionRefusedError) as e:
                if time.monotonic() > deadline:
                    raise BackendStopped(f"the influence backend stopped: nothing answers at {self.address} "
                                         f"({e.strerror})") from None
                time.sleep(0.1)
        info = self._call("info")
        self.served = info["name"]
        self.train_ids = info["train_ids"]
        self.measurements = info["measurements"]
        self.methods = info["methods"]
        self.bands = info["bands"]
        self.default_damping = info["default_damping"]
        self.curvature_scale = info["curvature_scale"]  # read by widgets.reading.curvature_scale
        for name in OPTIONAL:  # the session looks for these with getattr(backend, name, None)
            if name not in info["optional"]:
                setattr(self, name, None)

    @classmethod
    def from_env(cls, environ: dict | None = None, **kwargs) -> "RemoteBackend":
        """The backend of the server this kernel was started by (its address and key in the environment)."""
        env = os.environ if environ is None else environ
        address, key = env.get(BACKEND_ADDRESS_ENV), env.get(BACKEND_KEY_ENV)
        if not address or not key:
            raise BackendStopped(f"no influence backend: {BACKEND_ADDRESS_ENV} and {BACKEND_KEY_ENV} are not set")
        return cls(address, bytes.fromhex(key), **kwargs)

    def _call(self, name: str, *args):
        with self._lock:
            if self._stopped:
                raise BackendStopped(self._stopped)
            try:
                self._conn.send((name, args))
                if self.call_timeout is not None and not self._conn.poll(self.call_timeout):
                    raise TimeoutError(f"no answer to {name!r} within {self.call_timeout:g} s")
                status, value = self._conn.recv()
            except (EOFError, OSError) as e:  # TimeoutError is an OSError
                why = ("the connection closed" if isinstance(e, EOFError) else
                       str(e) if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__))
                self._stopped = f"the influence backend stopped: {why} (reload the page once the server runs again)"
                try:
                    self._conn.close()
                except OSError:
                    pass
                raise BackendStopped(self._stopped) from None
        if status == "err":
            raise value
        return value

    def close(self) -> None:
        with self._lock:
            self._stopped = self._stopped or "the connection to the influence backend was closed"
            try:
                self._conn.close()
            except OSError:
                pass

    # ------------------------------------------------------------------ the Protocol
    def train_images(self, ids: Sequence[int]):
        return self._call("train_images", [int(i) for i in ids])

    def queries(self) -> list:
        return self._call("queries")

    def generate_query(self, seed: int):
        return self._call("generate_query", int(seed))

    def prepare(self, query_id: int, measurement: str, method: str, band=None) -> PreparedQuery:
        key = self._call("prepare", int(query_id), measurement, method, None if band is None else tuple(band))
        return PreparedQuery(query_id=key[0], measurement=key[1], method=key[2], band=key[3], payload=key)

    @staticmethod
    def _key(prepared: PreparedQuery) -> tuple:
        return (prepared.query_id, prepared.measurement, prepared.method, prepared.band)

    def scores(self, prepared: PreparedQuery, damping: float):
        return self._call("scores", self._key(prepared), float(damping))

    def search(self, prepared: PreparedQuery, damping: float, k: int, route: str | None = None):
        return self._call("search", self._key(prepared), float(damping), int(k), *(() if route is None else (route,)))

    def refine(self, prepared: PreparedQuery, damping: float, k: int):
        return self._call("refine", self._key(prepared), float(damping), int(k))

    def band_profile(self, prepared: PreparedQuery, damping: float, ids: Sequence[int]):
        return self._call("band_profile", self._key(prepared), float(damping), [int(i) for i in ids])

    def map_2d(self):
        return self._call("map_2d")

    def map_2d_query(self, query_id: int):
        return self._call("map_2d_query", int(query_id))

    def server_stats(self) -> dict:
        """The server's counters (connections, refused keys, calls, prepared queries computed / reused)."""
        return self._call("stats")

    def train_labels(self, ids: Sequence[int]) -> list:
        """Class labels of training images (``None`` each where the served backend has none)."""
        return self._call("train_labels", [int(i) for i in ids])


# ---------------------------------------------------------------------------------------------- the process
def _watch_parent(parent: int, on_gone: Callable[[], None]) -> None:
    """Stop when the command line that started this process is gone (it was killed without its cleanup)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    on_gone()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffinfluence_widgets.remote",
                                description="serve the demo backend to the explorer's kernels (`diffinfluence "
                                            f"serve` starts it; address and key in ${BACKEND_ADDRESS_ENV} / "
                                            f"${BACKEND_KEY_ENV})")
    p.add_argument("config")
    p.add_argument("cache_dir", type=Path)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    address, key = os.environ.get(BACKEND_ADDRESS_ENV), os.environ.get(BACKEND_KEY_ENV)
    if not address or not key:
        p.error(f"{BACKEND_ADDRESS_ENV} and {BACKEND_KEY_ENV} must be set (the key is never a command-line argument)")
    from .app import _malloc_trim  # glibc: give the heap freed by a query's gradient work back

    trim = _malloc_trim()
    t0 = time.perf_counter()

    def load():
        from .demo import load_or_build_demo  # torch: in this process only, never in the kernels

        return load_or_build_demo(a.config, a.cache_dir, threads=a.threads, progress=False)

    server = BackendServer(load, address, bytes.fromhex(key), warm=True,
                           after_call=None if trim is None else (lambda: trim(0))).start()
    done = threading.Event()
    threading.Thread(target=_watch_parent, args=(os.getppid(), done.set), daemon=True).start()
    server.loaded.wait()
    if server.load_error is None:
        print(f"{BACKEND_READY} ({len(server.backend.train_ids)} training images, the first query prepared, "
              f"{time.perf_counter() - t0:.1f} s, {a.threads} thread{'s' if a.threads != 1 else ''})", flush=True)
    if server.load_error is not None:
        e = server.load_error
        print(f"diffinfluence: the influence backend could not load: {type(e).__name__}: {e}", file=sys.stderr,
              flush=True)
        time.sleep(1.0)  # let connected kernels read the reason
        server.close()
        return 1
    done.wait()  # until SIGTERM (the default action ends the process) or the parent is gone
    server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
