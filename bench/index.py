"""Benchmark of the projected-gradient index (issue 3). Prints, in one run:

1. **recall@10** of the projected search against exact full-gradient (E)K-FAC scores on the digits demo, at the
   default k and space, for held-out (and generated) queries, proponents and opponents, at several λ;
2. for a **synthetic store of N = 100 000** with the demo UNet's layer shapes: median and p95 time from a damping
   change to a refreshed top-20 (proponents + opponents), split into query side and search, for the flat and the
   IVF index (and recall@20 of IVF against flat on that store);
3. **bytes per training example** of the store;
4. **build throughput**: training examples per second of the digits store build (gradients + projection + shard
   writes), and of projection + writes alone on synthetic gradients.

Threads: ``torch.set_num_threads(1)`` and ``faiss.omp_set_num_threads(1)`` (shared 2-core machines). Results go to
``bench/RESULTS.md`` under "## Index" (``--write``).

The digits part needs a trained demo model: ``--model DIR`` (a ``save_pretrained`` folder) or the demo cache
(``diffinfluence-cache/demo/model``, built by ``diffinfluence demo``). The curvature is fitted (and cached under
``--cache``) unless the demo cache holds one for that model. Exact scores are accumulated in the same gradient pass
that builds the store (``IndexBackend(on_train_gradients=...)``), so the digits part costs one pass over the
training set plus the curvature fit.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _threads(n: int) -> None:
    torch.set_num_threads(n)
    import faiss

    faiss.omp_set_num_threads(n)


def _pct(ts, q) -> float:
    return float(np.percentile(np.asarray(ts) * 1e3, q))


# ------------------------------------------------------------------------------------------------ synthetic
def synthetic_curvature(shapes: dict, seed: int = 0):
    """Random orthogonal eigenbases and eigenvalues over ~8 decades, with the given layer shapes."""
    from diffinfluence_widgets.influence.curvature import Curvature

    g = torch.Generator().manual_seed(seed)
    qa, qb, la, lb, ev = {}, {}, {}, {}, {}
    for n, (d_out, d_in1) in shapes.items():
        qb[n] = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))[0]
        qa[n] = torch.linalg.qr(torch.randn(d_in1, d_in1, generator=g, dtype=torch.float64))[0]
        lb[n] = 10 ** (-4 * torch.rand(d_out, generator=g, dtype=torch.float64))
        la[n] = 10 ** (-4 * torch.rand(d_in1, generator=g, dtype=torch.float64))
        ev[n] = torch.outer(lb[n], la[n])
    return Curvature(list(shapes), qa, qb, la, lb, ev)


def synthetic_features(n: int, k: int, seed: int = 0, clusters: int = 500, rank: int = 64) -> np.ndarray:
    """Clustered low-rank features plus isotropic noise (projected gradients are far from isotropic)."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((rank, k)).astype(np.float32) / math.sqrt(rank)
    centers = rng.standard_normal((clusters, rank)).astype(np.float32) * 2
    out = np.empty((n, k), dtype=np.float32)
    for lo in range(0, n, 10_000):
        hi = min(n, lo + 10_000)
        z = centers[rng.integers(0, clusters, hi - lo)] + rng.standard_normal((hi - lo, rank), dtype=np.float32)
        out[lo:hi] = z @ basis + 0.3 * rng.standard_normal((hi - lo, k), dtype=np.float32) / math.sqrt(k)
    return out


def bench_latency(n: int, k: int, repeats: int, kinds=("flat", "ivf")) -> dict:
    from diffinfluence_widgets.diffusion.model import DiffusionModel, demo_unet_config
    from diffinfluence_widgets.index import FeatureIndex
    from diffinfluence_widgets.influence.preconditioners import KFACQuery
    from diffinfluence_widgets.influence.gradients import layer_shapes
    from diffinfluence_widgets.influence.projection import make_projector

    shapes = layer_shapes(DiffusionModel.from_config(demo_unet_config(), seed=0))
    curv = synthetic_curvature(shapes)
    proj = make_projector(shapes, k)
    t0 = time.perf_counter()
    feats = synthetic_features(n, k)
    t_gen = time.perf_counter() - t0
    ids = np.arange(n, dtype=np.int64)
    engine = KFACQuery(curv, proj, space="eigen", whiten_damping=1e-8, dtype=torch.float32)  # as the backend
    g = torch.Generator().manual_seed(1)
    query = {nm: torch.randn(1, *s, generator=g, dtype=torch.float64) for nm, s in shapes.items()}
    t0 = time.perf_counter()
    rotated = engine.rotate(query)  # prepare(): once per query
    t_prepare = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    dampings = 10 ** rng.uniform(-9, -2, repeats)
    out = {"N": n, "k": k, "num_params": int(sum(a * b for a, b in shapes.values())), "prepare_ms": t_prepare * 1e3,
           "synthetic_generation_s": t_gen}
    flat_top = None
    for kind in kinds:
        t0 = time.perf_counter()
        index = FeatureIndex(feats, ids, kind=kind)
        t_build = time.perf_counter() - t0
        tq, ts, tt = [], [], []
        tops = []
        for lam in dampings:
            a = time.perf_counter()
            q = engine.project(rotated, float(lam))[0].numpy()
            b = time.perf_counter()
            pi, ps, oi, os_ = index.proponents_opponents(q, 20)
            c = time.perf_counter()
            tq.append(b - a)
            ts.append(c - b)
            tt.append(c - a)
            tops.append((set(pi.tolist()), set(oi.tolist())))
        res = {"index_build_s": t_build, "median_ms": _pct(tt, 50), "p95_ms": _pct(tt, 95),
               "query_side_median_ms": _pct(tq, 50), "search_median_ms": _pct(ts, 50)}
        if kind == "flat":
            flat_top = tops
        elif flat_top is not None:
            res["recall@20_vs_flat"] = float(np.mean([(len(a & c) + len(b & d)) / 40
                                                      for (a, b), (c, d) in zip(tops, flat_top)]))
        out[kind] = res
        del index
    return out


def spectrum_features(n: int, k: int, seed: int = 0, clusters: int = 2000, rank: int = 128,
                      decay: float = 0.7) -> np.ndarray:
    """Realistic score structure: clustered low-rank features whose rank-``rank`` part has a decaying spectrum
    (σ_i ∝ (i + 1)^−decay, in a random orthonormal basis of R^k), plus weak isotropic noise."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((k, rank)))[0].T.astype(np.float32)  # [rank, k] orthonormal rows
    basis *= ((np.arange(rank) + 1.0) ** -decay).astype(np.float32)[:, None]
    centers = rng.standard_normal((clusters, rank)).astype(np.float32)
    out = np.empty((n, k), dtype=np.float32)
    for lo in range(0, n, 20_000):
        hi = min(n, lo + 20_000)
        z = centers[rng.integers(0, clusters, hi - lo)] + 0.5 * rng.standard_normal((hi - lo, rank), dtype=np.float32)
        out[lo:hi] = z @ basis
        out[lo:hi] += 0.02 * rng.standard_normal((hi - lo, k), dtype=np.float32)
    return out


def bench_scale(n: int, k: int, repeats: int, nprobe: int = 32, kinds: tuple[str, ...] = ("pca",)) -> dict:
    """Damping change → refreshed top-20 (both sides) on a synthetic store of N examples with a decaying spectrum:
    each approximate index kind against the exact flat search in the same projected space (recall@20), with the
    query side (division by Λ + λ, projection) included in the latency; memory and disk per example."""
    from diffinfluence_widgets.diffusion.model import DiffusionModel, demo_unet_config
    from diffinfluence_widgets.index import FeatureIndex
    from diffinfluence_widgets.influence.preconditioners import KFACQuery
    from diffinfluence_widgets.influence.gradients import layer_shapes
    from diffinfluence_widgets.influence.projection import make_projector

    shapes = layer_shapes(DiffusionModel.from_config(demo_unet_config(), seed=0))
    curv = synthetic_curvature(shapes)
    proj = make_projector(shapes, k)
    t0 = time.perf_counter()
    feats = spectrum_features(n, k)
    t_gen = time.perf_counter() - t0
    ids = np.arange(n, dtype=np.int64)
    engine = KFACQuery(curv, proj, space="eigen", whiten_damping=1e-8, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    rotated = engine.rotate({nm: torch.randn(1, *s, generator=g, dtype=torch.float64) for nm, s in shapes.items()})
    dampings = 10 ** np.random.default_rng(0).uniform(-9, -2, repeats)
    rows = []
    flat = FeatureIndex(feats, ids, kind="flat")
    ref, t_flat = [], []
    for lam in dampings:
        a = time.perf_counter()
        ref.append(flat.proponents_opponents(engine.project(rotated, float(lam))[0].numpy(), 20))
        t_flat.append(time.perf_counter() - a)
    del flat
    for kind in kinds:
        t0 = time.perf_counter()
        index = FeatureIndex(feats, ids, kind=kind, nprobe=nprobe)
        row = {"N": n, "k": k, "kind": kind, "generation_s": t_gen, "build_s": time.perf_counter() - t0,
               "flat_median_ms": _pct(t_flat, 50), "store_bytes_per_example": 4 * k + 8}
        if kind == "ivf":
            row["setting"] = f"nlist {index.index.nlist} / nprobe {index.index.nprobe}"
            row["memory_bytes_per_example"] = 4 * k + 8  # each vector and its id in the inverted lists
        elif kind == "pca":
            row["setting"] = f"PCA {index.pca_dim} dims, 8-bit, rerank ×{index.index.k_factor:g}"
            row["memory_bytes_per_example"] = 4 * k + index.pca_dim + 8  # full vector (re-ranking) + codes + id
        else:
            row["setting"] = f"M {index.index.hnsw.nb_neighbors(0)}, efSearch {index.index.hnsw.efSearch}"
            row["memory_bytes_per_example"] = 4 * k + 8 * index.index.hnsw.nb_neighbors(0) + 8
        tt, tq, rec = [], [], []
        for lam, (fp, _, fo, _) in zip(dampings, ref):
            a = time.perf_counter()
            q = engine.project(rotated, float(lam))[0].numpy()
            b = time.perf_counter()
            pi, _, oi, _ = index.proponents_opponents(q, 20)
            tt.append(time.perf_counter() - a)
            tq.append(b - a)
            rec.append((len(set(pi) & set(fp)) + len(set(oi) & set(fo))) / 40)
        row.update({"median_ms": _pct(tt, 50), "p95_ms": _pct(tt, 95), "query_side_median_ms": _pct(tq, 50),
                    "recall@20_vs_flat": float(np.mean(rec)), "recall@20_min": float(np.min(rec))})
        rows.append(row)
        del index
    return {"rows": rows}


def bench_projection_throughput(n: int = 512, k: int = 4096) -> dict:
    """Projection + shard writes alone (no gradient computation): examples per second."""
    import tempfile

    from diffinfluence_widgets.diffusion.model import DiffusionModel, demo_unet_config
    from diffinfluence_widgets.store import build_store
    from diffinfluence_widgets.influence.gradients import layer_shapes
    from diffinfluence_widgets.influence.projection import make_projector

    shapes = layer_shapes(DiffusionModel.from_config(demo_unet_config(), seed=0))
    curv = synthetic_curvature(shapes)
    proj = make_projector(shapes, k)
    inv = {nm: (curv.eigenvalues[nm] + 1e-8).rsqrt() for nm in shapes}
    g = torch.Generator().manual_seed(0)
    batch = {nm: torch.randn(32, *s, generator=g) for nm, s in shapes.items()}

    def compute(lo, hi):
        layers = {nm: v[: hi - lo] for nm, v in batch.items()}
        rot = curv.rotate({nm: v.double() for nm, v in layers.items()})
        return {"features": proj.project(layers), "eigen": proj.project({nm: rot[nm] * inv[nm] for nm in rot})}

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        store = build_store(Path(d) / "s", np.arange(n), compute, {"synthetic": True}, shard_size=32,
                            progress=False)
        dt = time.perf_counter() - t0
        bpe = store.bytes_per_example
    return {"examples_per_s": n / dt, "n": n, "bytes_per_example_two_arrays": bpe}


# ------------------------------------------------------------------------------------------------ digits recall
def bench_digits(args) -> dict:
    from diffinfluence_widgets.data import load_digits
    from diffinfluence_widgets.diffusion.model import DiffusionModel
    from diffinfluence_widgets.index import IndexBackend
    from diffinfluence_widgets.influence.curvature import Curvature, fit_curvature
    from diffinfluence_widgets.influence.gradients import per_example_gradients

    demo = ROOT / "diffinfluence-cache" / "demo"
    model_dir = Path(args.model) if args.model else demo / "model"
    if not model_dir.is_dir():
        return {"skipped": f"no trained demo model at {model_dir} (run `diffinfluence demo` or pass --model)"}
    model = DiffusionModel.from_pretrained(model_dir).to("cpu", torch.float32)
    model.unet.eval()
    train = load_digits(size=16, split="train", limit=args.train_limit)
    held = load_digits(size=16, split="heldout", limit=args.queries)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    curv = None
    for cdir in (demo / "curvature", cache / f"curvature-{args.curvature_draws}"):
        try:
            curv = Curvature.load(cdir, model=model, dataset=train)
            print(f"  curvature: reused {cdir}")
            break
        except (ValueError, FileNotFoundError, OSError):
            continue
    t_curv = 0.0
    if curv is None:
        t0 = time.perf_counter()
        curv = fit_curvature(model, train, num_draws=args.curvature_draws, progress=True, batch_size=32)
        t_curv = time.perf_counter() - t0
        curv.save(cache / f"curvature-{args.curvature_draws}")
        print(f"  curvature: fitted in {t_curv:.0f} s")
    names = curv.layer_names
    lams = [1e-8, 1e-6, 1e-4]

    # query gradients exactly as the backend computes them (same draws: seed = draw_seed, query ids)
    qids = [int(i) for i in held.ids]
    gq = per_example_gradients(model, held.images, qids, "loss", num_draws=args.query_draws, seed=0,
                               bands=[(0, 250), (250, 500), (500, 750), (750, 1000)])
    whole = {n: gq.band_layers[n].double().sum(0) for n in names}
    rotq = curv.rotate(whole)
    inv = {lam: {n: 1.0 / (curv.eigenvalues[n].double() + lam) for n in names} for lam in lams}
    exact_parts: dict[float, list] = {lam: [] for lam in lams}
    seen_ids: list[int] = []

    def on_grads(measurement, g):  # the store's own gradient pass: accumulate exact full-gradient scores
        if measurement != "loss":
            return
        rot = curv.rotate({n: g.layers[n].double() for n in names})
        for lam in lams:
            exact_parts[lam].append(sum(torch.einsum("qoi,boi->qb", rotq[n] * inv[lam][n], rot[n])
                                        for n in names).numpy())
        seen_ids.extend(int(i) for i in g.ids)

    tag = f"n{len(train)}-s{args.store_draws}-k{args.k}"
    exact_file = cache / f"exact-{tag}.npz"
    t0 = time.perf_counter()
    backend = IndexBackend.build(model, train, held, curv, cache / f"index-{tag}", k=args.k,
                                 num_draws=args.store_draws, query_num_draws=args.query_draws, num_generated=0,
                                 methods=("ekfac", "kfac", "trak"), batch_size=32, progress=True,
                                 on_train_gradients=on_grads)
    t_build = time.perf_counter() - t0
    if seen_ids:
        order = np.argsort(np.array(seen_ids))
        pos = np.searchsorted(np.array(seen_ids)[order], backend.train_ids)
        exact = {lam: np.concatenate(exact_parts[lam], 1)[:, order[pos]] for lam in lams}
        np.savez(exact_file, **{f"lam{lam:g}": v for lam, v in exact.items()})
        built = True
    elif exact_file.is_file():
        with np.load(exact_file) as z:
            exact = {lam: z[f"lam{lam:g}"] for lam in lams}
        built = False
    else:
        return {"skipped": f"store in {cache} was reused but {exact_file} is missing; delete the cache and rerun"}
    store = backend.stores["loss"]
    out = {"N": len(train), "queries": len(qids), "k": backend.projector.k, "space": backend.space,
           "store_draws": args.store_draws, "query_draws": args.query_draws,
           "projection": {k: v for k, v in backend.projector.spec().items() if k != "layer_shapes"},
           "bytes_per_example": store.bytes_per_example,
           "bytes_per_example_searched_array": 4 * backend.projector.k,
           "curvature_fit_s": t_curv or None}
    if built:
        out["store_build_s"] = t_build
        out["store_build_examples_per_s"] = len(train) / t_build
    for method in ("ekfac",):
        for lam in lams:
            rp, ro, rp_r = [], [], []
            for qi, qid in enumerate(qids):
                p = backend.prepare(qid, "loss", method)
                r = backend.search(p, lam, 10)
                ex = exact[lam][qi]
                top = set(backend.train_ids[np.argsort(-ex)[:10]].tolist())
                bot = set(backend.train_ids[np.argsort(ex)[:10]].tolist())
                rp.append(len(top & set(r.proponent_ids.tolist())) / 10)
                ro.append(len(bot & set(r.opponent_ids.tolist())) / 10)
                # with exact rescoring of the top-50 candidates per side
                cand_scores = backend.scores(p, lam)
                cp = np.argsort(-cand_scores)[:50]
                best = cp[np.argsort(-ex[cp])[:10]]
                rp_r.append(len(top & set(backend.train_ids[best].tolist())) / 10)
            out[f"{method}_lambda={lam:g}"] = {"recall@10_proponents": float(np.mean(rp)),
                                              "recall@10_opponents": float(np.mean(ro)),
                                              "recall@10_proponents_rescored_top50": float(np.mean(rp_r))}
    return out


# ------------------------------------------------------------------------------------------------ report
def _fmt(res: dict) -> str:
    lines = []
    d = res.get("digits", {})
    lat = res["latency"]
    thr = res["throughput"]
    lines.append("## Index")
    lines.append("")
    lines.append(f"`python bench/index.py` — {res['date']}, {res['machine']}; `torch.set_num_threads({res['threads']})`,"
                 f" `faiss.omp_set_num_threads({res['threads']})`; load average at start {res['load']}.")
    lines.append("")
    if "skipped" in d:
        lines.append(f"- Digits recall: skipped ({d['skipped']}).")
    elif d:
        lines.append(f"Digits demo (N = {d['N']} training images, {d['queries']} held-out queries, k = {d['k']} "
                     f"Kronecker {d['projection'].get('k_b')}×{d['projection'].get('k_a')} {d['projection']['kind']}, "
                     f"space = {d['space']}, S = {d['store_draws']} training draws, {d['query_draws']} query draws), "
                     "recall@10 of the FAISS search against exact full-gradient EK-FAC scores:")
        lines.append("")
        lines.append("| λ | proponents | opponents | proponents, exact rescoring of the top-50 |")
        lines.append("|---|---|---|---|")
        for key, v in d.items():
            m = re.match(r"ekfac_lambda=(.*)", key)
            if m:
                lines.append(f"| {m.group(1)} | {v['recall@10_proponents']:.2f} | {v['recall@10_opponents']:.2f} | "
                             f"{v['recall@10_proponents_rescored_top50']:.2f} |")
        lines.append("")
        if "store_build_examples_per_s" in d:
            lines.append(f"- Store build on the digits demo (gradients with S = {d['store_draws']} draws + projection "
                         f"+ shard writes): {d['store_build_examples_per_s']:.2f} examples/s "
                         f"({d['store_build_s']:.0f} s for {d['N']}).")
        lines.append(f"- Bytes per training example: {d['bytes_per_example']} on disk for the loss store (two "
                     f"float32 arrays of k = {d['k']} — parameter space for TRAK, eigen space for K-FAC — plus the "
                     f"int64 id); {d['bytes_per_example_searched_array']} B in each searched index.")
    lines.append(f"- Projection + shard writes alone (synthetic demo-shaped gradients, k = {lat['k']}, both arrays): "
                 f"{thr['examples_per_s']:.1f} examples/s.")
    lines.append("")
    lines.append(f"Synthetic store, N = {lat['N']}, k = {lat['k']}, demo UNet layer shapes ({lat['num_params']} "
                 f"parameters), damping change → refreshed top-20 proponents + opponents "
                 f"(query side: division + Kronecker projection in float32, as IndexBackend does; then FAISS):")
    lines.append("")
    lines.append("| index | median ms | p95 ms | query side (median) | search (median) | index build s | recall@20 vs flat |")
    lines.append("|---|---|---|---|---|---|---|")
    for kind in ("flat", "ivf", "hnsw"):
        if kind in lat:
            v = lat[kind]
            lines.append(f"| {kind} | {v['median_ms']:.1f} | {v['p95_ms']:.1f} | {v['query_side_median_ms']:.1f} | "
                         f"{v['search_median_ms']:.1f} | {v['index_build_s']:.1f} | "
                         f"{v.get('recall@20_vs_flat', 1.0):.2f} |")
    lines.append("")
    lines.append(f"Query preparation (rotation into the eigenbasis, once per query): {lat['prepare_ms']:.0f} ms.")
    return "\n".join(lines) + "\n"


def write_results(text: str, path: Path) -> None:
    """Replace (or append) the "## Index" section of RESULTS.md, leaving other sections alone."""
    old = path.read_text() if path.is_file() else "# Benchmark results\n\n"
    pattern = re.compile(r"^## Index\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda m: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(new)
    os.replace(tmp, path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default=None, help="trained demo model folder (default: the demo cache)")
    ap.add_argument("--cache", default=str(ROOT / "artifacts" / "bench-index"))
    ap.add_argument("--train-limit", type=int, default=None, help="first N training digits (default: all)")
    ap.add_argument("--queries", type=int, default=8, help="held-out queries")
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--store-draws", type=int, default=16)
    ap.add_argument("--query-draws", type=int, default=64)
    ap.add_argument("--curvature-draws", type=int, default=16)
    ap.add_argument("--n", type=int, default=100_000, help="synthetic store size")
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--skip-digits", action="store_true")
    ap.add_argument("--write", action="store_true", help="write the Index section of bench/RESULTS.md")
    ap.add_argument("--scale", default=None, help="only the scale rows: comma-separated N (e.g. 100000,1000000), "
                    "synthetic stores with a decaying spectrum at --scale-k")
    ap.add_argument("--scale-k", type=int, default=512)
    ap.add_argument("--scale-nprobe", type=int, default=96, help="IVF cells searched per query in the scale rows")
    ap.add_argument("--scale-kinds", default="pca", help="index kinds of the scale rows (pca, ivf, hnsw)")
    args = ap.parse_args(argv)
    _threads(args.threads)
    if args.scale:
        rows = []
        for n in [int(x) for x in args.scale.split(",")]:
            r = bench_scale(n, args.scale_k, args.repeats, args.scale_nprobe, tuple(args.scale_kinds.split(",")))
            for row in r["rows"]:
                print(json.dumps(row), flush=True)
            rows += r["rows"]
        print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; 1 thread")
        print("| N | k | index | median ms | p95 ms | of which query side ms | flat search ms | recall@20 vs flat "
              "(mean / min) | build s | memory B / example | disk B / example |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['N']} | {r['k']} | {r['kind']}: {r['setting']} | {r['median_ms']:.1f} | {r['p95_ms']:.1f} | "
                  f"{r['query_side_median_ms']:.1f} | {r['flat_median_ms']:.0f} | {r['recall@20_vs_flat']:.2f} / "
                  f"{r['recall@20_min']:.2f} | {r['build_s']:.0f} | {r['memory_bytes_per_example']} | "
                  f"{r['store_bytes_per_example']} |")
        return {"scale": rows}
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": args.threads,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
           "load": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    print("1. digits recall", flush=True)
    res["digits"] = {"skipped": "--skip-digits"} if args.skip_digits else bench_digits(args)
    print(json.dumps(res["digits"], indent=1), flush=True)
    print("2. synthetic latency", flush=True)
    res["latency"] = bench_latency(args.n, args.k, args.repeats)
    print(json.dumps(res["latency"], indent=1), flush=True)
    print("3./4. bytes per example, projection throughput", flush=True)
    res["throughput"] = bench_projection_throughput(k=args.k)
    print(json.dumps(res["throughput"], indent=1), flush=True)
    text = _fmt(res)
    print(text)
    if args.write:
        write_results(text, ROOT / "bench" / "RESULTS.md")
    return res


if __name__ == "__main__":
    main()
