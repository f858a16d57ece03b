"""The projected backend: stores + FAISS + one :class:`~diffinfluence_widgets.influence.preconditioners.Preconditioner`
per method (``method.md`` §6).

Scores are ``s[q, j] = ⟨feature_λ(q), φ_j⟩``: only the query is preconditioned; the training side is an array of a
projected-gradient store (:mod:`diffinfluence_widgets.store`) that never depends on λ, the query's measurement or the
query, so one FAISS index (:mod:`.faiss_index`) serves every setting of the explorer. Top-k opponents are the top-k
of the negated query. Sign convention: a **positive** score means removing the training example is predicted to
**increase** the query's measurement (a proponent for the loss).
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..backend import PreparedQuery, SearchResult
from ..config import IndexConfig, IndexKind, StoreConfig, StoreSpace, check_damping, split_settings
from ..influence import buffers
from ..influence.gradients import layer_shapes, per_example_gradients
from ..influence.preconditioners import Preconditioner, PreconditionerContext, make_preconditioner
from ..influence.projected import projected_gradients, whitened_layer_feature
from ..influence.projection import KroneckerProjector, make_projector
from ..measurements import get_measurement, timestep_bands
from ..store import ProjectedStore, StoreError, StoreMismatchError, build_store, store_feature_fn
from ..store.manifest import _canonical, _curvature_fingerprint, _json_bytes
from .exact import exact_rotation, instant, refine, setup_exact
from .faiss_index import FeatureIndex
from .queries import GENERATED_ID_BASE, QueryBook

__all__ = ["IndexBackend", "GENERATED_ID_BASE", "RESCORE_CACHE_BYTES"]

#: memory for the full training gradients kept for exact rescoring (oldest evicted first)
RESCORE_CACHE_BYTES = 512 << 20
DEFAULT_MEASUREMENTS = (
    "loss", "elbo_simplified", "square_norm", "loss_at_t=100", "loss_at_t=500", "journey_trak")


@dataclass
class _Payload:
    pre: Preconditioner  # the method's preconditioner
    rotated: Any  # what pre.rotate gave for rows [whole, band parts...]
    band_rows: list[int]  # row (in rotated) of each band's part, or -1 for "no contribution"
    measurement: str  # the measurement actually differentiated (journey_trak overrides)
    last: Any = None  # (key, feature) of the last λ asked (the slider asks search, then band_profile)
    exact_rot: Any = None  # K-FAC family: the whole query in the eigenbasis (float64, unscaled), for refine()
    exact_state: Any = None  # refine()'s per-query state (damping profile, or the candidate pool)


class IndexBackend:
    """The influence backend of the explorer: projected-gradient stores + FAISS + (E)K-FAC query preconditioning.

    Implements :class:`~diffinfluence_widgets.backend.InfluenceBackend`. Build it with :meth:`build` (or the
    constructor, same arguments): a :class:`~diffinfluence_widgets.config.StoreConfig` (``store=``) and an
    :class:`~diffinfluence_widgets.config.IndexConfig` (``index=``), or their fields as keywords; everything slow is cached under ``cache_dir`` (stores, Gram eigendecompositions,
    generated queries) and reused when the model, datasets, curvature and settings match.

    Methods: ``"ekfac"`` / ``"kfac"`` (the paper: EK-FAC or K-FAC eigenvalues of the fitted curvature, damping λ
    added to the eigenvalues, default 1e-3 · τ with τ their mean; the paper's 1e-8 is absolute), ``"trak"`` (loss
    gradients, (ΦᵀΦ + λI)⁻¹ in the projected space),
    ``"dtrak"`` (square-norm training gradients — its own store — with the chosen query measurement; D-TRAK proper
    is ``measurement="square_norm"``), ``"journey_trak"`` (TRAK with the query's per-step trajectory loss;
    generated queries only), ``"identity"`` (plain gradient dot product). Each method is a
    :class:`~diffinfluence_widgets.influence.preconditioners.Preconditioner` from the registry; the backend holds
    ``{method: Preconditioner}`` and never branches on a method's name. Damping values of the two families are not comparable (:attr:`default_damping`).

    Main settings: ``k`` (= ``k_b · k_a``, Kronecker projection), ``space`` (``"eigen"``: whitened store, default;
    ``"parameter"``: ``R g``), ``num_draws`` / ``draw_seed`` (training-side draws), ``query_num_draws``,
    ``index_kind`` (``"auto"``: exact ``"flat"`` up to 50 000 examples, ``"pca"`` above; or ``"ivf"``, ``"hnsw"``),
    ``rescore_candidates`` (> 0: rescore that many candidates per side with full gradients in :meth:`search`),
    ``on_train_gradients(measurement, LayerGradients)`` (called for every batch of training gradients while a
    store is built), ``query_dtype`` (float32: the damping slider's arithmetic; float64 for exactness checks),
    ``switch_damping`` (with ``space="eigen"``: at λ ≥ this value the K-FAC family is searched in the
    parameter-space array ``R g`` instead of the whitened one; default ``"auto"`` = the mean (E)K-FAC eigenvalue τ.
    The whitened array is accurate at small λ and noisy at large λ, the plain one the other way round; on the
    demo, recall@10 against exact scores was 0.65 vs 0.05 at λ = 1e-8 and 0.30 vs 0.80 at λ = 1, crossing near τ).

    ``exact_store`` (``"auto"``: when ``N × P × 4`` bytes ≤ ``exact_max_bytes``, default 4 GiB; ``True`` / ``False``)
    keeps every training gradient rotated into the eigenbasis on disk (:mod:`~diffinfluence_widgets.store.exact`,
    ``exact_dtype`` float32 or float64) so that :meth:`refine` is exact over all training images at any λ
    (``refine_bins`` eigenvalue bins of the damping profile, :mod:`.refine`); the opened store is then the
    attribute ``exact_store`` (``None`` otherwise). With it, ``instant_scan`` (default True) also keeps its 8-bit
    copy (:mod:`~diffinfluence_widgets.store.quantised`, attribute ``quantised``: 1 B per parameter per image),
    which gives :meth:`search` its first answer for a new query instead of the FAISS index.

    Sign convention: a **positive** score means removing the training example is predicted to **increase** the
    query's measurement (for the loss: a proponent).
    """

    def __init__(self, model, train, heldout, curvature, cache_dir: str | Path, *, store: StoreConfig | None = None,
                 index: IndexConfig | None = None, device=None, progress: bool = True,
                 on_train_gradients: Callable | None = None, query_dtype: torch.dtype = torch.float32,
                 **settings):
        store_kw, index_kw = split_settings(settings, StoreConfig, IndexConfig)
        self.store_config = replace(store or StoreConfig(), **store_kw)
        self.config = cfg = replace(index or IndexConfig(), **index_kw)
        sc = self.store_config
        self.model, self.train, self.heldout, self.curvature = model, train, heldout, curvature
        self.cache_dir = Path(cache_dir)
        self.device, self.progress, self.on_train_gradients = device, progress, on_train_gradients
        self._model_fp = fp_model = model.fingerprint()
        if getattr(curvature, "model_fingerprint", fp_model) not in ("", fp_model):
            raise StoreMismatchError(f"the curvature was fitted for model {curvature.model_fingerprint}, but the "
                                     f"given model is {fp_model}; refit it for this model")
        if getattr(curvature, "dataset_fingerprint", "") not in ("", train.fingerprint()):
            raise StoreMismatchError(f"the curvature was fitted on dataset {curvature.dataset_fingerprint}, but the "
                                     f"training dataset is {train.fingerprint()}")
        self.train_ids = np.asarray(torch.as_tensor(train.ids).numpy(), dtype=np.int64)
        self._train_pos = {int(i): p for p, i in enumerate(self.train_ids)}
        self.methods = [str(m) for m in cfg.methods]
        self.measurements = list(cfg.measurements if cfg.measurements is not None else DEFAULT_MEASUREMENTS)
        self.bands = [tuple(b) for b in timestep_bands(model.num_train_timesteps, cfg.num_bands)] \
            if cfg.num_bands else []
        self.num_draws, self.draw_seed, self.query_num_draws = sc.num_draws, sc.draw_seed, cfg.query_num_draws
        self.batch_size, self.shard_size = sc.batch_size, sc.shard_size
        self.rescore_candidates = cfg.rescore_candidates
        self.space = sc.space
        shapes_all = layer_shapes(model)
        self.layer_names = list(curvature.layer_names)
        missing = [n for n in self.layer_names if n not in shapes_all]
        if missing:
            raise StoreMismatchError(f"curvature layers {missing[:3]} are not layers of this model")
        self.projector = make_projector({n: shapes_all[n] for n in self.layer_names}, sc.k, structure=sc.structure,
                                        seed=sc.projection_seed, kind=sc.projection_kind, k_b=sc.k_b, k_a=sc.k_a)
        self.whiten_damping = sc.reference_damping

        # ---- stores (built once, then opened from the cache): the loss store always (the 2-D map reads it)
        self.stores: dict[str, ProjectedStore] = {}
        self._store("loss")
        # large-λ route of an eigen store (see the class docs): λ ≥ switch_damping searches the plain array
        self.switch_damping = None
        if self.space == StoreSpace.EIGEN and cfg.switch_damping is not None:
            self.switch_damping = float(torch.cat([curvature.eigenvalues[n].reshape(-1).double()
                                                   for n in self.layer_names]).mean()) \
                if cfg.switch_damping == "auto" else float(cfg.switch_damping)

        # ---- one preconditioner per method, and a FAISS index per array they search
        self.preconditioners: dict[str, Preconditioner] = {}
        for m in cfg.methods:
            ctx = PreconditionerContext(m, curvature, self.projector, self._store, self.space, self.whiten_damping,
                                        self.switch_damping, query_dtype)
            self.preconditioners[str(m)] = make_preconditioner(ctx)
        self.default_damping = {m: p.default_damping for m, p in self.preconditioners.items()}
        #: τ per method: λ = rel · τ is the relative damping rule (:meth:`relative_damping`)
        self.damping_scale = {m: p.damping_scale for m, p in self.preconditioners.items()}
        kind = cfg.index_kind
        if kind == IndexKind.AUTO:
            kind = IndexKind.FLAT if len(self.train_ids) <= cfg.auto_flat_max else IndexKind.PCA
        self.index_kind = kind
        self._index: dict[tuple[str, str], FeatureIndex] = {}
        for p in self.preconditioners.values():
            for array in self.stores[p.store].arrays:
                if (p.store, array) not in self._index:
                    self._index[(p.store, array)] = FeatureIndex(self.stores[p.store].arrays[array], self.train_ids,
                                                                 kind=kind)

        # ---- queries: held-out images, then generated samples (with trajectories)
        self._queries = QueryBook(model, heldout, self.cache_dir, device=device)
        # sampling the generated queries is the last long part of a build: a bar
        for s in tqdm(range(cfg.num_generated), desc="generated queries", unit="sample",
                      disable=not (progress and cfg.num_generated)):
            self.generate_query(s)
        self._map2d: np.ndarray | None = None
        self._grad_cache: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        setup_exact(self)  # the exact store behind refine(), when it fits (see IndexConfig.exact_store)

    @classmethod
    def build(cls, model, train, heldout, curvature, cache_dir: str | Path, **kwargs) -> "IndexBackend":
        """Build (or reopen from ``cache_dir``) the backend for a model, its training and held-out
        :class:`~diffinfluence_widgets.data.ImageDataset` and a fitted
        :class:`~diffinfluence_widgets.influence.curvature.Curvature`. Keyword arguments: see the class."""
        return cls(model, train, heldout, curvature, cache_dir, **kwargs)

    # ------------------------------------------------------------------ stores
    def _store_settings(self, measurement: str, with_eigen: bool) -> dict:
        return {"model_fingerprint": self._model_fp, "dataset_fingerprint": self.train.fingerprint(),
                "measurement": measurement, "num_draws": self.num_draws, "draw_seed": self.draw_seed,
                "projection": self.projector.spec(), "dtype": "float32", "gradient_mode": "eval",
                "bias": "folded into the layer input as a constant 1",
                "arrays": {"features": "R g (parameter space)",
                           **({"eigen": "R (Q^T g / sqrt(eigenvalues + whiten_damping))"} if with_eigen else {})},
                "curvature_fingerprint": _curvature_fingerprint(self.curvature) if with_eigen else None,
                "whiten_damping": self.whiten_damping if with_eigen else None}

    def _store(self, measurement: str) -> ProjectedStore:
        """The store of one training measurement (the loss store of an eigen space also holds the whitened array)."""
        if measurement not in self.stores:
            self.stores[measurement] = self._build_store(
                measurement, with_eigen=measurement == "loss" and self.space == StoreSpace.EIGEN)
        return self.stores[measurement]

    def _build_store(self, measurement: str, with_eigen: bool) -> ProjectedStore:
        settings = self._store_settings(measurement, with_eigen)
        digest = hashlib.sha256(_json_bytes(_canonical(settings))).hexdigest()[:12]
        path = self.cache_dir / "stores" / f"{measurement}-{digest}"
        if (path / "manifest.json").is_file():
            try:
                return ProjectedStore.open(path, model=self.model, dataset=self.train, expect=settings)
            except StoreError as e:
                warnings.warn(f"store {path} is unusable ({e}); rebuilding / resuming it", RuntimeWarning,
                              stacklevel=2)
        feat = store_feature_fn(self.projector)
        eig = store_feature_fn(self.projector, space=StoreSpace.EIGEN, curvature=self.curvature,
                               whiten_damping=self.whiten_damping) if with_eigen else None
        images, ids = self.train.images, torch.as_tensor(self.train.ids, dtype=torch.long)

        def compute(lo: int, hi: int):
            if self.on_train_gradients is None and isinstance(self.projector, KroneckerProjector):
                # factor-wise (LoGra-style): the whole per-example gradient is never formed
                extra = ({"eigen": whitened_layer_feature(self.projector, self.curvature, self.whiten_damping)}
                         if with_eigen else None)
                return projected_gradients(self.model, images[lo:hi], ids[lo:hi], self.projector, measurement,
                                           num_draws=self.num_draws, seed=self.draw_seed,
                                           batch_size=self.batch_size, layer_features=extra, device=self.device)
            g = per_example_gradients(self.model, images[lo:hi], ids[lo:hi], measurement, num_draws=self.num_draws,
                                      seed=self.draw_seed, batch_size=self.batch_size, device=self.device)
            if self.on_train_gradients is not None:  # e.g. a benchmark accumulating exact scores in the same pass
                self.on_train_gradients(measurement, g)
            out = {"features": feat(g.layers)}
            if eig is not None:
                out["eigen"] = eig({n: g.layers[n] for n in self.layer_names})
            return out

        return build_store(path, ids, compute, settings, shard_size=self.shard_size, progress=self.progress)

    # ------------------------------------------------------------------ queries
    def train_images(self, ids: Sequence[int]) -> np.ndarray:
        try:
            pos = [self._train_pos[int(i)] for i in ids]
        except KeyError as e:
            raise KeyError(f"unknown training id {e.args[0]}") from None
        return self.train.images[pos].numpy().astype(np.float32)

    def queries(self) -> list:
        return self._queries.all()

    def generate_query(self, seed: int):
        """Sample one image with this seed (full DDPM sampler, trajectory kept); cached under ``cache_dir``."""
        return self._queries.generate(seed)

    def query_gradients(self, query_id: int, measurement: str):
        """The query's measurement gradient (``LayerGradients``, with per-band parts when defined; the backend
        uses the sum of the band parts as the whole)."""
        item, traj = self._queries.get(query_id)
        meas = get_measurement(measurement)
        if meas.needs_trajectory and traj is None:
            raise ValueError(f"measurement {meas.name!r} needs a sampling trajectory; query {query_id} is a "
                             f"{item.kind} image — pick a generated query")
        bands = self.bands if (self.bands and meas.averages_over_timesteps) else None
        img = torch.from_numpy(item.image)[None]
        return per_example_gradients(self.model, img, [int(query_id)], meas, num_draws=self.query_num_draws,
                                     seed=self.draw_seed, trajectory=traj, bands=bands, device=self.device,
                                     batch_size=1)

    def prepare(self, query_id: int, measurement: str, method: str, band: tuple[int, int] | None = None):
        """Query gradient (the whole and each timestep band's part) → the method's rotation (done once; every λ
        after it is cheap)."""
        if method not in self.methods:
            raise ValueError(f"unknown method {method!r}; expected one of {self.methods}")
        if measurement not in self.measurements:
            raise ValueError(f"unknown measurement {measurement!r}; expected one of {self.measurements}")
        band = None if band is None else (int(band[0]), int(band[1]))
        if band is not None and band not in self.bands:
            raise ValueError(f"unknown band {band!r}; expected one of {self.bands} or None")
        pre = self.preconditioners[method]
        used = pre.query_measurement(measurement)
        stacked, band_rows = self._band_parts(self.query_gradients(query_id, used), get_measurement(used), band)
        return PreparedQuery(query_id=int(query_id), measurement=measurement, method=method, band=band,
                             payload=_Payload(pre, pre.rotate(stacked), band_rows, used,
                                              exact_rot=exact_rotation(self, pre, stacked)))

    def _band_parts(self, g, meas, band: tuple[int, int] | None) -> tuple[dict[str, torch.Tensor], list[int]]:
        """``{layer: [1 + nb', d_out, d_in+1]}`` float64 (row 0 the whole, then the band parts) and the row of each
        band's part (−1: no contribution); with ``band`` only that band's part counts."""
        layers = {n: g.layers[n][0] for n in self.layer_names}  # [d_out, d_in+1]
        nb = len(self.bands)
        if g.band_layers is not None:
            parts = {n: g.band_layers[n][:, 0].double() for n in self.layer_names}  # [nb, d_out, d_in+1]
            # the whole = the sum of its band parts (in float64), so band profiles add up to the scores exactly
            layers = {n: parts[n].sum(0) for n in self.layer_names}
            band_rows = list(range(1, nb + 1))
        else:
            parts = {n: layers[n].new_zeros((0, *layers[n].shape)) for n in self.layer_names}
            band_rows = [-1] * nb
            t_fixed = getattr(meas, "timestep", None)
            if t_fixed is not None:  # a fixed-timestep measurement lives in one band
                band_rows = [0 if lo <= t_fixed < hi else -1 for lo, hi in self.bands]
        if band is not None:
            bi = self.bands.index(band)
            if g.band_layers is not None:
                layers = {n: parts[n][bi] for n in self.layer_names}
            elif band_rows[bi] != 0:
                layers = {n: torch.zeros_like(layers[n]) for n in self.layer_names}
            band_rows = [(r if i == bi else -1) for i, r in enumerate(band_rows)]
        return {n: torch.cat([layers[n][None].double(), parts[n].double()]) for n in self.layer_names}, band_rows

    def _array(self, p: _Payload, damping: float) -> tuple[str, str]:
        """``(store, array)`` searched for this query at λ."""
        return p.pre.store, p.pre.array(damping)

    def _query_features(self, prepared, damping: float, all_rows: bool = False) -> np.ndarray:
        """``[1, dim]`` (or ``[1 + nb, dim]`` with the per-band parts) float64: the searched query feature at λ."""
        p: _Payload = prepared.payload
        key = (check_damping(damping), all_rows)
        if p.last is not None and p.last[0] == key:
            return p.last[1]
        out = p.pre.feature(p.rotated, key[0], all_rows=all_rows)
        p.last = (key, out)
        return out

    def _features(self, p: _Payload, damping: float) -> np.ndarray:
        store, array = self._array(p, damping)
        return self.stores[store].arrays[array]

    def relative_damping(self, method: str, relative: float) -> float:
        """The absolute λ = ``relative`` · τ of ``method`` (:attr:`damping_scale`: the mean (E)K-FAC eigenvalue, or
        that of ΦᵀΦ for the TRAK family); the rule of :func:`~diffinfluence_widgets.config.relative_damping`."""
        if str(method) not in self.preconditioners:
            raise KeyError(f"method {method!r} is not in this backend (have {list(self.preconditioners)})")
        return self.preconditioners[str(method)].relative_damping(relative)

    def scores(self, prepared, damping: float) -> np.ndarray:
        """Scores of every training example (``[N]`` float64, :attr:`train_ids` order) at damping λ."""
        q = self._query_features(prepared, damping)[0]
        feats, out = self._features(prepared.payload, damping), None
        out = np.empty(feats.shape[0])
        for a in range(0, feats.shape[0], 8192):  # float64 a block at a time, never a copy of the whole store
            out[a:a + 8192] = feats[a:a + 8192].astype(np.float64) @ q
        return out

    def refine(self, prepared, damping: float, k: int) -> SearchResult:
        """The refined answer: the method's exact top-k at λ (``exact=True``; ``exact_over``: ``"all"`` training
        images or the index's ``"candidates"``). See :mod:`diffinfluence_widgets.index.exact`."""
        return refine(self, prepared, damping, k)

    def search(self, prepared, damping: float, k: int, route: str | None = None):
        """The instant answer: top-k proponents and opponents (``exact=False``; ``stats["route"]`` says how).

        K-FAC family with an exact store: the query's damping-profile estimate once it has one (``"profile"``),
        before that the 8-bit scan of every training image (``"int8"``); otherwise the FAISS index
        (``"faiss"``). ``route`` forces one of them (a check reproducing an earlier answer). With
        ``rescore_candidates > 0`` the FAISS candidates of a method with exact rescoring are rescored with full
        gradients instead (``exact=True``)."""
        p: _Payload = prepared.payload
        if self.rescore_candidates > 0 and p.pre.exact and route is None:
            q = self._query_features(prepared, damping)[0]
            m = max(int(k), self.rescore_candidates)
            pi, _, oi, _ = self._index[self._array(p, damping)].proponents_opponents(q, m)
            cand = np.unique(np.concatenate([pi, oi]))
            exact = self.exact_scores(prepared, damping, cand)
            order = np.argsort(-exact, kind="stable")
            top, bot = order[: int(k)], order[::-1][: int(k)]
            return SearchResult(cand[top], exact[top], cand[bot], exact[bot], float(damping), exact=True,
                                exact_over="candidates", stats={"route": "faiss+rescore"})
        fast = instant(self, prepared, check_damping(damping), k, route)
        if fast is not None:
            return fast
        q = self._query_features(prepared, damping)[0]
        pi, ps, oi, os_ = self._index[self._array(p, damping)].proponents_opponents(q, int(k))
        return SearchResult(pi, ps, oi, os_, float(damping), exact=False, stats={"route": "faiss"})

    def exact_scores(self, prepared, damping: float, ids: Sequence[int]) -> np.ndarray:
        """Scores with full (unprojected) training gradients, for methods that define them (K-FAC family,
        identity): e.g. ``Σ_l ⟨P_λ g_q, g_j⟩``."""
        p: _Payload = prepared.payload
        pre = p.pre
        if not pre.exact:
            raise ValueError(f"exact rescoring is not defined for method {pre.method!r} (TRAK is defined in the "
                             "projected space)")
        lam = check_damping(damping)
        ids = [int(i) for i in ids]
        local = {i: self._grad_cache[(pre.train_key, i)] for i in ids if (pre.train_key, i) in self._grad_cache}
        todo = [i for i in dict.fromkeys(ids) if i not in local]
        if todo:
            pos = [self._train_pos[i] for i in todo]
            g = per_example_gradients(self.model, self.train.images[pos], todo, pre.store, num_draws=self.num_draws,
                                      seed=self.draw_seed, batch_size=self.batch_size, device=self.device)
            side = pre.train_side({n: g.layers[n] for n in self.layer_names})
            per_entry = 4 * sum(side[n][0].numel() for n in self.layer_names)
            cap = max(1, RESCORE_CACHE_BYTES // max(per_entry, 1))
            for b, i in enumerate(todo):
                while len(self._grad_cache) >= cap:  # oldest first
                    self._grad_cache.pop(next(iter(self._grad_cache)))
                local[i] = self._grad_cache[(pre.train_key, i)] = {n: side[n][b] for n in self.layer_names}
            del g, side
            buffers.clear()  # a serving process keeps no idle gradient memory between requests
        return pre.exact_scores(p.rotated, lam, [local[i] for i in ids])

    def band_profile(self, prepared, damping: float, ids: Sequence[int]) -> np.ndarray:
        """``[num_bands, len(ids)]`` per-band contributions (they sum to the scores of ``ids``; a prepared band or
        a fixed-timestep measurement puts everything in its band)."""
        p: _Payload = prepared.payload
        q = self._query_features(prepared, damping, all_rows=True)
        pos = np.array([self._train_pos[int(i)] for i in ids], dtype=np.int64) if len(ids) else np.zeros(0, int)
        feats = self._features(p, damping)[pos].astype(np.float64)
        out = np.zeros((len(self.bands), len(pos)))
        if all(r == -1 for r in p.band_rows):
            raise ValueError(f"measurement {p.measurement!r} has no per-timestep-band decomposition")
        for b, r in enumerate(p.band_rows):
            if r >= 0:
                out[b] = feats @ q[r]
        return out

    def map_2d(self) -> np.ndarray:
        """``[N, 2]``: the first two principal components of the stored (parameter-space) projected gradients."""
        if self._map2d is None:
            x = self.stores["loss"].arrays["features"].astype(np.float64)
            mean = x.mean(0)
            x = x - mean
            # principal axes from the k × k covariance (cheap for N ≫ k as well)
            w, v = np.linalg.eigh(x.T @ x)
            axes = np.ascontiguousarray(v[:, ::-1][:, :2])
            self._map2d, self._map_basis = x @ axes, (mean, axes)
        return self._map2d

    def map_2d_query(self, query_id: int) -> np.ndarray:
        """``[2]``: where a query (held-out or generated) sits on :meth:`map_2d`: its loss gradient, projected by
        the store's projection ``R`` and the same centring and principal axes as the training points (cached)."""
        self.map_2d()
        cache = self.__dict__.setdefault("_map_query", {})
        if int(query_id) not in cache:
            g = self.query_gradients(int(query_id), "loss")
            if g.band_layers is not None:  # the backend's whole query is the sum of its band parts
                whole = {n: g.band_layers[n][:, 0].double().sum(0)[None] for n in self.layer_names}
            else:
                whole = {n: g.layers[n].double() for n in self.layer_names}
            phi = self.projector.project(whole)[0].double().numpy()
            mean, axes = self._map_basis
            cache[int(query_id)] = (phi - mean) @ axes
        return cache[int(query_id)]
