"""Random projections: unbiased inner products whose error shrinks like 1/√k; Kronecker form equals its factor form."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffinfluence_widgets.influence.projection import (DenseProjector, KroneckerProjector, make_projector,
                                                        projector_from_spec)

torch.set_num_threads(1)


def _pair(p: int, rho: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(p, generator=g, dtype=torch.float64)
    w = torch.randn(p, generator=g, dtype=torch.float64)
    return u, rho * u + math.sqrt(1 - rho ** 2) * w


def _slope(ks, errs) -> float:
    return float(np.polyfit(np.log(ks), np.log(errs), 1)[0])


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_dense_error_shrinks_like_inverse_sqrt_k(kind):
    p, ks, reps = 2000, [16, 64, 256, 1024], 24
    u, v = _pair(p, 0.3, 0)
    exact = float(u @ v)
    errs, means = [], []
    for k in ks:
        est = []
        for r in range(reps):
            P = DenseProjector(p, k, seed=r, kind=kind, chunk_size=700)  # several chunks
            f = P.project(torch.stack([u, v]).float()).double()
            est.append(float(f[0] @ f[1]))
        est = np.array(est)
        errs.append(np.sqrt(np.mean((est - exact) ** 2)) / float(u.norm() * v.norm()))
        means.append(est.mean())
    slope = _slope(ks, errs)
    assert -0.62 < slope < -0.38, (slope, errs)
    # JL rate: relative RMS error ≈ sqrt((1 + ρ²)/k)
    assert errs[-1] < 2.0 * math.sqrt(1.1 / ks[-1])
    assert abs(means[-1] - exact) < 3 * errs[-1] * float(u.norm() * v.norm()) / math.sqrt(reps)


def test_dense_expected_gram_is_identity_and_chunking_is_invisible():
    p, k = 40, 64
    acc = torch.zeros(p, p, dtype=torch.float64)
    reps = 200
    for r in range(reps):
        R = DenseProjector(p, k, seed=r, chunk_size=7).matrix().double()
        acc += R.T @ R
    acc /= reps
    assert torch.allclose(torch.diagonal(acc), torch.ones(p, dtype=torch.float64), atol=1e-6)  # Rademacher: exact
    off = acc - torch.diag(torch.diagonal(acc))
    assert off.abs().max() < 5 / math.sqrt(k * reps)
    # same seed -> same features; the matrix used by project() is the one matrix() returns
    P = DenseProjector(p, k, seed=3, chunk_size=7)
    x = torch.randn(5, p)
    assert torch.allclose(P.project(x), x @ P.matrix().T, atol=1e-5)
    assert torch.equal(P.project(x), DenseProjector(p, k, seed=3, chunk_size=7, cache_bytes=0).project(x))
    assert not torch.equal(P.project(x), DenseProjector(p, k, seed=4, chunk_size=7).project(x))


def test_dense_accepts_layer_dicts_in_order():
    shapes = {"a": (3, 5), "b": (4, 2)}
    g = {n: torch.randn(6, *s) for n, s in shapes.items()}
    P = make_projector(shapes, 32, structure="dense", seed=1)
    flat = torch.cat([g["a"].flatten(1), g["b"].flatten(1)], 1)
    assert torch.allclose(P.project(g), P.project(flat))
    with pytest.raises(ValueError, match="parameters"):
        P.project(torch.randn(2, 7))


@pytest.mark.parametrize("rank_one", [True, False])
def test_kronecker_error_rates_and_unbiased(rank_one):
    """One layer, both sides random (d > k_b = k_a = s). Rank-one gradients (worst case): relative error
    ~ 1/√k_b + 1/√k_a, slope −1/2 in s. Gradients of high stable rank: error ~ 1/√k = 1/s, slope −1/2 in k."""
    d_out, d_in1 = 96, 160
    sides, reps = [4, 8, 16, 32, 64], 24
    g = torch.Generator().manual_seed(1)
    if rank_one:
        x, y, z = (torch.randn(d, generator=g, dtype=torch.float64) for d in (d_out, d_in1, d_in1))
        U, V = torch.outer(x, y)[None], torch.outer(x, 0.3 * y + 0.95 * z)[None]
    else:
        u, v = _pair(d_out * d_in1, 0.3, 1)
        U, V = u.reshape(1, d_out, d_in1), v.reshape(1, d_out, d_in1)
    exact, scale = float((U * V).sum()), float(U.norm() * V.norm())
    errs, means = [], []
    for s in sides:
        est = []
        for r in range(reps):
            P = KroneckerProjector({"w": (d_out, d_in1)}, s, s, seed=r)
            est.append(float(P.project({"w": U}) @ P.project({"w": V}).T))
        est = np.array(est)
        errs.append(np.sqrt(np.mean((est - exact) ** 2)) / scale)
        means.append(est.mean())
    ks = sides if rank_one else [s * s for s in sides]
    slope = _slope(ks, errs)
    assert -0.65 < slope < -0.35, (slope, errs)
    assert abs(np.mean(means) - exact) < 4 * np.mean(errs) * scale / math.sqrt(reps * len(sides))


def test_kronecker_exact_sides_give_dense_rate_across_layers():
    """Small layers (both sides exact isometries): only cross-layer terms remain, error ~ 1/√k."""
    shapes = {f"l{i}": (6, 9) for i in range(40)}
    p = sum(a * b for a, b in shapes.values())
    u, v = _pair(p, 0.3, 2)
    def split(x):
        out, o = {}, 0
        for n, (a, b) in shapes.items():
            out[n] = x[o:o + a * b].reshape(1, a, b)
            o += a * b
        return out
    U, V = split(u), split(v)
    exact = float(u @ v)
    # a single small layer is projected exactly
    P1 = KroneckerProjector({"l0": shapes["l0"]}, 8, 16, seed=0)
    assert abs(float(P1.project({"l0": U["l0"].double()}) @ P1.project({"l0": V["l0"].double()}).T)
               - float(U["l0"].flatten() @ V["l0"].flatten())) < 1e-9
    ks, errs = [(8, 16), (16, 16), (16, 32), (32, 32), (32, 64)], []
    for kb, ka in ks:
        est = []
        for r in range(16):
            P = KroneckerProjector(shapes, kb, ka, seed=r)
            est.append(float(P.project(U) @ P.project(V).T))
        errs.append(np.sqrt(np.mean((np.array(est) - exact) ** 2)) / float(u.norm() * v.norm()))
    slope = _slope([kb * ka for kb, ka in ks], errs)
    assert -0.65 < slope < -0.35, (slope, errs)


def test_kronecker_factor_form_never_needs_the_gradient():
    shapes = {"conv": (12, 37), "lin": (5, 9)}
    P = make_projector(shapes, 256, seed=5)  # k_b · k_a = 16 · 16
    a = torch.randn(3, 11, 37)
    b = torch.randn(3, 11, 12)
    G = torch.einsum("bro,bri->boi", b, a)
    assert torch.allclose(P.project_factors("conv", a, b), P.project({"conv": G}), rtol=1e-4, atol=1e-4)
    # compose: projecting Q_B X Q_Aᵀ equals (R_B Q_B) X (R_A Q_A)ᵀ
    qb = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))[0]
    qa = torch.linalg.qr(torch.randn(37, 37, dtype=torch.float64))[0]
    X = torch.randn(12, 37, dtype=torch.float64)
    mb, ma = P.compose("conv", qb, qa)
    assert torch.allclose((mb @ X @ ma.T).reshape(-1), P.project({"conv": (qb @ X @ qa.T)[None]})[0], atol=1e-9)
    # spec round trip reproduces the projection
    Q = projector_from_spec(P.spec())
    assert torch.equal(Q.project({"lin": torch.randn(2, 5, 9, generator=torch.Generator().manual_seed(0))}),
                       P.project({"lin": torch.randn(2, 5, 9, generator=torch.Generator().manual_seed(0))}))
    with pytest.raises(KeyError, match="does not know"):
        P.project({"other": torch.randn(1, 2, 2)})
    with pytest.raises(ValueError, match="projection kind"):
        make_projector(shapes, 256, kind="sparse")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    shapes = {"conv": (12, 37), "lin": (5, 9)}
    g = {n: torch.randn(4, *s) for n, s in shapes.items()}
    for structure in ("kronecker", "dense"):
        P = make_projector(shapes, 256, structure=structure, seed=2)
        cpu = P.project(g)
        gpu = P.project({n: t.cuda() for n, t in g.items()})
        assert gpu.is_cuda
        assert torch.allclose(cpu, gpu.cpu(), rtol=1e-4, atol=1e-4)
