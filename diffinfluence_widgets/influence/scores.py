"""Influence score matrices ``s[q, j] = ∇m(θ, x′_q)ᵀ (G + λI)⁻¹ ∇ℓ(θ, x_j)`` (method §2).

Sign convention: a **positive** score means that removing training example j is predicted to **increase** the
query's measurement m (for the loss: the query becomes less likely, j *supports* it — a proponent). The
predicted change of m when a set J of training examples is removed is ``(1/N) Σ_{j∈J} s[q, j]``
(:meth:`Scores.predicted_change`). Matrices are ``[num_queries, num_train]`` and carry the ids of both sides, so a
row keeps meaning the same query across save / load (method trap 6).

Only the query side is preconditioned: the query gradient is rotated into the (E)K-FAC eigenbasis once, divided by
``eigenvalues + λ`` for each damping, rotated back, and dotted with the raw training-loss gradients, which are
streamed in batches and never stored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..diffusion.model import DiffusionModel
from ..diffusion.sampling import Trajectory
from ..measurements import Measurement, get_measurement
from .._io import CorruptArtifactError, atomic_write_json, load_safetensors, save_safetensors
from ..config import DEFAULT_KFAC_DAMPING, DEFAULT_QUERY_DRAWS, DEFAULT_TRAIN_DRAWS, check_damping
from ..config import relative_damping as relative_damping_rule
from .artifacts import read_manifest
from .curvature import Curvature
from .gradients import LayerGradients, iter_gradients, per_example_gradients

__all__ = ["Scores", "compute_scores", "preconditioned_query_gradients", "SIGN_CONVENTION"]

SIGN_CONVENTION = ("s[q, j] > 0: removing training example j is predicted to increase the query's measurement "
                   "(for the loss: j supports the query, a proponent); s[q, j] < 0: an opponent.")
FORMAT_VERSION = 2  # 2: the manifest records the payload's SHA-256


@dataclass
class Scores:
    """A score matrix with its ids and provenance.

    ``matrix`` ``[Q, N]`` float64; ``band_matrix`` ``[num_bands, Q, N]`` (optional) sums to ``matrix``.
    """

    matrix: torch.Tensor
    query_ids: torch.Tensor
    train_ids: torch.Tensor
    band_matrix: torch.Tensor | None = None
    bands: list[tuple[int, int]] | None = None
    settings: dict = field(default_factory=dict)
    model_fingerprint: str = ""
    dataset_fingerprint: str = ""

    def __post_init__(self) -> None:
        for what in ("matrix", "query_ids", "train_ids"):
            v = getattr(self, what)
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"Scores.{what} must be a torch.Tensor, got {type(v).__name__} "
                                f"(wrap arrays with torch.as_tensor(...); ids are int64)")
        if self.matrix.dim() != 2:
            raise ValueError(f"Scores.matrix must be 2-D [num_queries, num_train], got shape {tuple(self.matrix.shape)}")
        q, n = self.query_ids.numel(), self.train_ids.numel()
        if tuple(self.matrix.shape) != (q, n):
            raise ValueError(f"score matrix {tuple(self.matrix.shape)} does not match {q} queries × {n} train ids")

    def row(self, query_id: int) -> torch.Tensor:
        hits = (self.query_ids == int(query_id)).nonzero()
        if hits.numel() == 0:
            raise KeyError(f"query id {query_id} is not in these scores (have {self.query_ids.tolist()[:10]}...)")
        return self.matrix[int(hits[0])]

    def predicted_change(self, removed_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """``[Q]`` predicted change of each query's measurement when the given training ids are removed."""
        removed = torch.as_tensor(list(removed_ids) if not isinstance(removed_ids, torch.Tensor) else removed_ids,
                                  dtype=torch.long)
        mask = torch.isin(self.train_ids, removed)
        missing = removed[~torch.isin(removed, self.train_ids)]
        if missing.numel():
            raise KeyError(f"training ids {missing.tolist()[:5]} are not in these scores")
        return self.matrix[:, mask].sum(1) / self.train_ids.numel()

    def top_k(self, query_id: int, k: int = 10, opponents: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Training ids and scores of the k strongest proponents (or opponents) of a query."""
        r = self.row(query_id)
        vals, idx = torch.topk(-r if opponents else r, min(int(k), r.numel()))
        return self.train_ids[idx], (-vals if opponents else vals)

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        t = {"matrix": self.matrix.double().cpu().contiguous(), "query_ids": self.query_ids.cpu().contiguous(),
             "train_ids": self.train_ids.cpu().contiguous()}
        if self.band_matrix is not None:
            t["band_matrix"] = self.band_matrix.double().cpu().contiguous()
        digest = save_safetensors(p / "scores.safetensors", t)
        man = {"format": "diffinfluence-scores", "version": FORMAT_VERSION, "settings": self.settings,
               "bands": self.bands, "model_fingerprint": self.model_fingerprint,
               "dataset_fingerprint": self.dataset_fingerprint, "sign_convention": SIGN_CONVENTION,
               "sha256": {"scores.safetensors": digest}}
        atomic_write_json(p / "manifest.json", man, indent=2)
        return p

    @classmethod
    def load(cls, path: str | Path, *, model: DiffusionModel | None = None, dataset=None,
             expect: dict | None = None) -> "Scores":
        p = Path(path)
        man = read_manifest(p, "scores.safetensors", "diffinfluence-scores", "scores", model=model, dataset=dataset,
                            expect=expect)
        f = p / "scores.safetensors"
        t = load_safetensors(f, (man.get("sha256") or {}).get("scores.safetensors"))
        missing = [k for k in ("matrix", "query_ids", "train_ids") if k not in t]
        if missing:
            raise CorruptArtifactError(f"{f} lacks the tensors {missing}", f)
        bands = [tuple(b) for b in man["bands"]] if man.get("bands") else None
        return cls(t["matrix"], t["query_ids"], t["train_ids"], t.get("band_matrix"), bands, man["settings"],
                   man["model_fingerprint"], man["dataset_fingerprint"])


def preconditioned_query_gradients(curvature: Curvature | None, grads: LayerGradients,
                                   dampings: Sequence[float]) -> list[torch.Tensor]:
    """For each λ: ``[Q, P]`` (or ``[num_bands, Q, P]`` for band gradients) flat ``(G + λI)⁻¹ ∇m``.

    ``curvature=None`` is the identity (a plain gradient dot product).
    """
    lams = [check_damping(d) for d in dampings]
    if curvature is None:
        return [grads.flat() for _ in lams]
    rotated = curvature.rotate(grads)
    out = []
    for lam in lams:
        pre = curvature.unrotate(curvature.precondition_rotated(rotated, lam))
        out.append(pre.flat())
    return out


def compute_scores(model: DiffusionModel, curvature: Curvature | None, query_images: torch.Tensor,
                   query_ids: Sequence[int] | torch.Tensor, train, *, measurement: str | Measurement = "loss",
                   damping: float | Sequence[float] | None = None,
                   relative_damping: float | Sequence[float] | None = None, num_draws: int | None = None,
                   train_num_draws: int | None = None, seed: int = 0, train_seed: int | None = None,
                   trajectory: Trajectory | None = None, bands: Sequence[tuple[int, int]] | None = None,
                   train_measurement: str | Measurement = "loss", batch_size: int = 32, max_rows: int = 512,
                   device=None, dtype: torch.dtype | None = None, progress: bool = True,
                   train_gradients: LayerGradients | None = None) -> Scores | list[Scores]:
    """Influence of every training example (``train``: ``.images``, ``.ids``) on each query's measurement.

    ``damping`` may be a list: the query side is rotated once and every λ is a cheap division, and the training
    gradients are computed once for all of them (a list of :class:`Scores` is returned). ``train_measurement``
    stays ``"loss"`` for the method; D-TRAK-style variants pass ``"square_norm"``. ``curvature=None`` scores with
    the identity (a plain gradient dot product).

    Damping: ``damping`` is the absolute λ (default: the paper's untuned 1e-8); ``relative_damping`` instead gives
    λ = rel · τ with τ = :meth:`Curvature.mean_eigenvalue` (:func:`~diffinfluence_widgets.config.relative_damping`),
    which means the same for any model and loss scale. Give at most one of the two.

    Draws: ``num_draws`` (query side) and ``train_num_draws`` default to
    :data:`~diffinfluence_widgets.config.DEFAULT_QUERY_DRAWS` (512) and ``DEFAULT_TRAIN_DRAWS`` (128): the
    recommended default, chosen on the digits benchmark (``bench/RESULTS.md``, issue 14).

    ``train_gradients``: precomputed training-side gradients (:func:`~.gradients.per_example_gradients` of
    ``train_measurement`` over the training set, in any order); they are used instead of recomputing them, so an
    ablation over curvatures and dampings computes them once. Their ids must be ``train``'s ids (``train`` may then
    be ``None``; the scores carry no dataset fingerprint in that case).
    """
    meas = get_measurement(measurement)
    tau = None
    if relative_damping is not None:
        if damping is not None:
            raise ValueError(f"give damping={damping!r} or relative_damping={relative_damping!r}, not both")
        if curvature is None:
            raise ValueError("relative_damping needs a curvature (its mean eigenvalue is the scale); "
                             "curvature=None scores with the identity")
        tau = curvature.mean_eigenvalue()
        single = isinstance(relative_damping, (int, float))
        rels = [relative_damping] if single else list(relative_damping)
        lams = [relative_damping_rule(r, tau) for r in rels]
    else:
        damping = DEFAULT_KFAC_DAMPING if damping is None else damping
        single = isinstance(damping, (int, float))
        rels = None
        lams = [check_damping(d) for d in ([damping] if single else damping)]
    if curvature is not None and curvature.model_fingerprint and curvature.model_fingerprint != model.fingerprint():
        raise ValueError(f"curvature was fitted for model {curvature.model_fingerprint}, not for this model "
                         f"({model.fingerprint()})")
    qg = per_example_gradients(model, query_images, query_ids, meas, seed=seed,
                               num_draws=DEFAULT_QUERY_DRAWS if num_draws is None else num_draws,
                               batch_size=batch_size, max_rows=max_rows, trajectory=trajectory, bands=bands,
                               device=device, dtype=dtype, progress=progress)
    pre_total = preconditioned_query_gradients(curvature, qg, lams)
    pre_bands = None
    if bands is not None:
        band_view = LayerGradients(qg.band_layers, qg.ids)
        pre_bands = preconditioned_query_gradients(curvature, band_view, lams)  # each [nb, Q, P]
    blocks, band_blocks, tids = [], [], []
    if train_gradients is not None:
        batches = _precomputed_batches(train_gradients, train, batch_size)
    elif train is None:
        raise ValueError("compute_scores needs a training set (train=...) or its gradients (train_gradients=...)")
    else:
        batches = iter_gradients(model, train, measurement=train_measurement,
                                 num_draws=DEFAULT_TRAIN_DRAWS if train_num_draws is None else train_num_draws,
                                 seed=seed if train_seed is None else train_seed, batch_size=batch_size,
                                 max_rows=max_rows, device=device, dtype=dtype, progress=progress,
                                 reuse_buffers=True)  # each batch is contracted before the next one is asked for
    for tg in batches:
        blocks.append(torch.stack([_contract(p, tg).double().cpu() for p in pre_total]))  # [L, Q, B]
        if pre_bands is not None:
            band_blocks.append(torch.stack([_contract(p, tg).double().cpu() for p in pre_bands]))
        tids.append(tg.ids.clone())
    train_ids = torch.cat(tids) if tids else torch.zeros(0, dtype=torch.long)
    mats = torch.cat(blocks, dim=-1) if blocks else torch.zeros(len(lams), qg.ids.numel(), 0, dtype=torch.float64)
    band_mats = torch.cat(band_blocks, dim=-1) if band_blocks else None
    out = []
    train_draws = int(train_gradients.meta.get("num_draws", train_num_draws or DEFAULT_TRAIN_DRAWS)
                      if train_gradients is not None else train_num_draws or DEFAULT_TRAIN_DRAWS)
    for i, lam in enumerate(lams):
        settings = {"measurement": meas.name, "train_measurement": get_measurement(train_measurement).name,
                    "damping": lam, "relative_damping": None if rels is None else float(rels[i]),
                    "curvature_scale": tau, "num_draws": qg.meta["num_draws"],
                    "train_num_draws": train_draws, "seed": int(seed),
                    "train_seed": int(seed if train_seed is None else train_seed),
                    "curvature": dict(curvature.settings) if curvature is not None else {"method": "identity"}}
        out.append(Scores(mats[i], qg.ids.clone(), train_ids, None if band_mats is None else band_mats[i],
                          [tuple(b) for b in bands] if bands is not None else None, settings, model.fingerprint(),
                          train.fingerprint() if hasattr(train, "fingerprint") else ""))
    return out[0] if single else out


def _contract(pre: torch.Tensor, grads: LayerGradients) -> torch.Tensor:
    """``pre @ grads.flat()ᵀ`` (``pre`` ``[..., P]`` in the flat layer order) one layer at a time, without the
    ``[B, P]`` concatenation."""
    out, off = None, 0
    for g in grads.layers.values():
        g2 = g.reshape(g.shape[0], -1)
        part = pre[..., off:off + g2.shape[1]].to(g2) @ g2.T
        out = part if out is None else out.add_(part)
        off += g2.shape[1]
    if off != pre.shape[-1]:
        raise ValueError(f"preconditioned queries have {pre.shape[-1]} parameters, the gradients {off}")
    return out


def _precomputed_batches(grads: LayerGradients, train, batch_size: int):
    """Slices of precomputed training gradients, after checking they cover exactly ``train``'s ids."""
    if not isinstance(grads, LayerGradients):
        raise TypeError(f"train_gradients must be LayerGradients (from per_example_gradients), got "
                        f"{type(grads).__name__}")
    if train is not None:
        want, have = set(torch.as_tensor(train.ids).tolist()), set(grads.ids.tolist())
        if want != have:
            extra, missing = sorted(have - want)[:5], sorted(want - have)[:5]
            raise ValueError(f"train_gradients are for other examples than train (missing ids {missing}, "
                             f"extra ids {extra})")
    b = int(batch_size)
    for lo in range(0, len(grads), b):
        yield LayerGradients({n: g[lo:lo + b] for n, g in grads.layers.items()}, grads.ids[lo:lo + b])
