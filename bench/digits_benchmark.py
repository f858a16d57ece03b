#!/usr/bin/env python
"""Digits benchmark: the paper's two evaluations (``method.md`` §7) end to end on the bundled digits.

What it does, in order:

1. Train the full-data model (seed 0) on ``num_train`` 8×8 digits and generate ``num_queries`` query samples.
2. **LDS.** Draw M subsets (α = 50%), retrain each with K seeds (resumable cache, ``num_workers`` processes),
   measure every query's loss under every model with common random numbers → targets ``[Q, M, K]``.
3. Score every training example for every query with each method:

   * K-FAC influence (loss, K-FAC-expand, GGN^model) — the paper's method — and EK-FAC;
   * the ablations GGN^loss (empirical Fisher) and K-FAC-reduce;
   * TRAK (∇loss, GGN^loss in a random-projection space) and D-TRAK (∇square-norm on both sides);
   * pixel-space cosine similarity (raw and mean-centred); the exact-retraining oracle.

   Every family is swept over damping λ (changing λ needs no refit: the query gradients are rotated into the
   eigenbasis once, TRAK's Gram matrix is eigendecomposed once). λ values are not comparable across families.
4. **Retraining without the top 2% / 10%** of the training set for a few queries, for the chosen methods
   (each at its best swept λ, K-FAC also at the untuned 1e-8), against removing a random 2% / 10%.
5. Print the tables, write ``results.json``, ``table.md`` and plotly figures (HTML + PNG) to ``--out``.

Retrained models are cached under ``--cache`` (default ``artifacts/bench-digits/<preset>``); rerunning after an
interruption resumes. ``--quick`` is a ~10–15 minute single-thread setting; the default (full) setting takes
about 90 minutes with ``--workers 2`` on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffinfluence_widgets.data import load_digits
from diffinfluence_widgets.diffusion import DiffusionModel, tiny_unet_config
from diffinfluence_widgets.diffusion.sampling import sample
from diffinfluence_widgets.diffusion.train import TrainConfig
from diffinfluence_widgets.evaluation.baselines import pixel_similarity
from diffinfluence_widgets.evaluation.counterfactual import retrain_without_top
from diffinfluence_widgets.evaluation.lds import generate_subsets, lds, lds_targets, oracle_lds
from diffinfluence_widgets.evaluation.retrain import RetrainCache, RetrainJob
from diffinfluence_widgets.influence.curvature import fit_curvature
from diffinfluence_widgets.influence.gradients import per_example_gradients
from diffinfluence_widgets.influence.projection import layer_shapes_of, make_projector
from diffinfluence_widgets.influence.trak import TRAKScorer

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Settings:
    """Everything the benchmark's numbers depend on (written to results.json)."""

    preset: str = "full"
    size: int = 8
    num_train: int = 512
    unet_channels: tuple[int, int] = (8, 16)
    train_steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    ema_decay: float = 0.995
    num_subsets: int = 40
    num_seeds: int = 3
    fraction: float = 0.5
    num_queries: int = 48
    target_draws: int = 512
    grad_draws: int = 64
    curvature_draws: int = 32
    trak_dim: int = 4096
    kfac_dampings: tuple[float, ...] = tuple(10.0 ** e for e in range(-8, 2))
    trak_relative_dampings: tuple[float, ...] = tuple(10.0 ** e for e in range(-6, 3))
    cf_queries: int = 6
    cf_fractions: tuple[float, ...] = (0.02, 0.10)
    cf_seeds: tuple[int, ...] = (0, 1)
    cf_random_sets: int = 2
    cf_methods: tuple[str, ...] = ("K-FAC (λ=1e-8)", "K-FAC", "TRAK", "D-TRAK", "pixel")
    num_workers: int = 2
    seed: int = 0

    @classmethod
    def quick(cls) -> "Settings":
        return cls(preset="quick", num_train=160, train_steps=400, num_subsets=12, num_seeds=2, num_queries=64,
                   target_draws=256, grad_draws=32, curvature_draws=16, trak_dim=1024, cf_queries=2,
                   cf_seeds=(0,), cf_random_sets=1, cf_methods=("K-FAC (λ=1e-8)", "D-TRAK"), num_workers=1)

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.train_steps, batch_size=self.batch_size, lr=self.lr, warmup=50,
                           ema_decay=self.ema_decay, checkpoint_every=max(50, self.train_steps // 4))

    def unet_config(self) -> dict:
        return dict(tiny_unet_config(self.size), block_out_channels=tuple(self.unet_channels),
                    norm_num_groups=min(4, self.unet_channels[0]))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------- scoring
def flat(grads, names) -> torch.Tensor:
    return torch.cat([grads.layers[n].reshape(grads.layers[n].shape[0], -1) for n in names], 1).double()


def kfac_sweep(curv, q_grads, train_flat: torch.Tensor, dampings) -> dict[float, np.ndarray]:
    """Scores ``(G + λI)⁻¹ g_q · g_j`` for every λ; the query is rotated into the eigenbasis once."""
    names = curv.layer_names
    rotated = curv.rotate({n: q_grads.layers[n].double() for n in names})
    out = {}
    for lam in dampings:
        pre = curv.unrotate(curv.precondition_rotated(rotated, lam))
        q = torch.cat([pre[n].reshape(pre[n].shape[0], -1) for n in names], 1)
        out[float(lam)] = (q @ train_flat.T).numpy()
    return out


def trak_sweep(phi_train: torch.Tensor, phi_query: torch.Tensor, relative_dampings) -> tuple[dict, float]:
    """``φ_qᵀ (ΦᵀΦ + λI)⁻¹ φ_j`` for λ = relative × mean eigenvalue of ΦᵀΦ (``influence.trak.TRAKScorer``:
    one eigendecomposition, then every λ is a division)."""
    scorer = TRAKScorer(phi_train.numpy())
    rotated = scorer.rotate(phi_query.numpy())
    out = {}
    for r in relative_dampings:
        lam = scorer.default_damping(float(r))
        out[lam] = scorer.scores(rotated, lam)
    return out, scorer.default_damping(1.0)


# ---------------------------------------------------------------------------------------------------- figures
def save_figure(fig, out: Path, name: str) -> list[str]:
    os.environ.setdefault("BROWSER_PATH", "/usr/bin/chromium")
    paths = [out / f"{name}.html", out / f"{name}.png"]
    fig.write_html(paths[0], include_plotlyjs="cdn")
    try:
        fig.write_image(paths[1], width=1100, height=480, scale=1)
    except Exception as e:  # kaleido needs a Chromium; the HTML is still written
        log(f"PNG export of {name} failed ({type(e).__name__}: {e}); HTML only")
        paths = paths[:1]
    return [str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in paths]


def damping_figure(sweeps: dict, oracle, pixel):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("K-FAC family: λ added to the GGN eigenvalues",
                                                        "TRAK family: λ added to ΦᵀΦ"))
    for col, family in ((1, "kfac"), (2, "trak")):
        for name, sw in sweeps.items():
            if sw["family"] != family:
                continue
            lam = [p["damping"] for p in sw["points"]]
            fig.add_trace(go.Scatter(x=lam, y=[100 * p["lds"] for p in sw["points"]], name=name, mode="lines+markers",
                                     error_y=dict(type="data", array=[100 * p["sem"] for p in sw["points"]])),
                          row=1, col=col)
        for value, label, dash in ((oracle, "oracle (exact retraining)", "dash"), (pixel, "pixel similarity", "dot")):
            fig.add_hline(y=100 * value, line_dash=dash, annotation_text=label, row=1, col=col)
        fig.update_xaxes(type="log", title_text="damping λ", row=1, col=col)
    fig.update_yaxes(title_text="LDS (%)", row=1, col=1)
    fig.update_layout(title="Digits: LDS vs damping (mean ± s.e. over queries)")
    return fig


def counterfactual_figure(rows):
    import plotly.graph_objects as go

    fig = go.Figure()
    for f in sorted({r["fraction"] for r in rows}):
        sel = [r for r in rows if r["fraction"] == f]
        fig.add_trace(go.Bar(x=[r["method"] for r in sel], y=[r["mean_increase"] for r in sel],
                             error_y=dict(type="data", array=[r["sem"] for r in sel]), name=f"remove {100 * f:g}%"))
    fig.update_layout(barmode="group", yaxis_title="increase of the query's loss",
                      title="Digits: retraining without the top-scored training examples vs random removal")
    return fig


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the ~10-15 minute single-thread setting")
    ap.add_argument("--workers", type=int, default=None, help="retraining processes (default: preset's)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    ap.add_argument("--cache", type=Path, default=None, help="retraining cache folder")
    ap.add_argument("--out", type=Path, default=None, help="where tables and figures go")
    ap.add_argument("--clip", type=Path, default=None,
                    help="folder of a locally stored CLIP model (transformers format): adds a CLIP-similarity row")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a setting, e.g. --set num_subsets=20 (repeatable; tuples as 1,2)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    s = Settings.quick() if args.quick else Settings()
    for kv in args.set:
        k, _, v = kv.partition("=")
        if k not in {f.name for f in dataclasses.fields(s)}:
            ap.error(f"unknown setting {k!r}")
        cur = getattr(s, k)
        if isinstance(cur, tuple):
            conv = type(cur[0]) if cur else float
            val = tuple(conv(x) for x in v.split(",")) if v else ()
        else:
            val = type(cur)(v)
        s = dataclasses.replace(s, **{k: val})
    if args.workers is not None:
        s = dataclasses.replace(s, num_workers=args.workers)
    cache_dir = args.cache or ROOT / "artifacts" / "bench-digits" / s.preset
    out = args.out or ROOT / "bench" / "results" / f"digits-{s.preset}"
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.time()

    def lap(name: str, t0: float) -> None:
        timings[name] = round(time.time() - t0, 1)
        log(f"{name}: {timings[name]:.0f}s")

    # 1. data, full-data model, queries ------------------------------------------------------------------------
    train = load_digits(size=s.size, split="train", limit=s.num_train)
    base = DiffusionModel.from_config(s.unet_config(), seed=0)
    cache = RetrainCache(cache_dir, base, train, s.train_config())
    log(f"{len(train)} training digits at {s.size}x{s.size}; UNet with "
        f"{sum(p.numel() for p in base.unet.parameters())} parameters; cache {cache_dir}")
    t0 = time.time()
    full_job = RetrainJob(tuple(train.ids.tolist()), 0, tag="full/seed0")
    cache.run([full_job], progress=False)
    model = cache.load(full_job)
    model.unet.eval()
    lap("train full-data model", t0)
    t0 = time.time()
    gen = sample(model, s.num_queries, seed=s.seed + 1000)
    q_images, q_ids = gen.images.float().clamp(-1, 1), np.arange(s.num_queries, dtype=np.int64)
    lap("generate queries", t0)

    # 2. LDS targets --------------------------------------------------------------------------------------------
    t0 = time.time()
    subsets = generate_subsets(train.ids, s.num_subsets, s.fraction, seed=s.seed)
    seeds = list(range(s.num_seeds))
    targets = lds_targets(cache, subsets, seeds, q_images, q_ids, num_draws=s.target_draws, seed=12345,
                          num_workers=s.num_workers)
    lap("LDS retraining + ground truth", t0)
    orc = oracle_lds(targets, q_ids)
    log(f"oracle LDS {orc}")

    # 3. scores -------------------------------------------------------------------------------------------------
    t0 = time.time()
    g_train = per_example_gradients(model, train.images, train.ids, "loss", num_draws=s.grad_draws, seed=1)
    g_query = per_example_gradients(model, q_images, q_ids, "loss", num_draws=s.grad_draws, seed=2)
    names = list(g_train.layers)
    train_flat = flat(g_train, names)
    lap("gradients (loss)", t0)

    sweeps: dict[str, dict] = {}
    score_at: dict[str, dict[float, np.ndarray]] = {}
    per_query: dict[str, dict[float, np.ndarray]] = {"oracle": {0.0: orc.per_query}}

    def record(name: str, family: str, scores_by_lambda: dict, extra: dict | None = None) -> None:
        pts = []
        for lam, mat in scores_by_lambda.items():
            r = lds(mat, subsets, targets, q_ids)
            pts.append({"damping": lam, "lds": r.mean, "sem": r.sem, "undefined": r.num_undefined})
            per_query.setdefault(name, {})[float(lam)] = r.per_query
        sweeps[name] = {"family": family, "points": pts, **(extra or {})}
        score_at[name] = scores_by_lambda
        best = max(pts, key=lambda p: p["lds"])
        log(f"{name}: best LDS {100 * best['lds']:.1f} ± {100 * best['sem']:.1f} at λ={best['damping']:.3g}")

    variants = [("K-FAC", "kfac", "expand", "model"), ("EK-FAC", "ekfac", "expand", "model"),
                ("K-FAC GGN^loss", "kfac", "expand", "empirical"), ("K-FAC reduce", "kfac", "reduce", "model"),
                ("K-FAC reduce GGN^loss", "kfac", "reduce", "empirical")]
    for name, method, approx, fisher in variants:
        t0 = time.time()
        curv = fit_curvature(model, train, method=method, kfac_approx=approx, fisher=fisher,
                             num_draws=s.curvature_draws, seed=3, progress=False)
        tau = float(np.mean([curv.eigenvalues[n].mean().item() for n in curv.layer_names]))
        record(name, "kfac", kfac_sweep(curv, g_query, train_flat, s.kfac_dampings),
               {"method": method, "kfac_approx": approx, "fisher": fisher, "mean_eigenvalue": tau})
        lap(f"curvature + scores: {name}", t0)

    t0 = time.time()
    proj = make_projector(layer_shapes_of(g_train.layers), s.trak_dim, seed=7)
    trak_scores, tau = trak_sweep(proj.project(g_train), proj.project(g_query), s.trak_relative_dampings)
    record("TRAK", "trak", trak_scores, {"projection_dim": s.trak_dim, "tau": tau})
    del g_train
    gs_train = per_example_gradients(model, train.images, train.ids, "square_norm", num_draws=s.grad_draws, seed=1)
    gs_query = per_example_gradients(model, q_images, q_ids, "square_norm", num_draws=s.grad_draws, seed=2)
    dtrak_scores, tau = trak_sweep(proj.project(gs_train), proj.project(gs_query), s.trak_relative_dampings)
    record("D-TRAK", "trak", dtrak_scores, {"projection_dim": s.trak_dim, "tau": tau})
    del gs_train
    lap("TRAK + D-TRAK", t0)

    pixel = {}
    for name, center in (("pixel", False), ("pixel (centred)", True)):
        sim = pixel_similarity(q_images, train, query_ids=q_ids, center=center)
        r = lds(sim, subsets, targets, q_ids)
        pixel[name] = {"scores": sim.matrix, "lds": r.mean, "sem": r.sem}
        per_query[name] = {0.0: r.per_query}
        log(f"{name}: LDS {r}")
    if args.clip is not None:
        from diffinfluence_widgets.evaluation.baselines import clip_image_encoder, feature_similarity

        sim = feature_similarity(clip_image_encoder(args.clip), q_images, train, query_ids=q_ids, name="clip")
        r = lds(sim, subsets, targets, q_ids)
        pixel["CLIP"] = {"scores": sim.matrix, "lds": r.mean, "sem": r.sem}
        log(f"CLIP similarity: LDS {r}")

    # table ------------------------------------------------------------------------------------------------------
    def at(name: str, lam: float | None):
        pts = sweeps[name]["points"]
        if lam is None:
            return max(pts, key=lambda p: p["lds"])
        return min(pts, key=lambda p: abs(math.log10(p["damping"]) - math.log10(lam)))

    rows = []
    paper = {"K-FAC": "21.5 ± 0.9", "EK-FAC": "—", "K-FAC GGN^loss": "17.9", "K-FAC reduce": "6.5",
             "K-FAC reduce GGN^loss": "6.1", "TRAK": "10.3 ± 0.8", "D-TRAK": "20.9 ± 0.9"}
    labels = {"K-FAC": "K-FAC influence (loss, expand, GGN^model)", "EK-FAC": "EK-FAC influence (expand, GGN^model)",
              "K-FAC GGN^loss": "ablation: expand + GGN^loss", "K-FAC reduce": "ablation: reduce + GGN^model",
              "K-FAC reduce GGN^loss": "ablation: reduce + GGN^loss", "TRAK": "TRAK (best λ)",
              "D-TRAK": "D-TRAK (best λ)"}
    for name in ("K-FAC", "EK-FAC", "K-FAC GGN^loss", "K-FAC reduce", "K-FAC reduce GGN^loss"):
        d, b = at(name, 1e-8), at(name, None)
        rows.append({"method": labels[name], "lds_default": d["lds"], "sem_default": d["sem"], "lds_best": b["lds"],
                     "sem_best": b["sem"], "best_damping": b["damping"], "paper_cifar2": paper[name]})
    for name in ("TRAK", "D-TRAK"):
        b = at(name, None)
        rows.append({"method": labels[name], "lds_default": None, "sem_default": None, "lds_best": b["lds"],
                     "sem_best": b["sem"], "best_damping": b["damping"], "paper_cifar2": paper[name]})
    for name in pixel:
        rows.append({"method": f"{name} cosine similarity", "lds_default": pixel[name]["lds"],
                     "sem_default": pixel[name]["sem"], "lds_best": None, "sem_best": None, "best_damping": None,
                     "paper_cifar2": "5.3 ± 0.7" if name == "CLIP" else "—"})
    rows.append({"method": "exact retraining (oracle)", "lds_default": orc.mean, "sem_default": orc.sem,
                 "lds_best": None, "sem_best": None, "best_damping": None, "paper_cifar2": "50.3 ± 0.2"})

    def pct(v, e):
        return "—" if v is None else f"{100 * v:.1f} ± {100 * e:.1f}"

    lines = ["| method | LDS (%) at λ = 1e-8 / no λ | LDS (%) at best swept λ | best λ | paper, CIFAR-2 |",
             "|---|---|---|---|---|"]
    for r in rows:
        lam = "—" if r["best_damping"] is None else f"{r['best_damping']:.3g}"
        lines.append(f"| {r['method']} | {pct(r['lds_default'], r['sem_default'])} | "
                     f"{pct(r['lds_best'], r['sem_best'])} | {lam} | {r['paper_cifar2']} |")
    # paired differences over the same queries: far less noisy than comparing two means ± s.e.
    def pq(name: str, lam: float | None | str) -> np.ndarray:
        if name not in sweeps:
            return next(iter(per_query[name].values()))
        return per_query[name][at(name, None if lam == "best" else lam)["damping"]]

    pairs = [("K-FAC", 1e-8, "TRAK", "best", "K-FAC > TRAK"), ("K-FAC", "best", "TRAK", "best", "K-FAC > TRAK"),
             ("K-FAC", 1e-8, "D-TRAK", "best", "K-FAC ≈ D-TRAK"), ("K-FAC", 1e-8, "K-FAC reduce", 1e-8, "expand > reduce"),
             ("K-FAC", "best", "K-FAC reduce", "best", "expand > reduce"),
             ("K-FAC GGN^loss", 1e-8, "K-FAC reduce GGN^loss", 1e-8, "expand > reduce"),
             ("K-FAC", 1e-8, "K-FAC GGN^loss", 1e-8, "GGN^model ≥ GGN^loss"),
             ("K-FAC", "best", "K-FAC GGN^loss", "best", "GGN^model ≥ GGN^loss"),
             ("EK-FAC", 1e-8, "K-FAC", 1e-8, "EK-FAC ≥ K-FAC"), ("oracle", None, "D-TRAK", "best", "oracle highest"),
             ("oracle", None, "pixel", None, "oracle highest"), ("K-FAC", 1e-8, "pixel", None, "(pixel baseline)")]
    paired = []
    pair_lines = ["| comparison (A − B, per-query LDS) | paper's finding | mean difference (pp) ± s.e. | A better in |",
                  "|---|---|---|---|"]
    for a, la, b, lb, finding in pairs:
        d = pq(a, la) - pq(b, lb)
        sem = float(np.std(d, ddof=1) / np.sqrt(d.size))
        fmt = lambda n, l: n if l is None else f"{n} (λ={'best' if l == 'best' else f'{l:g}'})"
        paired.append({"a": fmt(a, la), "b": fmt(b, lb), "finding": finding, "mean": float(d.mean()), "sem": sem,
                       "a_better_fraction": float((d > 0).mean())})
        pair_lines.append(f"| {fmt(a, la)} − {fmt(b, lb)} | {finding} | {100 * d.mean():+.1f} ± {100 * sem:.1f} | "
                          f"{int((d > 0).sum())}/{d.size} queries |")

    sweep_lines = ["| method | " + " | ".join(["λ → LDS (%)"]) + " |", "|---|---|"]
    for name, sw in sweeps.items():
        sweep_lines.append(f"| {name} | " + ", ".join(f"{p['damping']:.2g}: {100 * p['lds']:.1f}"
                                                     for p in sw["points"]) + " |")

    # 4. retraining without the top influences ------------------------------------------------------------------
    t0 = time.time()
    cf_scores = {}
    for m in s.cf_methods:
        if m == "K-FAC (λ=1e-8)":
            mat = score_at["K-FAC"][at("K-FAC", 1e-8)["damping"]]
        elif m == "pixel":
            mat = pixel["pixel"]["scores"]
        else:
            mat = score_at[m][at(m, None)["damping"]]
        cf_scores[m] = mat[: s.cf_queries]
    cf = retrain_without_top(cache, cf_scores, q_images[: s.cf_queries], q_ids[: s.cf_queries],
                             fractions=s.cf_fractions, seeds=s.cf_seeds, num_random_sets=s.cf_random_sets,
                             num_draws=s.target_draws, measurement_seed=12345, num_workers=s.num_workers)
    lap("retraining without top influences", t0)
    cf_rows = cf.summary()
    cf_lines = ["| method | removed | loss increase (mean ± s.e. over queries) |", "|---|---|---|"]
    for r in sorted(cf_rows, key=lambda r: (r["fraction"], r["method"] == "random", -r["mean_increase"])):
        cf_lines.append(f"| {r['method']} | {100 * r['fraction']:g}% | {r['mean_increase']:.5f} ± {r['sem']:.5f} |")
    cf_lines.append(f"\nbase loss of these queries under the full-data models: "
                    f"{', '.join(f'{v:.4f}' for v in cf.base_loss)}")

    # 5. output ---------------------------------------------------------------------------------------------------
    figs = save_figure(damping_figure(sweeps, orc.mean, pixel["pixel"]["lds"]), out, "damping_sweep")
    figs += save_figure(counterfactual_figure(cf_rows), out, "retrain_without_top")
    timings["total"] = round(time.time() - t_all, 1)
    cmd = "python bench/digits_benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = "\n".join(["### LDS", "", *lines, "", "### Paired comparisons", "", *pair_lines, "",
                       "### Damping sweeps", "", *sweep_lines, "",
                       "### Retraining without the top-scored examples", "", *cf_lines])
    (out / "table.md").write_text(f"Command: `{cmd.strip()}`\n\n{table}\n")
    result = {"settings": dataclasses.asdict(s), "command": cmd.strip(), "timings_s": timings, "table": rows,
              "sweeps": sweeps, "paired": paired, "oracle": {"mean": orc.mean, "sem": orc.sem},
              "counterfactual": cf_rows, "figures": figs,
              "target_spread": {"between_subsets_sd": float(targets.mean(2).std(1).mean()),
                                "between_seeds_sd": float(targets.std(2, ddof=1).mean())}}
    (out / "results.json").write_text(json.dumps(result, indent=1, default=float))
    print("\n" + table + "\n")
    print(f"timings (s): {timings}\nfigures: {figs}")
    return result


if __name__ == "__main__":
    main()
