"""The LDS evaluation of a built demo (what ``diffinfluence evaluate`` runs): score held-out queries with each
method at its default damping, retrain on random half-subsets (cached, resumable), and report LDS per method (and
the retraining oracle with ≥ 2 seeds) into ``lds.json``, written atomically."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .._io import atomic_write_text
from ..config import Method
from .lds import generate_subsets, lds, lds_targets, oracle_lds
from .retrain import RetrainCache

__all__ = ["evaluate_methods", "lds_table", "EVALUABLE_EXCLUDED"]

#: methods the LDS evaluation cannot score on held-out images (they need a sampling trajectory)
EVALUABLE_EXCLUDED = (Method.JOURNEY_TRAK,)


def evaluate_methods(art, methods: Sequence[str], *, num_queries: int, num_subsets: int | None, seeds: int,
                     workers: int, measure_draws: int, device=None, out: Path | None = None,
                     progress: bool = True) -> tuple[dict, Path]:
    """Run the LDS evaluation on a demo's artifacts (``art``: :class:`~diffinfluence_widgets.demo.DemoArtifacts`).

    Returns the result dict and the path of ``lds.json``. Bad arguments raise ``ValueError`` naming them."""
    backend, cfg, train = art.backend, art.config, art.train
    allowed = [m for m in backend.methods if m not in EVALUABLE_EXCLUDED]
    bad = [m for m in methods if m not in allowed]
    if bad or not methods:
        raise ValueError(f"unknown or unsupported methods {bad or list(methods)}; choose from {allowed}")
    if num_queries < 1 or seeds < 1 or workers < 1:
        raise ValueError(f"num_queries ({num_queries}), seeds ({seeds}) and workers ({workers}) must be positive")
    m_subsets = num_subsets or (8 if cfg.name == "tiny" else 16)
    heldout = art.heldout
    q = min(num_queries, len(heldout))
    qids = [int(i) for i in torch.as_tensor(heldout.ids)[:q].tolist()]
    out = Path(out) if out is not None else art.cache_dir / "evaluation"
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    scores = {m: np.stack([backend.scores(backend.prepare(i, "loss", m, None), backend.default_damping[m])
                           for i in qids]) for m in methods}
    t_scores = time.perf_counter() - t0
    subsets = generate_subsets(np.asarray(train.ids), m_subsets, fraction=0.5, seed=0)
    cache = RetrainCache(art.cache_dir / "retrain", art.model, train, cfg.train_config())
    seed_list = list(range(seeds))
    if progress:
        print(f"retraining {m_subsets} subsets × {len(seed_list)} seeds of the {cfg.name!r} model "
              f"({cfg.train_config().steps} steps each; cached in {cache.root}) …", flush=True)
    t1 = time.perf_counter()
    targets = lds_targets(cache, subsets, seed_list, heldout.images[:q], qids, measurement="loss",
                          num_draws=measure_draws, num_workers=workers, device=device, progress=progress)
    t_retrain = time.perf_counter() - t1
    rows = []
    for m in methods:
        res = lds(scores[m], subsets, targets, query_ids=qids)
        rows.append({"method": m, "damping": backend.default_damping[m], "lds_mean": res.mean, "lds_sem": res.sem,
                     "per_query": res.per_query.tolist()})
    if len(seed_list) >= 2:
        res = oracle_lds(targets, query_ids=qids)
        rows.append({"method": "oracle (retraining)", "damping": None, "lds_mean": res.mean, "lds_sem": res.sem,
                     "per_query": res.per_query.tolist()})
    result = {"config": cfg.name, "num_subsets": m_subsets, "seeds": seed_list, "query_ids": qids,
              "measure_draws": measure_draws, "rows": rows,
              "seconds": {"scores": round(t_scores, 2), "retrain_and_measure": round(t_retrain, 2)}}
    path = out / "lds.json"
    atomic_write_text(path, json.dumps(result, indent=1))
    return result, path


def lds_table(result: dict) -> str:
    """The printed summary of :func:`evaluate_methods`' result."""
    lines = [f"LDS on {len(result['query_ids'])} held-out queries, {result['num_subsets']} subsets (α = 0.5), "
             f"{len(result['seeds'])} seed(s), measurement: loss", f"{'method':<22}{'damping':>10}{'LDS (%)':>16}"]
    for r in result["rows"]:
        d = "" if r["damping"] is None else f"{r['damping']:.0e}"
        sem = "" if not np.isfinite(r["lds_sem"]) else f" ± {100 * r['lds_sem']:.1f}"
        lines.append(f"{r['method']:<22}{d:>10}{100 * r['lds_mean']:>10.1f}{sem}")
    return "\n".join(lines)
