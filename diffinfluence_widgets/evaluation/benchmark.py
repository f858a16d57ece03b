"""``evaluate``: the paper's two evaluations (``method.md`` §7) for any dataset and model config, in one call.

In order: train the full-data model (seed 0) and generate the queries; draw M subsets, retrain each with K seeds
and measure every query under every model (common random numbers) → targets ``[Q, M, K]``; score with every
method over its damping grid (:func:`.attribution.attribute`, gradients shared); LDS per (method, λ) with the
standard error over queries *and* the two-way bootstrap over queries × subsets (:mod:`.bootstrap`); the
**recommended default** (row ``"default"``: ``default_method`` averaged over an ensemble of ``ensemble``
independently trained full-data models, λ relative to each model's τ, the extra models trained into the same
cache) against the baselines and the oracle; paired
differences between methods, each with its two-way bootstrap interval; retraining without the top-scored examples
for a few queries against random removal. Everything retrained is cached under ``cache_dir`` (content-addressed,
atomic): rerunning after an interruption resumes, and a cache of another model, dataset or recipe is not reused.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..data import ImageDataset
from ..diffusion.model import DiffusionModel
from ..diffusion.sampling import sample
from ..diffusion.train import TrainConfig
from ..config import DEFAULT_ENSEMBLE, DEFAULT_RELATIVE_DAMPING
from .attribution import METHODS, Attribution, AttributionSettings, Attributor
from .bootstrap import bootstrap_difference
from .counterfactual import retrain_without_top
from .ensemble import train_ensemble
from .lds import LDSResult, Subsets, generate_subsets, lds, lds_targets, oracle_lds, predicted_changes
from .retrain import RetrainCache, RetrainJob

__all__ = ["EvaluationSettings", "Evaluation", "evaluate", "PAPER_PAIRS", "DEFAULT_PAIRS", "DEFAULT_ROW"]

#: the row of the recommended default (``EvaluationSettings.default_method`` over an ensemble, relative λ)
DEFAULT_ROW = "default"

#: the paper's comparisons: (A, λ of A, B, λ of B, the paper's finding); λ "best" = best swept, None = no λ
PAPER_PAIRS: tuple = (
    ("K-FAC", 1e-8, "TRAK", "best", "K-FAC > TRAK"), ("K-FAC", "best", "TRAK", "best", "K-FAC > TRAK"),
    ("K-FAC", 1e-8, "D-TRAK", "best", "K-FAC ≈ D-TRAK"), ("K-FAC", 1e-8, "K-FAC reduce", 1e-8, "expand > reduce"),
    ("K-FAC", "best", "K-FAC reduce", "best", "expand > reduce"),
    ("K-FAC GGN^loss", 1e-8, "K-FAC reduce GGN^loss", 1e-8, "expand > reduce"),
    ("K-FAC", 1e-8, "K-FAC GGN^loss", 1e-8, "GGN^model ≥ GGN^loss"),
    ("K-FAC", "best", "K-FAC GGN^loss", "best", "GGN^model ≥ GGN^loss"),
    ("EK-FAC", 1e-8, "K-FAC", 1e-8, "EK-FAC ≥ K-FAC"), ("oracle", None, "D-TRAK", "best", "oracle highest"),
    ("oracle", None, "pixel", None, "oracle highest"), ("K-FAC", 1e-8, "pixel", None, "(pixel baseline)"))
#: the recommended default against the best baselines (λ "default" = ``default_damping`` for the default row,
#: ``kfac_default_damping`` for a K-FAC-family row)
DEFAULT_PAIRS: tuple = (
    (DEFAULT_ROW, "default", "D-TRAK", "best", "default > D-TRAK (best λ)"),
    (DEFAULT_ROW, "default", "pixel", None, "default > pixel similarity"),
    (DEFAULT_ROW, "default", "EK-FAC", 1e-8, "default > the paper's setting (one model, λ = 1e-8)"),
    ("oracle", None, DEFAULT_ROW, "default", "oracle highest"))


@dataclass(frozen=True)
class EvaluationSettings:
    """Everything an evaluation's numbers depend on (written to ``results.json``); presets :meth:`quick` /
    :meth:`full` are the digits benchmark's. λ grids are stated per family as ``*_damping_mode`` says
    (``"relative"`` to the method's curvature scale or ``"absolute"``); ``kfac_default_damping`` is the λ of
    the table's "default" column (the paper's untuned 1e-8, absolute).

    The recommended default's row (``"default"``) is ``default_method`` with λ relative to each model's τ over
    ``default_dampings`` (its table column at ``default_damping``), averaged over ``ensemble`` full-data models
    (seeds 0 … E-1, trained into the same cache: E − 1 more trainings on top of the M × K of the LDS);
    ``default_method=""`` leaves the row out."""

    num_subsets: int = 40
    num_seeds: int = 3
    fraction: float = 0.5
    num_queries: int = 48
    target_draws: int = 512
    attribution: AttributionSettings = AttributionSettings()
    kfac_methods: tuple[str, ...] = ("K-FAC", "EK-FAC", "K-FAC GGN^loss", "K-FAC reduce", "K-FAC reduce GGN^loss")
    trak_methods: tuple[str, ...] = ("TRAK", "D-TRAK")
    similarity_methods: tuple[str, ...] = ("pixel", "pixel (centred)")
    kfac_dampings: tuple[float, ...] = tuple(10.0 ** e for e in range(-8, 2))
    kfac_damping_mode: str = "absolute"
    kfac_default_damping: float = 1e-8
    trak_dampings: tuple[float, ...] = tuple(10.0 ** e for e in range(-6, 3))
    trak_damping_mode: str = "relative"
    default_method: str = "EK-FAC"
    ensemble: int = DEFAULT_ENSEMBLE
    default_dampings: tuple[float, ...] = tuple(10.0 ** e for e in range(-4, 2))
    default_damping: float = DEFAULT_RELATIVE_DAMPING
    pairs: tuple = PAPER_PAIRS + DEFAULT_PAIRS
    cf_queries: int = 6
    cf_fractions: tuple[float, ...] = (0.02, 0.10)
    cf_seeds: tuple[int, ...] = (0, 1)
    cf_random_sets: int = 2
    cf_methods: tuple[str, ...] = (DEFAULT_ROW, "K-FAC (λ=1e-8)", "K-FAC", "TRAK", "D-TRAK", "pixel")
    bootstrap: int = 1000
    num_workers: int = 2
    seed: int = 0
    measurement_seed: int = 12345
    #: seed of the generated queries (``None``: ``seed + 1000``). Another value draws a fresh, disjoint query set
    #: for the same models and subsets (nothing is retrained): a validation set on which to choose λ or a method
    #: without looking at the evaluation's own queries
    query_sample_seed: int | None = None

    def __post_init__(self) -> None:
        unknown = [m for m in (*self.kfac_methods, *self.trak_methods, *self.similarity_methods, self.default_method)
                   if m and m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; expected names from {list(METHODS)}")
        for f in ("num_subsets", "num_seeds", "num_queries", "target_draws", "num_workers"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"{f} must be a positive integer, got {getattr(self, f)!r}")
        if self.default_method and METHODS[self.default_method].family != "kfac":
            raise ValueError(f"default_method must be a K-FAC-family method (its λ is relative to τ), got "
                             f"{self.default_method!r}")
        if isinstance(self.ensemble, bool) or not isinstance(self.ensemble, int) or self.ensemble < 1:
            raise ValueError(f"ensemble (full-data models averaged by the default) must be a positive integer, "
                             f"got {self.ensemble!r}")
        if not any(math.isclose(d, self.default_damping, rel_tol=1e-9) for d in self.default_dampings):
            raise ValueError(f"default_damping={self.default_damping!r} must be one of default_dampings "
                             f"{self.default_dampings}")
        qs = self.query_sample_seed
        if qs is not None and (isinstance(qs, bool) or not isinstance(qs, int) or qs < 0):
            raise ValueError(f"query_sample_seed must be a non-negative integer or None, got {qs!r}")
        if self.num_seeds < 2:
            raise ValueError(f"num_seeds must be at least 2 (the oracle needs two seeds), got {self.num_seeds}")

    @classmethod
    def full(cls, **kw) -> "EvaluationSettings":
        return cls(**kw)

    @classmethod
    def quick(cls, **kw) -> "EvaluationSettings":
        base = dict(num_subsets=12, num_seeds=2, num_queries=64, target_draws=256,
                    attribution=AttributionSettings(curvature_draws=16, trak_dim=1024), cf_queries=2,
                    cf_seeds=(0,), cf_random_sets=1, cf_methods=("K-FAC (λ=1e-8)", "D-TRAK"), num_workers=1)
        return cls(**{**base, **kw})

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Evaluation:
    """What :func:`evaluate` returns: per-(method, λ) LDS results (with per-query values and bootstrap intervals),
    paired differences, the counterfactual rows, and the raw material (subsets, targets, scores, the full-data
    model and the generated queries)."""

    settings: EvaluationSettings
    subsets: Subsets
    targets: np.ndarray
    query_ids: np.ndarray
    oracle: LDSResult
    attribution: Attribution
    results: dict[str, dict[float | None, LDSResult]] = field(default_factory=dict)
    paired: list[dict] = field(default_factory=list)
    counterfactual: list[dict] = field(default_factory=list)
    counterfactual_base_loss: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)
    model: DiffusionModel | None = None  # the full-data model the scores are computed with
    query_images: torch.Tensor | None = None

    def at(self, name: str, damping: float | str | None) -> float | None:
        """The computed λ nearest (in log) to ``damping``; ``"best"`` / None: the best LDS; ``"default"``: the
        default row's ``default_damping`` or a K-FAC-family row's ``kfac_default_damping``."""
        res = self.results[name]
        if None in res:
            return None
        if damping == "default":
            damping = self.settings.default_damping if name == DEFAULT_ROW else self.settings.kfac_default_damping
        if damping is None or damping == "best":
            return max(res, key=lambda lam: res[lam].mean)
        return min(res, key=lambda lam: abs(math.log10(lam) - math.log10(float(damping))))

    def per_query(self, name: str, damping: float | str | None = "best") -> np.ndarray:
        if name == "oracle":
            return self.oracle.per_query
        return self.results[name][self.at(name, damping)].per_query

    def prediction(self, name: str, damping: float | str | None = "best") -> np.ndarray | None:
        """``[Q, M]`` predicted changes (None for the oracle)."""
        if name == "oracle":
            return None
        return predicted_changes(self.attribution.matrix(name, self.at(name, damping)), self.subsets)


def _log(progress: bool) -> Callable[[str], None]:
    return (lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)) if progress else (lambda m: None)


def evaluate(model: DiffusionModel | dict, train: ImageDataset, train_config: TrainConfig, cache_dir: str | Path, *,
             settings: EvaluationSettings | None = None, device: Any = None, progress: bool = True,
             extra_scores: dict[str, Callable[[torch.Tensor, ImageDataset], np.ndarray]] | None = None) -> Evaluation:
    """Run LDS and retraining-without-top-influences for ``train`` and the architecture of ``model``.

    ``model``: a :class:`DiffusionModel` (its architecture and schedule; weights are trained here) or a UNet
    config dict. ``train_config``: the recipe every retrained model uses. Resumable: everything trained or
    measured is cached under ``cache_dir``. ``extra_scores`` adds similarity-style rows without λ:
    ``{name: fn(query_images, train) -> [Q, N] scores in train order}`` (e.g. a CLIP feature similarity).
    """
    s = settings or EvaluationSettings()
    if not isinstance(train, ImageDataset):
        raise TypeError(f"train must be an ImageDataset (data.from_image_folder / from_arrays), got "
                        f"{type(train).__name__}")
    if s.cf_methods and s.cf_queries:
        for f in s.cf_fractions:
            if not 0 < round(float(f) * len(train)) < len(train):
                raise ValueError(f"cf_fractions: removing {f} of {len(train)} training images removes "
                                 f"{round(float(f) * len(train))}; choose fractions that remove at least one")
    base = DiffusionModel.from_config(model, seed=0) if isinstance(model, dict) else model
    if base.image_shape != train.image_shape:
        raise ValueError(f"the model makes images of shape {base.image_shape}, the training set has "
                         f"{train.image_shape}; set the UNet's sample_size / channels to match")
    log, timings, t_all = _log(progress), {}, time.time()

    def lap(name: str, t0: float) -> None:
        timings[name] = round(time.time() - t0, 1)
        log(f"{name}: {timings[name]:.0f}s")

    cache = RetrainCache(cache_dir, base, train, train_config)
    log(f"{len(train)} training images {train.image_shape}; UNet with "
        f"{sum(p.numel() for p in base.unet.parameters())} parameters; cache {cache_dir}")
    t0 = time.time()
    full_job = RetrainJob(tuple(train.ids.tolist()), 0, tag="full/seed0")
    cache.run([full_job], progress=False, device=device)
    trained = cache.load(full_job, device=device)
    trained.unet.eval()
    lap("train full-data model", t0)
    t0 = time.time()
    query_seed = s.seed + 1000 if s.query_sample_seed is None else s.query_sample_seed
    gen = sample(trained, s.num_queries, seed=query_seed, device=device)
    q_images, q_ids = gen.images.float().clamp(-1, 1).cpu(), np.arange(s.num_queries, dtype=np.int64)
    lap("generate queries", t0)

    t0 = time.time()
    subsets = generate_subsets(train.ids, s.num_subsets, s.fraction, seed=s.seed)
    targets = lds_targets(cache, subsets, list(range(s.num_seeds)), q_images, q_ids, num_draws=s.target_draws,
                          seed=s.measurement_seed, num_workers=s.num_workers, device=device, progress=progress)
    lap("LDS retraining + ground truth", t0)
    orc = oracle_lds(targets, q_ids)
    log(f"oracle LDS {orc}")

    t0 = time.time()
    att = Attributor(trained, train, q_images, q_ids, settings=s.attribution, device=device)
    scores = att.run(s.kfac_methods, s.kfac_dampings, s.kfac_damping_mode) if s.kfac_methods else None
    for part in ((s.trak_methods, s.trak_dampings, s.trak_damping_mode), (s.similarity_methods, (1.0,), "relative")):
        if part[0]:
            more = att.run(*part)
            scores = more if scores is None else scores.merge(more)
    for name, fn in (extra_scores or {}).items():
        mat = np.asarray(fn(q_images, train), dtype=np.float64)
        if mat.shape != (len(q_ids), len(train)):
            raise ValueError(f"extra_scores[{name!r}] returned shape {mat.shape}; expected {(len(q_ids), len(train))}")
        scores.scores[name], scores.absolute[name], scores.scale[name], scores.damping_mode[name] = \
            {None: mat}, {None: None}, None, None
    lap("scores", t0)
    if s.default_method:
        t0 = time.time()
        _default_row(scores, att, cache, train, q_images, q_ids, s, device)
        lap(f"default: {s.default_method} over {s.ensemble} model(s)", t0)
    ev = Evaluation(s, subsets, targets, q_ids, orc, scores, timings=timings, model=trained, query_images=q_images)
    t0 = time.time()
    for name in scores.methods:
        ev.results[name] = {lam: lds(mat, subsets, targets, q_ids, bootstrap=s.bootstrap, bootstrap_seed=s.seed)
                            for lam, mat in scores.scores[name].items()}
        best = ev.at(name, "best")
        log(f"{name}: best LDS {ev.results[name][best]} at λ={best}")
    ev.paired = _paired(ev)
    lap("LDS + bootstrap", t0)

    if s.cf_methods and s.cf_queries:
        t0 = time.time()
        cf_scores = {m: _cf_matrix(ev, m)[: s.cf_queries] for m in s.cf_methods}
        cf = retrain_without_top(cache, cf_scores, q_images[: s.cf_queries], q_ids[: s.cf_queries],
                                 fractions=s.cf_fractions, seeds=s.cf_seeds, num_random_sets=s.cf_random_sets,
                                 num_draws=s.target_draws, measurement_seed=s.measurement_seed,
                                 num_workers=s.num_workers, device=device)
        ev.counterfactual, ev.counterfactual_base_loss = cf.summary(), cf.base_loss
        for row in ev.counterfactual:  # paired over queries with the random control at the same fraction
            if row["method"] != "random":
                d = cf.increase[(row["method"], row["fraction"])] - cf.increase[("random", row["fraction"])]
                row["minus_random"] = float(d.mean())
        lap("retraining without top influences", t0)
    timings["total"] = round(time.time() - t_all, 1)
    return ev


def _default_row(scores: Attribution, att: Attributor, cache: RetrainCache, train: ImageDataset,
                 q_images: torch.Tensor, q_ids: np.ndarray, s: EvaluationSettings, device: Any) -> None:
    """Add the recommended default's row to ``scores``: the full-data model ``att`` scores with (its gradients are
    shared with the single-model rows) and ``s.ensemble - 1`` more models of other seeds, matrices averaged."""
    models = train_ensemble(cache, train, num_models=s.ensemble, num_workers=s.num_workers, device=device)
    parts = [att.run((s.default_method,), s.default_dampings, "relative")]
    for m in models[1:]:
        parts.append(Attributor(m, train, q_images, q_ids, settings=s.attribution, device=device)
                     .run((s.default_method,), s.default_dampings, "relative"))
    ens = Attribution.mean(parts)
    for d, o in ((scores.scores, ens.scores), (scores.absolute, ens.absolute), (scores.scale, ens.scale),
                 (scores.damping_mode, ens.damping_mode)):
        d[DEFAULT_ROW] = o[s.default_method]


def _cf_matrix(ev: Evaluation, label: str) -> np.ndarray:
    """``"name"`` at its best λ, or ``"name (λ=v)"`` at the computed λ nearest v."""
    m = re.fullmatch(r"(.+?) \(λ=([0-9.eE+-]+)\)", label)
    name, lam = (m.group(1), float(m.group(2))) if m else (label, "default" if label == DEFAULT_ROW else "best")
    if name not in ev.results:
        raise ValueError(f"counterfactual method {label!r}: {name!r} was not scored ({list(ev.results)})")
    return ev.attribution.matrix(name, ev.at(name, lam))


def _paired(ev: Evaluation) -> list[dict]:
    s, rows = ev.settings, []
    for a, la, b, lb, finding in s.pairs:
        if any(n != "oracle" and n not in ev.results for n in (a, b)):
            continue
        d = ev.per_query(a, la) - ev.per_query(b, lb)
        sem = float(np.std(d, ddof=1) / np.sqrt(d.size))
        iv = bootstrap_difference(ev.prediction(a, la), ev.prediction(b, lb), ev.targets, num_resamples=s.bootstrap,
                                  seed=s.seed) if s.bootstrap else None
        fmt = lambda n, l: n if l is None or n == "oracle" or None in ev.results.get(n, {}) else \
            f"{n} (λ={l if isinstance(l, str) else f'{l:g}'})"
        rows.append({"a": fmt(a, la), "b": fmt(b, lb), "finding": finding, "mean": float(d.mean()), "sem": sem,
                     "a_better_fraction": float((d > 0).mean()), "a_better": int((d > 0).sum()), "num": int(d.size),
                     "bootstrap": None if iv is None else iv.to_json()})
    return rows

