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

import csv
import html
import io
import json
import math
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import traitlets

from ._io import atomic_write_bytes as _atomic_write
from .backend import SIGN_CONVENTION, InfluenceBackend, PreparedQuery, QueryItem, SearchResult

__all__ = ["AttributionSession", "InfluenceResult", "Influence", "CompareResult", "SweepResult",
           "to_png", "rank_agreement", "SIGN_CONVENTION"]

#: thumbnail edge in pixels (nearest-neighbour upscale of small images so they stay crisp)
THUMB_SIZE = 64


# ----------------------------------------------------------------------------------------------- images
def to_png(image: np.ndarray, size: int | None = THUMB_SIZE) -> bytes:
    """PNG bytes of one image ``[C, H, W]`` (or ``[H, W]``) with values in ``[-1, 1]``.

    ``size`` upscales with nearest neighbour to roughly ``size`` pixels on the longer edge (whole multiples only, so
    pixels stay square); ``None`` keeps the native size.
    """
    from PIL import Image

    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 3:
        x = x[0] if x.shape[0] == 1 else np.transpose(x, (1, 2, 0))
    if x.ndim not in (2, 3):
        raise ValueError(f"image must be [C, H, W] or [H, W], got shape {np.asarray(image).shape}")
    u8 = np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
    img = Image.fromarray(u8, mode="L" if u8.ndim == 2 else "RGB")
    if size:
        f = max(1, int(size) // max(img.size))
        if f > 1:
            img = img.resize((img.size[0] * f, img.size[1] * f), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Influence:
    """One training image in a top-k list."""

    id: int
    score: float
    rank: int  # 1-based within its list
    role: str  # "proponent" | "opponent"


@dataclass
class InfluenceResult:
    """The answer for one setting of the session (scores in :data:`SIGN_CONVENTION`)."""

    request_id: int
    query_id: int
    measurement: str
    method: str
    band: tuple[int, int] | None
    damping: float
    k: int
    proponents: list[Influence]
    opponents: list[Influence]
    exact: bool = False
    #: what an exact answer ranked: every training image (``"all"``) or the index's candidates (``"candidates"``)
    exact_over: str = ""
    #: for an approximate answer: the mean overlap of earlier approximate answers with their refined ones
    #: (this session, this method), or None before the first refinement
    est_recall: float | None = None
    elapsed_s: float = 0.0
    #: scores of every training example in ``train_ids`` order, when the session asked for them
    all_scores: np.ndarray | None = field(default=None, repr=False)
    train_ids: np.ndarray | None = field(default=None, repr=False)
    #: wall-clock times (``time.time()``) when the request was made and when its answer was ready (diagnostics)
    requested_at: float = 0.0
    finished_at: float = 0.0

    @property
    def settings(self) -> dict[str, Any]:
        return {"query_id": self.query_id, "measurement": self.measurement, "method": self.method,
                "band": list(self.band) if self.band else None, "damping": self.damping, "k": self.k}

    @property
    def badge(self) -> str:
        """``"exact ✓"`` or ``"approximate (est. recall …)"``: what the gallery marks the answer as."""
        if self.exact:
            return "exact ✓" if self.exact_over != "candidates" else "exact ✓ (over the index's candidates)"
        return "approximate" + (f" (est. recall {self.est_recall:.2f})" if self.est_recall is not None else "")

    def records(self) -> list[dict[str, Any]]:
        """One row per listed training image (proponents first), with the settings repeated."""
        rows = []
        for inf in [*self.proponents, *self.opponents]:
            rows.append({"role": inf.role, "rank": inf.rank, "train_id": inf.id, "score": inf.score,
                         "query_id": self.query_id, "measurement": self.measurement, "method": self.method,
                         "band": "" if self.band is None else f"{self.band[0]}-{self.band[1]}",
                         "damping": self.damping})
        return rows

    def to_csv(self, path: str | Path | None = None) -> str:
        buf = io.StringIO()
        rows = self.records()
        fields = ["role", "rank", "train_id", "score", "query_id", "measurement", "method", "band", "damping"]
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "score": repr(float(r["score"])), "damping": repr(float(r["damping"]))})
        text = buf.getvalue()
        if path is not None:
            _atomic_write(Path(path), text.encode())
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "sign_convention": SIGN_CONVENTION, "exact": self.exact,
                "proponents": [asdict(p) for p in self.proponents],
                "opponents": [asdict(o) for o in self.opponents]}

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            _atomic_write(Path(path), text.encode())
        return text


@dataclass
class SweepResult:
    """Rank stability across a damping sweep: where the top-k at the reference damping rank at other dampings."""

    dampings: np.ndarray  # [D]
    reference_damping: float
    ids: np.ndarray  # [k] top proponents at the reference damping
    ranks: np.ndarray  # [D, k] 1-based rank of each id among all training images (by descending score)
    overlap: np.ndarray  # [D] |top-k(λ) ∩ top-k(ref)| / k
    spearman: np.ndarray  # [D] Spearman of all scores at λ vs the reference


@dataclass
class CompareResult:
    """Two methods on the same query: their top-k and how much they agree."""

    method_a: str
    method_b: str
    result_a: InfluenceResult
    result_b: InfluenceResult
    spearman: float
    kendall: float
    topk_overlap: float  # |top-k proponents A ∩ B| / k
    k: int


def rank_agreement(a: np.ndarray, b: np.ndarray, k: int) -> tuple[float, float, float]:
    """Spearman and Kendall correlation of two score vectors and the overlap of their top-k (by descending score)."""
    from scipy import stats

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"score vectors must have the same shape, got {a.shape} and {b.shape}")
    rho = float(stats.spearmanr(a, b).statistic) if a.size > 1 else float("nan")
    tau = float(stats.kendalltau(a, b).statistic) if a.size > 1 else float("nan")
    k = max(1, min(int(k), a.size))
    ta = set(np.argsort(-a, kind="stable")[:k].tolist())
    tb = set(np.argsort(-b, kind="stable")[:k].tolist())
    return rho, tau, len(ta & tb) / k


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


# ----------------------------------------------------------------------------------------------- session
class AttributionSession(traitlets.HasTraits):
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
        self._prepared: "OrderedDict[tuple, PreparedQuery]" = OrderedDict()
        self._prepare_cache_size = prepare_cache_size
        self._thumbs: "OrderedDict[tuple[int, int], bytes]" = OrderedDict()
        self._thumb_cache_size = thumb_cache_size
        self._query_thumbs: dict[tuple[int, int], bytes] = {}
        self._map: np.ndarray | None = None
        self._train_pos: dict[int, int] | None = None
        self._suspend = 0
        self.stats = {"prepare_calls": 0, "prepare_hits": 0, "search_calls": 0, "refine_calls": 0,
                      "refine_stale": 0}
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
        v = float(proposal["value"])
        if not (math.isfinite(v) and v > 0):
            raise traitlets.TraitError(f"damping must be a positive finite number, got {v!r}")
        return v

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
                self._prepared.move_to_end(key)
                self.stats["prepare_hits"] += 1
                return hit
        self.stats["prepare_calls"] += 1
        p = self.backend.prepare(key[0], key[1], key[2], key[3])
        with self._lock:
            self._prepared[key] = p
            while len(self._prepared) > self._prepare_cache_size:
                self._prepared.popitem(last=False)
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
        pro = [Influence(int(i), float(v), n + 1, "proponent")
               for n, (i, v) in enumerate(zip(np.asarray(r.proponent_ids), np.asarray(r.proponent_scores)))]
        opp = [Influence(int(i), float(v), n + 1, "opponent")
               for n, (i, v) in enumerate(zip(np.asarray(r.opponent_ids), np.asarray(r.opponent_scores)))]
        return InfluenceResult(request_id=request_id, query_id=s["query_id"], measurement=s["measurement"],
                               method=s["method"], band=s["band"], damping=float(s["damping"]), k=int(s["k"]),
                               proponents=pro, opponents=opp, exact=bool(r.exact),
                               exact_over=str(getattr(r, "exact_over", "")),
                               est_recall=None if r.exact else self._est_recall(s["method"]),
                               elapsed_s=time.perf_counter() - t0, all_scores=all_scores,
                               train_ids=np.asarray(self.backend.train_ids))

    def _est_recall(self, method: str) -> float | None:
        with self._lock:
            seen = self._overlaps.get(method)
            return float(np.mean(seen)) if seen else None

    def compute_refined(self, request_id: int = 0, **settings) -> InfluenceResult:
        """The refined answer (``backend.refine``: the method's exact top-k) for the current settings (overridden
        by ``settings``), computed now on this thread. Scores of all examples are not fetched again."""
        if not callable(getattr(self.backend, "refine", None)):
            raise TypeError(f"backend {type(self.backend).__name__} has no refine(): no exact answers")
        s = {**self.settings, **settings}
        if s["query_id"] is None:
            raise ValueError("no query selected (the backend listed no queries; generate one first)")
        t0 = time.perf_counter()
        p = self.prepared(s["query_id"], s["measurement"], s["method"], s["band"])
        self.stats["refine_calls"] += 1
        r: SearchResult = self.backend.refine(p, float(s["damping"]), int(s["k"]))
        pro = [Influence(int(i), float(v), n + 1, "proponent")
               for n, (i, v) in enumerate(zip(np.asarray(r.proponent_ids), np.asarray(r.proponent_scores)))]
        opp = [Influence(int(i), float(v), n + 1, "opponent")
               for n, (i, v) in enumerate(zip(np.asarray(r.opponent_ids), np.asarray(r.opponent_scores)))]
        return InfluenceResult(request_id=request_id, query_id=s["query_id"], measurement=s["measurement"],
                               method=s["method"], band=s["band"], damping=float(s["damping"]), k=int(s["k"]),
                               proponents=pro, opponents=opp, exact=bool(r.exact),
                               exact_over=str(getattr(r, "exact_over", "")),
                               elapsed_s=time.perf_counter() - t0, train_ids=np.asarray(self.backend.train_ids))

    def check_exact(self) -> dict[str, Any]:
        """Check the shown top-k against the method's exact top-k at the same settings (blocking): the overlap per
        side. Also sets :attr:`check`."""
        r = self._need_result()
        ex = self.compute_refined(query_id=r.query_id, measurement=r.measurement, method=r.method, band=r.band,
                                  damping=r.damping, k=r.k)
        out: dict[str, Any] = {"settings": r.settings, "shown_exact": r.exact, "exact_over": ex.exact_over,
                               "k": r.k}
        for side in ("proponents", "opponents"):
            shown = [i.id for i in getattr(r, side)]
            exact = [i.id for i in getattr(ex, side)]
            out[side] = {"overlap": len(set(shown) & set(exact)), "of": len(exact),
                         "identical": shown == exact, "missing": [i for i in exact if i not in shown]}
        self.set_trait("check", out)
        return out

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
        if err is not None:
            self.set_trait("error", f"{type(err).__name__}: {err}")
        else:
            out.request_id = rid
            self.set_trait("error", "")
            self.set_trait("result", out)
        if self._worker.is_latest("result", rid):
            self.set_trait("progress", "")
            self.set_trait("busy", False)
            if err is None and self.refine and not out.exact:
                self._schedule_refine(rid, out)

    def _schedule_refine(self, parent: int, raw: InfluenceResult) -> None:
        """Second stage: compute the exact answer for ``raw``'s settings; show it only if nothing changed since."""
        settings = {"query_id": raw.query_id, "measurement": raw.measurement, "method": raw.method,
                    "band": raw.band, "damping": raw.damping, "k": raw.k}

        def fn():
            if not self._worker.is_latest("result", parent) or self.settings != settings:
                return None  # already stale: skip the work
            return self.compute_refined(**settings)

        def done(rid, out, err):
            stale = out is None or not self._worker.is_latest("result", parent) or self.settings != settings
            if err is not None:
                if not stale:
                    self.set_trait("error", f"refining failed: {type(err).__name__}: {err}")
            elif stale:  # a newer request exists: this answer belongs to settings no longer shown
                self.stats["refine_stale"] += 1
            else:
                pro = {i.id for i in raw.proponents} | {-1 - i.id for i in raw.opponents}
                ex = {i.id for i in out.proponents} | {-1 - i.id for i in out.opponents}
                with self._lock:
                    seen = self._overlaps.setdefault(raw.method, [])
                    seen.append(len(pro & ex) / max(len(ex), 1))
                    del seen[:-50]
                out.request_id = rid
                out.all_scores, out.requested_at, out.finished_at = raw.all_scores, raw.requested_at, time.time()
                self.set_trait("request_id", rid)
                self.set_trait("result", out)
            if self._worker.is_latest("refine", rid):
                self.set_trait("refining", False)

        self.set_trait("refining", True)
        self._worker.submit("refine", fn, done)

    def run_async(self, channel: str, fn: Callable[[], Any],
                  on_done: Callable[[Any], None], on_error: Callable[[BaseException], None] | None = None) -> int:
        """Run ``fn`` on the worker; call ``on_done(out)`` unless a newer request on ``channel`` was made."""
        def done(rid, out, err):
            if err is not None:
                (on_error or (lambda e: self.set_trait("error", f"{type(e).__name__}: {e}")))(err)
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
                    self._thumbs[(i, size)] = to_png(im, size)
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
            self._query_thumbs[key] = to_png(q.image, size)
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
        dampings = np.asarray(sorted(float(d) for d in dampings), dtype=np.float64)
        k = int(k or self.k)
        s_ref = self.scores(ref)
        top = np.argsort(-s_ref, kind="stable")[:k]
        ranks = np.zeros((len(dampings), len(top)), dtype=np.int64)
        overlap = np.zeros(len(dampings))
        rho = np.zeros(len(dampings))
        from scipy import stats
        for n, d in enumerate(dampings):
            s = self.scores(d)
            order = np.argsort(-s, kind="stable")
            rank_of = np.empty_like(order)
            rank_of[order] = np.arange(1, len(order) + 1)
            ranks[n] = rank_of[top]
            overlap[n] = len(set(order[:k].tolist()) & set(top.tolist())) / k
            rho[n] = float(stats.spearmanr(s, s_ref).statistic)
        ids = np.asarray(self.backend.train_ids)[top]
        return SweepResult(dampings=dampings, reference_damping=ref, ids=ids, ranks=ranks, overlap=overlap,
                           spearman=rho)

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
        r = self._need_result()
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

    def _need_result(self) -> InfluenceResult:
        r = self.result
        if r is None:
            raise RuntimeError("no result yet: pick a query (and wait for the session) before exporting")
        return r

    def html_card(self) -> str:
        """A self-contained HTML card of the current result (images embedded: a file, not a widget message)."""
        import base64

        r = self._need_result()

        def img(png: bytes, alt: str) -> str:
            return (f'<img alt="{html.escape(alt)}" width="64" height="64" style="image-rendering:pixelated" '
                    f'src="data:image/png;base64,{base64.b64encode(png).decode()}">')

        def row(title: str, items: list[Influence]) -> str:
            thumbs = self.thumbnails([i.id for i in items])
            cells = "".join(f'<figure style="margin:4px;text-align:center">{img(t, f"{title} {i.rank}: train {i.id}")}'
                            f'<figcaption style="font:11px monospace">#{i.id}<br>{i.score:+.3e}</figcaption></figure>'
                            for i, t in zip(items, thumbs))
            return f'<h3>{html.escape(title)}</h3><div style="display:flex;flex-wrap:wrap">{cells}</div>'

        q = self.query(r.query_id)
        s = r.settings
        head = (f"query {q.id} ({html.escape(q.kind)}{', ' + html.escape(q.label) if q.label else ''}) · "
                f"measurement {html.escape(s['measurement'])} · method {html.escape(s['method'])} · "
                f"damping {s['damping']:.3g} · band {s['band'] or 'all timesteps'}")
        return ("<!doctype html><html><head><meta charset='utf-8'><title>Influence card</title></head>"
                "<body style='font-family:sans-serif;max-width:900px'>"
                f"<h2>Which training images made the model generate this?</h2>"
                f"<div style='display:flex;gap:12px;align-items:center'>"
                f"{img(self.query_thumbnail(q.id), f'query {q.id}')}<p>{head}</p></div>"
                f"<p><em>{html.escape(SIGN_CONVENTION)}</em></p>"
                f"{row('Proponents', r.proponents)}{row('Opponents', r.opponents)}</body></html>")

    def png_card(self, columns: int | None = None) -> bytes:
        """A PNG card of the current result drawn with Pillow (no browser needed)."""
        from PIL import Image, ImageDraw

        r = self._need_result()
        t = THUMB_SIZE
        cols = columns or max(len(r.proponents), len(r.opponents), 1)
        cell_w, cell_h = t + 16, t + 30
        width = max(16 + cols * cell_w, 520)
        height = 100 + 2 * (cell_h + 22) + 10
        card = Image.new("RGB", (width, height), "white")
        d = ImageDraw.Draw(card)
        q = self.query(r.query_id)
        card.paste(Image.open(io.BytesIO(self.query_thumbnail(q.id))).convert("RGB"), (8, 8))
        s = r.settings
        d.text((t + 20, 10), f"query {q.id} ({q.kind})  measurement {s['measurement']}  method {s['method']}",
               fill="black")
        d.text((t + 20, 26), f"damping {s['damping']:.3g}  band {s['band'] or 'all'}  k {s['k']}", fill="black")
        d.text((t + 20, 42), "positive score: removing it is predicted to increase the query's", fill="#444")
        d.text((t + 20, 56), "measurement (a proponent); negative: an opponent", fill="#444")
        y = 90
        for title, items, colour in (("proponents", r.proponents, "#b2182b"), ("opponents", r.opponents, "#2166ac")):
            d.text((8, y), title, fill=colour)
            y += 16
            for n, (inf, png) in enumerate(zip(items[:cols], self.thumbnails([i.id for i in items[:cols]]))):
                x = 8 + n * cell_w
                card.paste(Image.open(io.BytesIO(png)).convert("RGB"), (x, y))
                d.text((x, y + t + 2), f"#{inf.id}", fill="black")
                d.text((x, y + t + 14), f"{inf.score:+.2e}", fill=colour)
            y += cell_h + 6
        buf = io.BytesIO()
        card.save(buf, format="PNG")
        return buf.getvalue()
