"""Per-example weight-gradient kernels (``influence.wgrad``): equal to autograd one example at a time, for every
convolution geometry the hooks can meet; ``out=`` reuse in ``per_example_gradients`` equals a fresh result."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from diffinfluence_widgets.diffusion import DiffusionModel, tiny_unet_config
from diffinfluence_widgets.influence.gradients import iter_gradients, per_example_gradients
from diffinfluence_widgets.influence import wgrad
from diffinfluence_widgets.influence.wgrad import add_conv_per_example_, add_input_covariance_, add_linear_per_example_

torch.set_num_threads(1)
DT = torch.float64


def _reference(m: nn.Module, x: torch.Tensor, g: torch.Tensor, B: int) -> torch.Tensor:
    """Example n's gradient of Σ (m(x_n) · g_n) by ordinary autograd, bias in the last column."""
    k = x.shape[0] // B
    out = []
    for n in range(B):
        m.zero_grad(set_to_none=True)
        (m(x[n * k:(n + 1) * k]) * g[n * k:(n + 1) * k]).sum().backward()
        w = m.weight.grad.reshape(m.weight.shape[0], -1)
        if m.bias is not None:
            w = torch.cat([w, m.bias.grad[:, None]], 1)
        out.append(w)
    return torch.stack(out)


@pytest.mark.parametrize("kernel,padding,stride,dilation", [
    (3, 1, 1, 1), (3, 0, 1, 1), (1, 0, 1, 1), (3, 1, 2, 1), (3, 2, 1, 2), ((3, 1), (1, 0), 1, 1), (1, 1, 1, 1),
    (2, 0, 2, 1), ((1, 3), (0, 1), (1, 2), 1), (3, (2, 1), 1, (2, 1))])
@pytest.mark.parametrize("rows_per_example", [1, 3, 4])  # 4: the per-example convolution route
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("c_out", [5, 2])  # 2: the scattered output-gradient route (an output layer)
def test_conv_kernel_equals_autograd(kernel, padding, stride, dilation, rows_per_example, channels_last, c_out):
    torch.manual_seed(0)
    m = nn.Conv2d(3, c_out, kernel, padding=padding, stride=stride, dilation=dilation, bias=stride == 1).to(DT)
    B = 4
    x = torch.randn(B * rows_per_example, 3, 7, 6, dtype=DT)
    g = torch.randn_like(m(x))
    if channels_last:  # what mkldnn hands the hooks after some layers
        x, g = x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
    ref = _reference(m, x, g, B)
    for dt in (DT, torch.float32):  # reused workspaces holding another call's values
        for slot in ("cols", "scatter_out", "a", "b"):
            wgrad._workspace(x.to(dt), slot, 10 ** 5).fill_(float("nan"))
    got = add_conv_per_example_(torch.full_like(ref, float("nan")), m, x, g, accumulate=False,
                                workspace_bytes=1)  # one example per workspace chunk
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
    # the padded copies' buffers are kept with their zero padding: a second call with other values is still exact
    x2, g2 = torch.randn_like(x) * 3, torch.randn_like(g)
    got2 = add_conv_per_example_(torch.full_like(ref, float("nan")), m, x2, g2, accumulate=False, workspace_bytes=1)
    assert torch.allclose(got2, _reference(m, x2, g2, B), rtol=1e-12, atol=1e-12)
    # a strided out (the weight columns are not whole rows): the bias is summed apart from the GEMM
    wide = torch.full((B, ref.shape[1], ref.shape[2] + 3), float("nan"), dtype=DT)
    add_conv_per_example_(wide[..., 1:-2], m, x, g, accumulate=False)
    assert torch.allclose(wide[..., 1:-2], ref, rtol=1e-12, atol=1e-12) and wide[..., 0].isnan().all()
    got = add_conv_per_example_(torch.ones_like(ref), m, x, g)  # accumulates, several examples per chunk
    assert torch.allclose(got, ref + 1, rtol=1e-12, atol=1e-12)
    # float32 (with ≥ 4 rows per example: one oneDNN weight-gradient convolution per example)
    m32, x32, g32 = m.float(), x.float(), g.float()
    got = add_conv_per_example_(torch.full_like(ref, float("nan"), dtype=torch.float32), m32, x32, g32,
                                accumulate=False)
    assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel,padding,stride,dilation", [(3, 1, 1, 1), (3, 0, 1, 1), (3, 1, 2, 1), (3, 2, 1, 2),
                                                        (5, 2, 1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_grouped_route_equals_autograd(kernel, padding, stride, dilation, channels_last, monkeypatch):
    """One row per example at ≥ 16×16 output positions in float32 (the demo UNet's 16×16 layers): the batch as the
    groups of one weight-gradient convolution. Equal to autograd, and to the im2col route it replaces."""
    torch.manual_seed(2)
    m = nn.Conv2d(8, 8, kernel, padding=padding, stride=stride, dilation=dilation).to(DT)
    B = 3
    x = torch.randn(B, 8, 34, 33, dtype=DT)
    g = torch.randn_like(m(x))
    if channels_last:
        x, g = x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
    ref = _reference(m, x, g, B)
    routes = []
    grouped, strided = wgrad._add_grouped_conv_, wgrad._add_strided_conv_
    monkeypatch.setattr(wgrad, "_add_grouped_conv_", lambda *a: (routes.append("grouped"), grouped(*a)))
    monkeypatch.setattr(wgrad, "_add_strided_conv_", lambda *a: (routes.append("im2col"), strided(*a)))
    m32, x32, g32 = m.float(), x.float(), g.float()
    got = add_conv_per_example_(torch.full_like(ref, float("nan"), dtype=torch.float32), m32, x32, g32,
                                accumulate=False)
    assert routes == ["grouped"]
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-4)
    summed = add_conv_per_example_(torch.ones_like(got), m32, x32, g32)
    assert torch.allclose(summed, got + 1, rtol=1e-6, atol=1e-5)
    # the rule: the measured shapes, not a timing (every process takes the same route)
    assert wgrad._grouped_is_faster(32, 32, 256) and wgrad._grouped_is_faster(96, 32, 256)
    assert not (wgrad._grouped_is_faster(64, 64, 64) or wgrad._grouped_is_faster(128, 128, 1024)
                or wgrad._grouped_is_faster(32, 1, 256) or wgrad._grouped_is_faster(64, 64, 256)
                or wgrad._grouped_is_faster(1, 32, 256))
    monkeypatch.setattr(wgrad, "_grouped_is_faster", lambda *a: False)
    other = add_conv_per_example_(torch.full_like(got, float("nan")), m32, x32, g32, accumulate=False)
    assert routes == ["grouped", "grouped", "im2col"]
    assert torch.allclose(other, got, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("c_out,route", [(1, "scatter"), (4, "scatter"), (5, "im2col")])
def test_few_output_channels_scatter_the_output_gradient(c_out, route, monkeypatch):
    """An output layer (1–4 channels, here at the demo's 16×16 with one row per example) unfolds its output gradient,
    not its input: equal to autograd and to the im2col route it replaces, whatever the workspace's chunking."""
    torch.manual_seed(3)
    m = nn.Conv2d(8, c_out, 3, padding=1).to(DT)
    B = 3
    x = torch.randn(B, 8, 16, 16, dtype=DT)
    g = torch.randn_like(m(x))
    ref = _reference(m, x, g, B)
    routes = []
    scattered, strided = wgrad._add_scattered_conv_, wgrad._add_strided_conv_
    monkeypatch.setattr(wgrad, "_add_scattered_conv_", lambda *a: (routes.append("scatter"), scattered(*a)))
    monkeypatch.setattr(wgrad, "_add_strided_conv_", lambda *a: (routes.append("im2col"), strided(*a)))
    for ws in (1, wgrad.DEFAULT_WORKSPACE_BYTES):
        got = add_conv_per_example_(torch.full_like(ref, float("nan")), m, x, g, accumulate=False, workspace_bytes=ws)
        assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
    assert routes == [route, route]
    monkeypatch.setattr(wgrad, "_SCATTER_MAX_OUT_CHANNELS", 0)
    other = add_conv_per_example_(torch.full_like(ref, float("nan")), m, x, g, accumulate=False)
    assert routes[-1] == "im2col" and torch.allclose(other, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rows_per_example", [1, 2])
@pytest.mark.parametrize("R", [5, 1])  # 1: the time embedding's layers (the bias as a ones column of the input)
def test_linear_kernel_equals_autograd(rows_per_example, R):
    torch.manual_seed(1)
    m = nn.Linear(6, 4).to(DT)
    B = 3
    x = torch.randn(B * rows_per_example, R, 6, dtype=DT)  # R tokens share the weight
    g = torch.randn(B * rows_per_example, R, 4, dtype=DT)
    ref = _reference(m, x, g, B)
    a_cols, b_cols = x.transpose(1, 2), g.transpose(1, 2)
    got = add_linear_per_example_(torch.full_like(ref, float("nan")), a_cols, b_cols, True, accumulate=False)
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
    got = add_linear_per_example_(torch.ones_like(ref), a_cols, b_cols, True)
    assert torch.allclose(got, ref + 1, rtol=1e-12, atol=1e-12)
    wide = torch.full((B, ref.shape[1], ref.shape[2] + 1), float("nan"), dtype=DT)  # a strided out
    add_linear_per_example_(wide[..., 1:], a_cols, b_cols, True, accumulate=False)
    assert torch.allclose(wide[..., 1:], ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="rows"):
        add_linear_per_example_(torch.zeros(B + 1, *ref.shape[1:], dtype=DT), a_cols, b_cols, True)


def test_out_reuse_equals_fresh_result():
    model = DiffusionModel.from_config(tiny_unet_config(), seed=0).to(dtype=DT)
    gen = torch.Generator().manual_seed(0)
    imgs = torch.rand(6, 1, 8, 8, generator=gen, dtype=DT) * 2 - 1
    first = per_example_gradients(model, imgs[:3], [0, 1, 2], num_draws=2, seed=3)
    kept = first.flat().clone()
    fresh = per_example_gradients(model, imgs[3:], [3, 4, 5], num_draws=2, seed=3)
    reused = per_example_gradients(model, imgs[3:], [3, 4, 5], num_draws=2, seed=3, out=first)
    assert all(reused.layers[n] is first.layers[n] for n in first.layers)  # written in place
    assert torch.equal(reused.ids, torch.tensor([3, 4, 5]))
    assert torch.allclose(reused.flat(), fresh.flat(), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(kept, reused.flat())

    class DS:
        images, ids = imgs, torch.arange(6)
    streamed = [g.flat().clone() for g in iter_gradients(model, DS, num_draws=2, seed=3, batch_size=4,
                                                          reuse_buffers=True)]
    whole = per_example_gradients(model, imgs, DS.ids, num_draws=2, seed=3).flat()
    assert torch.allclose(torch.cat(streamed), whole, rtol=1e-12, atol=1e-14)

    with pytest.raises(ValueError, match=r"out layer .* expected a contiguous \(2,"):
        per_example_gradients(model, imgs[:2], [0, 1], num_draws=2, out=first)
    with pytest.raises(ValueError, match="bands"):
        per_example_gradients(model, imgs[3:], [3, 4, 5], num_draws=2, out=first, bands=[(0, 1000)])
    with pytest.raises(TypeError, match="LayerGradients"):
        per_example_gradients(model, imgs[3:], [3, 4, 5], num_draws=2, out={"a": 1})


@pytest.mark.parametrize("kernel,padding,stride,dilation", [(3, 1, 1, 1), (1, 0, 1, 1), (3, 1, 2, 1), (3, 2, 1, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_input_covariance_equals_unfold_reference(kernel, padding, stride, dilation, channels_last):
    """K-FAC-expand's A statistic from the chunked im2col equals Σ a aᵀ over F.unfold's patches."""
    torch.manual_seed(2)
    m = nn.Conv2d(3, 5, kernel, padding=padding, stride=stride, dilation=dilation).to(DT)
    x = torch.randn(5, 3, 7, 6, dtype=DT)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    a = torch.nn.functional.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [N, d, R]
    a2 = a.transpose(1, 2).reshape(-1, a.shape[1])
    acc = torch.full((a.shape[1] + 1, a.shape[1] + 1), 2.0, dtype=DT)
    col_sum, count = add_input_covariance_(acc, m, x, workspace_bytes=1)  # one row per workspace chunk
    assert torch.allclose(acc[:-1, :-1], a2.T @ a2 + 2, rtol=1e-12, atol=1e-12)
    assert torch.equal(acc[-1], torch.full_like(acc[-1], 2.0))  # the bias row is the caller's
    assert torch.allclose(col_sum, a2.sum(0), rtol=1e-12, atol=1e-12) and count == a2.shape[0]
    lin = nn.Linear(4, 2).to(DT)
    xl = torch.randn(3, 5, 4, dtype=DT)
    acc = torch.zeros(5, 5, dtype=DT)
    col_sum, count = add_input_covariance_(acc, lin, xl)
    assert torch.allclose(acc[:4, :4], xl.reshape(-1, 4).T @ xl.reshape(-1, 4), rtol=1e-12) and count == 15
