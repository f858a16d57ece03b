"""K-FAC / EK-FAC against the exact GGN, computed independently of the hook machinery (plain autograd).

K-FAC is provably exact (method §4) for deep linear networks with a squared loss (any number of data points, in
the weight-sharing setting matching the flavour) and for any network on a single datum; EK-FAC must be at least as
close to the exact GGN as K-FAC (it is the Frobenius-optimal diagonal in the K-FAC eigenbasis).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from diffinfluence_widgets.diffusion import DiffusionModel, draw_noise, tiny_unet_config
from diffinfluence_widgets.influence.capture import layer_shape, tracked_layers
from diffinfluence_widgets.influence.curvature import (Curvature, FactorProblem, check_damping, fit_curvature,
                                                       fit_factors)

torch.set_num_threads(1)
DT = torch.float64


# ------------------------------------------------------------------------------------------ helpers
def layer_jacobian_rows(out_fn, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """For one data point: ``{layer: [D, d_out*(d_in+1)]}`` Jacobian of the flat output, by plain autograd."""
    out = out_fn().reshape(-1)
    params = []
    for m in layers.values():
        params += [m.weight] + ([m.bias] if m.bias is not None else [])
    rows = {n: [] for n in layers}
    for c in range(out.numel()):
        grads = torch.autograd.grad(out[c], params, retain_graph=True, allow_unused=True)
        k = 0
        for n, m in layers.items():
            gw = grads[k] if grads[k] is not None else torch.zeros_like(m.weight)
            k += 1
            gw = gw.reshape(m.weight.shape[0], -1)
            if m.bias is not None:
                gb = grads[k] if grads[k] is not None else torch.zeros_like(m.bias)
                k += 1
                gw = torch.cat([gw, gb[:, None]], 1)
            rows[n].append(gw.reshape(-1))
    return {n: torch.stack(r) for n, r in rows.items()}


def exact_ggn_blocks(out_fns, layers) -> dict[str, torch.Tensor]:
    """Exact block-diagonal GGN of the mean-over-outputs squared loss: (1/N) Σ_n J_nᵀ (2/D) J_n per layer."""
    blocks = None
    for fn in out_fns:
        J = layer_jacobian_rows(fn, layers)
        D = next(iter(J.values())).shape[0]
        contrib = {n: (2.0 / D) * j.T @ j for n, j in J.items()}
        blocks = contrib if blocks is None else {n: blocks[n] + contrib[n] for n in blocks}
    return {n: b / len(out_fns) for n, b in blocks.items()}


def problem_for(net: nn.Module, xs: torch.Tensor, batch_size: int) -> FactorProblem:
    def batches():
        for lo in range(0, xs.shape[0], batch_size):
            x = xs[lo:lo + batch_size]
            yield lambda x=x: (net(x).flatten(1), None, None)
    return FactorProblem(tracked_layers(net), batches)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class PerPosition(nn.Module):
    """Deep linear layers applied to every position of [N, R, d] (expand setting), output [N, R, d_out]."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(3, 4), nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.l3(self.l2(self.l1(x)))


class PooledPositions(nn.Module):
    """Shared linear layers per position, mean-pooled over positions, then a head (reduce setting)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.head = nn.Linear(3, 4), nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.l2(self.l1(x)).mean(1))


class Conv1x1(nn.Module):
    """Deep linear 1×1 convolutions: conv weight sharing in the expand setting."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 3, 1), nn.Conv2d(3, 2, 1, bias=False)

    def forward(self, x):
        return self.c2(self.c1(x))


class TanhMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


def fitted_blocks(net, xs, approx, method="kfac", fisher="exact", batch_size=3):
    fitted = fit_factors(problem_for(net, xs, batch_size), method=method, kfac_approx=approx, fisher=fisher)
    return Curvature.from_factors(fitted).dense_blocks()


CASES = {
    # name: (network, inputs, flavour) — each a case where K-FAC of that flavour is exact
    "deep-linear-mlp": (lambda: nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(3, 2)),
                        lambda g: torch.randn(7, 4, generator=g, dtype=DT), "expand"),
    "deep-linear-mlp-reduce": (lambda: nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3)),
                               lambda g: torch.randn(6, 4, generator=g, dtype=DT), "reduce"),
    "expand-shared-positions": (PerPosition, lambda g: torch.randn(5, 4, 3, generator=g, dtype=DT), "expand"),
    "expand-conv1x1": (Conv1x1, lambda g: torch.randn(4, 2, 3, 3, generator=g, dtype=DT), "expand"),
    "reduce-pooled-positions": (PooledPositions, lambda g: torch.randn(6, 4, 3, generator=g, dtype=DT), "reduce"),
    "single-datum-nonlinear": (TanhMLP, lambda g: torch.randn(1, 4, generator=g, dtype=DT), "expand"),
    "single-datum-nonlinear-reduce": (TanhMLP, lambda g: torch.randn(1, 4, generator=g, dtype=DT), "reduce"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_kfac_exact_where_provably_exact(case, method):
    make_net, make_x, approx = CASES[case]
    torch.manual_seed(0)
    net = make_net().to(DT)
    xs = make_x(torch.Generator().manual_seed(1))
    exact = exact_ggn_blocks([lambda x=x: net(x[None]) for x in xs], tracked_layers(net))
    approx_blocks = fitted_blocks(net, xs, approx, method=method)
    for n in exact:
        assert rel_err(approx_blocks[n], exact[n]) <= 1e-5, (case, n, rel_err(approx_blocks[n], exact[n]))


def test_kfac_flavours_differ_where_they_should():
    """The test above can fail: on the shared-position network, reduce is far from the exact GGN, expand is exact."""
    torch.manual_seed(0)
    net = PerPosition().to(DT)
    xs = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    exact = exact_ggn_blocks([lambda x=x: net(x[None]) for x in xs], tracked_layers(net))
    reduce_blocks = fitted_blocks(net, xs, "reduce")
    assert max(rel_err(reduce_blocks[n], exact[n]) for n in exact) > 0.05


def test_mc_and_empirical_fisher_agree_with_exact_in_expectation():
    """The MC Fisher (σ² convention) and exact B factors agree up to MC error, so λ means the same for both."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(DT)
    xs = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    layers = tracked_layers(net)
    reps = 4000
    g = torch.Generator().manual_seed(2)
    zs = torch.randn(reps, xs.shape[0], 2, generator=g, dtype=DT)

    def batches():
        for r in range(reps):
            yield lambda r=r: (net(xs), None, zs[r])

    mc = Curvature.from_factors(fit_factors(FactorProblem(layers, batches), method="kfac", fisher="model"))
    ex = Curvature.from_factors(fit_factors(problem_for(net, xs, 4), method="kfac", fisher="exact"))
    for n in layers:
        assert rel_err(mc.dense_blocks()[n], ex.dense_blocks()[n]) < 0.1


# ------------------------------------------------------------------------------------------ diffusers UNet
@pytest.fixture(scope="module")
def unet_setup():
    model = DiffusionModel.from_config(tiny_unet_config(), seed=0).to(dtype=DT)
    g = torch.Generator().manual_seed(3)
    images = (torch.rand(3, 1, 8, 8, generator=g, dtype=DT) * 2 - 1)
    ids = torch.tensor([11, 12, 13])
    return model, images, ids


class _DS:
    def __init__(self, images, ids):
        self.images, self.ids = images, ids

    def fingerprint(self):
        return "test"


def test_ekfac_closer_to_exact_ggn_than_kfac_on_unet_with_attention(unet_setup):
    model, images, ids = unet_setup
    S = 2
    draws = draw_noise(ids, S, model.image_shape, model.num_train_timesteps, seed=0)
    model.unet.eval()
    layers = tracked_layers(model.unet)
    # Keep the exact reference affordable: compare on a representative subset of layers (conv, attention,
    # time embedding), with the exact GGN from plain autograd, one output coordinate at a time.
    names = [n for n in layers if n in ("conv_in", "time_embedding.linear_2", "down_blocks.1.attentions.0.to_q",
                                        "down_blocks.1.attentions.0.to_out.0", "up_blocks.1.resnets.0.conv2",
                                        "conv_out")]
    sub = {n: layers[n] for n in names}
    fns = []
    for i in range(len(ids)):
        for s in range(S):
            def fn(i=i, s=s):
                t = draws.timesteps[i:i + 1, s:s + 1]
                x_t = model.add_noise(images[i:i + 1, None], draws.noise[i:i + 1, s:s + 1].to(DT), t)
                return model.predict_noise(x_t, t)
            fns.append(fn)
    exact = exact_ggn_blocks(fns, sub)
    curv = {m: fit_curvature(model, _DS(images, ids), method=m, fisher="exact", num_draws=S, seed=0,
                             batch_size=2, progress=False) for m in ("kfac", "ekfac")}
    errs = {m: {} for m in curv}
    for m, c in curv.items():
        dense = c.dense_blocks()
        for n in names:
            errs[m][n] = float((dense[n] - exact[n]).norm())
    for n in names:
        # (conv_out's block is exact for both up to rounding: compare with an absolute floor)
        assert errs["ekfac"][n] <= errs["kfac"][n] * (1 + 1e-9) + 1e-10 * float(exact[n].norm()), (n, errs)
    assert sum(errs["ekfac"].values()) < sum(errs["kfac"].values())


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_curvature_independent_of_batch_size_and_chunking(unet_setup, method):
    model, images, ids = unet_setup
    ds = _DS(images, ids)
    a = fit_curvature(model, ds, method=method, num_draws=6, seed=4, batch_size=1, max_rows=2, progress=False)
    b = fit_curvature(model, ds, method=method, num_draws=6, seed=4, batch_size=3, max_rows=512, progress=False)
    for n in a.layer_names:
        assert torch.allclose(a.eigenvalues[n], b.eigenvalues[n], rtol=1e-9, atol=1e-14)
        A_a = a.q_a[n] @ torch.diag(a.lambda_a[n]) @ a.q_a[n].T
        A_b = b.q_a[n] @ torch.diag(b.lambda_a[n]) @ b.q_a[n].T
        assert torch.allclose(A_a, A_b, rtol=1e-9, atol=1e-14)


def test_ekfac_second_pass_reads_kept_activations_to_the_same_bits(unet_setup):
    """Within ``reuse_bytes`` the EK-FAC pass reads the K-FAC pass's layer inputs and output gradients back
    instead of running the network again: the same bits as two network passes, half the network calls."""
    model, images, ids = unet_setup
    ds = _DS(images, ids)
    calls = []
    h = model.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        fits = {}
        for budget in (0, 1 << 14, 1 << 30):  # never kept, over the budget after the first batch, all kept
            calls.clear()
            fits[budget] = fit_curvature(model, ds, method="ekfac", num_draws=2, seed=1, batch_size=2,
                                         progress=False, reuse_bytes=budget)
            fits[budget] = (fits[budget], len(calls))
    finally:
        h.remove()
    (ref, n_ref), (over, n_over), (kept, n_kept) = fits[0], fits[1 << 14], fits[1 << 30]
    batches = -(-images.shape[0] // 2)
    assert n_ref == n_over == 2 * batches and n_kept == batches
    for n in ref.layer_names:
        assert torch.equal(ref.eigenvalues[n], kept.eigenvalues[n]) and torch.equal(ref.q_a[n], kept.q_a[n])
        assert torch.equal(ref.eigenvalues[n], over.eigenvalues[n])


def test_damping_exact_and_never_mutates(unet_setup):
    model, images, ids = unet_setup
    curv = fit_curvature(model, _DS(images, ids), num_draws=4, progress=False)
    before = {n: v.clone() for n, v in curv.eigenvalues.items()}
    name = curv.layer_names[0]
    g = {n: torch.randn(2, *curv.eigenvalues[n].shape, dtype=DT) for n in curv.layer_names}
    for lam in (1e-8, 1e-3, 10.0):
        pre = curv.precondition(g, lam)
        # (G + λI) (G + λI)^{-1} g == g, with G the dense EK-FAC block
        G = curv.dense_blocks()[name]
        back = (G + lam * torch.eye(G.shape[0], dtype=DT)) @ pre[name].reshape(2, -1).T
        assert torch.allclose(back.T, g[name].reshape(2, -1), rtol=1e-6, atol=1e-8)
    for n in before:
        assert torch.equal(before[n], curv.eigenvalues[n])


@pytest.mark.parametrize("bad", [0, -1e-3, float("nan"), float("inf"), "x", None])
def test_bad_damping_is_refused(bad):
    with pytest.raises((ValueError, TypeError), match="damping"):
        check_damping(bad)


def test_bad_settings_refused(unet_setup):
    model, images, ids = unet_setup
    with pytest.raises(ValueError, match="kfac_approx='mean'"):
        fit_curvature(model, _DS(images, ids), kfac_approx="mean", num_draws=1, progress=False)
    with pytest.raises(ValueError, match="fisher='hessian'"):
        fit_curvature(model, _DS(images, ids), fisher="hessian", num_draws=1, progress=False)
    with pytest.raises(ValueError, match="shape"):
        fit_curvature(model, _DS(images[:, :, :4], ids), num_draws=1, progress=False)


def test_save_load_round_trip_and_refusal(unet_setup, tmp_path):
    model, images, ids = unet_setup
    ds = _DS(images, ids)
    curv = fit_curvature(model, ds, num_draws=2, progress=False)
    curv.save(tmp_path / "c")
    back = Curvature.load(tmp_path / "c", model=model, dataset=ds, expect={"method": "ekfac"})
    for n in curv.layer_names:
        assert torch.equal(back.eigenvalues[n], curv.eigenvalues[n].cpu())
        assert torch.equal(back.q_a[n], curv.q_a[n].cpu())
    other = DiffusionModel.from_config(tiny_unet_config(), seed=1).to(dtype=DT)
    with pytest.raises(ValueError, match="built for model"):
        Curvature.load(tmp_path / "c", model=other)
    with pytest.raises(ValueError, match="kfac_approx='reduce'|kfac_approx"):
        Curvature.load(tmp_path / "c", expect={"kfac_approx": "reduce"})
    with pytest.raises(FileNotFoundError):
        Curvature.load(tmp_path / "nothing")


@pytest.mark.parametrize("reuse_bytes", [0, 1 << 30])  # EK-FAC's second pass through the network / kept calls
def test_fit_resumes_after_interruption(unet_setup, tmp_path, monkeypatch, reuse_bytes):
    model, images, ids = unet_setup
    ds = _DS(images, ids)
    ref = fit_curvature(model, ds, num_draws=3, batch_size=1, progress=False)
    import diffinfluence_widgets.influence.curvature as C

    calls = {"n": 0}
    orig = C.save_fit_checkpoint

    def flaky(*a, **k):
        orig(*a, **k)
        calls["n"] += 1
        if calls["n"] == 6:  # 3 K-FAC batches, the switch of passes, one EK-FAC batch: die inside the EK-FAC pass
            raise KeyboardInterrupt

    monkeypatch.setattr(C, "save_fit_checkpoint", flaky)
    with pytest.raises(KeyboardInterrupt):
        fit_curvature(model, ds, num_draws=3, batch_size=1, progress=False, checkpoint_dir=tmp_path,
                      reuse_bytes=reuse_bytes)
    monkeypatch.setattr(C, "save_fit_checkpoint", orig)
    assert list(tmp_path.glob("factors-*.safetensors"))
    done = fit_curvature(model, ds, num_draws=3, batch_size=1, progress=False, checkpoint_dir=tmp_path,
                         reuse_bytes=reuse_bytes)
    for n in ref.layer_names:
        assert torch.allclose(done.eigenvalues[n], ref.eigenvalues[n], rtol=1e-10, atol=1e-15)
    assert not list(tmp_path.glob("factors-*"))


def test_layer_shapes_cover_attention_and_time_embedding(unet_setup):
    model = unet_setup[0]
    layers = tracked_layers(model.unet)
    assert any("to_q" in n for n in layers) and "time_embedding.linear_1" in layers
    assert not any("norm" in n for n in layers)
    n = "down_blocks.1.attentions.0.to_q"
    assert layer_shape(layers[n])[1] == layers[n].in_features + (layers[n].bias is not None)
