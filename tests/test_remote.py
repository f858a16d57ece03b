"""One backend process shared by every page (``remote.py``): a real server process on a real Unix socket.

Every Protocol call through :class:`RemoteBackend` returns exactly (bit for bit) what the backend object returns
locally: for the torch-free ``StandInBackend`` and for the real ``tiny`` demo backend; two clients at once; a wrong
key refused; the server's death a one-line ``BackendStopped``; a thin kernel's imports free of torch.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from diffinfluence_widgets.demo_names import BACKEND_ADDRESS_ENV, BACKEND_KEY_ENV
from diffinfluence_widgets.remote import BackendStopped, RemoteBackend
from diffinfluence_widgets.serving import BACKEND_READY
from diffinfluence_widgets.session import AttributionSession
from diffinfluence_widgets.widgets._standin import StandInBackend
from diffinfluence_widgets.widgets.reading import curvature_scale, train_labels

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

STANDIN_SERVER = """
import os, threading
from diffinfluence_widgets.remote import BackendServer
from diffinfluence_widgets.widgets._standin import StandInBackend
s = BackendServer(lambda: StandInBackend(num_train=300, fail_query=301,
                                         prepare_delay=float(os.environ.get('PREPARE_DELAY', '0'))), os.environ['ADDR'],
                  bytes.fromhex(os.environ["KEY"]), prepare_cache_size=4).start()
s.loaded.wait()
print('LISTENING', flush=True)
threading.Event().wait()
"""


class Server:
    """A backend server in its own process (the test kills it at the end, or earlier on purpose)."""

    def __init__(self, argv: list[str], ready: str, env: dict | None = None):
        self.folder = Path(tempfile.mkdtemp(prefix="dinf-test-backend-"))
        self.address = str(self.folder / "backend.sock")
        self.key = secrets.token_bytes(32)
        env = {**ENV, **(env or {}), "ADDR": self.address, "KEY": self.key.hex(),
               BACKEND_ADDRESS_ENV: self.address, BACKEND_KEY_ENV: self.key.hex()}
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            self.lines.append(line)
            if ready in line:
                break
            if not line and self.proc.poll() is not None:
                raise AssertionError("".join(self.lines))
        else:
            self.stop()
            raise AssertionError("server not ready:\n" + "".join(self.lines))

    def client(self, **kw) -> RemoteBackend:
        return RemoteBackend(self.address, self.key, **kw)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def standin_server():
    s = Server([sys.executable, "-c", STANDIN_SERVER], "LISTENING")
    yield s
    s.stop()


def assert_same(a, b, what=""):
    """Equal values, arrays bit for bit (same dtype), dataclasses field by field."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray), what
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), what
    elif hasattr(a, "__dataclass_fields__"):
        assert type(a) is type(b), what
        for f in a.__dataclass_fields__:
            assert_same(getattr(a, f), getattr(b, f), f"{what}.{f}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), what
        for n, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{what}[{n}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            assert_same(a[k], b[k], f"{what}[{k!r}]")
    else:
        assert a == b and type(a) is type(b), f"{what}: {a!r} != {b!r}"


def check_protocol(remote, local, query_ids, dampings, k=7):
    """Every Protocol call (and the optional ones the session uses) gives identical answers on both."""
    for attr in ("train_ids", "measurements", "methods", "default_damping"):
        assert_same(getattr(remote, attr), getattr(local, attr), attr)
    assert [tuple(b) for b in remote.bands] == [tuple(b) for b in local.bands]
    assert_same(remote.queries(), local.queries(), "queries")
    ids = [int(i) for i in local.train_ids[[0, 5, 3, len(local.train_ids) - 1]]]
    assert_same(remote.train_images(ids), local.train_images(ids), "train_images")
    assert_same(remote.map_2d(), local.map_2d(), "map_2d")
    assert train_labels(remote, ids) == train_labels(local, ids)
    for m in local.methods:
        assert curvature_scale(remote, m) == curvature_scale(local, m)
    assert (remote.refine is None) == (getattr(local, "refine", None) is None)
    for q in query_ids:
        if getattr(local, "map_2d_query", None) is not None:
            assert_same(remote.map_2d_query(q), local.map_2d_query(q), "map_2d_query")
        for meas in local.measurements[:2]:
            for meth in local.methods:
                try:
                    pl = local.prepare(q, meas, meth)
                except ValueError as e:  # e.g. Journey-TRAK on a held-out image: the same error through the server
                    with pytest.raises(type(e), match=re.escape(str(e))):
                        remote.prepare(q, meas, meth)
                    continue
                pr = remote.prepare(q, meas, meth)
                assert (pr.query_id, pr.measurement, pr.method, pr.band) == (q, meas, meth, None)
                for lam in dampings[meth]:
                    what = f"{q}/{meas}/{meth}/{lam}"
                    assert_same(remote.scores(pr, lam), local.scores(pl, lam), "scores " + what)
                    got = remote.search(pr, lam, k)
                    # the server answers by the route its state allows (its warmed query already has a damping
                    # profile): the local backend asked for the same route gives the same answer
                    route = (getattr(got, "stats", None) or {}).get("route")
                    want = local.search(pl, lam, k, route) if route else local.search(pl, lam, k)
                    assert_same(got, want, "search " + what)
                    if route and route != "faiss":  # a route asked through the server: the same answer
                        assert_same(remote.search(pr, lam, k, "faiss"), local.search(pl, lam, k, "faiss"),
                                    "faiss route " + what)
                    if remote.refine is not None:
                        assert_same(remote.refine(pr, lam, k), local.refine(pl, lam, k), "refine " + what)
                    assert_same(remote.band_profile(pr, lam, ids), local.band_profile(pl, lam, ids), "bands " + what)
        if local.bands:
            band = tuple(local.bands[1])
            pr, pl = remote.prepare(q, local.measurements[0], local.methods[0], band), \
                local.prepare(q, local.measurements[0], local.methods[0], band)
            lam = dampings[local.methods[0]][0]
            assert_same(remote.search(pr, lam, k), local.search(pl, lam, k), "band search")


def test_standin_through_the_server_equals_the_local_object(standin_server):
    local = StandInBackend(num_train=300, fail_query=301)
    remote = standin_server.client()
    dampings = {m: [local.default_damping[m] * f for f in (1e-3, 1.0, 1e3)] for m in local.methods}
    check_protocol(remote, local, [300, 302, 100_002], dampings)
    # a generated query appears in both lists, and the session over the remote shows the local session's result
    assert_same(remote.generate_query(11), local.generate_query(11), "generate_query")
    assert_same(remote.queries(), local.queries(), "queries after generating")
    sr, sl = AttributionSession(remote, threaded=False), AttributionSession(local, threaded=False)
    for s in (sr, sl):
        s.update(query_id=100_011, method="trak", damping=0.3, k=5)
    assert_same(sr.result.proponents, sl.result.proponents, "session result")
    assert_same(sr.result.all_scores, sl.result.all_scores, "session all_scores")
    assert sr.thumbnails([1003, 1010]) == sl.thumbnails([1003, 1010])
    # errors come back with their type and message; the connection stays usable
    with pytest.raises(ValueError, match="unknown measurement 'nope'"):
        remote.prepare(300, "nope", "ekfac")
    with pytest.raises(RuntimeError, match="stand-in failure for query 301"):
        remote.prepare(301, "loss", "ekfac")
    with pytest.raises(KeyError, match="unknown training id 5"):
        remote.train_images([5])
    sr.update(query_id=301)
    assert sr.error == "RuntimeError: stand-in failure for query 301 (as asked by fail_query)"
    assert remote.queries()[0].id == 300
    remote.close()


def test_two_clients_at_once_share_prepared_queries(standin_server):
    local = StandInBackend(num_train=300, fail_query=301)
    a, b = standin_server.client(), standin_server.client()
    before = a.server_stats()
    out: dict = {}

    def work(name, client, order):
        got = []
        for q in order:
            p = client.prepare(q, "loss", "ekfac")
            got.append((q, client.search(p, 1e-3, 9), client.scores(p, 1e-2)))
        out[name] = got

    qs = [300, 302, 303, 304]
    threads = [threading.Thread(target=work, args=("a", a, qs)), threading.Thread(target=work, args=("b", b, qs[::-1]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for name in ("a", "b"):
        for q, search, scores in out[name]:
            p = local.prepare(q, "loss", "ekfac")
            assert_same(search, local.search(p, 1e-3, 9), f"{name} search {q}")
            assert_same(scores, local.scores(p, 1e-2), f"{name} scores {q}")
    after = a.server_stats()
    # 8 prepares for 4 queries: the second client's were answered from the shared cache (at most 4 computed)
    assert after["prepare_calls"] - before["prepare_calls"] <= 4
    assert after["prepare_hits"] - before["prepare_hits"] >= 4
    assert after["prepared"] <= 4  # the server's bounded LRU
    # a query evicted from that LRU is prepared again transparently, with the same answer
    p = a.prepare(300, "loss", "ekfac")
    for q in (305, 100_000, 100_001, 100_003):
        a.prepare(q, "loss", "ekfac")
    assert_same(a.search(p, 1e-3, 9), local.search(local.prepare(300, "loss", "ekfac"), 1e-3, 9), "evicted")
    a.close()
    b.close()


def test_a_wrong_key_is_refused(standin_server):
    with pytest.raises(PermissionError, match="refused"):
        RemoteBackend(standin_server.address, secrets.token_bytes(32))
    import socket

    for _ in range(3):  # clients that hang up during the handshake do not stop the server either
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.connect(standin_server.address)
    ok = standin_server.client()  # the server goes on serving the right key
    assert len(ok.train_ids) == 300 and ok.server_stats()["refused"] >= 1
    ok.close()
    with pytest.raises(ValueError, match="at least 16 random bytes"):
        from diffinfluence_widgets.remote import BackendServer

        BackendServer(StandInBackend, "/nonexistent/x.sock", b"short")


def test_the_servers_death_is_one_clear_line():
    server = Server([sys.executable, "-c", STANDIN_SERVER], "LISTENING")
    remote = server.client()
    session = AttributionSession(remote, threaded=False)
    assert session.result is not None and session.error == ""
    server.stop(signal.SIGKILL)
    session.update(damping=0.5)  # a new request: the backend is gone
    assert session.error.startswith("the influence backend stopped: "), session.error
    assert "Traceback" not in session.error and "\n" not in session.error
    with pytest.raises(BackendStopped, match="the influence backend stopped"):
        remote.queries()
    # a kernel started after the backend is gone: the same kind of line, after a short wait
    with pytest.raises(BackendStopped, match="the influence backend stopped: nothing answers"):
        RemoteBackend(server.address, server.key, timeout=0.5)
    with pytest.raises(BackendStopped, match=BACKEND_ADDRESS_ENV):
        RemoteBackend.from_env({})


def test_a_call_left_unanswered_is_one_clear_line():
    """A backend that does not answer within ``call_timeout`` (stuck, or queued behind far too much work) stops
    this client with one line; the connection is dropped so that the late answer is never read as another call's."""
    server = Server([sys.executable, "-c", STANDIN_SERVER], "LISTENING", env={"PREPARE_DELAY": "3"})
    try:
        remote = server.client(call_timeout=0.5)
        q = remote.queries()[0].id
        t0 = time.monotonic()
        with pytest.raises(BackendStopped, match=r"no answer to 'prepare' within 0.5 s"):
            remote.prepare(q, "loss", remote.methods[0])
        assert time.monotonic() - t0 < 2.5
        with pytest.raises(BackendStopped, match="no answer"):
            remote.queries()
        fresh = server.client()  # the server itself goes on
        assert fresh.prepare(q, "loss", remote.methods[0]).query_id == q
        fresh.close()
        with pytest.raises(ValueError, match="call_timeout"):
            server.client(call_timeout=0)
    finally:
        server.stop()


def test_a_thin_kernel_imports_no_torch():
    """What the served app imports on the remote path (a fresh interpreter) leaves torch, diffusers, FAISS, scipy
    and scikit-learn out of ``sys.modules``."""
    code = ("import sys; from diffinfluence_widgets import app, demo_names, remote, session, widgets; "
            "from diffinfluence_widgets.app import open_backend, backend_stopped_view; "
            "from diffinfluence_widgets.widgets import InfluenceExplorer; "
            "print(sorted(m for m in ('torch', 'diffusers', 'faiss', 'scipy', 'sklearn') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr


THIN_KERNEL = """
import sys, json
from diffinfluence_widgets.app import open_backend
from diffinfluence_widgets.widgets import InfluenceExplorer
backend = open_backend('tiny', None, 1)
explorer = InfluenceExplorer(backend)
r = explorer.session.wait(120)
explorer.session.close()
heavy = sorted(m for m in ('torch', 'diffusers', 'faiss', 'scipy', 'sklearn') if m in sys.modules)
rss = int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) // 1024
print('THIN ' + json.dumps({'type': type(backend).__name__, 'heavy': heavy, 'rss_mb': rss,
                            'ids': [int(i.id) for i in r.proponents], 'error': explorer.session.error}))
"""


@pytest.mark.slow
def test_tiny_demo_through_the_server_and_a_thin_kernel(tmp_path_factory):
    """The real ``python -m diffinfluence_widgets.remote`` on a built ``tiny`` cache answers exactly as the backend
    loaded in this process; a kernel using it (the app's ``open_backend``) never imports torch, diffusers or FAISS."""
    from threadpoolctl import threadpool_limits  # (scikit-learn's dependency)

    from diffinfluence_widgets.demo import load_or_build_demo

    # bit-for-bit needs the same arithmetic on both sides: the server runs at --threads 1 (torch and the BLAS under
    # NumPy), so this process computes its side at one BLAS thread too (a 2-thread OpenBLAS sums in another order)
    with threadpool_limits(limits=1):
        _tiny_demo_through_the_server(tmp_path_factory, load_or_build_demo)


def _tiny_demo_through_the_server(tmp_path_factory, load_or_build_demo):
    cache = tmp_path_factory.mktemp("remote") / "tiny"
    load_or_build_demo("tiny", cache, threads=1, progress=False)  # build
    local = load_or_build_demo("tiny", cache, threads=1, progress=False)  # reopened, as the server opens it
    server = Server([sys.executable, "-m", "diffinfluence_widgets.remote", "tiny", str(cache), "--threads", "1"],
                    BACKEND_READY)
    try:
        remote = server.client()
        assert remote.served == type(local).__name__
        warm = remote.server_stats()  # the default query (what every new page opens on) was prepared at startup
        assert warm["prepared"] == 1 and warm["prepare_calls"] == 1
        qs = local.queries()
        # ... and refined once: its first instant answer is the damping profile's estimate, not an 8-bit scan
        first = remote.prepare(qs[0].id, local.measurements[0], local.methods[0])
        assert remote.search(first, local.default_damping[local.methods[0]], 5).stats["route"] == "profile"
        query_ids = [next(q.id for q in qs if q.kind == "generated"), next(q.id for q in qs if q.kind == "heldout")]
        dampings = {m: [local.default_damping[m], local.default_damping[m] * 100] for m in local.methods}
        check_protocol(remote, local, query_ids, dampings, k=5)
        env = {**ENV, BACKEND_ADDRESS_ENV: server.address, BACKEND_KEY_ENV: server.key.hex()}
        p = subprocess.run([sys.executable, "-c", THIN_KERNEL], capture_output=True, text=True, env=env, timeout=300)
        line = [x for x in p.stdout.splitlines() if x.startswith("THIN ")]
        assert line, p.stdout + p.stderr
        out = json.loads(line[-1][5:])
        assert out["type"] == "RemoteBackend" and out["heavy"] == [] and out["error"] == "", out
        s = AttributionSession(local, threaded=False)  # the same first result (refined, as the explorer shows it)
        s.wait()
        assert s.result.exact and out["ids"] == [int(i.id) for i in s.result.proponents]
        print(f"thin kernel RSS {out['rss_mb']} MB")
        remote.close()
    finally:
        server.stop()
    assert server.proc.returncode == -signal.SIGTERM
