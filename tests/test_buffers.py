"""Recycled memory for per-example gradient batches (``influence.buffers``): a block comes back only once nothing
views it, at most one idle block is kept, and gradients computed in recycled memory (poisoned with NaN) equal
those computed in fresh memory."""
from __future__ import annotations

import pytest
import torch

from diffinfluence_widgets.diffusion import DiffusionModel, tiny_unet_config
from diffinfluence_widgets.influence import buffers
from diffinfluence_widgets.influence.gradients import layer_shapes, per_example_gradients

torch.set_num_threads(1)
MB = 1 << 20


@pytest.fixture(autouse=True)
def _empty_pool():
    buffers.clear()
    yield
    buffers.clear()


def test_block_comes_back_only_when_nothing_views_it():
    n = buffers.MIN_BYTES  # float32: a 4 × MIN_BYTES block
    a = buffers.take(n, dtype=torch.float32, device="cpu")
    assert a.numel() == n and a.dtype == torch.float32 and a.data_ptr() % 64 == 0
    ptr = a.data_ptr()
    view = a[5:9].view(2, 2)
    del a
    assert buffers.free_bytes() == 0  # a view still holds it
    b = buffers.take(n, dtype=torch.float32, device="cpu")
    assert b.data_ptr() != ptr
    del view
    assert buffers.free_bytes() >= 4 * n
    c = buffers.take(n // 2, dtype=torch.float64, device="cpu")  # same bytes, another dtype
    assert c.data_ptr() == ptr and c.numel() == n // 2 and buffers.free_bytes() == 0
    del c
    d = buffers.take(n // 4, dtype=torch.float32, device="cpu")  # a quarter of the block: not served by it
    assert d.data_ptr() != ptr and buffers.free_bytes() == 0  # and the block was released, not kept
    del b, d
    assert buffers.free_bytes() > 0 and len(buffers._kept) == 1  # one idle block at most


def test_small_large_and_other_requests_are_not_kept(monkeypatch):
    small = buffers.take(1000, dtype=torch.float32, device="cpu")
    ints = buffers.take(buffers.MIN_BYTES, dtype=torch.int64, device="cpu")
    del small, ints
    assert buffers.free_bytes() == 0
    monkeypatch.setattr(buffers, "MAX_FREE_BYTES", 8 * MB)
    big = buffers.take(4 * MB, dtype=torch.float32, device="cpu")  # 16 MB: over the cap
    del big
    assert buffers.free_bytes() == 0


def test_gradients_in_recycled_memory_equal_fresh(monkeypatch):
    model = DiffusionModel.from_config(tiny_unet_config(), seed=0).to(dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    imgs = torch.rand(5, 1, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1
    fresh = per_example_gradients(model, imgs, range(5), num_draws=2, seed=1).flat()
    monkeypatch.setattr(buffers, "MIN_BYTES", 0)  # the tiny model's batch is under the usual threshold
    numel = 5 * sum(o * i for o, i in layer_shapes(model).values())
    poison = buffers.take(numel, dtype=torch.float64, device="cpu")
    ptr = poison.data_ptr()
    poison.fill_(float("nan"))
    del poison
    got = per_example_gradients(model, imgs, range(5), num_draws=2, seed=1)
    assert next(iter(got.layers.values())).data_ptr() == ptr  # computed in the poisoned block
    assert torch.equal(got.flat(), fresh)
