"""Projected per-example gradients straight from the captured factors (LoGra-style), for the store build.

For a Kronecker projection ``R = R_B ⊗ R_A`` the feature of layer ``l`` is ``R_B G_l R_Aᵀ`` with
``G_l = Σ_r b_r a_rᵀ`` (output gradients × inputs, summed over positions and draws, :mod:`.capture`). Hence

    R_B G_l R_Aᵀ = Σ_r (R_B b_r)(R_A a_r)ᵀ,

so each side is projected first and the ``[d_out, d_in+1]`` gradient is never formed: memory per layer is
``rows × positions × (k_b + k_a)`` instead of ``B × d_out × (d_in+1)``, and nothing of size "all parameters" ever
exists. For a convolution, ``R_A a_r`` over all patches is itself a convolution of the layer input with the
``k_a`` filters ``R_A`` (its bias column as the bias), so no im2col copy is made either; ``R_B b_r`` is a 1×1
convolution of the output gradient. A side that is not larger than its ``k`` (``d ≤ k``: the projector uses an
exact isometry there) is cheaper to contract first and project afterwards, which is what happens.

Training-side features that need the per-layer gradient in full (the whitened eigenbasis store of
:mod:`..store`, where the EK-FAC eigenvalues break the Kronecker structure) are computed one layer and one
chunk of draws at a time from the same backward pass (``layer_features``), so memory is still bounded by the
batch and the largest layer, never by the parameter count.

The draws, the eval mode and the ``1/S`` of the objective are those of
:func:`~diffinfluence_widgets.influence.gradients.per_example_gradients`; the result equals projecting its output
up to float rounding (the tests check ``≤ 1e-5`` relative in float64).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion.model import DiffusionModel
from ..measurements import Measurement, get_measurement
from .capture import CallRecord, LayerCapture, frozen_eval, layer_shape, tracked_layers
from .gradients import _as_ids, _prepare_run
from .projection import KroneckerProjector

__all__ = ["projected_gradients", "project_call", "whitened_layer_feature"]

#: ``fn(layer name, per-example layer gradient [B, d_out, d_in+1]) -> [B, k]`` (linear in the gradient)
LayerFeature = Callable[[str, torch.Tensor], torch.Tensor]


def project_call(projector: KroneckerProjector, name: str, rec: CallRecord, num_examples: int,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[B, k_b, k_a]``: ``Σ_rows-of-example Σ_r (R_B b_r)(R_A a_r)ᵀ`` for one recorded call of layer ``name``."""
    m, x, g = rec.module, rec.x, rec.g
    if g is None:
        raise RuntimeError(f"layer {name!r}: no output gradient recorded for this call")
    B = int(num_examples)
    rb, ra = projector.matrices(name, x.device, dtype)
    d_out, d_in1 = layer_shape(m)
    if (rb.shape[1], ra.shape[1]) != (d_out, d_in1):
        raise ValueError(f"layer {name!r}: gradient shape {(d_out, d_in1)}, projection expects "
                         f"{(rb.shape[1], ra.shape[1])}")
    has_bias = m.bias is not None
    d_in = d_in1 - int(has_bias)
    proj_a = ra.shape[0] < d_in1  # project this side before contracting (else contract first: cheaper)
    proj_b = rb.shape[0] < d_out
    x, g = x.to(dtype), g.to(dtype)
    if isinstance(m, nn.Conv2d):
        if proj_a:
            w = ra[:, :d_in].reshape(ra.shape[0], *m.weight.shape[1:])
            a = F.conv2d(x, w, ra[:, d_in] if has_bias else None, m.stride, m.padding, m.dilation).flatten(2)
        else:
            a = rec.a_cols.to(dtype)
            if has_bias:
                a = torch.cat([a, a.new_ones(a.shape[0], 1, a.shape[2])], 1)
        b = g.flatten(2)  # [rows, d_out, L]
        if proj_b:
            b = torch.matmul(rb, b)
        a = a.reshape(B, -1, a.shape[1], a.shape[2])  # [B, rows/B, ·, L]
        b = b.reshape(B, -1, b.shape[1], b.shape[2])
        out = torch.einsum("nkol,nkil->noi", b, a)
    else:
        a = x.reshape(x.shape[0], -1, x.shape[-1])  # [rows, R, d_in]
        if proj_a:
            a = torch.matmul(a, ra[:, :d_in].T)
            if has_bias:
                a = a + ra[:, d_in]
        elif has_bias:
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], -1)
        b = g.reshape(g.shape[0], -1, g.shape[-1])
        if proj_b:
            b = torch.matmul(b, rb.T)
        out = torch.einsum("nro,nri->noi", b.reshape(B, -1, b.shape[-1]), a.reshape(B, -1, a.shape[-1]))
    if not proj_b:
        out = torch.matmul(rb, out)
    if not proj_a:
        out = torch.matmul(out, ra.T)
    return out


def projected_gradients(model: DiffusionModel, images: torch.Tensor, ids: Sequence[int] | torch.Tensor,
                        projector: KroneckerProjector, measurement: str | Measurement = "loss", *,
                        num_draws: int | None = None, seed: int = 0, batch_size: int = 32, max_rows: int = 512,
                        layer_features: Mapping[str, LayerFeature] | None = None,
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None
                        ) -> dict[str, torch.Tensor]:
    """``{"features": R g_j [N, k], **{key: Σ_l fn(l, g_j,l) [N, k]}}`` without forming whole gradients.

    ``R g_j`` (the :class:`KroneckerProjector` applied to the gradient of ``measurement`` averaged over
    ``num_draws`` seeded draws, exactly as :func:`~.gradients.per_example_gradients` defines it) is computed from
    the projected factors. Each entry of ``layer_features`` is a per-layer linear map of the per-example layer
    gradient; it is applied to one layer's gradient of one chunk of draws at a time and the results are summed
    (over layers and chunks), so only one layer's ``[B, d_out, d_in+1]`` is ever alive. Features are float32,
    or float64 when the model runs in float64.
    """
    if not isinstance(projector, KroneckerProjector):
        raise TypeError(f"factor-wise projection needs a KroneckerProjector, got {type(projector).__name__}")
    meas = get_measurement(measurement)
    if meas.needs_trajectory:
        raise ValueError(f"measurement {meas.name!r} needs a trajectory; use per_example_gradients for queries")
    model.check_images(images)
    ids_t = _as_ids(ids, images.shape[0])
    S, dev, dt = _prepare_run(model, batch_size, max_rows, num_draws, device, dtype)
    fdt = torch.float64 if dt == torch.float64 else torch.float32
    tracked = tracked_layers(model.unet)
    missing = [n for n in projector.layer_shapes if n not in tracked]
    if missing:
        raise KeyError(f"the projection covers layers {missing[:3]} that this model does not have")
    layers = {n: m for n, m in tracked.items() if n in projector.layer_shapes}  # the projection's layers only
    extra = dict(layer_features or {})
    if "features" in extra:
        raise ValueError("layer_features may not be called 'features' (that is the projected gradient)")
    n = images.shape[0]
    outs: dict[str, list[torch.Tensor]] = {key: [] for key in ["features", *extra]}
    with frozen_eval(model.unet), LayerCapture(layers, root=model.unet) as cap:
        for lo in range(0, n, int(batch_size)):
            sl = slice(lo, min(n, lo + int(batch_size)))
            x = images[sl].to(dev, dt)
            B = x.shape[0]
            draws = meas.draws(model, ids_t[sl], S, seed)
            acc = {key: torch.zeros(B, projector.k_b, projector.k_a, device=dev, dtype=fdt) for key in outs}
            chunk = max(1, min(S, int(max_rows) // B))
            for s0 in range(0, S, chunk):
                d = draws.select_draws(slice(s0, s0 + chunk)).to(dev, dt)
                cap.clear()
                with torch.enable_grad():
                    vals = meas.per_draw(model, x, d, None)
                    if vals.shape != (B, d.num_draws):
                        raise RuntimeError(f"measurement {meas.name!r} returned {tuple(vals.shape)}, "
                                           f"expected {(B, d.num_draws)}")
                    (vals.sum() / S).backward()
                for name in layers:
                    grad_l = None
                    for rec in cap.calls(name):
                        if rec.x.shape[0] % B:
                            raise RuntimeError(f"layer {name!r} saw {rec.x.shape[0]} rows for {B} examples; "
                                               "measurements must call the network on example-major batches")
                        acc["features"] += project_call(projector, name, rec, B, fdt)
                        rec.drop_unfolded_()  # an im2col copy (small-input convs) lives for one call only
                        if extra:
                            grad_l = rec.add_per_example_(grad_l if grad_l is not None else
                                                          rec.x.new_zeros(B, *layer_shape(rec.module)))
                    for key, fn in extra.items():
                        acc[key] += fn(name, grad_l).reshape(B, projector.k_b, projector.k_a).to(fdt)
                    del grad_l
                cap.clear()
            for key in outs:
                outs[key].append(acc[key].reshape(B, -1))
    return {key: torch.cat(v) for key, v in outs.items()}


def whitened_layer_feature(projector: KroneckerProjector, curvature, whiten_damping: float) -> LayerFeature:
    """The eigen store's per-layer map ``g_l ↦ R_l (Q_Bᵀ g_l Q_A ⊘ √(Λ_l + λ₀))`` (for ``layer_features``).

    The rotation runs in float64: float32 rounding of it spreads ~1e-7·‖g‖ into every coordinate, which the
    whitening would amplify by up to 1/√λ₀ in the near-null directions.
    """
    inv_sqrt = {n: (curvature.eigenvalues[n].double() + float(whiten_damping)).rsqrt()
                for n in curvature.layer_names}
    q = {n: (curvature.q_b[n].double(), curvature.q_a[n].double()) for n in curvature.layer_names}

    def fn(name: str, g: torch.Tensor) -> torch.Tensor:
        qb, qa = (t.to(g.device) for t in q[name])
        rot = qb.T @ g.double() @ qa
        return projector.project_layer(name, rot * inv_sqrt[name].to(g.device)).reshape(g.shape[0], -1)
    return fn
