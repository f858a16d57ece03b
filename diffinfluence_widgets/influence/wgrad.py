"""Per-example weight gradients of one Conv2d / Linear call from its input ``x`` and output gradient ``g``.

An example's weight gradient is ``Σ_rows Σ_r b_r a_rᵀ`` over its ``k`` consecutive (example-major) rows and the
layer's R weight-sharing positions. Both kernels here form it as one GEMM per example, batched over examples,
written straight into the caller's ``[B, d_out, d_in (+1)]`` buffer (``baddbmm_`` on the weight columns, or on
whole rows with the bias: no temporary of the batch's gradients, no second pass to add it; with
``accumulate=False`` the buffer is overwritten, so it may come from ``torch.empty``):

* a 1×1 convolution (stride 1, no padding) and a Linear layer contract the input as it is stored
  (``[rows, d_in, R]``: no copy for one row per example; a Linear layer's input gets a ones column for its bias
  where it is copied anyway, with several rows per example, or is one position per row);
* a convolution with at most 4 output channels (an output layer to image or latent channels) unfolds its output
  gradient instead, scattered onto the input grid once per kernel tap (:func:`_add_scattered_conv_`): ``C_out``
  planes per tap in place of ``C_in``;
* any other convolution with few rows per example unfolds (im2col) a few examples at a time into one reused
  workspace of ``workspace_bytes`` (on CPU about one core's L2 cache), in the ``[d_in, k·R]`` layout the strided
  input view copies fastest into, so the unfolded input never exists for the whole batch (``F.unfold`` of a batch is
  ``kh·kw`` times its input and, on CPU, slower than the GEMM it feeds). The workspace carries a row of ones under
  the patches, so the GEMM writes whole rows of a contiguous ``out``, bias column included: one batched BLAS call
  per chunk, where the weight columns alone (a strided result) cost one GEMM call per example. Narrow outputs (≤ 8
  columns) unfold in two steps (:func:`_unfold_two_step_`). With many rows per example (draws), PyTorch's own
  weight-gradient convolution over each example's rows is faster, and with one row per example at ≥ 16×16 positions
  and few channels, one grouped weight-gradient convolution over the whole batch (examples as groups).

Workspaces (the unfolded input, the padded input, the scattered output gradient) are kept per thread and reused
across calls: on CPU a freshly allocated multi-MB block page-faults on first touch, which costs more than filling
it. Padded copies (the padded input, a chunk of rows at a time; the two-step unfold's shifted planes; the scattered
output gradient) are kept per layer geometry, so their padding, zeroed once, stays zero (no fill per call).

The bias gradient (the last column, bias folded into the input) is one reduction of ``g`` per call.
"""
from __future__ import annotations

import threading

import torch
from torch import nn

__all__ = ["add_conv_per_example_", "add_linear_per_example_", "add_input_covariance_", "release_workspaces",
           "DEFAULT_WORKSPACE_BYTES", "PER_EXAMPLE_WORKSPACE_BYTES"]

#: size of :func:`add_input_covariance_`'s im2col workspace: a few rows' unfolded inputs
DEFAULT_WORKSPACE_BYTES = 8 << 20
#: size of the per-example kernels' im2col workspace on CPU: about one core's L2 cache, so that a chunk's unfolded
#: input is still cached when its GEMM reads it (at 1 thread, replaying the demo pass's kernels took 4–6 % less
#: time than with 8 MB); on a GPU, where fewer and larger GEMMs win, :data:`_GPU_WORKSPACE_BYTES`
PER_EXAMPLE_WORKSPACE_BYTES = 2 << 20
_GPU_WORKSPACE_BYTES = 256 << 20


_LOCAL = threading.local()


def _workspace(like: torch.Tensor, slot: str, *shape: int) -> torch.Tensor:
    """A reused, uninitialised buffer of ``shape`` (one per thread, slot, device and dtype)."""
    cache = getattr(_LOCAL, "buffers", None)
    if cache is None:
        cache = _LOCAL.buffers = {}
    key = (slot, like.device, like.dtype)
    numel = 1
    for d in shape:
        numel *= int(d)
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = cache[key] = like.new_empty(numel)
    return buf[:numel].view(*shape)


def _zero_bordered(like: torch.Tensor, geometry: tuple, n: int, *shape: int) -> torch.Tensor:
    """A reused ``[n, *shape]`` buffer, zero when first made, one per thread and ``geometry`` (and device, dtype).

    For padded copies: a caller writes the same interior positions on every call with the same geometry, so the
    padding around them is still zero, and the buffer needs no fill (a fill costs about as much as the copy)."""
    cache = getattr(_LOCAL, "zeroed", None)
    if cache is None:
        cache = _LOCAL.zeroed = {}
    key = (geometry, tuple(shape), like.device, like.dtype)
    buf = cache.get(key)
    if buf is None or buf.shape[0] < n:
        buf = cache[key] = like.new_zeros(n, *shape)
    return buf[:n]


def release_workspaces() -> None:
    """Free this thread's workspaces (they are otherwise kept for the next call)."""
    _LOCAL.buffers = {}
    _LOCAL.zeroed = {}


def _default_workspace_bytes(x: torch.Tensor) -> int:
    return PER_EXAMPLE_WORKSPACE_BYTES if x.device.type == "cpu" else _GPU_WORKSPACE_BYTES


def _rows_per_example(rows: int, B: int) -> int:
    if B < 1 or rows % B:
        raise RuntimeError(f"{rows} rows cannot be split into {B} examples (rows must be example-major)")
    return rows // B


def _fold_rows(t: torch.Tensor, B: int, k: int, slot: str) -> torch.Tensor:
    """``[B·k, d, R]`` → ``[B, d, k·R]`` (an example's rows side by side along the contracted dimension)."""
    if k == 1:
        return t
    d, R = t.shape[1], t.shape[2]
    out = _workspace(t, slot, B, d, k, R)
    out.copy_(t.reshape(B, k, d, R).transpose(1, 2))
    return out.view(B, d, k * R)


def _gemm_(dst: torch.Tensor, left: torch.Tensor, right: torch.Tensor, accumulate: bool) -> None:
    dst.baddbmm_(left, right, beta=1 if accumulate else 0)


def _bias_(out: torch.Tensor, d_in: int, value: torch.Tensor, accumulate: bool) -> None:
    if accumulate:
        out[..., d_in] += value
    else:
        out[..., d_in] = value


def add_linear_per_example_(out: torch.Tensor, a_cols: torch.Tensor, b_cols: torch.Tensor, has_bias: bool, *,
                            accumulate: bool = True) -> torch.Tensor:
    """``out[n] += Σ b aᵀ`` over example n's rows: ``a_cols [B·k, d_in, R]``, ``b_cols [B·k, d_out, R]``
    (``=`` instead of ``+=`` with ``accumulate=False``)."""
    B = out.shape[0]
    rows, d_in, R = a_cols.shape
    k = _rows_per_example(rows, B)
    if has_bias and out.is_contiguous() and (k > 1 or R == 1):
        # the bias as a ones column of the input, so that one batched GEMM writes all of out; worth its copy of the
        # input where the input is copied anyway (several rows per example) or tiny (one position: the time embedding)
        a1 = _workspace(a_cols, "a", B, k * R, d_in + 1)
        a1[..., d_in].fill_(1)
        a1[..., :d_in].view(rows, R, d_in).copy_(a_cols.transpose(1, 2))
        _gemm_(out, _fold_rows(b_cols, B, k, "b"), a1, accumulate)
        return out
    _gemm_(out[..., :d_in], _fold_rows(b_cols, B, k, "b"), _fold_rows(a_cols, B, k, "a").transpose(1, 2),
           accumulate)
    if has_bias:
        _bias_(out, d_in, b_cols.reshape(B, k, b_cols.shape[1], -1).sum(dim=(1, 3)), accumulate)
    return out


def add_conv_per_example_(out: torch.Tensor, m: nn.Conv2d, x: torch.Tensor, g: torch.Tensor, *,
                          accumulate: bool = True, workspace_bytes: int | None = None) -> torch.Tensor:
    """``out[n] += Σ_rows Σ_r b_r a_rᵀ`` for a Conv2d call with input ``x [B·k, C_in, H, W]`` and output gradient
    ``g [B·k, C_out, H_o, W_o]``; ``out`` is ``[B, C_out, C_in·kh·kw (+1)]`` (PyTorch's weight order, bias last).
    With ``accumulate=False`` ``out`` is overwritten instead. ``workspace_bytes`` bounds the unfolded chunk
    (default: :data:`PER_EXAMPLE_WORKSPACE_BYTES` on CPU)."""
    if workspace_bytes is None:
        workspace_bytes = _default_workspace_bytes(x)
    B = out.shape[0]
    rows, c_in, _, _ = x.shape
    k = _rows_per_example(rows, B)
    c_out, h_o, w_o = g.shape[1:]
    kh, kw = m.kernel_size
    R = h_o * w_o
    d_in = c_in * kh * kw
    on_cpu32 = x.device.type == "cpu" and x.dtype == torch.float32
    if (kh, kw) == (1, 1) and tuple(m.stride) == (1, 1) and tuple(m.padding) == (0, 0):
        route = "1x1"
    elif c_out <= _SCATTER_MAX_OUT_CHANNELS:
        route = "scatter"
    elif on_cpu32 and k >= _PER_EXAMPLE_CONV_MIN_ROWS:
        route = "per-example"
    elif on_cpu32 and k == 1 and _grouped_is_faster(c_in, c_out, R):
        route = "grouped"
    else:
        route = "im2col"
    # im2col into a contiguous out: the bias rides in the GEMM as a row of ones under the patches
    ones = route == "im2col" and m.bias is not None and out.is_contiguous()
    if m.bias is not None and not ones:
        _bias_(out, d_in, g.reshape(B, k, c_out, R).sum(dim=(1, 3)), accumulate)
    weight = out[..., :d_in]
    if route == "1x1":
        _gemm_(weight, _fold_rows(g.reshape(rows, c_out, R), B, k, "b"),
               _fold_rows(x.reshape(rows, c_in, R), B, k, "a").transpose(1, 2), accumulate)
    elif route == "per-example":
        _add_conv_per_example_loop_(weight, m, x, g, B, k, accumulate)
    elif route == "grouped":
        _add_grouped_conv_(weight, m, x, g, B, accumulate)
    elif route == "scatter":
        _add_scattered_conv_(weight, m, x, g, B, k, accumulate, workspace_bytes)
    else:
        _add_strided_conv_(out if ones else weight, m, x, g, B, k, accumulate, workspace_bytes, ones)
    return out


#: from this many rows per example on, one weight-gradient convolution per example (PyTorch's own oneDNN kernel over
#: the example's rows) beats the batched im2col GEMM on CPU in float32 (measured with 8 draws per example,
#: bench/gradients.py); float64 has no oneDNN kernel (its fallback unfolds per example) and stays on the GEMM
_PER_EXAMPLE_CONV_MIN_ROWS = 4


def _add_conv_per_example_loop_(weight: torch.Tensor, m: nn.Conv2d, x: torch.Tensor, g: torch.Tensor, B: int,
                                k: int, accumulate: bool) -> None:
    c_out = g.shape[1]
    for n in range(B):
        w = torch.ops.aten.convolution_backward(
            g[n * k:(n + 1) * k], x[n * k:(n + 1) * k], m.weight, None, list(m.stride), list(m.padding),
            list(m.dilation), False, [0, 0], m.groups, [False, True, False])[1].reshape(c_out, -1)
        if accumulate:
            weight[n] += w
        else:
            weight[n].copy_(w)


def _grouped_is_faster(c_in: int, c_out: int, R: int) -> bool:
    """Whether oneDNN's grouped weight-gradient convolution (one group per example) beats the im2col GEMM for a CPU
    float32 call with one row per example. A fixed rule, not a timing, so that every process picks the same kernel
    and results repeat bit for bit. Measured per layer at 1 thread (batch 64, against the im2col route with its
    batched GEMM): the grouped kernel takes 0.5–0.95× the time from 16×16 output positions on with few
    channels (16→16, 32→32, 64→32 and 96→32 at 16×16; 32→32 and 64→32 at 32×32; 64→64 at 32×32 and 128→64 at
    16×16 are about even), and 1.4–2.4× for 64→64 at 16×16 or with 1–3 input channels; at 8×8 and below, with
    128 channels or with a single output channel it was 1.1–8× in earlier measurements."""
    return (R >= _GROUPED_MIN_POSITIONS and c_out >= _GROUPED_MIN_CHANNELS and c_in >= _GROUPED_MIN_CHANNELS
            and c_in * c_out < _GROUPED_MAX_CHANNEL_PRODUCT)


_GROUPED_MIN_POSITIONS = 256
_GROUPED_MIN_CHANNELS = 8
_GROUPED_MAX_CHANNEL_PRODUCT = 64 * 64


def _add_grouped_conv_(weight: torch.Tensor, m: nn.Conv2d, x: torch.Tensor, g: torch.Tensor, B: int,
                       accumulate: bool) -> None:
    """One row per example: folding the batch into the channels (a free view of contiguous tensors) makes example
    n's weight gradient that of group n of one grouped convolution, which oneDNN forms without an im2col copy."""
    c_in, H, W = x.shape[1:]
    c_out, h_o, w_o = g.shape[1:]
    proto = x.new_empty(1).expand(B * c_out, c_in, *m.kernel_size)  # only its shape is read
    w = torch.ops.aten.convolution_backward(
        g.reshape(1, B * c_out, h_o, w_o), x.reshape(1, B * c_in, H, W), proto, None, list(m.stride),
        list(m.padding), list(m.dilation), False, [0, 0], B, [False, True, False])[1].view(B, c_out, -1)
    if accumulate:
        weight += w
    else:
        weight.copy_(w)


#: output channels up to which :func:`_add_scattered_conv_` replaces the im2col (an output layer to 1–4 image or
#: latent channels): at 1 thread, 32→1 at 16×16 takes 0.15×, 128→3 at 32×32 0.18×, 32→4 at 16×16 0.35× the time of
#: the im2col route, and 64→8 at 16×16 2× (batch 64)
_SCATTER_MAX_OUT_CHANNELS = 4


def _add_scattered_conv_(weight: torch.Tensor, m: nn.Conv2d, x: torch.Tensor, g: torch.Tensor, B: int, k: int,
                         accumulate: bool, workspace_bytes: int) -> None:
    """A convolution with few output channels: the output gradient, not the input, is unfolded.

    Tap ``(i, j)`` of example n's weight gradient is ``Σ_q x[c, q] · s_ij[o, q]`` over the input grid, where
    ``s_ij`` is the output gradient scattered onto the input positions that tap reads (``q = p·stride + (i, j)·
    dilation − padding``; zero elsewhere, padding included). So the ``C_out·kh·kw`` planes ``s`` (the size of the
    input times ``C_out·kh·kw / C_in``) replace the ``C_in·kh·kw`` im2col planes, and one GEMM per example gives
    ``[C_in, C_out·kh·kw]``, transposed into the weight columns (``[C_out, C_in·kh·kw]``)."""
    rows, c_in, H, W = x.shape
    c_out, h_o, w_o = g.shape[1:]
    kh, kw = m.kernel_size
    (sh, sw), (ph, pw), (dh, dw) = m.stride, m.padding, m.dilation
    taps = c_out * kh * kw
    chunk = _chunk(B, k * taps * H * W * x.element_size(), workspace_bytes)
    # every call of this geometry writes the same positions: the rest stays zero
    ws = _zero_bordered(x, ("scatter", h_o, w_o, sh, sw, ph, pw, dh, dw), chunk, c_out, kh, kw, k, H, W)
    res = _workspace(x, "scatter_out", chunk, c_in, taps)
    x_rows = x.reshape(rows, c_in, H * W)
    g_rows = g.unflatten(0, (B, k)).transpose(1, 2)  # [B, C_out, k, H_o, W_o]
    row_spans = [_tap_span(i * dh - ph, sh, h_o, H) for i in range(kh)]
    col_spans = [_tap_span(j * dw - pw, sw, w_o, W) for j in range(kw)]
    out = weight.unflatten(-1, (c_in, kh * kw))  # [B, C_out, C_in, kh·kw]
    for n0 in range(0, B, chunk):
        n = min(B, n0 + chunk) - n0
        s = ws[:n]
        for i, (y_lo, y_hi, r0) in enumerate(row_spans):
            for j, (x_lo, x_hi, c0) in enumerate(col_spans):
                if y_hi > y_lo and x_hi > x_lo:
                    s[:, :, i, j, :, r0:r0 + (y_hi - y_lo - 1) * sh + 1:sh, c0:c0 + (x_hi - x_lo - 1) * sw + 1:sw] = \
                        g_rows[n0:n0 + n, ..., y_lo:y_hi, x_lo:x_hi]
        x_n = _fold_rows(x_rows[n0 * k:(n0 + n) * k], n, k, "a")  # [n, C_in, k·H·W]
        torch.bmm(x_n, s.view(n, taps, k * H * W).transpose(1, 2), out=res[:n])
        r = res[:n].view(n, c_in, c_out, kh * kw).transpose(1, 2)
        if accumulate:
            out[n0:n0 + n] += r
        else:
            out[n0:n0 + n].copy_(r)


def _tap_span(off: int, stride: int, n_out: int, n_in: int) -> tuple[int, int, int]:
    """Output positions ``lo..hi-1`` whose input position ``p·stride + off`` lies in ``0..n_in-1``, and the first
    one's input position."""
    lo = max(0, -(off // stride))  # first p with p·stride + off >= 0
    hi = min(n_out, (n_in - 1 - off) // stride + 1) if n_in - 1 - off >= 0 else 0
    return lo, hi, lo * stride + off


def _add_strided_conv_(dst: torch.Tensor, m: nn.Conv2d, x: torch.Tensor, g: torch.Tensor, B: int, k: int,
                       accumulate: bool, workspace_bytes: int, ones: bool) -> None:
    """Any convolution: im2col of a few examples at a time from a strided view of the padded input, one GEMM per
    chunk into ``dst`` (the weight columns ``[B, C_out, d_in]``).

    With ``ones`` the unfolded input gets a row of ones and ``dst`` is the whole contiguous ``[B, C_out, d_in + 1]``
    buffer: the GEMM writes whole rows, bias column included, which is one batched BLAS call per chunk, where a
    strided result (the weight columns alone) is one GEMM call per example."""
    rows, c_in = x.shape[:2]
    c_out, h_o, w_o = g.shape[1:]
    kh, kw = m.kernel_size
    (sh, sw), (dh, dw) = m.stride, m.dilation
    R = h_o * w_o
    d_in = c_in * kh * kw
    g_cols = _fold_rows(g.reshape(rows, c_out, R), B, k, "b")  # [B, C_out, k·R]
    d_ws = d_in + 1 if ones else d_in
    chunk = _chunk(B, k * d_ws * R * x.element_size(), workspace_bytes)
    ws = _workspace(x, "cols", chunk, d_ws, k * R)
    if ones:
        ws[:, d_in].fill_(1)
    two_step = w_o <= _TWO_STEP_MAX_WIDTH and sh == 1 and kw > 1
    for n0 in range(0, B, chunk):
        n = min(B, n0 + chunk) - n0
        cols = ws[:n, :d_in].unflatten(1, (c_in, kh, kw)).unflatten(-1, (k, h_o, w_o))
        if two_step:
            _unfold_two_step_(cols, m, x, n0, n, k)
        else:
            # patches of examples n0..n0+n: [n, k, C_in, kh, kw, H_o, W_o] as a view of their padded input
            xp = _padded_rows(m, x, n0 * k, (n0 + n) * k)
            sN, sC, sH, sW = xp.stride()
            patches = xp.as_strided((n, k, c_in, kh, kw, h_o, w_o),
                                    (k * sN, sN, sC, sH * dh, sW * dw, sH * sh, sW * sw), xp.storage_offset())
            cols.copy_(patches.permute(0, 2, 3, 4, 1, 5, 6))
        _gemm_(dst[n0:n0 + n], g_cols[n0:n0 + n], ws[:n].transpose(1, 2), accumulate)


def _unfold_two_step_(cols: torch.Tensor, m: nn.Conv2d, x: torch.Tensor, n0: int, n: int, k: int) -> None:
    """im2col of examples ``n0 .. n0+n`` into ``cols [n, C_in, kh, kw, k, H_o, W_o]`` for a narrow output with unit
    vertical stride.

    Copied straight from the padded input, each output row is a run of only ``W_o`` elements. Instead: first the
    ``kw`` column shifts of the zero-padded input, ``shifted[..., j, y, w] = x_pad[..., y, w·s + j·d]`` (``kw·H_pad``
    short rows per channel, fewer than ``kh·kw·H_o``; written from ``x`` itself, the padding as zeros), then every
    ``(channel, i, j)`` patch is ``H_o·W_o`` consecutive elements of ``shifted``, starting at row ``i·d``."""
    c_in, H, W = x.shape[1:]
    kh, kw = m.kernel_size
    (ph, pw), sw, (dh, dw) = m.padding, m.stride[1], m.dilation
    h_o, w_o = cols.shape[-2:]
    hp = H + 2 * ph
    # the copies below write the same positions for every call of this geometry: the padding stays zero
    shifted = _zero_bordered(x, ("shifted", H, W, ph, pw, sw, dw), n, k, c_in, kw, hp, w_o)
    src = x[n0 * k:(n0 + n) * k].unflatten(0, (n, k))
    for j in range(kw):
        w_lo, w_hi, c0 = _tap_span(j * dw - pw, sw, w_o, W)  # output columns that read input columns
        if w_hi > w_lo:
            shifted[:, :, :, j, ph:ph + H, w_lo:w_hi].copy_(src[..., c0:c0 + (w_hi - w_lo - 1) * sw + 1:sw])
    t = shifted.stride()
    cols.copy_(shifted.as_strided((n, c_in, kh, kw, k, h_o, w_o), (t[0], t[2], dh * w_o, t[3], t[1], w_o, 1)))


#: output widths up to which :func:`_add_strided_conv_` unfolds in two steps (:func:`_unfold_two_step_`): at 8×8
#: outputs ~15–20 % faster than one strided copy, at 16×16 ~40 % slower (1 thread, 32–128 channels)
_TWO_STEP_MAX_WIDTH = 8


def _chunk(B: int, bytes_per_example: int, workspace_bytes: int) -> int:
    return max(1, min(B, int(workspace_bytes) // max(1, bytes_per_example)))


def _padded_rows(m: nn.Conv2d, x: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0 .. r1`` of ``x`` zero-padded, in a reused buffer whose padding stays zero (:func:`_zero_bordered`)."""
    (ph, pw) = m.padding
    if not (ph or pw):
        return x[r0:r1]
    c_in, H, W = x.shape[1:]
    xp = _zero_bordered(x, ("x_pad", ph, pw), r1 - r0, c_in, H + 2 * ph, W + 2 * pw)
    xp[:, :, ph:ph + H, pw:pw + W].copy_(x[r0:r1])
    return xp


def add_input_covariance_(acc: torch.Tensor, m: nn.Module, x: torch.Tensor, *,
                          workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> tuple[torch.Tensor, int]:
    """``acc[:d_in, :d_in] += Σ_rows Σ_r a_r a_rᵀ`` (K-FAC-expand's A statistic, without the bias row) for one call
    of a Conv2d / Linear layer with input ``x``; returns ``(Σ a_r, number of rows × positions)`` for the bias row.

    A convolution's patches are unfolded a few rows at a time into the reused workspace, laid out ``[d_in, rows·R]``
    so that each chunk is one GEMM (no im2col of the whole batch, no transposed copy of it); the products are formed
    in ``x``'s dtype and summed into ``acc`` in its own (float64 for the factors).
    """
    if isinstance(m, nn.Linear):
        a = x.reshape(-1, x.shape[-1])
        d_in = a.shape[1]
        prod = a.T @ a
        acc[:d_in, :d_in] += prod.to(acc.dtype)
        return a.sum(0).to(acc.dtype), a.shape[0]
    rows, c_in = x.shape[:2]
    kh, kw = m.kernel_size
    (ph, pw), (sh, sw), (dh, dw) = m.padding, m.stride, m.dilation
    h_o = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    w_o = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    R = h_o * w_o
    d_in = c_in * kh * kw
    chunk = _chunk(rows, d_in * R * x.element_size(), workspace_bytes)
    col_sum = torch.zeros(d_in, dtype=acc.dtype, device=acc.device)
    for r0 in range(0, rows, chunk):
        n = min(rows, r0 + chunk) - r0
        xp = _padded_rows(m, x, r0, r0 + n)
        sN, sC, sH, sW = xp.stride()
        patches = xp.as_strided((c_in, kh, kw, n, h_o, w_o), (sC, sH * dh, sW * dw, sN, sH * sh, sW * sw),
                                xp.storage_offset())
        w = _workspace(x, "cols", d_in, n * R)
        w.view(c_in, kh, kw, n, h_o, w_o).copy_(patches)
        if acc.dtype == w.dtype:
            acc[:d_in, :d_in].addmm_(w, w.T)
        else:
            acc[:d_in, :d_in] += (w @ w.T).to(acc.dtype)
        col_sum += w.sum(1).to(acc.dtype)
    return col_sum, rows * R
