"""Could a better *instant* (first, approximate) answer reach recall@10 ≥ 0.9 on the demo? (issue 9, point 3)

Offline measurement on a built ``demo`` cache with an exact store: for a few held-out queries, exact K-FAC-family
scores at every decade 1e-14 … 1e5 (from the exact store's rows, float64), against instant answers that need no
pass over the full gradients:

- **CountSketch, uniform**: every eigen-coordinate hashed (seeded) to one of D buckets with a random sign; the
  training side stores ``S r_j`` ([N, D]), the query side hashes ``u ⊘ (Λ + λ)`` — exact per-coordinate damping,
  so one array serves every λ (an unbiased estimate of the exact score);
- **CountSketch, binned**: the same with the buckets split across decades of eigenvalue in proportion to each
  decade's largest share of the score over the λ grid (``‖v_b(λ)‖ · rms_j ‖r_jb‖``, normalised per λ);
- **PCA per decade** (``--pca``): each decade's m leading right singular vectors of the training rows, exact
  (query side: an ``[n_b, m]`` matrix per decade).

Prints recall@10 (min of proponents / opponents, mean over queries) per decade and the minimum over λ. One thread.
``python bench/instant_sketch.py --cache /tmp/cache-9/demo --queries 3 --dims 4096,16384,65536``
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sparse
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _topk(s, k=10):
    return set(np.argsort(-s, kind="stable")[:k]), set(np.argsort(s, kind="stable")[:k])


def _recall_row(est, exact, decades):
    """min(prop, opp) recall@10 per decade, mean over queries: est / exact ``[Q, D, N]``."""
    out = []
    for d in range(len(decades)):
        r = []
        for q in range(est.shape[0]):
            (a, b), (c, e) = _topk(est[q, d]), _topk(exact[q, d])
            r.append((len(a & c) / 10, len(b & e) / 10))
        r = np.array(r).mean(0)
        out.append(float(min(r)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default="diffinfluence-cache/demo", help="a built demo cache folder")
    ap.add_argument("--queries", type=int, default=3)
    ap.add_argument("--dims", default="4096,16384,65536")
    ap.add_argument("--pca", default="", help="comma-separated m per decade (empty: skip)")
    ap.add_argument("--query-draws", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from diffinfluence_widgets.data import load_digits
    from diffinfluence_widgets.diffusion.model import DiffusionModel
    from diffinfluence_widgets.index.refine import flat_eigenvalues
    from diffinfluence_widgets.influence.curvature import Curvature
    from diffinfluence_widgets.influence.gradients import per_example_gradients
    from diffinfluence_widgets.store.exact import ExactStore

    root = Path(args.cache)
    curv = Curvature.load(root / "curvature")
    st = ExactStore.open(next((root / "index" / "exact").iterdir()), curvature=curv)
    model = DiffusionModel.from_pretrained(root / "model").to("cpu", torch.float32)
    held = load_digits(size=int(model.unet.config.sample_size), split="heldout", limit=args.queries)
    names = curv.layer_names
    us = []
    for i in range(args.queries):
        g = per_example_gradients(model, held.images[i:i + 1], [int(held.ids[i])], "loss",
                                  num_draws=args.query_draws, seed=0, batch_size=1)
        rot = curv.rotate({n: g.layers[n].double() for n in names})
        us.append(torch.cat([rot[n].reshape(-1) for n in names]).numpy())
    U = np.stack(us)
    P, N = st.num_parameters, len(st)
    R = st.read(0, N)
    decades = list(range(-14, 6))
    print(f"N = {N}, P = {P}, {args.queries} queries, decades 1e{decades[0]} … 1e{decades[-1]}")
    for method in ("ekfac", "kfac"):
        lam = flat_eigenvalues(curv, method)
        V = np.stack([U / (lam + 10.0 ** e) for e in decades], 1)  # [Q, D, P]
        exact = np.zeros((len(U), len(decades), N))
        for lo in range(0, N, 32):
            exact[:, :, lo:lo + 32] = (V.reshape(-1, P) @ R[lo:lo + 32].astype(np.float64).T).reshape(
                len(U), len(decades), -1)
        dec = np.clip(np.floor(np.log10(np.maximum(lam, 1e-30))).astype(int), -22, 2)
        _, binv = np.unique(dec, return_inverse=True)
        nb = int(binv.max()) + 1
        rsq = np.zeros(nb)
        for lo in range(0, N, 64):
            rsq += np.bincount(binv, weights=(R[lo:lo + 64].astype(np.float64) ** 2).sum(0), minlength=nb)
        vb = np.array([np.sqrt(np.stack([np.bincount(binv, weights=V[q, d] ** 2, minlength=nb)
                                         for q in range(len(U))])).mean(0) for d in range(len(decades))])
        share = vb * np.sqrt(rsq / N)[None]
        share = (share / share.sum(1, keepdims=True)).max(0)
        share /= share.sum()
        for D in [int(x) for x in args.dims.split(",") if x]:
            for alloc in ("uniform", "binned"):
                rng = np.random.default_rng(0)
                sign = rng.choice([-1.0, 1.0], P)
                if alloc == "uniform":
                    h = rng.integers(0, D, P)
                else:
                    kb = np.maximum(1, np.floor(share * D)).astype(np.int64)
                    h = np.r_[0, np.cumsum(kb)[:-1]][binv] + rng.integers(0, 1 << 30, P) % kb[binv]
                S = sparse.csr_matrix((sign, (np.arange(P), h)), shape=(P, int(h.max()) + 1))
                F = np.zeros((N, S.shape[1]))
                for lo in range(0, N, 64):
                    F[lo:lo + 64] = (S.T @ R[lo:lo + 64].T.astype(np.float64)).T
                est = np.einsum("nd,qtd->qtn", F, np.stack([[S.T @ V[q, d] for d in range(len(decades))]
                                                            for q in range(len(U))]))
                per = _recall_row(est, exact, decades)
                print(f"{method} CountSketch {alloc} D={D} ({4 * D} B per image float32): min {min(per):.2f} | "
                      + " ".join(f"{x:.2f}" for x in per), flush=True)
        for m in [int(x) for x in args.pca.split(",") if x]:
            est = np.zeros_like(exact)
            dims = qbytes = 0
            for b in range(nb):
                cols = np.flatnonzero(binv == b)
                Rb = R[:, cols].astype(np.float64)
                if len(cols) <= m:
                    est += np.einsum("qdp,np->qdn", V[:, :, cols], Rb)
                    dims += len(cols)
                    continue
                w, Q = np.linalg.eigh(Rb @ Rb.T)
                top = np.argsort(w)[::-1][:m]
                W = (Rb.T @ Q[:, top]) / np.sqrt(np.maximum(w[top], 1e-300))
                est += np.einsum("qdm,nm->qdn", V[:, :, cols] @ W, Rb @ W)
                dims += m
                qbytes += len(cols) * m * 4
            per = _recall_row(est, exact, decades)
            print(f"{method} PCA per decade m={m} ({dims} dims per image, query side {qbytes / 2**20:.0f} MiB): "
                  f"min {min(per):.2f} | " + " ".join(f"{x:.2f}" for x in per), flush=True)


if __name__ == "__main__":
    main()
