#!/usr/bin/env python
"""Issue 14: why the recommended K-FAC-family default is not the best attribution on the digits benchmark.

Re-scores an existing ``bench/digits_benchmark.py`` cache (the retrained models and their measured LDS targets are
reused as they are: nothing is retrained for the LDS) under settings that could explain the gap, and reports each
setting's LDS with its paired difference against the current default (EK-FAC, expand, GGN^model, loss on both
sides, λ = 1e-8, 32 query / 32 training draws, 16 curvature draws), with a two-way bootstrap 95 % interval
(queries and subsets resampled together) and the plain ± s.e. over queries.

Stages (``--stages``, comma-separated; results are appended to ``--out``/why_default.json, so stages resume):

* ``base``      the default and the damping sweeps, absolute λ and relative λ = rel · τ (τ = mean eigenvalue);
* ``draws``     query-side draws 32 → 128 / 256 and training-side draws 32 → 128 (``draws2``: 512 / 256);
* ``meas``      query measurement: ELBO*, square norm (training side: loss), and square norm on both sides;
* ``fisher``    more curvature draws (64, i.e. 4× the MC samples of the one-sample GGN^model) and ``fisher="exact"``;
* ``ensemble``  scores averaged over independently trained full-data models (seeds 0, 1, 2; the two extra models
                are trained into the cache with the same recipe — ~30 s each — and nothing else is retrained);
* ``ensemble_draws``  the 3-model ensemble at 512 query / 128 training draws;
* ``pixel``     pixel cosine similarity for reference; ``report`` only rebuilds the tables.

Run with ``OMP_NUM_THREADS=1``; each stage takes minutes on one thread.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

from diffinfluence_widgets.data import load_digits
from diffinfluence_widgets.diffusion import DiffusionModel, tiny_unet_config
from diffinfluence_widgets.diffusion.sampling import sample
from diffinfluence_widgets.diffusion.train import TrainConfig
from diffinfluence_widgets.evaluation.baselines import pixel_similarity
from diffinfluence_widgets.evaluation.lds import (generate_subsets, lds, lds_jobs, lds_targets, oracle_lds,
                                                  predicted_changes)
from diffinfluence_widgets.evaluation.retrain import RetrainCache, RetrainJob
from diffinfluence_widgets.influence.curvature import fit_curvature
from diffinfluence_widgets.influence.gradients import per_example_gradients

REL = tuple(10.0 ** e for e in range(-6, 1))
ABS = tuple(10.0 ** e for e in range(-8, 2))
REFERENCE = "EK-FAC λ=1e-8 (default)"


@dataclass(frozen=True)
class QuickDigits:
    """The ``--quick`` digits preset of the 2026-11-28 benchmark runs (Run A): the cache's models are keyed by
    exactly these settings (data, UNet, training recipe), so nothing is retrained when they match."""

    size: int = 8
    num_train: int = 160
    unet_channels: tuple[int, int] = (8, 16)
    train_steps: int = 400
    num_subsets: int = 12
    num_seeds: int = 2
    fraction: float = 0.5
    num_queries: int = 64
    target_draws: int = 256
    seed: int = 0

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.train_steps, batch_size=64, lr=2e-3, warmup=50, ema_decay=0.995,
                           checkpoint_every=max(50, self.train_steps // 4))

    def unet_config(self) -> dict:
        return dict(tiny_unet_config(self.size), block_out_channels=tuple(self.unet_channels),
                    norm_num_groups=min(4, self.unet_channels[0]))


def flat(grads, names) -> torch.Tensor:
    return torch.cat([grads.layers[n].reshape(grads.layers[n].shape[0], -1) for n in names], 1).double()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def two_way_bootstrap(pa: np.ndarray, pb: np.ndarray, t: np.ndarray, reps: int = 1000, seed: int = 0):
    """95 % interval of mean_q LDS_A − LDS_B with queries and subsets resampled together (pa, pb, t: [Q, M])."""
    rng = np.random.default_rng(seed)
    q, m = t.shape
    out = np.empty(reps)
    for r in range(reps):
        qi, mi = rng.integers(0, q, q), rng.integers(0, m, m)
        rt = rankdata(t[np.ix_(qi, mi)], axis=1)
        diff = 0.0
        for sign, p in ((1, pa), (-1, pb)):
            rp = rankdata(p[np.ix_(qi, mi)], axis=1)
            a, b = rp - rp.mean(1, keepdims=True), rt - rt.mean(1, keepdims=True)
            den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
            rho = np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1), 0.0)
            diff = diff + sign * rho.mean()
        out[r] = diff
    return float(np.quantile(out, 0.025)), float(np.quantile(out, 0.975))


class Experiment:
    def __init__(self, args):
        self.s = s = QuickDigits()
        self.args = args
        self.train = load_digits(size=s.size, split="train", limit=s.num_train)
        base = DiffusionModel.from_config(s.unet_config(), seed=0)
        self.cache = RetrainCache(args.cache, base, self.train, s.train_config())
        job = RetrainJob(tuple(self.train.ids.tolist()), 0, tag="full/seed0")
        self.subsets = generate_subsets(self.train.ids, s.num_subsets, s.fraction, seed=s.seed)
        missing = [j.tag for j in [job, *lds_jobs(self.subsets, range(s.num_seeds))] if not self.cache.is_done(j)]
        if missing and not args.allow_retrain:
            raise SystemExit(f"{len(missing)} models (e.g. {missing[:2]}) are not in the cache {args.cache} for "
                             "these settings; this script re-scores an existing cache (--allow-retrain to train)")
        self.cache.run([job], progress=False)
        self.model = self.cache.load(job)
        self.model.unet.eval()
        t0 = time.time()
        gen = sample(self.model, s.num_queries, seed=s.seed + 1000)
        self.q_images, self.q_ids = gen.images.float().clamp(-1, 1), np.arange(s.num_queries, dtype=np.int64)
        self.targets = lds_targets(self.cache, self.subsets, list(range(s.num_seeds)), self.q_images, self.q_ids,
                                   num_draws=s.target_draws, seed=12345, num_workers=1, progress=False)
        self.t_mean = self.targets.mean(2)
        log(f"queries + cached targets {time.time() - t0:.0f}s; oracle {oracle_lds(self.targets, self.q_ids)}")
        self.path = args.out / "why_default.json"
        self.rows = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.preds: dict[str, np.ndarray] = {}
        self._grads: dict = {}
        self._curv: dict = {}

    # -- cached building blocks -------------------------------------------------------------------------------
    def grads(self, side: str, meas: str = "loss", draws: int = 32, model=None, key=""):
        k = (side, meas, draws, key)
        if k not in self._grads:
            t0 = time.time()
            imgs, ids, seed = ((self.train.images, self.train.ids, 1) if side == "train"
                               else (self.q_images, self.q_ids, 2))
            g = per_example_gradients(model or self.model, imgs, ids, meas, num_draws=draws, seed=seed)
            self._grads[k] = (g, list(g.layers))
            log(f"gradients {k}: {time.time() - t0:.0f}s")
        return self._grads[k]

    def curvature(self, method="ekfac", fisher="model", draws=16, model=None, key=""):
        k = (method, fisher, draws, key)
        if k not in self._curv:
            t0 = time.time()
            self._curv[k] = fit_curvature(model or self.model, self.train, method=method, kfac_approx="expand",
                                          fisher=fisher, num_draws=draws, seed=3, progress=False)
            log(f"curvature {k}: {time.time() - t0:.0f}s")
        return self._curv[k]

    @staticmethod
    def scores(curv, q_grads, train_flat, lam: float) -> np.ndarray:
        names = curv.layer_names
        rot = curv.rotate({n: q_grads.layers[n].double() for n in names})
        pre = curv.unrotate(curv.precondition_rotated(rot, lam))
        return (torch.cat([pre[n].reshape(pre[n].shape[0], -1) for n in names], 1) @ train_flat.T).numpy()

    def record(self, name: str, stage: str, mat: np.ndarray, extra: dict | None = None) -> None:
        r = lds(mat, self.subsets, self.targets, self.q_ids)
        self.preds[name] = predicted_changes(mat, self.subsets)
        self.rows[name] = {"stage": stage, "lds": r.mean, "sem": r.sem, "per_query": r.per_query.tolist(),
                           **(extra or {})}
        fname = f"pred-{hashlib.sha1(name.encode()).hexdigest()[:12]}.npy"
        np.save(self.args.out / fname, self.preds[name])
        self.rows[name]["pred_file"] = fname
        self.path.write_text(json.dumps(self.rows, indent=1))
        log(f"{name}: LDS {r}")

    def kfac_variant(self, name, stage, *, method="ekfac", fisher="model", cdraws=16, qmeas="loss", qdraws=32,
                     tmeas="loss", tdraws=32, lam=1e-8, rel=None):
        curv = self.curvature(method, fisher, cdraws)
        gq, _ = self.grads("query", qmeas, qdraws)
        gt, names = self.grads("train", tmeas, tdraws)
        tau = curv.mean_eigenvalue()
        lam_abs = lam if rel is None else rel * tau
        self.record(name, stage, self.scores(curv, gq, flat(gt, names), lam_abs),
                    {"damping": lam_abs, "relative": rel, "tau": tau})

    # -- stages -------------------------------------------------------------------------------------------------
    def base(self):
        for method, label in (("ekfac", "EK-FAC"), ("kfac", "K-FAC")):
            curv = self.curvature(method)
            gq, _ = self.grads("query")
            gt, names = self.grads("train")
            tf = flat(gt, names)
            tau = curv.mean_eigenvalue()
            log(f"{label}: τ = {tau:.3g}")
            for lam in ABS:
                name = REFERENCE if (label == "EK-FAC" and lam == 1e-8) else f"{label} λ={lam:g}"
                self.record(name, "base", self.scores(curv, gq, tf, lam), {"damping": lam, "tau": tau})
            for rel in REL:
                self.record(f"{label} rel={rel:g}", "base", self.scores(curv, gq, tf, rel * tau),
                            {"damping": rel * tau, "relative": rel, "tau": tau})

    def draws(self):
        for qd in (128, 256):
            self.kfac_variant(f"EK-FAC query draws {qd}", "draws", qdraws=qd)
        self.kfac_variant("EK-FAC train draws 128", "draws", tdraws=128)
        self.kfac_variant("EK-FAC query 256 + train 128 draws", "draws", qdraws=256, tdraws=128)

    def draws2(self):
        self.kfac_variant("EK-FAC query 512 + train 256 draws", "draws", qdraws=512, tdraws=256)
        self.kfac_variant("EK-FAC query 512 + train 256 draws rel=1e-2", "draws", qdraws=512, tdraws=256, rel=1e-2)
        self.kfac_variant("EK-FAC query 256 + train 256 draws", "draws", qdraws=256, tdraws=256)
        self.kfac_variant("EK-FAC query 512 + train 128 draws", "draws", qdraws=512, tdraws=128)

    def meas(self):
        self.kfac_variant("EK-FAC query ELBO*", "meas", qmeas="elbo_simplified")
        self.kfac_variant("EK-FAC query square norm", "meas", qmeas="square_norm")
        self.kfac_variant("EK-FAC square norm both sides", "meas", qmeas="square_norm", tmeas="square_norm")
        for rel in (1e-3, 1e-2, 1e-1):
            self.kfac_variant(f"EK-FAC square norm both sides rel={rel:g}", "meas", qmeas="square_norm",
                              tmeas="square_norm", rel=rel)

    def fisher(self):
        self.kfac_variant("EK-FAC 64 curvature draws", "fisher", cdraws=64)
        self.kfac_variant("EK-FAC GGN^loss", "fisher", fisher="empirical")
        # the exact GGN^model costs D = 64 backward passes per draw: compare at 2 draws, K-FAC eigenvalues
        self.kfac_variant("K-FAC fisher=model (2 draws)", "fisher", method="kfac", cdraws=2)
        self.kfac_variant("K-FAC fisher=exact (2 draws)", "fisher", method="kfac", fisher="exact", cdraws=2)

    def ensemble(self, seeds=(0, 1, 2)):
        jobs = [RetrainJob(tuple(self.train.ids.tolist()), s, tag=f"full/seed{s}") for s in seeds]
        t0 = time.time()
        self.cache.run(jobs, progress=False)
        log(f"ensemble models: {time.time() - t0:.0f}s")
        total = {"abs": None, "rel": None}
        for k, job in enumerate(jobs):
            m = self.cache.load(job)
            m.unet.eval()
            curv = self.curvature("ekfac", model=m, key=f"seed{job.seed}")
            gq, _ = self.grads("query", model=m, key=f"seed{job.seed}")
            gt, names = self.grads("train", model=m, key=f"seed{job.seed}")
            tf, tau = flat(gt, names), curv.mean_eigenvalue()
            for kind, lam in (("abs", 1e-8), ("rel", 1e-2 * tau)):
                sc = self.scores(curv, gq, tf, lam)
                total[kind] = sc if total[kind] is None else total[kind] + sc
            if k:
                self.record(f"EK-FAC ensemble of {k + 1} models λ=1e-8", "ensemble", total["abs"] / (k + 1))
                self.record(f"EK-FAC ensemble of {k + 1} models rel=1e-2", "ensemble", total["rel"] / (k + 1))

    def ensemble_draws(self, seeds=(0, 1, 2)):
        """The two effects together: 3 models, 512 query / 128 training draws each."""
        total = None
        for k, s in enumerate(seeds):
            m = self.cache.load(RetrainJob(tuple(self.train.ids.tolist()), s, tag=f"full/seed{s}"))
            m.unet.eval()
            key = "" if s == 0 else f"seed{s}"
            curv = self.curvature("ekfac", model=m, key=key)
            gq, _ = self.grads("query", draws=512, model=m, key=key)
            gt, names = self.grads("train", draws=128, model=m, key=key)
            sc = self.scores(curv, gq, flat(gt, names), 1e-8)
            total = sc if total is None else total + sc
        self.record(f"EK-FAC ensemble of {len(seeds)} models, query 512 + train 128 draws", "ensemble", total / 3)

    def pixel(self):
        sim = pixel_similarity(self.q_images, self.train, query_ids=self.q_ids)
        self.record("pixel cosine similarity", "pixel", sim.matrix)

    # -- report -------------------------------------------------------------------------------------------------
    def report(self) -> str:
        for name, row in self.rows.items():
            if name not in self.preds:
                self.preds[name] = np.load(self.args.out / row["pred_file"])
        ref = np.asarray(self.rows[REFERENCE]["per_query"])
        lines = [f"| setting | LDS (%) ± s.e. | paired diff vs {REFERENCE} (pp) ± s.e. | two-way bootstrap 95 % |",
                 "|---|---|---|---|"]
        for name, row in self.rows.items():
            d = np.asarray(row["per_query"]) - ref
            if name == REFERENCE:
                ci = "—"
            else:
                lo, hi = two_way_bootstrap(self.preds[name], self.preds[REFERENCE], self.t_mean)
                ci = f"[{100 * lo:+.1f}, {100 * hi:+.1f}]"
                row["bootstrap95"] = [lo, hi]
            row["paired_mean"], row["paired_sem"] = float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size))
            lines.append(f"| {name} | {100 * row['lds']:.1f} ± {100 * row['sem']:.1f} | "
                         f"{100 * d.mean():+.1f} ± {100 * row['paired_sem']:.1f} | {ci} |")
        pix = "pixel cosine similarity"
        if pix in self.rows:
            lines += ["", f"| setting | paired diff vs {pix} (pp) ± s.e. | two-way bootstrap 95 % |", "|---|---|---|"]
            for name, row in self.rows.items():
                if row["stage"] in ("draws", "ensemble"):
                    d = np.asarray(row["per_query"]) - np.asarray(self.rows[pix]["per_query"])
                    lo, hi = two_way_bootstrap(self.preds[name], self.preds[pix], self.t_mean)
                    row["vs_pixel"] = [float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size)), lo, hi]
                    lines.append(f"| {name} | {100 * d.mean():+.1f} ± {100 * row['vs_pixel'][1]:.1f} | "
                                 f"[{100 * lo:+.1f}, {100 * hi:+.1f}] |")
        self.path.write_text(json.dumps(self.rows, indent=1))
        return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, required=True, help="the --quick benchmark's retraining cache")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--stages", default="base,pixel,draws,draws2,meas,ensemble,fisher,ensemble_draws")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--allow-retrain", action="store_true", help="train missing models instead of refusing")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    ex = Experiment(args)
    for st in args.stages.split(","):
        if st and st != "report":
            t0 = time.time()
            getattr(ex, st)()
            log(f"stage {st}: {time.time() - t0:.0f}s")
    table = ex.report()
    (args.out / "why_default.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
