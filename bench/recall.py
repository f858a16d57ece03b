"""Recall of the explorer's answers against the method's exact scores, across the damping slider (issue 9).

For the shipped demo config (or ``--config tiny``), for each query, each K-FAC-family method and every decade of
the damping slider's range (the range :class:`~diffinfluence_widgets.widgets.controls.Controls` shows), prints
recall@10 against exact scores for proponents and opponents of:

- **raw**: the instant first answer for a new setting, as the explorer gets it (``IndexBackend.search``): the
  8-bit scan of every training image (``route="int8"``) for a query without a damping profile, the profile's
  estimate after the query's first refinement (``"profile"``: an ``[N, B]`` product, no pass over the store);
- **int8 scan**: the 8-bit scan at *every* λ (what a new query opened at that λ gets first);
- **FAISS**: the projected search (``route="faiss"``; the instant answer where there is no exact store);
- **refined**: ``IndexBackend.refine``, the answer the explorer finally shows.

``raw_min`` is the minimum over the raw answers and the 8-bit scans at every λ.

The exact reference is computed here independently of the exact store and of :mod:`diffinfluence_widgets.refine`:
one pass of full training gradients with the store's draws, rotated into the eigenbasis in float64 and kept in
memory, and ``Σ_i u_i r_ji / (Λ_i + λ)`` in float64. Refine latency: the first refine of a query (one streamed pass
over the exact store) and every later one (a damping change); the query-side gradient (``prepare``) and the
process's memory growth during a pass are printed separately. Each method is swept over its own slider range
(``Controls._range``). One thread. The last line is
``RECALL raw_min=<x> refined_min=<y> refine_median_ms=<z>`` (min over λ, sides, queries and methods; the median
over damping changes).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss() -> int:
    """Resident set size of this process now (bytes), from /proc (0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def recall(found, exact) -> float:
    return len(set(map(int, found)) & set(map(int, exact))) / max(len(exact), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="demo", choices=["demo", "tiny"])
    ap.add_argument("--cache", default=None, help="parent of the demo cache folders (default $DIFFINFLUENCE_CACHE)")
    ap.add_argument("--queries", type=int, default=8, help="queries (held-out first, then generated)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--methods", default="ekfac,kfac")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import faiss

    faiss.omp_set_num_threads(1)
    from diffinfluence_widgets.demo import default_cache_dir, load_or_build_demo
    from diffinfluence_widgets.influence.gradients import per_example_gradients
    from diffinfluence_widgets.index.refine import flat_eigenvalues
    from diffinfluence_widgets.widgets.controls import DECADES_ABOVE, DECADES_BELOW
    from diffinfluence_widgets.widgets.reading import NOISE_BELOW, curvature_scale

    if args.cache:
        os.environ["DIFFINFLUENCE_CACHE"] = args.cache
    t0 = time.perf_counter()
    b = load_or_build_demo(args.config, default_cache_dir(args.config), progress=False, threads=1)
    print(f"backend ready in {time.perf_counter() - t0:.1f} s ({args.config}: N = {len(b.train_ids)}, "
          f"P = {b.curvature.num_parameters}, k = {b.projector.k}, S = {b.num_draws} training draws, "
          f"{b.query_num_draws} query draws)")
    st = b.exact_store
    if st is None:
        raise SystemExit("the backend has no exact store (exact_store=False or too large)")
    sc0 = next(iter(b._exact.values()))
    print(f"exact store: {st.bytes_per_example} B per training image on disk ({st.settings['dtype']}), "
          f"{len(st) * st.bytes_per_example / 2**20:.0f} MiB in all; damping profile: {sc0.num_bins} bins, "
          f"{24 * sc0.num_bins} B per training image and refined query in memory")
    methods = [m for m in args.methods.split(",") if m in b.methods]

    def slider_decades(m: str) -> list[int]:
        """The explorer's slider range for method m (``Controls._range``): a decade below the noise boundary
        1e-6 τ (or the default) to two above τ (or the default)."""
        d, tau = b.default_damping[m], curvature_scale(b, m)
        lows = [math.log10(d)] + ([math.log10(NOISE_BELOW * tau)] if tau else [])
        highs = [math.log10(d)] + ([math.log10(tau)] if tau else [])
        return list(range(math.floor(min(lows)) - DECADES_BELOW, math.ceil(max(highs)) + DECADES_ABOVE + 1))

    qs = [q for q in b.queries() if q.kind == "heldout"] + [q for q in b.queries() if q.kind == "generated"]
    qs = qs[: args.queries]
    for m in methods:
        ds = slider_decades(m)
        print(f"slider range of {m}: 1e{ds[0]} … 1e{ds[-1]} ({len(ds)} decades; τ = {curvature_scale(b, m)})")
    print(f"{len(qs)} queries, methods {methods}, k = {args.k}")

    # ---- exact reference, independent of the exact store: full gradients, rotated in float64, in memory
    t1 = time.perf_counter()
    names = b.layer_names
    rows = []
    for a in range(0, len(b.train_ids), b.batch_size):
        pos = list(range(a, min(len(b.train_ids), a + b.batch_size)))
        ids = [int(b.train_ids[p]) for p in pos]
        g = per_example_gradients(b.model, b.train.images[pos], ids, "loss", num_draws=b.num_draws,
                                  seed=b.draw_seed, batch_size=b.batch_size)
        rot = b.curvature.rotate({n: g.layers[n].double() for n in names})
        rows.append(torch.cat([rot[n].reshape(len(pos), -1) for n in names], 1))
    R = torch.cat(rows)  # [N, P] float64
    print(f"reference gradients: {time.perf_counter() - t1:.1f} s ({R.numel() * 8 / 2**30:.2f} GiB float64)")

    raw_min, ref_min, prof_min, int8_min, faiss_min = 1.0, 1.0, 1.0, 1.0, 1.0
    first_ms, change_ms, prepare_ms, rss_growth, scan_ms, raw_ms = [], [], [], [], [], []
    routes = {}
    table = {}  # (method, decade) -> lists
    for q in qs:
        for m in methods:
            t = time.perf_counter()
            p = b.prepare(q.id, "loss", m)  # the query-side gradient (and its rotation): part of a new query
            prepare_ms.append((time.perf_counter() - t) * 1e3)
            u = torch.cat([p.payload.exact_rot[n].reshape(-1) for n in names]).double()
            lam_vec = torch.from_numpy(flat_eigenvalues(b.curvature, m))
            default = b.default_damping[m]
            dampings = [10.0 ** e for e in slider_decades(m)]
            order = [default] + [d for d in dampings if d != default]  # the explorer opens at the default
            for i, lam in enumerate(order):
                exact = (R @ (u / (lam_vec + lam))).numpy()
                n = len(exact)
                e_pro = np.lexsort((np.arange(n), -exact))[: args.k]
                e_opp = np.lexsort((np.arange(n), exact))[: args.k]
                t = time.perf_counter()
                raw = b.search(p, lam, args.k)  # what the explorer shows first
                raw_ms.append((time.perf_counter() - t) * 1e3)
                routes[raw.stats.get("route")] = routes.get(raw.stats.get("route"), 0) + 1
                t = time.perf_counter()
                scan = b.search(p, lam, args.k, "int8") if b.quantised is not None else None
                scan_ms.append((time.perf_counter() - t) * 1e3)
                faiss_r = b.search(p, lam, args.k, "faiss")
                prof = None
                if p.payload.exact_state is not None and p.payload.exact_state.profile_p is not None:
                    prof = b.search(p, lam, args.k, "profile")
                rss0 = _rss()
                t = time.perf_counter()
                ref = b.refine(p, lam, args.k)
                ms = (time.perf_counter() - t) * 1e3
                if i == 0:
                    rss_growth.append(_rss() - rss0)
                (first_ms if i == 0 else change_ms).append(ms)
                pos = st.positions

                def rec(r):
                    return [recall(pos(r.proponent_ids), e_pro), recall(pos(r.opponent_ids), e_opp)]
                r = rec(raw) + rec(ref) + rec(faiss_r) + (rec(scan) if scan is not None else [np.nan] * 2)
                r += rec(prof) if prof is not None else [np.nan] * 2
                raw_min, ref_min = min(raw_min, r[0], r[1]), min(ref_min, r[2], r[3])
                faiss_min = min(faiss_min, r[4], r[5])
                if scan is not None:
                    int8_min = min(int8_min, r[6], r[7])
                if prof is not None:
                    prof_min = min(prof_min, r[8], r[9])
                ok = np.allclose(ref.proponent_scores, exact[e_pro], rtol=1e-4, atol=1e-7 * np.abs(exact).max())
                cell = table.setdefault((m, round(math.log10(lam))), [])
                cell.append(r + [ref.stats.get("candidates", -1), float(ok)])
    print()
    print("| method | λ | raw (as shown) prop / opp | 8-bit scan prop / opp | FAISS prop / opp | "
          "profile estimate prop / opp | refined prop / opp | candidates rescored (median) | refined scores = exact |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (m, e), cells in sorted(table.items()):
        a = np.array([c[:10] for c in cells])

        def pair(i):
            col = a[:, i:i + 2]
            col = col[~np.isnan(col).any(1)]
            return " / ".join(f"{v:.2f}" for v in col.mean(0)) if len(col) else "—"
        cand = int(np.median([c[-2] for c in cells]))
        good = all(c[-1] == 1.0 for c in cells)
        print(f"| {m} | 1e{e} | {pair(0)} | {pair(6)} | {pair(4)} | {pair(8)} | {pair(2)} | {cand} | "
              f"{'yes' if good else 'NO'} |")
    print()
    print(f"query-side gradient + rotation (prepare, {b.query_num_draws} draws): "
          f"median {np.median(prepare_ms):.0f} ms, "
          f"max {np.max(prepare_ms):.0f} ms")
    print(f"refine latency, new query (one streamed pass over the exact store): median "
          f"{np.median(first_ms):.0f} ms, max {np.max(first_ms):.0f} ms ({len(first_ms)} queries × methods); "
          f"new query in all (prepare + first refine): median {np.median(np.add(prepare_ms, first_ms)):.0f} ms")
    print(f"resident memory growth during a new query's pass: max {max(rss_growth) / 2**20:.0f} MiB "
          f"(the store is {len(st) * st.bytes_per_example / 2**20:.0f} MiB: read in chunks, not mapped)")
    print(f"refine latency, damping change (profile bounds + candidate rows): median {np.median(change_ms):.1f} ms, "
          f"p95 {np.percentile(change_ms, 95):.1f} ms ({len(change_ms)} changes)")
    print(f"instant answers: routes {routes}; latency median {np.median(raw_ms):.1f} ms, max {np.max(raw_ms):.1f} ms; "
          f"8-bit scan alone median {np.median(scan_ms):.1f} ms"
          + (f" ({len(st) * b.quantised.bytes_per_example / 2**20:.0f} MiB scanned)" if b.quantised is not None
             else " (no 8-bit copy)"))
    print(f"recall@{args.k} minima: 8-bit scan {int8_min:.2f}, profile estimate {prof_min:.2f}, FAISS {faiss_min:.2f}")
    raw_min = min(raw_min, int8_min)
    print(f"RECALL raw_min={raw_min:.2f} refined_min={ref_min:.2f} refine_median_ms={np.median(change_ms):.1f}")


if __name__ == "__main__":
    main()
