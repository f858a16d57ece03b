"""Refined answers of :class:`~diffinfluence_widgets.index.IndexBackend` (issue 9): the method's exact top-k, and
the instant first answers that an exact store makes possible.

K-FAC family with an exact store (``exact_over="all"``): exact over every training image (:mod:`.refine`: one
streamed pass per query, then any λ from the query's damping profile and a few rows; no training gradient).
Without one (datasets whose store would exceed ``IndexConfig.exact_max_bytes``; ``"candidates"``): exact scores of
a pool of FAISS candidates gathered once per query at every decade of λ (1e-14 … 1e2) and at the current λ, whose
rotated gradients are kept with the query, so a new λ computes no gradient either. TRAK family: the projected
search *is* the method's definition, so the flat index's answer is exact (``"all"``); IVF / HNSW answers are not.

Instant answers (:func:`instant`, the backend's ``search`` routes): with an exact store, the first answer for a
query and λ is not the projected FAISS search but, once the query has a damping profile, that profile's estimate
(``"profile"``: an ``[N, B]`` product), and before that a scan of the store's 8-bit copy over every training image
(``"int8"``, :mod:`~diffinfluence_widgets.store.quantised`: one pass over ``N × P`` bytes, exact per-coordinate
damping) whose best ``k + INSTANT_MARGIN`` per side are rescored from their exact rows (which the refinement then
finds in the row cache), so the listed scores are exact and only the membership of the top-k is approximate.
Neither is marked exact: the guarantee comes with the refined answer.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from ..backend import SearchResult
from ..influence import buffers
from ..influence.gradients import per_example_gradients
from ..influence.preconditioners.kfac import KFACPreconditioner
from ..store import StoreMismatchError
from ..store.exact import build_exact_store, curvature_basis_fingerprint
from ..store.quantised import build_quantised_store
from ..store.manifest import _json_bytes
from .refine import ExactScorer

__all__ = ["setup_exact", "refine", "instant", "exact_rotation", "RESCORE_POOL_BYTES", "ROUTES"]

#: memory for the rows of a query's candidate pool (no exact store)
RESCORE_POOL_BYTES = 512 << 20
#: how ``IndexBackend.search`` can answer: the damping profile's estimate, the 8-bit scan, the FAISS index
ROUTES = ("profile", "int8", "faiss")
#: candidates beyond k per side that the 8-bit scan's answer rescores from their exact rows
INSTANT_MARGIN = 10


def setup_exact(b) -> None:
    """Build / open the exact store of backend ``b`` when its config asks for one (``b.exact_store``, ``b._exact``)."""
    cfg = b.config
    b.exact_store, b._exact, b.quantised = None, {}, None
    kfac = [m for m, p in b.preconditioners.items() if isinstance(p, KFACPreconditioner)]
    size = len(b.train_ids) * b.curvature.num_parameters * (8 if cfg.exact_dtype == "float64" else 4)
    if not kfac or cfg.exact_store is False or (cfg.exact_store == "auto" and size > cfg.exact_max_bytes):
        return
    key = _json_bytes([b._model_fp, b.train.fingerprint(), curvature_basis_fingerprint(b.curvature), b.num_draws,
                       b.draw_seed, cfg.exact_dtype])
    path = b.cache_dir / "exact" / hashlib.sha256(key).hexdigest()[:12]
    b.exact_store = build_exact_store(path, b.model, b.train, b.curvature, num_draws=b.num_draws, seed=b.draw_seed,
                                      dtype=cfg.exact_dtype, batch_size=b.batch_size, device=b.device,
                                      progress=b.progress)
    if not np.array_equal(b.exact_store.ids, b.train_ids):
        raise StoreMismatchError(f"exact store {path} lists other training ids than the dataset")
    b._exact = {m: ExactScorer(b.exact_store, b.curvature, eigenvalues=m, num_bins=cfg.refine_bins) for m in kfac}
    if cfg.instant_scan:
        b.quantised = build_quantised_store(b.exact_store, progress=b.progress)


def instant(b, prepared, damping: float, k: int, route: str | None = None) -> SearchResult | None:
    """The instant answer of a K-FAC-family query with an exact store (``None``: use the FAISS index).

    ``route=None`` picks ``"profile"`` when the query has its damping profile, else ``"int8"`` when the store has
    its 8-bit copy, else ``"faiss"``; an explicit ``"profile"`` builds the profile when it is missing (one pass).
    ``"int8"`` lists exact scores of the scan's best candidates; ``"profile"`` lists the profile's estimates.
    """
    if route not in (None, *ROUTES):
        raise ValueError(f"route must be one of {ROUTES} or None, got {route!r}")
    p = prepared.payload
    sc = b._exact.get(prepared.method)
    if route == "faiss" or sc is None or p.exact_rot is None:
        if route not in (None, "faiss"):
            raise ValueError(f"route {route!r} needs an exact store and a K-FAC-family method; "
                             f"{prepared.method!r} here has none")
        return None
    if route is None:
        has_profile = p.exact_state is not None and p.exact_state.profile_p is not None
        route = "profile" if has_profile else "int8" if b.quantised is not None else "faiss"
        if route == "faiss":
            return None
    if route == "int8" and b.quantised is None:
        raise ValueError("route 'int8' needs the exact store's 8-bit copy (IndexConfig.instant_scan=True)")
    lam = float(damping)
    with sc._lock:
        if p.exact_state is None:
            p.exact_state = sc.query(p.exact_rot)
        q = p.exact_state
        if route == "profile":
            sc.profile(q)
            est, _ = sc.bounds(q, lam)
        else:  # the scan's best k + INSTANT_MARGIN per side, rescored from their exact rows
            est = b.quantised.scan(q.u.numpy() / (sc.lam + sc._check(lam)))
            n, m = len(est), min(len(est), int(k) + INSTANT_MARGIN)
            pos = np.unique(np.concatenate([np.argpartition(-est, m - 1)[:m], np.argpartition(est, m - 1)[:m]]))
            est = np.full(n, np.nan)
            est[pos] = sc.scores_at(q, lam, pos)
    pos = np.flatnonzero(~np.isnan(est))
    k = min(int(k), len(pos))
    top = pos[np.lexsort((pos, -est[pos]))[:k]]
    bot = pos[np.lexsort((pos, est[pos]))[:k]]
    ids = b.exact_store.ids
    return SearchResult(ids[top], est[top], ids[bot], est[bot], lam, exact=False, stats={"route": route})


def exact_rotation(b, pre, stacked) -> dict | None:
    """The whole query (row 0) in the eigenbasis, float64 and unscaled (K-FAC family; else None)."""
    if not isinstance(pre, KFACPreconditioner):
        return None
    return b.curvature.rotate({n: stacked[n][0].double() for n in b.layer_names})


def refine(b, prepared, damping: float, k: int) -> SearchResult:
    """See the module docs; ``b`` is the backend."""
    lam = float(damping)
    if not (lam > 0) or not math.isfinite(lam):
        raise ValueError(f"damping must be a finite number > 0, got {damping!r}")
    p = prepared.payload
    if p.exact_rot is None:  # TRAK family (defined in the projected space), identity
        r = b.search(prepared, lam, k)
        r.exact = b.index_kind == "flat" and not p.pre.exact
        r.exact_over = "all" if r.exact else ""
        return r
    if prepared.method in b._exact:
        sc = b._exact[prepared.method]
        if p.exact_state is None:
            p.exact_state = sc.query(p.exact_rot)
        t = sc.top_k(p.exact_state, lam, k)
        ids = b.exact_store.ids
        return SearchResult(ids[t.proponents], t.proponent_scores, ids[t.opponents], t.opponent_scores, lam,
                            exact=True, exact_over="all", stats={"candidates": t.candidates, "streamed": t.streamed})
    if p.exact_state is None:
        p.exact_state = _candidate_pool(b, prepared, lam, k)
    pool_ids, rows = p.exact_state
    eng = p.pre.engine
    u = torch.cat([(p.exact_rot[n] / (eng.lam[n].double() + lam)).reshape(-1) for n in b.layer_names])
    s = (rows.double() @ u).numpy()
    order = np.lexsort((pool_ids, -s))[: int(k)]
    rev = np.lexsort((pool_ids, s))[: int(k)]
    return SearchResult(pool_ids[order], s[order], pool_ids[rev], s[rev], lam, exact=True, exact_over="candidates",
                        stats={"candidates": len(pool_ids), "streamed": False})


def _candidate_pool(b, prepared, damping: float, k: int):
    """``(ids, [M, P] rotated training gradients)`` of the FAISS candidates of every decade of λ."""
    p = prepared.payload
    per_row = 4 * b.curvature.num_parameters
    grid = [float(damping)] + [10.0 ** e for e in range(-14, 3)]
    m = max(int(k), b.rescore_candidates or 20)
    m = max(int(k), min(m, RESCORE_POOL_BYTES // max(per_row * 2 * len(grid), 1)))  # the rows must fit
    pool: dict[int, None] = {}
    for lam in grid:
        q = b._query_features(prepared, lam)[0]
        pi, _, oi, _ = b._index[b._array(p, lam)].proponents_opponents(q, m)
        pool.update(dict.fromkeys(int(i) for i in np.concatenate([pi, oi])))
    ids = np.array(list(pool), dtype=np.int64)
    rows = []
    for a in range(0, len(ids), b.batch_size):
        part = ids[a:a + b.batch_size].tolist()
        pos = [b._train_pos[i] for i in part]
        g = per_example_gradients(b.model, b.train.images[pos], part, "loss", num_draws=b.num_draws,
                                  seed=b.draw_seed, batch_size=b.batch_size, device=b.device)
        rot = b.curvature.rotate({n: g.layers[n].to("cpu", torch.float64) for n in b.layer_names})
        rows.append(torch.cat([rot[n].reshape(len(part), -1) for n in b.layer_names], 1).float())
        del g, rot
    buffers.clear()  # a serving process keeps no idle gradient memory between requests
    return ids, torch.cat(rows)
