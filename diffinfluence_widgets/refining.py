"""The session's second stage (issue 9): after each approximate answer, the method's exact one.

:class:`RefiningMixin` is part of :class:`~diffinfluence_widgets.session.AttributionSession`. When a backend has
``refine(prepared, damping, k)`` (the method's exact top-k, e.g.
:meth:`~diffinfluence_widgets.index.IndexBackend.refine`), every approximate result is followed by a refined one
on the worker's ``"refine"`` channel; it is shown only if no newer request was made and the settings are still the
ones it was computed for, so a refined answer for stale settings never reaches the widgets. The overlap of each
approximate answer with its refinement feeds the "est. recall" of later approximate answers (per method).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from .backend import SearchResult
from .results import InfluenceResult, result_from_search

__all__ = ["RefiningMixin"]


class RefiningMixin:
    """Two-stage answers for :class:`~diffinfluence_widgets.session.AttributionSession` (needs its ``backend``,
    ``_worker``, ``_lock``, ``stats``, ``settings``, ``prepared``, ``current_result`` and the ``result``,
    ``request_id``, ``refining``, ``check`` and ``error`` traits)."""

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
        return result_from_search(r, s, request_id, time.perf_counter() - t0, self.backend.train_ids)

    def check_exact(self) -> dict[str, Any]:
        """Check the shown top-k against the method's exact top-k at the same settings (blocking): the overlap per
        side. Also sets :attr:`check`."""
        r = self.current_result()
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

    def _schedule_refine(self, parent: int, raw: InfluenceResult) -> None:
        """Second stage: compute the exact answer for ``raw``'s settings; show it only if nothing changed since."""
        settings = {"query_id": raw.query_id, "measurement": raw.measurement, "method": raw.method,
                    "band": raw.band, "damping": raw.damping, "k": raw.k}

        def fn():
            if not self._worker.is_latest("result", parent) or self.settings != settings:
                return None  # already stale: skip the work
            return self.compute_refined(**settings)

        def done(rid, out, err):
            last = self._worker.is_latest("refine", rid)
            stale = not self._worker.is_latest("result", parent) or self.settings != settings
            if err is not None:
                if not stale:
                    self.set_trait("error", str(err) if getattr(err, "plain", False)  # e.g. the backend stopped
                                   else f"refining failed: {type(err).__name__}: {err}")
            elif out is None or stale:  # a newer request exists: this answer belongs to settings no longer shown
                self.stats["refine_stale"] += 1
            else:
                if last:  # said before the refined answer is shown, so observers see the final state with it
                    self.set_trait("refining", False)
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
            if last:
                self.set_trait("refining", False)

        self.set_trait("refining", True)
        self._worker.submit("refine", fn, done)

