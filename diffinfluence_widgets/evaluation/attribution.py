"""One call from (model, training set, queries) to score matrices of every method over a damping grid.

:func:`attribute` scores every query against every training example for any of the methods of ``method.md`` §5 —
the K-FAC family (K-FAC, EK-FAC and the GGN^loss / reduce ablations), the TRAK family (TRAK, D-TRAK, Journey-TRAK)
and pixel similarity — over a λ grid. What the methods share is computed once and reused (:class:`Attributor`
caches it): per-example training gradients per training measurement, query gradients per measurement, each
curvature, the random projection and TRAK's eigendecomposition. A new λ is then an elementwise division.

**Damping, stated one way for every method.** By default (``damping="relative"``) a λ is a multiple of the
method's curvature scale τ: for the K-FAC family τ is the mean eigenvalue of the (E)K-FAC curvature (trace / size,
``Curvature.mean_eigenvalue()``, the same τ as ``compute_scores(relative_damping=...)``), for the TRAK family the
mean eigenvalue of ΦᵀΦ. ``damping="absolute"`` takes λ as is (the paper's ``λ = 1e-8`` of the K-FAC family is
absolute). :attr:`Attribution.absolute` records the absolute λ of every entry
and :attr:`Attribution.scale` the τ used. λ values of the two families are not comparable in absolute terms.

**Ensembles.** ``attribute([m0, m1, m2], ...)`` scores with each independently trained model and averages the
matrices (:meth:`Attribution.mean`); :func:`~diffinfluence_widgets.evaluation.train_ensemble` trains the models
through the resumable retraining cache. The recommended default (issue 14, ``bench/RESULTS.md``): EK-FAC,
λ = 1e-3 · τ, 512 query / 128 training draws, 3 models.

Sign convention as everywhere: ``s[q, j] > 0`` means removing training example j is predicted to increase the
query's measurement. Matrices are float64 ``[num_queries, num_train]`` in the training set's order.

Memory: the training gradients of each training measurement are held in memory (``N × P`` floats, P the number of
Conv2d / Linear parameters); for larger sets use the projected-gradient store of :mod:`diffinfluence_widgets.index`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..data import ImageDataset, as_id_tensor
from ..diffusion.model import DiffusionModel
from ..config import DEFAULT_QUERY_DRAWS, DEFAULT_RELATIVE_DAMPING, DEFAULT_TRAIN_DRAWS, check_damping
from ..influence.curvature import Curvature, fit_curvature
from ..influence.gradients import LayerGradients, per_example_gradients
from ..influence.projection import layer_shapes_of, make_projector
from ..influence.scores import Scores
from ..influence.trak import TRAKScorer
from .baselines import pixel_similarity

__all__ = ["MethodSpec", "METHODS", "AttributionSettings", "Attribution", "Attributor", "attribute",
           "DAMPING_MODES"]

DAMPING_MODES = ("relative", "absolute")


@dataclass(frozen=True)
class MethodSpec:
    """A method as a setting of the one framework (``method.md`` §5).

    ``family``: ``"kfac"`` (``curvature``, ``kfac_approx``, ``fisher`` of :func:`fit_curvature`), ``"trak"``
    (random projection, ``(ΦᵀΦ + λI)⁻¹``) or ``"similarity"`` (pixel cosine, ``center`` subtracts each image's
    mean). ``measurement`` is the query side, ``train_measurement`` the training side.
    """

    name: str
    family: str
    measurement: str = "loss"
    train_measurement: str = "loss"
    curvature: str = "kfac"
    kfac_approx: str = "expand"
    fisher: str = "model"
    center: bool = False

    def __post_init__(self) -> None:
        if self.family not in ("kfac", "trak", "similarity"):
            raise ValueError(f"family must be 'kfac', 'trak' or 'similarity', got {self.family!r}")


METHODS: dict[str, MethodSpec] = {m.name: m for m in [
    MethodSpec("K-FAC", "kfac"),
    MethodSpec("EK-FAC", "kfac", curvature="ekfac"),
    MethodSpec("K-FAC GGN^loss", "kfac", fisher="empirical"),
    MethodSpec("EK-FAC GGN^loss", "kfac", curvature="ekfac", fisher="empirical"),
    MethodSpec("K-FAC reduce", "kfac", kfac_approx="reduce"),
    MethodSpec("K-FAC reduce GGN^loss", "kfac", kfac_approx="reduce", fisher="empirical"),
    MethodSpec("TRAK", "trak"),
    MethodSpec("D-TRAK", "trak", measurement="square_norm", train_measurement="square_norm"),
    MethodSpec("Journey-TRAK", "trak", measurement="journey_trak"),
    MethodSpec("pixel", "similarity"),
    MethodSpec("pixel (centred)", "similarity", center=True),
]}


@dataclass(frozen=True)
class AttributionSettings:
    """Draws, projection size and seeds shared by every method.

    ``query_draws`` / ``train_draws``: (t, ε) draws per query-side / training-side gradient (default: the
    recommended :data:`~diffinfluence_widgets.config.DEFAULT_QUERY_DRAWS` = 512 and ``DEFAULT_TRAIN_DRAWS`` = 128;
    a query gradient's Monte-Carlo noise does not average out over the removed training examples, so the query side
    needs more). ``grad_draws`` sets both sides at once (the 2026-11 benchmark runs used 32 / 32); giving it
    together with a different ``query_draws`` or ``train_draws`` is an error.
    """

    query_draws: int | None = None
    train_draws: int | None = None
    curvature_draws: int = 32
    trak_dim: int = 4096
    train_seed: int = 1
    query_seed: int = 2
    curvature_seed: int = 3
    projection_seed: int = 7
    batch_size: int = 32
    grad_draws: int | None = None

    def __post_init__(self) -> None:
        for f in ("query_draws", "train_draws", "grad_draws"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{f} must be a positive integer (or None for the default), got {v!r}")
        both = self.grad_draws
        for f, default in (("query_draws", DEFAULT_QUERY_DRAWS), ("train_draws", DEFAULT_TRAIN_DRAWS)):
            v = getattr(self, f)
            if both is not None and v is not None and v != both:
                raise ValueError(f"grad_draws={both} sets both sides, but {f}={v} differs; give one or the other")
            object.__setattr__(self, f, v if v is not None else both if both is not None else default)
        for f in ("curvature_draws", "trak_dim", "batch_size"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{f} must be a positive integer, got {v!r}")


@dataclass
class Attribution:
    """Score matrices by method and stated λ (``None`` for similarity methods, which have no λ).

    ``scores[method][λ]`` is ``[Q, N]`` float64; ``absolute[method][λ]`` the absolute λ it used, ``scale[method]``
    the curvature scale τ relative dampings multiply, ``damping_mode[method]`` how λ was stated. An ensemble's
    attribution (:meth:`mean`, ``num_models`` > 1) holds the mean score matrix over its models, and the mean τ and
    mean absolute λ over them (each model's relative λ multiplies its own τ).
    """

    query_ids: np.ndarray
    train_ids: np.ndarray
    scores: dict[str, dict[float | None, np.ndarray]] = field(default_factory=dict)
    absolute: dict[str, dict[float | None, float | None]] = field(default_factory=dict)
    scale: dict[str, float | None] = field(default_factory=dict)
    damping_mode: dict[str, str | None] = field(default_factory=dict)
    num_models: int = 1

    @classmethod
    def mean(cls, parts: Sequence["Attribution"]) -> "Attribution":
        """The ensemble of attributions of the same queries, training set, methods and dampings computed with
        different models: score matrices averaged (``scores = (1/E) Σ_e scores_e``)."""
        parts = list(parts)
        if not parts:
            raise ValueError("Attribution.mean needs at least one attribution")
        first = parts[0]
        for k, p in enumerate(parts[1:], 1):
            if not (np.array_equal(first.query_ids, p.query_ids) and np.array_equal(first.train_ids, p.train_ids)):
                raise ValueError(f"attribution {k} has other queries or training examples than attribution 0")
            if {m: list(d) for m, d in p.scores.items()} != {m: list(d) for m, d in first.scores.items()}:
                raise ValueError(f"attribution {k} has other methods or dampings than attribution 0")
        mean = lambda vals: None if vals[0] is None else float(np.mean(vals))
        out = cls(first.query_ids.copy(), first.train_ids.copy(), num_models=sum(p.num_models for p in parts))
        w = np.array([p.num_models for p in parts], dtype=np.float64)
        for m, by in first.scores.items():
            out.scores[m] = {lam: sum(wi * p.scores[m][lam] for wi, p in zip(w, parts)) / w.sum() for lam in by}
            out.absolute[m] = {lam: mean([p.absolute[m][lam] for p in parts]) for lam in by}
            out.scale[m] = mean([p.scale[m] for p in parts])
            out.damping_mode[m] = first.damping_mode[m]
        return out

    @property
    def methods(self) -> list[str]:
        return list(self.scores)

    def dampings(self, method: str) -> list[float | None]:
        return list(self._of(method))

    def _of(self, method: str) -> dict:
        if method not in self.scores:
            raise KeyError(f"method {method!r} was not computed; have {self.methods}")
        return self.scores[method]

    def matrix(self, method: str, damping: float | None = None) -> np.ndarray:
        """The ``[Q, N]`` matrix at the stated λ (the only one when ``damping`` is None and there is one)."""
        by = self._of(method)
        if damping is None:
            if len(by) != 1:
                raise ValueError(f"{method} was computed at {len(by)} dampings {list(by)}; say which")
            return next(iter(by.values()))
        hit = [k for k in by if k is not None and np.isclose(k, float(damping), rtol=1e-9, atol=0)]
        if not hit:
            raise KeyError(f"{method} has no scores at λ = {damping!r}; computed: {list(by)}")
        return by[hit[0]]

    def as_scores(self, method: str, damping: float | None = None) -> Scores:
        """One matrix as :class:`~diffinfluence_widgets.influence.scores.Scores` (ids attached)."""
        return Scores(torch.from_numpy(self.matrix(method, damping)), torch.from_numpy(self.query_ids),
                      torch.from_numpy(self.train_ids),
                      settings={"method": method, "damping": damping, "damping_mode": self.damping_mode[method]})

    def merge(self, other: "Attribution") -> "Attribution":
        """Add another run's methods (same queries and training set)."""
        if not (np.array_equal(self.query_ids, other.query_ids) and np.array_equal(self.train_ids, other.train_ids)):
            raise ValueError("can only merge attributions of the same queries and training set")
        if self.num_models != other.num_models:
            raise ValueError(f"cannot merge an attribution of {other.num_models} models into one of "
                             f"{self.num_models}")
        for d, o in ((self.scores, other.scores), (self.absolute, other.absolute), (self.scale, other.scale),
                     (self.damping_mode, other.damping_mode)):
            d.update(o)
        return self


def _flat64(grads: LayerGradients) -> torch.Tensor:
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.layers.values()], 1).double()


class Attributor:
    """Holds what methods share (gradients, curvatures, projections) so that :meth:`run` reuses it.

    ``curvatures`` may give fitted curvatures by method name (else they are fitted on ``train`` with
    ``settings.curvature_draws``); ``trajectory`` (from ``sample(..., keep_trajectory=True)``) is needed by
    Journey-TRAK only.
    """

    def __init__(self, model: DiffusionModel, train: ImageDataset, query_images: torch.Tensor,
                 query_ids: Sequence[int] | None = None, *, settings: AttributionSettings | None = None,
                 curvatures: Mapping[str, Curvature] | None = None, trajectory: Any = None, device: Any = None):
        if not isinstance(train, ImageDataset):
            raise TypeError(f"train must be an ImageDataset (see data.from_arrays), got {type(train).__name__}")
        if not isinstance(query_images, torch.Tensor) or query_images.dim() != 4:
            raise TypeError(f"query_images must be a tensor [Q, C, H, W] in [-1, 1], got "
                            f"{getattr(query_images, 'shape', type(query_images).__name__)}")
        self.model, self.train, self.device, self.trajectory = model, train, device, trajectory
        self.query_images = query_images
        q = query_images.shape[0]
        self.query_ids = as_id_tensor(range(q) if query_ids is None else query_ids, "query_ids")
        if self.query_ids.numel() != q:
            raise ValueError(f"got {self.query_ids.numel()} query ids for {q} query images")
        self.settings = settings or AttributionSettings()
        self._curvatures: dict[str, Curvature] = dict(curvatures or {})
        self._grads: dict[tuple[str, str], LayerGradients] = {}
        self._flat: dict[str, torch.Tensor] = {}
        self._trak: dict[str, TRAKScorer] = {}
        self._projector = None

    # -- shared pieces -------------------------------------------------------------------------------------
    def gradients(self, side: str, measurement: str) -> LayerGradients:
        """Per-example gradients of ``measurement`` on the ``"train"`` or ``"query"`` side (computed once)."""
        key = (side, measurement)
        if key not in self._grads:
            s = self.settings
            if side == "train":
                images, ids, seed, traj = self.train.images, self.train.ids, s.train_seed, None
            else:
                images, ids, seed, traj = self.query_images, self.query_ids, s.query_seed, None
                if measurement.startswith("journey_trak"):
                    if self.trajectory is None:
                        raise ValueError("Journey-TRAK needs the queries' sampling trajectory: pass trajectory= "
                                         "(sample(..., keep_trajectory=True).trajectory)")
                    traj = self.trajectory
            draws = s.train_draws if side == "train" else s.query_draws
            self._grads[key] = per_example_gradients(self.model, images, ids, measurement, num_draws=draws,
                                                     seed=seed, batch_size=s.batch_size, trajectory=traj,
                                                     device=self.device, progress=False)
        return self._grads[key]

    def curvature(self, spec: MethodSpec) -> Curvature:
        if spec.name not in self._curvatures:
            self._curvatures[spec.name] = fit_curvature(
                self.model, self.train, method=spec.curvature, kfac_approx=spec.kfac_approx, fisher=spec.fisher,
                num_draws=self.settings.curvature_draws, seed=self.settings.curvature_seed, device=self.device,
                progress=False)
        return self._curvatures[spec.name]

    def _train_flat(self, measurement: str) -> torch.Tensor:
        if measurement not in self._flat:
            self._flat[measurement] = _flat64(self.gradients("train", measurement))
        return self._flat[measurement]

    def _scorer(self, train_measurement: str) -> TRAKScorer:
        if train_measurement not in self._trak:
            g = self.gradients("train", train_measurement)
            if self._projector is None:
                self._projector = make_projector(layer_shapes_of(g.layers), self.settings.trak_dim,
                                                 seed=self.settings.projection_seed)
            self._trak[train_measurement] = TRAKScorer(self._projector.project(g).numpy())
        return self._trak[train_measurement]

    # -- scoring ---------------------------------------------------------------------------------------------
    def run(self, methods: Sequence[str | MethodSpec], dampings: Sequence[float] = (1.0,),
            damping: str = "relative") -> Attribution:
        """Scores of every method at every λ of ``dampings`` (stated as ``damping``: relative or absolute)."""
        if damping not in DAMPING_MODES:
            raise ValueError(f"damping must be one of {DAMPING_MODES} (how λ is stated), got {damping!r}")
        lams = [check_damping(d) for d in dampings]
        if not lams:
            raise ValueError("dampings is empty")
        specs = [_spec(m) for m in methods]
        out = Attribution(self.query_ids.numpy().copy(), self.train.ids.numpy().copy())
        for spec in specs:
            if spec.family == "similarity":
                sim = pixel_similarity(self.query_images, self.train, query_ids=self.query_ids, center=spec.center)
                by, absolute, tau, mode = {None: np.asarray(sim.matrix, dtype=np.float64)}, {None: None}, None, None
            elif spec.family == "kfac":
                by, absolute, tau = self._kfac(spec, lams, damping)
                mode = damping
            else:
                by, absolute, tau = self._trak_scores(spec, lams, damping)
                mode = damping
            out.scores[spec.name], out.absolute[spec.name] = by, absolute
            out.scale[spec.name], out.damping_mode[spec.name] = tau, mode
        return out

    def _kfac(self, spec: MethodSpec, lams: list[float], mode: str):
        curv = self.curvature(spec)
        tau = curv.mean_eigenvalue()
        q = self.gradients("query", spec.measurement)
        train_flat = self._train_flat(spec.train_measurement)
        names = curv.layer_names
        rotated = curv.rotate({n: q.layers[n].double() for n in names})  # once; every λ is a division
        by, absolute = {}, {}
        for lam in lams:
            a = lam * tau if mode == "relative" else lam
            pre = curv.unrotate(curv.precondition_rotated(rotated, a))
            flat = torch.cat([pre[n].reshape(pre[n].shape[0], -1) for n in names], 1)
            by[lam], absolute[lam] = (flat @ train_flat.T).numpy(), a
        return by, absolute, tau

    def _trak_scores(self, spec: MethodSpec, lams: list[float], mode: str):
        scorer = self._scorer(spec.train_measurement)
        rotated = scorer.rotate(self._projector.project(self.gradients("query", spec.measurement)).numpy())
        tau = scorer.default_damping(1.0)
        by, absolute = {}, {}
        for lam in lams:
            a = scorer.default_damping(lam) if mode == "relative" else lam
            by[lam], absolute[lam] = scorer.scores(rotated, a), a
        return by, absolute, tau


def _spec(m: str | MethodSpec) -> MethodSpec:
    if isinstance(m, MethodSpec):
        return m
    if m not in METHODS:
        raise ValueError(f"unknown method {m!r}; expected one of {list(METHODS)} or a MethodSpec")
    return METHODS[m]


def attribute(model: DiffusionModel | Sequence[DiffusionModel], train: ImageDataset, query_images: torch.Tensor,
              query_ids: Sequence[int] | None = None, *, methods: Sequence[str | MethodSpec] = ("EK-FAC",),
              dampings: Sequence[float] = (DEFAULT_RELATIVE_DAMPING,), damping: str = "relative",
              settings: AttributionSettings | None = None, curvatures: Mapping[str, Curvature] | None = None,
              trajectory: Any = None, device: Any = None) -> Attribution:
    """Score ``query_images`` against ``train`` for each method in ``methods`` at each λ in ``dampings``.

    ``model``: one model, or an **ensemble** — a sequence of models trained independently on the same data (e.g.
    :func:`~diffinfluence_widgets.evaluation.train_ensemble`, :data:`~diffinfluence_widgets.config.DEFAULT_ENSEMBLE`
    = 3 seeds): each model is scored on its own (its own gradients, curvature and τ) and the score matrices are
    averaged (:meth:`Attribution.mean`). The recommended default is EK-FAC, λ = 1e-3 · τ (relative), 512 / 128
    draws, on an ensemble of 3 models; the paper's setting is one model, ``dampings=(1e-8,), damping="absolute"``
    (see README, "Method settings and defaults").

    ``methods``: names from :data:`METHODS` ("K-FAC", "EK-FAC", "K-FAC GGN^loss", "EK-FAC GGN^loss",
    "K-FAC reduce", "K-FAC reduce GGN^loss", "TRAK", "D-TRAK", "Journey-TRAK", "pixel", "pixel (centred)") or
    :class:`MethodSpec` objects. ``dampings`` are multiples of each method's curvature scale
    (``damping="relative"``, the default) or absolute values (``damping="absolute"``); see the module docstring.
    Training gradients are computed once per training measurement and shared by all methods and dampings; to
    share them across several calls, use one :class:`Attributor` and call :meth:`Attributor.run`.
    """
    models = [model] if isinstance(model, DiffusionModel) else list(model) if isinstance(model, (list, tuple)) \
        else None
    if not models or not all(isinstance(m, DiffusionModel) for m in models):
        kinds = "" if models is None else f" of {[type(m).__name__ for m in models]}"
        raise TypeError(f"model must be a DiffusionModel or a non-empty list of them (an ensemble), got "
                        f"{type(model).__name__}{kinds}")
    if curvatures and len(models) > 1:
        raise ValueError("curvatures= holds one model's curvatures; an ensemble fits each model's own "
                         f"(got {len(models)} models)")
    return Attribution.mean([Attributor(m, train, query_images, query_ids, settings=settings, curvatures=curvatures,
                                        trajectory=trajectory, device=device).run(methods, dampings, damping)
                             for m in models])
