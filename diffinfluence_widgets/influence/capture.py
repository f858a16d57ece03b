"""Hooks on Conv2d / Linear layers: layer inputs ``a`` and output gradients ``b``, per call and per row.

Everything in the influence backend (per-example gradients, K-FAC / EK-FAC factors, projections) is built from
two quantities per tracked layer and per network row:

* ``a`` ``[rows, R, d_in (+1)]`` — the layer input at each of the R weight-sharing positions (conv patches via
  ``unfold``; attention tokens), with a constant 1 appended when the layer has a bias (**bias folded into the
  input**: the layer's gradient is one ``[d_out, d_in + 1]`` matrix whose last column is the bias gradient);
* ``b`` ``[rows, R, d_out]`` — the gradient of the backward pass's objective w.r.t. the layer output.

A row's weight gradient is ``Σ_r b_r a_rᵀ``. Hooks on the modules (not ``torch.func``) keep diffusers' fused
attention usable (method trap 5). Parameters are frozen during a capture: the backward pass then skips the weight
gradient GEMMs entirely, and a layer whose input does not depend on any tracked parameter (the first convolution,
the timestep embedding's first layer) has its output made a leaf that requires grad, so that its ``b`` is still
produced (and no gradient w.r.t. its input).
"""
from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .wgrad import add_conv_per_example_, add_linear_per_example_

__all__ = ["tracked_layers", "layer_shape", "LayerCapture", "CallRecord", "frozen_eval", "model_lock"]

_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(module: nn.Module) -> threading.RLock:
    """The re-entrant lock that serialises work on one network across threads.

    A capture registers hooks on shared modules and toggles ``requires_grad`` of their parameters, so any other
    forward pass on the same network while it runs (another capture, sampling) would corrupt both. Hold this lock
    around such work; :class:`LayerCapture` holds it for its whole duration.
    """
    with _LOCKS_GUARD:
        lock = _LOCKS.get(module)
        if lock is None:
            lock = _LOCKS[module] = threading.RLock()
        return lock


def tracked_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The Conv2d and Linear sub-modules that take part in influence, in module order."""
    out: dict[str, nn.Module] = {}
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.groups != 1:
                raise NotImplementedError(f"layer {name!r}: grouped convolutions (groups={m.groups}) are not supported")
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise NotImplementedError(f"layer {name!r}: padding={m.padding!r}, padding_mode={m.padding_mode!r} "
                                          "is not supported (integer zero padding only)")
            out[name] = m
        elif isinstance(m, nn.Linear):
            out[name] = m
    if not out:
        raise ValueError(f"{type(module).__name__} has no Conv2d or Linear layers to attribute through")
    return out


def layer_shape(m: nn.Module) -> tuple[int, int]:
    """(d_out, d_in + has_bias) of a tracked layer's gradient matrix."""
    w = m.weight
    return int(w.shape[0]), int(w[0].numel()) + (1 if m.bias is not None else 0)


def _unfold(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Layer input in "channels × positions" layout: conv ``[rows, C_in*kh*kw, L]``, linear ``[rows, d_in, R]``."""
    if isinstance(m, nn.Conv2d):
        if m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding == (0, 0):
            return x.flatten(2)  # a 1×1 convolution needs no im2col copy
        return F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
    return x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2)


def _grad_layout(m: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Output gradient in "channels × positions" layout ``[rows, d_out, R]``."""
    if isinstance(m, nn.Conv2d):
        return g.flatten(2)
    return g.reshape(g.shape[0], -1, g.shape[-1]).transpose(1, 2)


@dataclass
class CallRecord:
    """One call of a layer: the raw input is kept in the forward pass, the output gradient set in the backward pass.

    ``a`` ``[rows, R, d_in (+1)]`` and ``b`` ``[rows, R, d_out]`` are the position-major views used for
    Kronecker factors; :meth:`per_example` forms per-example weight gradients without the ones-column copy.
    """

    module: nn.Module
    x: torch.Tensor
    g: torch.Tensor | None = None
    _a: torch.Tensor | None = field(default=None, repr=False)

    @property
    def has_bias(self) -> bool:
        return self.module.bias is not None

    @property
    def a_cols(self) -> torch.Tensor:
        """``[rows, d_in, R]`` (no bias column)."""
        if self._a is None:
            self._a = _unfold(self.module, self.x)
        return self._a

    def drop_unfolded_(self) -> None:
        """Free the cached unfolded (im2col) input: a conv's is ``kh·kw`` times its input, so holding every
        layer's at once would make a pass's memory that of the whole network's patches, not one layer's."""
        self._a = None

    @property
    def b_cols(self) -> torch.Tensor:
        """``[rows, d_out, R]``."""
        if self.g is None:
            raise RuntimeError("no output gradient recorded for this call")
        return _grad_layout(self.module, self.g)

    @property
    def a(self) -> torch.Tensor:
        a = self.a_cols.transpose(1, 2)
        if self.has_bias:
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
        return a

    @property
    def b(self) -> torch.Tensor:
        return self.b_cols.transpose(1, 2)

    def add_per_example_(self, out: torch.Tensor, masks: torch.Tensor | None = None, *,
                         accumulate: bool = True) -> torch.Tensor:
        """Add this call's per-example weight gradients into ``out`` (bias in the last column) and return it.

        ``out`` is ``[B, d_out, d_in (+1)]``, or ``[M, B, d_out, d_in (+1)]`` with ``masks`` ``[M, B, k]`` weighting
        each example's rows. Rows are example-major: ``k = rows // B`` consecutive rows per example.
        ``accumulate=False`` (without masks) overwrites ``out`` instead of adding to it.
        """
        B = out.shape[-3]
        if masks is None:  # one batched GEMM per layer call, straight into ``out`` (see :mod:`.wgrad`)
            if isinstance(self.module, nn.Conv2d):
                if self.g is None:
                    raise RuntimeError("no output gradient recorded for this call")
                return add_conv_per_example_(out, self.module, self.x, self.g, accumulate=accumulate)
            return add_linear_per_example_(out, self.a_cols, self.b_cols, self.has_bias, accumulate=accumulate)
        if not accumulate:
            raise ValueError("accumulate=False is only supported without masks")
        if isinstance(self.module, nn.Conv2d):  # one pass per mask, over the rows it weights
            if self.g is None:
                raise RuntimeError("no output gradient recorded for this call")
            rows_w = masks.to(self.g.dtype).reshape(masks.shape[0], -1)  # [M, B·k], example-major like the rows
            for j in range(masks.shape[0]):
                add_conv_per_example_(out[j], self.module, self.x, self.g * rows_w[j][:, None, None, None])
            return out
        a, b = self.a_cols, self.b_cols
        k = a.shape[0] // B
        a4 = a.reshape(B, k, a.shape[1], a.shape[2])
        b4 = b.reshape(B, k, b.shape[1], b.shape[2])
        d_in = a.shape[1]
        out[..., :d_in] += torch.einsum("mnk,nkor,nkir->mnoi", masks, b4, a4)
        if self.has_bias:
            out[..., d_in] += torch.einsum("mnk,nko->mno", masks, b4.sum(3))
        return out

    def per_example(self, num_examples: int, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Per-example weight gradients ``[B, d_out, d_in (+1)]`` (``[M, B, ...]`` with masks)."""
        o, i = layer_shape(self.module)
        lead = (num_examples,) if masks is None else (masks.shape[0], num_examples)
        return self.add_per_example_(self.x.new_zeros(*lead, o, i), masks)


@dataclass
class LayerCapture:
    """Context manager recording ``a`` and ``b`` for every call of the given layers.

    ``records[name]`` is the list of :class:`CallRecord` of that layer, in forward order. Call :meth:`clear`
    between backward passes. While it is open, the network's :func:`model_lock` is held and its parameters are
    frozen (restored on exit).
    """

    layers: dict[str, nn.Module]
    freeze_parameters: bool = True
    #: freeze every parameter of this module (e.g. the whole UNet, norms included), not only the tracked layers'
    root: nn.Module | None = None
    records: dict[str, list[CallRecord]] = field(default_factory=dict)
    _handles: list = field(default_factory=list, repr=False)
    _frozen: list = field(default_factory=list, repr=False)
    _lock: threading.RLock | None = field(default=None, repr=False)

    def clear(self) -> None:
        self.records = {name: [] for name in self.layers}

    def _make_forward_hook(self, name: str):
        def hook(module, inputs, output):
            rec = CallRecord(module, inputs[0].detach())
            self.records[name].append(rec)
            replaced = None
            if torch.is_grad_enabled() and not output.requires_grad:
                # The input does not depend on any tracked parameter (the first convolution's noisy image, the
                # sinusoidal timestep embedding): the output becomes a leaf that requires grad, so that this layer's
                # output gradient is still computed, and no gradient w.r.t. its input is.
                output = replaced = output.detach().requires_grad_(True)
            if output.requires_grad:
                def grad_hook(g, rec=rec):
                    rec.g = g.detach()
                output.register_hook(grad_hook)
            return replaced
        return hook

    def __enter__(self) -> "LayerCapture":
        self._lock = model_lock(self.root if self.root is not None else next(iter(self.layers.values())))
        self._lock.acquire()
        self.clear()
        if self.freeze_parameters:
            params = (self.root.parameters() if self.root is not None else
                      (p for m in self.layers.values() for p in m.parameters(recurse=False)))
            for p in params:
                self._frozen.append((p, p.requires_grad))
                p.requires_grad_(False)
        for name, m in self.layers.items():
            self._handles.append(m.register_forward_hook(self._make_forward_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p, flag in self._frozen:
            p.requires_grad_(flag)
        self._frozen.clear()
        self._lock.release()

    def calls(self, name: str) -> Iterator[CallRecord]:
        for rec in self.records[name]:
            if rec.g is None:
                raise RuntimeError(f"layer {name!r}: a forward call got no output gradient; the backward pass did "
                                   "not reach it (is the measurement differentiable through this layer?)")
            yield rec


@contextmanager
def frozen_eval(module: nn.Module):
    """Eval mode (no dropout) for the duration; the previous mode is restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
