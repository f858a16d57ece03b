"""The K-FAC family (EK-FAC / K-FAC eigenvalues, ``method.md`` §4) as a :class:`~.base.Preconditioner`.

:class:`KFACQuery` is the query path against a store: the query gradient is rotated into the (E)K-FAC eigenbasis
once; a new λ is then an elementwise division followed by the projection. For the Kronecker projection the products
``R_B Q_B`` and ``R_A Q_A`` are precomputed per layer, so a query is never rotated back to parameter space.
:class:`KFACPreconditioner` searches the store's whitened ``"eigen"`` array at small λ and, past
``switch_damping``, the plain ``"features"`` array (see :class:`~diffinfluence_widgets.index.IndexBackend`).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from ...config import DEFAULT_RELATIVE_DAMPING, Method, StoreSpace, check_damping, choice
from ..projection import KroneckerProjector
from .base import Layers, PreconditionerBase, PreconditionerContext

__all__ = ["KFACQuery", "KFACPreconditioner"]


class KFACQuery:
    """The (E)K-FAC query path against a store: rotate once, then any λ is a division + projection.

    Parameters
    ----------
    curvature:
        A fitted :class:`~diffinfluence_widgets.influence.curvature.Curvature` (``q_a``, ``q_b``, ``eigenvalues``,
        ``lambda_a``, ``lambda_b``).
    projector:
        The store's projection.
    space, whiten_damping:
        The store's space (``"parameter"`` or ``"eigen"``) and, for ``"eigen"``, its reference damping λ₀.
    eigenvalues:
        ``"ekfac"`` (the curvature's corrected eigenvalues) or ``"kfac"`` (``λ_B λ_Aᵀ``): the same eigenbasis.
    """

    def __init__(self, curvature, projector, *, space: StoreSpace = StoreSpace.PARAMETER,
                 whiten_damping: float | None = None, eigenvalues: Method = Method.EKFAC, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64):
        self.curv, self.proj, self.space = curvature, projector, choice(StoreSpace, space, "store space")
        self.names = list(curvature.layer_names)
        self.device, self.dtype = torch.device(device), dtype
        if eigenvalues == Method.EKFAC:
            lam = {n: curvature.eigenvalues[n] for n in self.names}
        elif eigenvalues == Method.KFAC:
            lam = {n: torch.outer(curvature.lambda_b[n], curvature.lambda_a[n]) for n in self.names}
        else:
            raise ValueError(f"eigenvalues must be 'ekfac' or 'kfac', got {eigenvalues!r}")
        #: τ, the mean of these eigenvalues (the scale of a relative damping), from the curvature's own precision
        #: before any cast to the compute dtype, so that it equals ``Curvature.mean_eigenvalue()``
        self.tau = float(sum(float(v.double().sum()) for v in lam.values())
                         / max(1, sum(v.numel() for v in lam.values())))
        # a fresh tensor per layer: the curvature's eigenvalues are never modified (method trap 8)
        self.lam = {n: lam[n].to(self.device, dtype).clone() for n in self.names}
        if self.space == StoreSpace.EIGEN:
            if whiten_damping is None:
                raise ValueError("an 'eigen' store needs its whiten_damping")
            self.scale = {n: (curvature.eigenvalues[n].to(self.device, dtype) + float(whiten_damping)).sqrt()
                          for n in self.names}
        self._mats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if isinstance(projector, KroneckerProjector):
            for n in self.names:
                if self.space == StoreSpace.PARAMETER:
                    mb, ma = projector.compose(n, curvature.q_b[n].to(self.device, dtype),
                                               curvature.q_a[n].to(self.device, dtype))
                else:
                    rb, ra = projector.matrices(n, self.device)
                    mb, ma = rb.to(dtype), ra.to(dtype)
                self._mats[n] = (mb.contiguous(), ma.contiguous())

    def rotate(self, layers: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Query gradients (``[..., d_out, d_in+1]`` per layer) into the eigenbasis (do this once per query)."""
        # rotate in float64 (once per query; see store_feature_fn), then keep the working dtype: the damping
        # division is per coordinate, so float32 loses nothing there
        g = {n: layers[n].to(self.device, torch.float64) for n in self.names}
        rot = self.curv.rotate(g)
        if self.space == StoreSpace.EIGEN:
            rot = {n: rot[n] * self.scale[n].double() for n in self.names}
        return {n: rot[n].to(self.dtype) for n in self.names}

    def project(self, rotated: Mapping[str, torch.Tensor], damping: float) -> torch.Tensor:
        """``[..., k]`` feature of the preconditioned query at damping λ (float64)."""
        lam = check_damping(damping)
        if isinstance(self.proj, KroneckerProjector):
            out = None
            for n in self.names:
                x = rotated[n] / (self.lam[n] + lam)
                mb, ma = self._mats[n]
                phi = mb @ x @ ma.T
                out = phi if out is None else out.add_(phi)
            return out.reshape(*out.shape[:-2], -1)
        # dense projection: back to parameter space (or stay in the eigen coordinates), then project
        x = {n: rotated[n] / (self.lam[n] + lam) for n in self.names}
        if self.space == StoreSpace.PARAMETER:
            x = self.curv.unrotate(x)
        lead = next(iter(x.values())).shape[:-2]
        flat = {n: v.reshape(-1, *v.shape[-2:]) for n, v in x.items()}
        return self.proj.project(flat).reshape(*lead, -1).to(self.dtype)


class KFACPreconditioner(PreconditionerBase):
    """``(G + λI)⁻¹`` with the EK-FAC (``method="ekfac"``) or K-FAC (``"kfac"``) eigenvalues of the curvature."""

    store = "loss"
    exact = True
    train_key = "curvature-eigenbasis"

    def __init__(self, ctx: PreconditionerContext):
        self.method = ctx.method
        self.curvature = ctx.curvature
        self.space = ctx.space
        self.engine = KFACQuery(ctx.curvature, ctx.projector, space=ctx.space, whiten_damping=ctx.whiten_damping,
                                eigenvalues=ctx.method, dtype=ctx.query_dtype)
        self.damping_scale = self.engine.tau
        #: the recommended λ = 1e-3 · τ (issue 14: an absolute λ means something else for every model and loss
        #: scale); the paper's absolute 1e-8 is one slider move or ``damping=1e-8`` away
        self.default_damping = DEFAULT_RELATIVE_DAMPING * self.damping_scale
        # large-λ route of an eigen store: the plain parameter-space array
        self.switch_damping = ctx.switch_damping if ctx.space == StoreSpace.EIGEN else None
        self.param_engine = None if self.switch_damping is None else KFACQuery(
            ctx.curvature, ctx.projector, space=StoreSpace.PARAMETER, eigenvalues=ctx.method, dtype=ctx.query_dtype)

    def _switched(self, damping: float) -> bool:
        return self.switch_damping is not None and float(damping) >= self.switch_damping

    def rotate(self, layers: Layers) -> tuple[dict, dict | None]:
        return self.engine.rotate(layers), None if self.param_engine is None else self.param_engine.rotate(layers)

    def array(self, damping: float) -> str:
        return "eigen" if self.space == StoreSpace.EIGEN and not self._switched(damping) else "features"

    def _feature(self, rotated: Any, damping: float, all_rows: bool) -> np.ndarray:
        vectors, engine = (rotated[1], self.param_engine) if self._switched(damping) else (rotated[0], self.engine)
        vec = vectors if all_rows else {n: v[:1] for n, v in vectors.items()}
        return engine.project(vec, damping).cpu().numpy()

    def train_side(self, layers: Layers) -> dict[str, torch.Tensor]:
        rot = self.curvature.rotate({n: layers[n].double() for n in self.engine.names})
        return {n: rot[n].float() for n in self.engine.names}

    def exact_scores(self, rotated: Any, damping: float, train: list[Mapping[str, torch.Tensor]]) -> np.ndarray:
        """``Σ_l ⟨P_λ g_q, g_j⟩`` in the eigenbasis (``train``: :meth:`train_side` vectors of each example)."""
        lam, eng = check_damping(damping), self.engine
        out = np.zeros(len(train))
        for n in eng.names:
            x = rotated[0][n][0] / (eng.lam[n] + lam)
            if eng.space == StoreSpace.EIGEN:
                x = x / eng.scale[n]  # undo the query-side whitening scale: back to Qᵀ P_λ g_q
            g = torch.stack([t[n] for t in train]).to(x.dtype)
            out += (g * x).flatten(1).sum(1).cpu().numpy()
        return out
