"""Hooks on Conv2d / Linear layers: layer inputs ``a`` and output gradients ``b``, per call and per row.

Everything in the influence backend (per-example gradients, K-FAC / EK-FAC factors, projections) is built from
two quantities per tracked layer and per network row:

* ``a`` ``[rows, R, d_in (+1)]`` — the layer input at each of the R weight-sharing positions (conv patches via
  ``unfold``; attention tokens), with a constant 1 appended when the layer has a bias (**bias folded into the
  input**: the layer's gradient is one ``[d_out, d_in + 1]`` matrix whose last column is the bias gradient);
* ``b`` ``[rows, R, d_out]`` — the gradient of the backward pass's objective w.r.t. the layer output.

A row's weight gradient is ``Σ_r b_r a_rᵀ``. Hooks on the modules (not ``torch.func``) keep diffusers' fused
attention usable (method trap 5). Parameters are frozen during a capture: the backward pass then skips the weight
gradient GEMMs entirely, and inputs that do not depend on any tracked parameter (the timestep embedding's input)
are given ``requires_grad`` so their layer's ``b`` is still produced.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["tracked_layers", "layer_shape", "LayerCapture", "CallRecord"]


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


def _inputs(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Layer input as ``[rows, R, d_in (+1)]``."""
    if isinstance(m, nn.Conv2d):
        cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
        a = cols.transpose(1, 2)  # [rows, L, C_in*kh*kw]
    else:
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    if m.bias is not None:
        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
    return a


def _outputs(m: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Output gradient as ``[rows, R, d_out]``."""
    if isinstance(m, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


@dataclass
class CallRecord:
    """One call of a layer: ``a`` is set in the forward pass, ``b`` in the backward pass."""

    a: torch.Tensor
    b: torch.Tensor | None = None


@dataclass
class LayerCapture:
    """Context manager recording ``a`` and ``b`` for every call of the given layers.

    ``records[name]`` is the list of :class:`CallRecord` of that layer, in forward order. Call :meth:`clear`
    between backward passes. ``transform_a`` / ``transform_b`` (optional) map ``(name, tensor) -> tensor`` right when
    a tensor is captured, e.g. to rotate into an eigenbasis or project, so the raw tensors need not be kept.
    """

    layers: dict[str, nn.Module]
    freeze_parameters: bool = True
    #: freeze every parameter of this module (e.g. the whole UNet, norms included), not only the tracked layers'
    root: nn.Module | None = None
    records: dict[str, list[CallRecord]] = field(default_factory=dict)
    _handles: list = field(default_factory=list, repr=False)
    _frozen: list = field(default_factory=list, repr=False)

    def clear(self) -> None:
        self.records = {name: [] for name in self.layers}

    def _pre_hook(self, module, inputs):
        x = inputs[0]
        if torch.is_grad_enabled() and not x.requires_grad:
            # The input does not depend on any tracked parameter (e.g. the sinusoidal timestep embedding):
            # make it a leaf that requires grad so the output gradient of this layer is still computed.
            return (x.detach().requires_grad_(True), *inputs[1:])
        return None

    def _make_forward_hook(self, name: str):
        def hook(module, inputs, output):
            rec = CallRecord(a=_inputs(module, inputs[0].detach()))
            self.records[name].append(rec)
            if output.requires_grad:
                def grad_hook(g, rec=rec, module=module):
                    rec.b = _outputs(module, g.detach())
                output.register_hook(grad_hook)
        return hook

    def __enter__(self) -> "LayerCapture":
        self.clear()
        if self.freeze_parameters:
            params = (self.root.parameters() if self.root is not None else
                      (p for m in self.layers.values() for p in m.parameters(recurse=False)))
            for p in params:
                self._frozen.append((p, p.requires_grad))
                p.requires_grad_(False)
        for name, m in self.layers.items():
            self._handles.append(m.register_forward_pre_hook(self._pre_hook))
            self._handles.append(m.register_forward_hook(self._make_forward_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p, flag in self._frozen:
            p.requires_grad_(flag)
        self._frozen.clear()

    def calls(self, name: str) -> Iterator[CallRecord]:
        for rec in self.records[name]:
            if rec.b is None:
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
