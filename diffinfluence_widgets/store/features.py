"""What a gradient store holds: projected training gradients in the parameter or the (whitened) eigen space."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import StoreSpace, choice
from ..influence.gradients import per_example_gradients
from ..influence.projected import projected_gradients, whitened_layer_feature
from ..influence.projection import KroneckerProjector
from .manifest import _curvature_fingerprint
from .shards import ProjectedStore, build_store

__all__ = ["store_feature_fn", "default_whiten_damping", "build_gradient_store"]


# ---------------------------------------------------------------------------------------- gradient stores
def store_feature_fn(projector, *, space: StoreSpace = StoreSpace.PARAMETER, curvature=None, whiten_damping: float | None = None):
    """``f(layer gradients) -> [B, k]``: the training-side feature of a store in the given space.

    ``"parameter"``: ``R g``. ``"eigen"``: ``R (Qᵀ g ⊘ √(Λ + λ₀))`` with the curvature's eigenbasis and eigenvalues.
    """
    if choice(StoreSpace, space, "store space") == StoreSpace.PARAMETER:
        return lambda layers: projector.project(layers)
    if curvature is None or whiten_damping is None:
        raise ValueError("an 'eigen' store needs the curvature and a reference damping (whiten_damping)")
    inv_sqrt = {n: (curvature.eigenvalues[n].double() + float(whiten_damping)).rsqrt()
                for n in curvature.layer_names}

    def f(layers):
        # rotate in float64: float32 rounding of the rotation spreads ~1e-7·‖g‖ into every coordinate, which the
        # whitening would amplify by up to 1/√λ₀ in the near-null directions
        rot = curvature.rotate({n: layers[n].double() for n in curvature.layer_names})
        return projector.project({n: rot[n] * inv_sqrt[n].to(rot[n].device) for n in rot})
    return f


def default_whiten_damping(curvature, rel: float = 1e-3) -> float:
    """λ₀ for an eigen store: ``rel`` × the mean eigenvalue (a scale where float32 stays well conditioned)."""
    tot = sum(float(curvature.eigenvalues[n].double().sum()) for n in curvature.layer_names)
    cnt = sum(curvature.eigenvalues[n].numel() for n in curvature.layer_names)
    return rel * tot / max(cnt, 1)


def build_gradient_store(path: str | Path, model, dataset, projector, *, measurement: str = "loss",
                         num_draws: int = 64, seed: int = 0, space: StoreSpace = StoreSpace.PARAMETER, curvature=None,
                         whiten_damping: float | None = None, shard_size: int = 256, batch_size: int = 16,
                         device=None, resume: bool = True, overwrite: bool = False,
                         progress: bool = True) -> ProjectedStore:
    """Project every training example's measurement gradient (``"loss"`` for the method, ``"square_norm"`` for
    D-TRAK) and store it (array ``"features"``). See :func:`build_store` for resume / distributed behaviour."""
    space = choice(StoreSpace, space, "store space")
    if space == StoreSpace.EIGEN and whiten_damping is None and curvature is not None:
        whiten_damping = default_whiten_damping(curvature)
    feat = store_feature_fn(projector, space=space, curvature=curvature, whiten_damping=whiten_damping)
    settings = {"model_fingerprint": model.fingerprint(), "dataset_fingerprint": dataset.fingerprint(),
                "measurement": str(measurement), "num_draws": int(num_draws), "draw_seed": int(seed),
                "projection": projector.spec(), "space": str(space), "dtype": "float32",
                "curvature_fingerprint": _curvature_fingerprint(curvature) if space == StoreSpace.EIGEN else None,
                "whiten_damping": float(whiten_damping) if space == StoreSpace.EIGEN else None,
                "gradient_mode": "eval", "bias": "folded into the layer input as a constant 1"}
    images, ids = dataset.images, torch.as_tensor(dataset.ids, dtype=torch.long)

    def compute(lo: int, hi: int):
        if isinstance(projector, KroneckerProjector):  # factor-wise: no per-example gradient is ever formed
            eigen = space == StoreSpace.EIGEN
            extra = {"eigen": whitened_layer_feature(projector, curvature, whiten_damping)} if eigen else None
            out = projected_gradients(model, images[lo:hi], ids[lo:hi], projector, measurement,
                                      num_draws=num_draws, seed=seed, batch_size=batch_size, layer_features=extra,
                                      device=device)
            return {"features": out["eigen" if eigen else "features"]}
        g = per_example_gradients(model, images[lo:hi], ids[lo:hi], measurement, num_draws=num_draws, seed=seed,
                                  batch_size=batch_size, device=device)
        return {"features": feat(g.layers)}

    return build_store(path, ids, compute, settings, shard_size=shard_size, resume=resume, overwrite=overwrite,
                       progress=progress)
