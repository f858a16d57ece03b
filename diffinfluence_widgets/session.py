"""``AttributionSession``: the one object the widgets talk to.

The session sits between an :class:`~diffinfluence_widgets.backend.InfluenceBackend` and the widgets. It holds the
current settings (query, measurement, method, damping, timestep band, k), answers the top-k proponents and opponents
with their scores through ``backend.search``, caches the damping-independent query work (``backend.prepare``) per
``(query, measurement, method, band)`` and the PNG thumbnails per training id, and exports the current result.

Responsiveness. Slow work runs on one worker thread, never on the kernel thread (the kernel only handles front-end
events while no cell runs). Every request carries an increasing id per *channel* ("result", "sweep", ...); a newer
request replaces a pending older one before it starts (a dragged slider coalesces to its last value), and an answer
whose id is no longer the latest is dropped. Widgets observe the traits (``result``, ``busy``, ``error``...) and
never call the backend themselves, so they can be tested against a stand-in backend and the backend without a
browser.

Sign convention: :data:`~diffinfluence_widgets.backend.SIGN_CONVENTION` — a **positive** score means removing the
training image is predicted to **increase** the query's measurement (for the loss: a proponent, it supports the
query); negative scores are opponents.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import traitlets

from ._io import atomic_write_bytes as _atomic_write
from ._worker import _Inline, _Worker
from .backend import SIGN_CONVENTION, InfluenceBackend, PreparedCache, PreparedQuery, QueryItem, SearchResult
from .config import check_damping
from ._png import png_bytes as to_png  # numpy + Pillow: a thin kernel imports no torch
from .report import html_card, png_card
from .refining import RefiningMixin
from .results import (CompareResult, Influence, InfluenceResult, SweepResult, rank_agreement, result_from_search,
                      sweep_ranks)

__all__ = ["AttributionSession", "InfluenceResult", "Influence", "CompareResult", "SweepResult",
           "rank_agreement", "SIGN_CONVENTION"]

#: thumbnail edge in pixels (nearest-neighbour upscale of small images so they stay crisp)
THUMB_SIZE = 64


# ----------------------------------------------------------------------------------------------- session
def error_text(err: BaseException) -> str:
    """One line for the user: ``"Type: message"``, or the message alone for errors that say everything themselves
    (``plain = True``, e.g. ``remote.BackendStopped``: "the influence backend stopped: …")."""
    return str(err) if getattr(err, "plain", False) else f"{type(err).__name__}: {err}"


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings in one canonical form (a band as a list), so a result's settings compare with the session's."""
    out = dict(settings)
    out["band"] = list(out["band"]) if out.get("band") else None
    return out


class AttributionSession(RefiningMixin, traitlets.HasTraits):
    """Current query and settings → top-k proponents / opponents, observable through traitlets.

    Parameters
    ----------
    backend:
        Anything implementing :class:`~diffinfluence_widgets.backend.InfluenceBackend`.
    threaded:
        Run backend work on a worker thread (default; what widgets need). ``False`` runs it inline.
    full_scores:
        Also fetch the scores of every training example with each result (for the score distribution).
    refine:
        After each approximate answer, compute the refined one (``backend.refine``: the method's exact top-k) and
        show it, unless the settings changed meanwhile (default, when the backend has ``refine``).
    query_id, measurement, method, damping, band, k:
        Initial settings; defaults are the first query, the backend's first measurement and method (the backend
        lists its recommended ones first) and that method's default damping.

    Observe ``result`` (an :class:`InfluenceResult`), ``busy``, ``error`` and ``queries`` with
    ``session.observe(callback, "result")``. Setting any of the settings traits schedules a new request.
    """

    query_id = traitlets.Int(allow_none=True, default_value=None)
    measurement = traitlets.Unicode()
    method = traitlets.Unicode()
    damping = traitlets.Float(1e-3)
    band = traitlets.Tuple(allow_none=True, default_value=None)
    k = traitlets.Int(10)

    result = traitlets.Instance(InfluenceResult, allow_none=True, default_value=None, read_only=True)
    busy = traitlets.Bool(False, read_only=True)
    #: short human-readable description of the work in progress ("" when idle)
    progress = traitlets.Unicode("", read_only=True)
    #: last error as text ("" when the last request succeeded)
    error = traitlets.Unicode("", read_only=True)
    queries = traitlets.List(read_only=True)
    #: id of the latest request for the main result (a front end can tag its own events with it)
    request_id = traitlets.Int(0, read_only=True)
    #: True while the refined (exact) answer for the shown approximate one is being computed
    refining = traitlets.Bool(False, read_only=True)
    #: the last :meth:`check_exact` report (empty before the first check)
    check = traitlets.Dict(read_only=True)

    def __init__(self, backend: InfluenceBackend, *, threaded: bool = True, full_scores: bool = True,
                 query_id: int | None = None, measurement: str | None = None, method: str | None = None,
                 damping: float | None = None, band: tuple[int, int] | None = None, k: int = 10,
                 prepare_cache_size: int = 64, thumb_cache_size: int = 4096, refine: bool = True):
        for attr in ("train_ids", "measurements", "methods", "search", "prepare", "scores"):
            if not hasattr(backend, attr):
                raise TypeError(f"backend {type(backend).__name__} lacks {attr!r}: it must implement "
                                "diffinfluence_widgets.backend.InfluenceBackend")
        super().__init__()
        self.backend = backend
        self.full_scores = full_scores
        self._worker = _Worker() if threaded else _Inline()
        self._lock = threading.RLock()  # guards the caches (worker thread + kernel thread)
        self._thumbs: "OrderedDict[tuple[int, int], bytes]" = OrderedDict()
        self._thumb_cache_size = thumb_cache_size
        self._query_thumbs: dict[tuple[int, int], bytes] = {}
        self._map: np.ndarray | None = None
        self._train_pos: dict[int, int] | None = None
        self._suspend = 0
        self.stats = {"prepare_calls": 0, "prepare_hits": 0, "search_calls": 0, "refine_calls": 0,
                      "refine_stale": 0}
        self._prepared = PreparedCache(prepare_cache_size, self.stats)
        #: show a refined (exact) answer after each approximate one, when the backend has ``refine``
        self.refine = bool(refine) and callable(getattr(backend, "refine", None))
        self._overlaps: dict[str, list[float]] = {}  # method -> overlaps of approximate vs refined answers

        qs = list(backend.queries())
        self.set_trait("queries", qs)
        method = method or backend.methods[0]
        with self.hold_updates():
            self.measurement = measurement or backend.measurements[0]
            self.method = method
            self.damping = float(damping if damping is not None else self.default_damping(method))
            self.band = tuple(band) if band else None
            self.k = k
            self.query_id = query_id if query_id is not None else (qs[0].id if qs else None)

    # ------------------------------------------------------------------ validation at the boundary
    @traitlets.validate("measurement")
    def _v_measurement(self, proposal):
        v = proposal["value"]
        if v not in self.backend.measurements:
            raise traitlets.TraitError(f"measurement {v!r} is not one of {list(self.backend.measurements)}")
        return v

    @traitlets.validate("method")
    def _v_method(self, proposal):
        v = proposal["value"]
        if v not in self.backend.methods:
            raise traitlets.TraitError(f"method {v!r} is not one of {list(self.backend.methods)}")
        return v

    @traitlets.validate("damping")
    def _v_damping(self, proposal):
        try:
            return check_damping(proposal["value"])
        except (TypeError, ValueError) as e:  # the one damping rule, reported as a trait error
            raise traitlets.TraitError(str(e)) from None

    @traitlets.validate("k")
    def _v_k(self, proposal):
        v = int(proposal["value"])
        n = len(self.backend.train_ids)
        if not 1 <= v <= n:
            raise traitlets.TraitError(f"k must be between 1 and the number of training images ({n}), got {v}")
        return v

    @traitlets.validate("band")
    def _v_band(self, proposal):
        v = proposal["value"]
        if v is None or len(v) == 0:
            return None
        v = (int(v[0]), int(v[1]))
        bands = [tuple(map(int, b)) for b in getattr(self.backend, "bands", [])]
        if v not in bands:
            raise traitlets.TraitError(f"band {v} is not one of the backend's bands {bands} (or None for all)")
        return v

    @traitlets.validate("query_id")
    def _v_query(self, proposal):
        v = proposal["value"]
        if v is None:
            return v
        if int(v) not in {q.id for q in self.queries}:
            raise traitlets.TraitError(f"query id {v} is not one of the session's queries "
                                       f"{[q.id for q in self.queries][:20]}")
        return int(v)

    @traitlets.observe("query_id", "measurement", "method", "damping", "band", "k")
    def _on_setting(self, change):
        if not self._suspend:
            self.refresh()

    # ------------------------------------------------------------------ settings
    def default_damping(self, method: str | None = None) -> float:
        d = getattr(self.backend, "default_damping", {}) or {}
        return float(d.get(method or self.method, 1e-3))

    def hold_updates(self):
        """Context manager: change several settings, then one request (``with s.hold_updates(): ...``)."""
        session = self

        class _Hold:
            def __enter__(self_):
                session._suspend += 1

            def __exit__(self_, *exc):
                session._suspend -= 1
                if not session._suspend and exc[0] is None:
                    session.refresh()

        return _Hold()

    def update(self, **settings) -> None:
        """Set several settings at once (one request): ``s.update(method="trak", damping=1e-2)``."""
        unknown = set(settings) - {"query_id", "measurement", "method", "damping", "band", "k"}
        if unknown:
            raise TypeError(f"unknown settings {sorted(unknown)}")
        with self.hold_updates():
            for name, value in settings.items():
                setattr(self, name, value)

    @property
    def settings(self) -> dict[str, Any]:
        return {"query_id": self.query_id, "measurement": self.measurement, "method": self.method,
                "damping": self.damping, "band": self.band, "k": self.k}

    def query(self, query_id: int | None = None) -> QueryItem:
        qid = self.query_id if query_id is None else int(query_id)
        for q in self.queries:
            if q.id == qid:
                return q
        raise KeyError(f"no query with id {qid}")

    # ------------------------------------------------------------------ backend work (worker thread)
    def prepared(self, query_id: int | None = None, measurement: str | None = None, method: str | None = None,
                 band: tuple[int, int] | None | str = "current") -> PreparedQuery:
        """``backend.prepare`` through the per-(query, measurement, method, band) cache. Blocking."""
        key = (self.query_id if query_id is None else int(query_id), measurement or self.measurement,
               method or self.method, self.band if band == "current" else (tuple(band) if band else None))
        with self._lock:
            hit = self._prepared.get(key)
        if hit is not None:
            return hit
        self.stats["prepare_calls"] += 1
        p = self.backend.prepare(key[0], key[1], key[2], key[3])
        with self._lock:
            self._prepared.put(key, p)
        return p

    def is_prepared(self, **settings) -> bool:
        s = {**self.settings, **settings}
        key = (s["query_id"], s["measurement"], s["method"], s["band"])
        with self._lock:
            return key in self._prepared

    def compute(self, request_id: int = 0, **settings) -> InfluenceResult:
        """The result for the current settings (overridden by ``settings``), computed now on this thread."""
        s = {**self.settings, **settings}
        if s["query_id"] is None:
            raise ValueError("no query selected (the backend listed no queries; generate one first)")
        t0 = time.perf_counter()
        p = self.prepared(s["query_id"], s["measurement"], s["method"], s["band"])
        self.stats["search_calls"] += 1
        r: SearchResult = self.backend.search(p, float(s["damping"]), int(s["k"]))
        all_scores = None
        if self.full_scores:
            all_scores = np.asarray(self.backend.scores(p, float(s["damping"])), dtype=np.float64)
        return result_from_search(r, s, request_id, time.perf_counter() - t0, self.backend.train_ids,
                                  est_recall=None if r.exact else self._est_recall(s["method"]), all_scores=all_scores)

    def refresh(self) -> int:
        """Schedule the result for the current settings; returns its request id."""
        settings = dict(self.settings)
        if settings["query_id"] is None:
            return self.request_id
        slow = not self.is_prepared()
        box: dict[str, int] = {}
        requested_at = time.time()

        def fn():
            if slow:
                self.set_trait("progress", f"preparing query {settings['query_id']} "
                                           f"({settings['measurement']}, {settings['method']})…")
            r = self.compute(request_id=box.get("rid", 0), **settings)
            r.requested_at, r.finished_at = requested_at, time.time()
            return r

        def done(rid, out, err):
            self._finish(rid, out, err)

        self.set_trait("busy", True)
        rid = box["rid"] = self._worker.submit("result", fn, done)
        if rid > self.request_id:  # (an inline refinement may already have shown a later request id)
            self.set_trait("request_id", rid)
        return rid

    def _finish(self, rid: int, out: InfluenceResult | None, err: BaseException | None) -> None:
        # the worker only calls this while ``rid`` is the latest "result" request; a newer one may start now
        will_refine = err is None and self.refine and not out.exact and self._worker.is_latest("result", rid)
        if will_refine:  # said before the approximate answer is shown: its refinement follows
            self.set_trait("refining", True)
        if err is not None:
            self.set_trait("error", error_text(err))
        else:
            out.request_id = rid
            self.set_trait("error", "")
            self.set_trait("result", out)
        if self._worker.is_latest("result", rid):
            self.set_trait("progress", "")
            self.set_trait("busy", False)
            if will_refine:
                self._schedule_refine(rid, out)

    def run_async(self, channel: str, fn: Callable[[], Any],
                  on_done: Callable[[Any], None], on_error: Callable[[BaseException], None] | None = None) -> int:
        """Run ``fn`` on the worker; call ``on_done(out)`` unless a newer request on ``channel`` was made."""
        def done(rid, out, err):
            if err is not None:
                (on_error or (lambda e: self.set_trait("error", error_text(e))))(err)
            else:
                on_done(out)
        return self._worker.submit(channel, fn, done)

    def wait(self, timeout: float | None = 60.0) -> InfluenceResult | None:
        """Block until all scheduled work is done (scripts and tests); returns the current result."""
        if not self._worker.wait(timeout):
            raise TimeoutError(f"session still busy after {timeout}s")
        return self.result

    def close(self) -> None:
        self._worker.close()

    # ------------------------------------------------------------------ images
    def thumbnails(self, ids: Sequence[int], size: int = THUMB_SIZE) -> list[bytes]:
        """PNG bytes of training images by id (cached per id)."""
        ids = [int(i) for i in ids]
        with self._lock:
            missing = [i for i in ids if (i, size) not in self._thumbs]
        if missing:
            imgs = np.asarray(self.backend.train_images(missing))
            with self._lock:
                for i, im in zip(missing, imgs):
                    self._thumbs[(i, size)] = to_png(im, size=size)
                while len(self._thumbs) > self._thumb_cache_size:
                    self._thumbs.popitem(last=False)
        with self._lock:
            out = []
            for i in ids:
                self._thumbs.move_to_end((i, size))
                out.append(self._thumbs[(i, size)])
            return out

    def query_thumbnail(self, query_id: int | None = None, size: int = THUMB_SIZE) -> bytes:
        q = self.query(query_id)
        key = (q.id, size)
        if key not in self._query_thumbs:
            self._query_thumbs[key] = to_png(q.image, size=size)
        return self._query_thumbs[key]

    # ------------------------------------------------------------------ queries
    def generate_query(self, seed: int, select: bool = True) -> QueryItem:
        """Sample a new query with this seed (blocking; widgets call it through :meth:`run_async`)."""
        q = self.backend.generate_query(int(seed))
        qs = [x for x in self.backend.queries()]
        if q.id not in {x.id for x in qs}:
            qs.append(q)
        self.set_trait("queries", qs)
        if select:
            self.query_id = q.id
        return q

    # ------------------------------------------------------------------ analyses for the plots
    def train_position(self, ids: Sequence[int]) -> np.ndarray:
        if self._train_pos is None:
            self._train_pos = {int(t): n for n, t in enumerate(np.asarray(self.backend.train_ids))}
        return np.array([self._train_pos[int(i)] for i in ids], dtype=np.int64)

    def scores(self, damping: float | None = None, **settings) -> np.ndarray:
        """All training scores (``train_ids`` order) at the current settings. Blocking."""
        s = {**self.settings, **settings}
        p = self.prepared(s["query_id"], s["measurement"], s["method"], s["band"])
        return np.asarray(self.backend.scores(p, float(self.damping if damping is None else damping)),
                          dtype=np.float64)

    def damping_sweep(self, dampings: Sequence[float] | None = None, k: int | None = None) -> SweepResult:
        """Ranks of the current top-k across dampings (default: 4 decades either side of the current). Blocking."""
        ref = float(self.damping)
        if dampings is None:
            dampings = ref * np.logspace(-4, 4, 17)
        return sweep_ranks(self.scores, ref, dampings, int(k or self.k), np.asarray(self.backend.train_ids))

    def band_profile(self, ids: Sequence[int] | None = None) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray]:
        """``(bands, ids, contributions [num_bands, len(ids)])`` for the current top proponents and opponents.

        Computed with ``band=None`` (all timesteps), so the contributions sum to the listed scores. Blocking.
        """
        bands = [tuple(map(int, b)) for b in getattr(self.backend, "bands", [])]
        if ids is None:
            r = self.result
            ids = [] if r is None else [i.id for i in [*r.proponents, *r.opponents]]
        ids = np.asarray(list(ids), dtype=np.int64)
        if not bands or len(ids) == 0:
            return bands, ids, np.zeros((len(bands), len(ids)))
        p = self.prepared(band=None)
        prof = np.asarray(self.backend.band_profile(p, float(self.damping), ids), dtype=np.float64)
        return bands, ids, prof

    def map_2d(self) -> np.ndarray:
        """``[N, 2]`` map of the projected training gradients (cached). Blocking."""
        if self._map is None:
            self._map = np.asarray(self.backend.map_2d(), dtype=np.float64)
        return self._map

    def map_query(self, query_id: int | None = None) -> np.ndarray | None:
        """``[2]``: the query's place on :meth:`map_2d` (``None`` when the backend cannot place it). Blocking."""
        fn = getattr(self.backend, "map_2d_query", None)
        return None if fn is None else np.asarray(fn(int(self.query_id if query_id is None else query_id)),
                                                  dtype=np.float64).reshape(2)

    def compare(self, method_a: str, method_b: str, damping_a: float | None = None,
                damping_b: float | None = None) -> CompareResult:
        """Two methods on the current query side by side (each at its own family's damping). Blocking."""
        def pick(method: str, given: float | None) -> float:
            if given is not None:
                return float(given)
            # λ means the same within a method family (same default); otherwise use that family's default
            same_family = method == self.method or self.default_damping(method) == self.default_damping()
            return float(self.damping if same_family else self.default_damping(method))

        da, db = pick(method_a, damping_a), pick(method_b, damping_b)
        ra = self.compute(method=method_a, damping=da)
        rb = self.compute(method=method_b, damping=db)
        sa = ra.all_scores if ra.all_scores is not None else self.scores(da, method=method_a)
        sb = rb.all_scores if rb.all_scores is not None else self.scores(db, method=method_b)
        rho, tau, ov = rank_agreement(sa, sb, self.k)
        return CompareResult(method_a, method_b, ra, rb, rho, tau, ov, int(self.k))

    # ------------------------------------------------------------------ export
    def export(self, path: str | Path) -> Path:
        """Write the current result; the format follows the suffix: .csv, .json, .html (card) or .png (card)."""
        path = Path(path)
        r = self.current_result()
        suffix = path.suffix.lower()
        if suffix == ".csv":
            r.to_csv(path)
        elif suffix == ".json":
            r.to_json(path)
        elif suffix in (".html", ".htm"):
            _atomic_write(path, self.html_card().encode())
        elif suffix == ".png":
            _atomic_write(path, self.png_card())
        else:
            raise ValueError(f"cannot export to {path.name!r}: use a .csv, .json, .html or .png file name")
        return path

    @property
    def result_is_current(self) -> bool:
        """Whether :attr:`result` answers the current settings (after a failed request it does not: it is stale)."""
        r = self.result
        return r is not None and _comparable(r.settings) == _comparable(self.settings)

    def current_result(self) -> InfluenceResult:
        """The result for the current settings, or a ``RuntimeError`` saying why there is none. A stale result (the
        last request failed, or a newer one is still running) is never passed off as the current one."""
        if self.result_is_current:
            return self.result
        want = _comparable(self.settings)
        why = (f"the last request failed ({self.error})" if self.error else
               "it is still being computed (session.wait())" if self.busy else "none was computed yet")
        held = "" if self.result is None else f"; the result held is for {_comparable(self.result.settings)}"
        raise RuntimeError(f"no result {'yet ' if self.result is None else ''}for the current settings {want}: "
                           f"{why}{held}")

    def html_card(self) -> str:
        """A self-contained HTML card of the current result (images embedded: a file, not a widget message)."""
        r = self.current_result()
        return html_card(r, self.query(r.query_id), self.query_thumbnail(r.query_id), self.thumbnails)

    def png_card(self, columns: int | None = None) -> bytes:
        """A PNG card of the current result drawn with Pillow (no browser needed)."""
        r = self.current_result()
        return png_card(r, self.query(r.query_id), self.query_thumbnail(r.query_id), self.thumbnails,
                        columns=columns, thumb_size=THUMB_SIZE)
