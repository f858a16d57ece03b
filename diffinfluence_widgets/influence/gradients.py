"""Per-example gradients of the training loss and of any measurement, w.r.t. Conv2d / Linear parameters.

For an example x with S seeded draws, the gradient of ``m(θ, x) = mean_s term_s`` is computed in one backward pass
over an example-major batch: the hooks of :mod:`.capture` give each layer's inputs ``a`` and output gradients ``b``
per network row, and the example's gradient is ``Σ_rows-of-x Σ_r b aᵀ`` (divided by S through the objective).
Examples never mix (diffusers UNets have no batch statistics), so this equals a plain autograd loop over
examples — which the tests check — at a fraction of the cost: parameters are frozen during the pass, so the
weight-gradient GEMMs of an ordinary backward are skipped.

Gradient passes run the UNet in **eval mode** (no dropout), as the paper's code did for curvature and query
gradients (method trap 4); training-side gradients use the same mode so that both sides see the same function.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from ..diffusion.model import DiffusionModel, resolve_device
from ..diffusion.sampling import Trajectory
from ..measurements import Measurement, band_masks, get_measurement
from . import buffers
from .capture import LayerCapture, frozen_eval, layer_shape, tracked_layers

__all__ = ["LayerGradients", "per_example_gradients", "iter_gradients", "tracked_layers", "layer_shapes",
           "DEFAULT_GRADIENT_DRAWS"]

#: draws per example for a reliable per-example gradient (method §1: stratified t with K ≥ 64)
DEFAULT_GRADIENT_DRAWS = 64


def layer_shapes(model: DiffusionModel) -> dict[str, tuple[int, int]]:
    """``{layer name: (d_out, d_in + has_bias)}`` for every tracked layer of the model's UNet."""
    return {n: layer_shape(m) for n, m in tracked_layers(model.unet).items()}


@dataclass
class LayerGradients:
    """Per-example gradients, one ``[B, d_out, d_in (+1)]`` tensor per tracked layer (bias = last column).

    ``band_layers`` (optional) holds the per-timestep-band parts ``[num_bands, B, d_out, d_in (+1)]``; they sum
    to ``layers`` exactly.
    """

    layers: dict[str, torch.Tensor]
    ids: torch.Tensor
    band_layers: dict[str, torch.Tensor] | None = None
    bands: list[tuple[int, int]] | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.ids.numel())

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    def flat(self) -> torch.Tensor:
        """``[B, P]``: all layers concatenated in order (each matrix flattened row-major).

        Layer tensors with extra leading dims (e.g. ``[num_bands, B, d_out, d_in]``) give ``[..., B, P]``.
        """
        return torch.cat([g.flatten(-2) for g in self.layers.values()], dim=-1)

    def band_flat(self) -> torch.Tensor:
        """``[num_bands, B, P]``."""
        if self.band_layers is None:
            raise ValueError("these gradients were computed without timestep bands (pass bands=...)")
        return torch.cat([g.flatten(2) for g in self.band_layers.values()], dim=2)

    def map(self, fn) -> "LayerGradients":
        """Apply ``fn(name, tensor)`` to every layer (and band) tensor."""
        bands = None if self.band_layers is None else {n: fn(n, g) for n, g in self.band_layers.items()}
        return LayerGradients({n: fn(n, g) for n, g in self.layers.items()}, self.ids, bands, self.bands,
                              dict(self.meta))

    def to(self, device=None, dtype=None) -> "LayerGradients":
        return self.map(lambda n, g: g.to(device=device, dtype=dtype))

    @staticmethod
    def cat(parts: Sequence["LayerGradients"]) -> "LayerGradients":
        if not parts:
            raise ValueError("no gradients to concatenate")
        if len(parts) == 1:  # no copy: on CPU a fresh B × P buffer costs as much as computing it (page faults)
            return parts[0]
        names = parts[0].layer_names
        bands = None
        if parts[0].band_layers is not None:
            bands = {n: torch.cat([p.band_layers[n] for p in parts], dim=1) for n in names}
        return LayerGradients({n: torch.cat([p.layers[n] for p in parts]) for n in names},
                              torch.cat([p.ids for p in parts]), bands, parts[0].bands, dict(parts[0].meta))


def _as_ids(ids, n: int) -> torch.Tensor:
    t = torch.as_tensor(ids if not isinstance(ids, range) else list(ids), dtype=torch.long).reshape(-1)
    if t.numel() != n:
        raise ValueError(f"got {t.numel()} ids for {n} images")
    return t


def _prepare_run(model: DiffusionModel, batch_size: int, max_rows: int, num_draws: int | None, device,
                 dtype: torch.dtype | None) -> tuple[int, torch.device, torch.dtype]:
    """Check the batch sizes and draw count, move ``model`` to its device and dtype; returns ``(S, device, dtype)``."""
    if int(batch_size) < 1 or int(max_rows) < 1:
        raise ValueError(f"batch_size and max_rows must be positive, got {batch_size!r}, {max_rows!r}")
    S = DEFAULT_GRADIENT_DRAWS if num_draws is None else int(num_draws)
    if S < 1:
        raise ValueError(f"num_draws must be a positive integer, got {num_draws!r}")
    dev = resolve_device(device) if device is not None else model.device
    model.to(dev)
    dt = dtype or model.dtype
    if dt != model.dtype:
        model.to(dtype=dt)
    return S, dev, dt


def _layer_buffers(B: int, layers: dict, dev: torch.device, dt: torch.dtype, *, zero: bool
                   ) -> dict[str, torch.Tensor]:
    """One ``[B, d_out, d_in (+1)]`` tensor per layer, views of one block of recycled memory (:mod:`.buffers`).

    Without ``zero`` the block is uninitialised: each layer's first call writes its buffer (no zero fill, no read of
    zeros in the GEMM)."""
    shapes = {name: (B, *layer_shape(m)) for name, m in layers.items()}
    block = buffers.take(sum(b * o * i for b, o, i in shapes.values()), dtype=dt, device=dev)
    if zero:
        block.zero_()
    out, lo = {}, 0
    for name, shape in shapes.items():
        n = shape[0] * shape[1] * shape[2]
        out[name] = block[lo:lo + n].view(shape)
        lo += n
    return out


def per_example_gradients(model: DiffusionModel, images: torch.Tensor, ids: Sequence[int] | torch.Tensor,
                          measurement: str | Measurement = "loss", *, num_draws: int | None = None, seed: int = 0,
                          batch_size: int = 32, max_rows: int = 512, trajectory: Trajectory | None = None,
                          bands: Sequence[tuple[int, int]] | None = None, device: str | torch.device | None = None,
                          dtype: torch.dtype | None = None, progress: bool = False,
                          out: LayerGradients | None = None) -> LayerGradients:
    """Gradients ``∇_θ m(θ, x)`` for each image, averaged over ``num_draws`` seeded draws.

    Parameters
    ----------
    measurement:
        A name from :data:`~diffinfluence_widgets.measurements.MEASUREMENTS` or a :class:`Measurement`; the
        training-side gradients of the method use ``"loss"``.
    num_draws:
        S draws of (t, ε) per example (default :data:`DEFAULT_GRADIENT_DRAWS`). The draws of an example depend
        only on ``(seed, id)``, so results do not depend on ``batch_size`` or ``max_rows``.
    max_rows:
        Upper bound on ``examples × draws`` per network call; draws are processed in chunks to respect it.
    bands:
        Optional timestep bands ``[(lo, hi), ...]`` partitioning 0..T−1: also return the per-band parts.
    device, dtype:
        Where to compute (``None``: the model's device, or CUDA when available if the model is on the CPU and
        ``device="auto"``) and in which float type (default: the model's).
    out:
        A previous result with the same layers, number of images, device and dtype (no bands) whose tensors are
        overwritten and returned, for consumers that stream batches and are done with the previous one. Without
        it the result is a fresh block on CPU — the memory of the last dropped batch when it fits
        (:mod:`.buffers`): faulting in new memory for every ``B × P`` batch costs a sizeable part of the pass.
    """
    meas = get_measurement(measurement)
    model.check_images(images)
    ids_t = _as_ids(ids, images.shape[0])
    if meas.needs_trajectory and trajectory is None:
        raise ValueError(f"measurement {meas.name!r} needs the query's sampling trajectory (trajectory=...)")
    if bands is not None and not meas.averages_over_timesteps:
        raise ValueError(f"measurement {meas.name!r} does not average over timesteps; bands are not defined for it")
    S, dev, dt = _prepare_run(model, batch_size, max_rows, num_draws, device, dtype)
    layers = tracked_layers(model.unet)
    if out is not None:
        _check_out(out, layers, images.shape[0], dev, dt, bands)
    band_list = [tuple(map(int, b)) for b in bands] if bands is not None else None
    parts: list[LayerGradients] = []
    n = images.shape[0]
    bar = tqdm(total=n, desc=f"gradients ({meas.name})", unit="img", disable=not progress, leave=False)
    with frozen_eval(model.unet), LayerCapture(layers, root=model.unet) as cap:
        for lo in range(0, n, int(batch_size)):
            sl = slice(lo, min(n, lo + int(batch_size)))
            x = images[sl].to(dev, dt)
            B = x.shape[0]
            traj = trajectory.select(sl).to(dev, dt) if trajectory is not None else None
            draws = meas.draws(model, ids_t[sl], S, seed, trajectory=traj)
            S_eff = draws.num_draws  # a trajectory measurement may use fewer draws than asked (one per step)
            if out is not None:
                acc = {name: out.layers[name][sl] for name in layers}
            else:
                acc = _layer_buffers(B, layers, dev, dt, zero=band_list is not None)
            unwritten = set(layers) if band_list is None else set()
            acc_b = None
            if band_list is not None:
                acc_b = {name: torch.zeros(len(band_list), B, *layer_shape(m), device=dev, dtype=dt)
                         for name, m in layers.items()}
            chunk = max(1, min(S_eff, int(max_rows) // B))
            for s0 in range(0, S_eff, chunk):
                d = draws.select_draws(slice(s0, s0 + chunk)).to(dev, dt)
                cap.clear()
                with torch.enable_grad():
                    vals = meas.per_draw(model, x, d, traj)  # [B, s]
                    if vals.shape != (B, d.num_draws):
                        raise RuntimeError(f"measurement {meas.name!r} returned {tuple(vals.shape)}, "
                                           f"expected {(B, d.num_draws)}")
                    (vals.sum() / S_eff).backward()
                masks = None
                if band_list is not None:
                    masks = band_masks(meas.draw_timesteps(d, traj).to(dev), band_list).to(dt)  # [nb, B, s]
                for name in layers:
                    for rec in cap.calls(name):
                        rows = rec.x.shape[0]
                        if rows % B:
                            raise RuntimeError(f"layer {name!r} saw {rows} rows for {B} examples; measurements "
                                               "must call the network on example-major batches")
                        if masks is None:
                            rec.add_per_example_(acc[name], accumulate=name not in unwritten)
                            unwritten.discard(name)
                        else:
                            if rows // B != d.num_draws:
                                raise RuntimeError(f"measurement {meas.name!r}: layer {name!r} is called with "
                                                   f"{rows // B} rows per example for {d.num_draws} draws; cannot "
                                                   "split by band")
                            bw = rec.per_example(B, masks)
                            acc[name] += bw.sum(0)
                            acc_b[name] += bw
                cap.clear()
            for name in unwritten:  # a layer the measurement never called: its gradient is zero
                acc[name].zero_()
            parts.append(LayerGradients(acc, ids_t[sl].clone(), acc_b, band_list))
            bar.update(B)
    bar.close()
    if out is not None:
        res = LayerGradients(dict(out.layers), ids_t.clone())
    else:
        res = LayerGradients.cat(parts)
    res.meta = {"measurement": meas.name, "num_draws": S, "seed": int(seed)}
    return res


def _check_out(out: LayerGradients, layers: dict, n: int, dev: torch.device, dt: torch.dtype, bands) -> None:
    if not isinstance(out, LayerGradients):
        raise TypeError(f"out must be a LayerGradients from a previous call, got {type(out).__name__}")
    if bands is not None:
        raise ValueError("out= cannot be combined with bands=")
    if list(out.layers) != list(layers):
        raise ValueError(f"out has layers {list(out.layers)[:3]}..., expected this model's {list(layers)[:3]}...")
    for name, m in layers.items():
        t = out.layers[name]
        want = (n, *layer_shape(m))
        if tuple(t.shape) != want or t.dtype != dt or t.device.type != dev.type or not t.is_contiguous():
            raise ValueError(f"out layer {name!r} is {tuple(t.shape)} {t.dtype} on {t.device}, expected a contiguous "
                             f"{want} {dt} on {dev}")


def iter_gradients(model: DiffusionModel, dataset, *, measurement: str | Measurement = "loss",
                   num_draws: int | None = None, seed: int = 0, batch_size: int = 32, max_rows: int = 512,
                   device=None, dtype=None, progress: bool = False, start: int = 0,
                   stop: int | None = None, reuse_buffers: bool = False) -> Iterator[LayerGradients]:
    """Per-example gradients over an ``ImageDataset`` (``.images``, ``.ids``), one batch at a time, in order.

    ``reuse_buffers=True`` writes every full batch into the tensors of the previous one (``out=`` of
    :func:`per_example_gradients`): only for a consumer that is done with a batch before it asks for the next.
    """
    n = len(dataset.ids)
    stop = n if stop is None else min(int(stop), n)
    prev = None
    bar = tqdm(total=stop - start, desc=f"training gradients ({get_measurement(measurement).name})", unit="img",
               disable=not progress)
    for lo in range(int(start), stop, int(batch_size)):
        hi = min(stop, lo + int(batch_size))
        prev = prev if reuse_buffers and prev is not None and len(prev) == hi - lo else None
        prev = per_example_gradients(model, dataset.images[lo:hi], dataset.ids[lo:hi], measurement,
                                     num_draws=num_draws, seed=seed, batch_size=batch_size, max_rows=max_rows,
                                     device=device, dtype=dtype, out=prev)
        yield prev
        bar.update(hi - lo)
    bar.close()
