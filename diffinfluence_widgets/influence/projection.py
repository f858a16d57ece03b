"""Seeded random projections of per-example gradients to k dimensions (``method.md`` §6).

A projection ``R`` (k × p) with ``E[RᵀR] = I`` keeps inner products unbiased, ``E⟨R u, R v⟩ = ⟨u, v⟩``, with an
error that shrinks like ``1/√k``. Two structures are provided; neither ever holds the k × p matrix:

* :class:`DenseProjector` — an i.i.d. Gaussian or Rademacher ``R`` with entries of variance ``1/k``, generated
  column-chunk by column-chunk from the seed (chunk ``c`` depends only on ``(seed, c)``), so ``R g`` is accumulated
  over chunks of the flat gradient. Error ``‖u‖‖v‖/√k`` (the classic Johnson–Lindenstrauss rate).
* :class:`KroneckerProjector` — per layer ``φ_l = R_B,l G_l R_A,lᵀ`` (``G_l`` the ``[d_out, d_in+1]`` gradient
  matrix, ``R_B,l`` ``[k_b, d_out]``, ``R_A,l`` ``[k_a, d_in+1]``), **summed** over layers into one ``k_b × k_a``
  feature (so every layer uses all k dimensions and cross-layer terms average out like a dense projection). Because
  ``G_l = Σ_r b_r a_rᵀ`` (output gradients × inputs, summed over positions and draws),
  :meth:`KroneckerProjector.project_factors` projects ``a`` and ``b`` first and never forms ``G_l``. A side that is
  not larger than its ``k`` (``d_out ≤ k_b`` or ``d_in+1 ≤ k_a``) uses a random matrix with orthonormal columns,
  which is an exact isometry on that side (no error from it), still independent across layers.

Inner-product error of the Kronecker form, relative to ``‖u‖‖v‖``: for one layer it is between ``1/√k`` (gradient
matrices of high stable rank) and ``1/√k_b + 1/√k_a`` (rank-one gradients: ``k^{-1/4}`` when ``k_b = k_a = √k``);
sides that are exact isometries contribute nothing; cross-layer terms contribute ``1/√k``. Random matrices are generated on the CPU from the seed and then
moved to the device, so a projection is bit-identical on CPU and CUDA (only the arithmetic differs).
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Mapping, Sequence

import torch

__all__ = ["DenseProjector", "KroneckerProjector", "make_projector", "projector_from_spec", "layer_shapes_of",
           "PROJECTION_KINDS"]

PROJECTION_KINDS = ("rademacher", "gaussian")
_MIX = 0x9E3779B97F4A7C15


def _generator(seed: int, *stream: int) -> torch.Generator:
    s = int(seed) * _MIX
    for i, x in enumerate(stream):
        s = (s * 0xBF58476D1CE4E5B9 + (int(x) + 1) * (0x94D049BB133111EB + i)) % (2**63 - 1)
    return torch.Generator().manual_seed(s % (2**63 - 1))


def _random(shape: tuple[int, int], kind: str, gen: torch.Generator) -> torch.Tensor:
    """Unit-variance entries (float32, CPU)."""
    if kind == "gaussian":
        return torch.randn(shape, generator=gen, dtype=torch.float32)
    if kind == "rademacher":
        return torch.randint(0, 2, shape, generator=gen, dtype=torch.int8).to(torch.float32).mul_(2).sub_(1)
    raise ValueError(f"projection kind must be one of {PROJECTION_KINDS}, got {kind!r}")


def _check_kind(kind: str) -> str:
    if kind not in PROJECTION_KINDS:
        raise ValueError(f"projection kind must be one of {PROJECTION_KINDS}, got {kind!r}")
    return kind


def layer_shapes_of(layers: Mapping[str, torch.Tensor] | Mapping[str, Sequence[int]]) -> dict[str, tuple[int, int]]:
    """``{name: (d_out, d_in+1)}`` from per-layer gradients ``[B, d_out, d_in+1]`` or from shapes."""
    out = {}
    for name, v in layers.items():
        shape = tuple(v.shape[-2:]) if isinstance(v, torch.Tensor) else tuple(int(s) for s in v)[-2:]
        out[name] = (int(shape[0]), int(shape[1]))
    return out


def _flatten(grads, names: Sequence[str] | None) -> torch.Tensor:
    if isinstance(grads, torch.Tensor):
        if grads.dim() != 2:
            raise ValueError(f"flat gradients must be [B, P], got shape {tuple(grads.shape)}")
        return grads
    layers = getattr(grads, "layers", grads)
    names = list(names) if names is not None else list(layers)
    missing = [n for n in names if n not in layers]
    if missing:
        raise KeyError(f"gradients lack layers {missing[:3]}{'...' if len(missing) > 3 else ''}")
    return torch.cat([layers[n].reshape(layers[n].shape[0], -1) for n in names], 1)


class DenseProjector:
    """``φ = R g`` with an i.i.d. ``R`` (k × p, entries of variance 1/k), generated in column chunks from the seed.

    Parameters
    ----------
    num_params:
        p, the length of the flat gradient (layers concatenated in ``layer_names`` order, each ``[d_out, d_in+1]``
        row-major).
    k:
        The projected dimension.
    seed, kind:
        The projection is a pure function of ``(seed, kind, k, p, chunk_size)``.
    chunk_size:
        Columns generated at a time (memory ``k × chunk_size`` floats).
    cache_bytes:
        Keep generated chunks (on the device) when the whole ``R`` fits in this many bytes; otherwise regenerate
        them on each call.
    """

    structure = "dense"

    def __init__(self, num_params: int, k: int, seed: int = 0, kind: str = "rademacher", *,
                 layer_names: Sequence[str] | None = None, chunk_size: int = 16384, cache_bytes: int = 256 << 20):
        if int(k) < 1 or int(num_params) < 1:
            raise ValueError(f"k and num_params must be positive, got k={k!r}, num_params={num_params!r}")
        self.p, self.k, self.seed, self.kind = int(num_params), int(k), int(seed), _check_kind(kind)
        self.layer_names = list(layer_names) if layer_names is not None else None
        self.chunk_size = int(chunk_size)
        self.cache = self.k * self.p * 4 <= int(cache_bytes)
        self._chunks: dict[tuple[int, str], torch.Tensor] = {}

    def spec(self) -> dict:
        return {"structure": "dense", "kind": self.kind, "seed": self.seed, "k": self.k, "num_params": self.p,
                "chunk_size": self.chunk_size, "layer_names": self.layer_names}

    def chunk(self, c: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Columns ``[c·chunk, (c+1)·chunk)`` of R, ``[k, w]`` (scaled by 1/√k)."""
        key = (c, str(device))
        if key in self._chunks:
            return self._chunks[key]
        lo = c * self.chunk_size
        w = min(self.chunk_size, self.p - lo)
        r = _random((self.k, w), self.kind, _generator(self.seed, 0, c)).mul_(1.0 / math.sqrt(self.k)).to(device)
        if self.cache:
            self._chunks[key] = r
        return r

    def project(self, grads) -> torch.Tensor:
        """``[B, k]`` float32 from flat ``[B, P]`` gradients or a dict / ``LayerGradients`` of layer matrices."""
        g = _flatten(grads, self.layer_names)
        if g.shape[1] != self.p:
            raise ValueError(f"gradients have {g.shape[1]} parameters, this projection was built for {self.p}")
        out = torch.zeros(g.shape[0], self.k, device=g.device, dtype=torch.float32)
        for c in range(math.ceil(self.p / self.chunk_size)):
            lo = c * self.chunk_size
            blk = g[:, lo:lo + self.chunk_size].to(torch.float32)
            out.addmm_(blk, self.chunk(c, g.device).T)
        return out

    def matrix(self) -> torch.Tensor:
        """The whole R (``[k, p]``) — only for tests on small problems."""
        return torch.cat([self.chunk(c) for c in range(math.ceil(self.p / self.chunk_size))], 1)


class KroneckerProjector:
    """Per-layer Kronecker-structured projection ``φ = Σ_l vec(R_B,l G_l R_A,lᵀ)`` into ``k = k_b · k_a`` dims.

    Parameters
    ----------
    layer_shapes:
        ``{name: (d_out, d_in+1)}`` in the model's layer order (see :func:`layer_shapes_of`).
    k_b, k_a:
        The output-side and input-side dimensions; the feature is the flattened ``[k_b, k_a]`` matrix.
    seed, kind:
        Layer ``l``'s matrices depend only on ``(seed, kind, l's name, its shape, k_b, k_a)``.
    exact_small_sides:
        When a side is not larger than its k, use a random matrix with orthonormal columns (exact isometry of that
        side, mean zero, independent across layers) instead of i.i.d. entries.
    """

    structure = "kronecker"

    def __init__(self, layer_shapes: Mapping[str, tuple[int, int]], k_b: int = 64, k_a: int = 32, seed: int = 0,
                 kind: str = "rademacher", *, exact_small_sides: bool = True):
        if int(k_b) < 1 or int(k_a) < 1:
            raise ValueError(f"k_b and k_a must be positive, got k_b={k_b!r}, k_a={k_a!r}")
        if not layer_shapes:
            raise ValueError("layer_shapes is empty: nothing to project")
        self.layer_shapes = {n: (int(s[0]), int(s[1])) for n, s in layer_shapes.items()}
        self.k_b, self.k_a, self.seed, self.kind = int(k_b), int(k_a), int(seed), _check_kind(kind)
        self.exact_small_sides = bool(exact_small_sides)
        self._mats: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def k(self) -> int:
        return self.k_b * self.k_a

    @property
    def layer_names(self) -> list[str]:
        return list(self.layer_shapes)

    def spec(self) -> dict:
        return {"structure": "kronecker", "kind": self.kind, "seed": self.seed, "k": self.k, "k_b": self.k_b,
                "k_a": self.k_a, "exact_small_sides": self.exact_small_sides,
                "layer_shapes": {n: list(s) for n, s in self.layer_shapes.items()}}

    def _side(self, name: str, side: int, k: int, d: int) -> torch.Tensor:
        name_key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:7], "little")
        gen = _generator(self.seed, 1, name_key, side, d, k)
        if self.exact_small_sides and d <= k:
            # k × d with orthonormal columns: RᵀR = I exactly; sign-fixed QR of a Gaussian is Haar (mean zero)
            q, r = torch.linalg.qr(torch.randn(k, d, generator=gen, dtype=torch.float64))
            return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones((), dtype=q.dtype))
        return _random((k, d), self.kind, gen).double().mul_(1.0 / math.sqrt(k))

    def matrices(self, name: str, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R_B [k_b, d_out], R_A [k_a, d_in+1])`` of one layer on ``device`` (cached; generated in float64 on
        the CPU, so float32 and float64 copies are the same matrix up to rounding)."""
        key = (name, str(device), dtype)
        if key not in self._mats:
            if name not in self.layer_shapes:
                raise KeyError(f"layer {name!r} is not part of this projection")
            d_out, d_in1 = self.layer_shapes[name]
            self._mats[key] = (self._side(name, 0, self.k_b, d_out).to(device, dtype),
                               self._side(name, 1, self.k_a, d_in1).to(device, dtype))
        return self._mats[key]

    def project_layer(self, name: str, g: torch.Tensor) -> torch.Tensor:
        """``[B, k_b, k_a]`` = ``R_B G R_Aᵀ`` for layer gradients ``g`` ``[B, d_out, d_in+1]`` (float32; float64
        stays float64)."""
        dt = torch.float64 if g.dtype == torch.float64 else torch.float32  # float64 kept for exact query paths
        rb, ra = self.matrices(name, g.device, dt)
        if tuple(g.shape[-2:]) != (rb.shape[1], ra.shape[1]):
            raise ValueError(f"layer {name!r}: gradient shape {tuple(g.shape[-2:])}, projection expects "
                             f"{(rb.shape[1], ra.shape[1])}")
        g = g.to(dt)
        d_out, d_in1 = g.shape[-2:]
        # contraction order by cost
        if d_out * d_in1 * self.k_a + self.k_b * d_out * self.k_a <= d_out * d_in1 * self.k_b + self.k_b * d_in1 * self.k_a:
            return torch.matmul(rb, torch.matmul(g, ra.T))
        return torch.matmul(torch.matmul(rb, g), ra.T)

    def project(self, grads) -> torch.Tensor:
        """``[B, k]`` from a dict / ``LayerGradients`` of ``[B, d_out, d_in+1]`` layer matrices (float32, or
        float64 for float64 input)."""
        layers = getattr(grads, "layers", grads)
        if isinstance(layers, torch.Tensor):
            raise TypeError("KroneckerProjector needs per-layer gradient matrices {name: [B, d_out, d_in+1]}, "
                            "not a flat tensor")
        unknown = [n for n in layers if n not in self.layer_shapes]
        if unknown:
            raise KeyError(f"gradients contain layers this projection does not know: {unknown[:3]}")
        out = None
        for name, g in layers.items():
            phi = self.project_layer(name, g)
            out = phi if out is None else out.add_(phi)
        return out.reshape(out.shape[0], -1)

    def project_factors(self, name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``[B, k]`` contribution of one layer from inputs ``a`` ``[B, R, d_in+1]`` and output gradients ``b``
        ``[B, R, d_out]`` (``G = Σ_r b_r a_rᵀ``, R = positions × draws): the gradient matrix is never formed."""
        rb, ra = self.matrices(name, a.device)
        pa = torch.matmul(a.to(torch.float32), ra.T)  # [B, R, k_a]
        pb = torch.matmul(b.to(torch.float32), rb.T)  # [B, R, k_b]
        return torch.einsum("brk,brj->bkj", pb, pa).reshape(a.shape[0], -1)

    def compose(self, name: str, q_b: torch.Tensor, q_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R_B Q_B, R_A Q_A)``: projecting ``Q_B X Q_Aᵀ`` equals ``(R_B Q_B) X (R_A Q_A)ᵀ`` — lets a query held in
        an eigenbasis be projected without rotating it back (precompute once per layer)."""
        rb, ra = self.matrices(name, q_b.device, q_b.dtype)
        return rb @ q_b, ra @ q_a.to(q_b.dtype)


def make_projector(layer_shapes: Mapping[str, tuple[int, int]], k: int | None = None, *, structure: str = "kronecker",
                   seed: int = 0, kind: str = "rademacher", k_b: int | None = None, k_a: int | None = None,
                   **kwargs):
    """A projector for gradients with these layer shapes. ``structure="kronecker"`` (default) splits ``k`` as
    ``k_b · k_a`` (``k_b = 2^⌈log₂(k)/2⌉`` unless given); ``"dense"`` uses k as is."""
    shapes = {n: tuple(s) for n, s in layer_shapes.items()}
    if structure == "dense":
        if k is None:
            raise ValueError("a dense projection needs k")
        p = sum(a * b for a, b in shapes.values())
        return DenseProjector(p, k, seed, kind, layer_names=list(shapes), **kwargs)
    if structure != "kronecker":
        raise ValueError(f"projection structure must be 'kronecker' or 'dense', got {structure!r}")
    if k_b is None or k_a is None:
        if k is None:
            raise ValueError("a Kronecker projection needs k or both k_b and k_a")
        if k_b is None and k_a is None:
            k_b = min(k, 2 ** math.ceil(math.log2(k) / 2))
        k_b = k_b if k_b is not None else max(1, k // k_a)
        k_a = k_a if k_a is not None else max(1, k // k_b)
        if k is not None and k_b * k_a != k:
            raise ValueError(f"k={k} is not k_b·k_a={k_b}·{k_a}; pass k_b and k_a explicitly")
    return KroneckerProjector(shapes, k_b, k_a, seed, kind, **kwargs)


def projector_from_spec(spec: Mapping) -> DenseProjector | KroneckerProjector:
    """Rebuild a projector from its :meth:`spec` (stored in a manifest)."""
    spec = dict(spec)
    if spec.get("structure") == "dense":
        return DenseProjector(spec["num_params"], spec["k"], spec["seed"], spec["kind"],
                              layer_names=spec.get("layer_names"), chunk_size=spec.get("chunk_size", 16384))
    if spec.get("structure") == "kronecker":
        shapes = {n: tuple(s) for n, s in spec["layer_shapes"].items()}
        return KroneckerProjector(shapes, spec["k_b"], spec["k_a"], spec["seed"], spec["kind"],
                                  exact_small_sides=spec.get("exact_small_sides", True))
    raise ValueError(f"unknown projection spec {json.dumps(spec)[:200]}")
