"""Datasets: validation, ids, splits, conversions and round trips."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from diffinfluence_widgets.data import (ImageDataset, digits_split_ids, from_image_folder, from_torch_dataset,
                                        load_digits, to_png, to_uint8)


def _ds(n=5, c=1, s=4, **kw):
    g = torch.Generator().manual_seed(0)
    return ImageDataset(torch.rand(n, c, s, s, generator=g) * 2 - 1, torch.arange(10, 10 + n), **kw)


# ---------------------------------------------------------------------- ImageDataset
def test_validation_errors_name_the_problem():
    x = torch.zeros(3, 1, 4, 4)
    with pytest.raises(ValueError, match=r"4-D.*\(3, 4, 4\)"):
        ImageDataset(torch.zeros(3, 4, 4), torch.arange(3))
    bad = x.clone()
    bad[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN.*position 1"):
        ImageDataset(bad, torch.arange(3))
    with pytest.raises(TypeError, match="floating point.*uint8"):
        ImageDataset(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.arange(3))
    with pytest.raises(ValueError, match="channels, got 2"):
        ImageDataset(torch.zeros(3, 2, 4, 4), torch.arange(3))
    with pytest.raises(ValueError, match=r"\[-1, 1\].*255"):
        ImageDataset(x + 255, torch.arange(3))
    with pytest.raises(ValueError, match="duplicated: \\[7\\]"):
        ImageDataset(x, torch.tensor([7, 7, 8]))
    with pytest.raises(ValueError, match="2 ids for 3 images"):
        ImageDataset(x, torch.arange(2))
    with pytest.raises(ValueError, match="2 labels for 3 images"):
        ImageDataset(x, torch.arange(3), labels=[0, 1])


def test_by_ids_subset_and_missing_ids():
    d = _ds(labels=[0, 1, 2, 3, 4], names=list("abcde"))
    assert d.image_shape == (1, 4, 4) and len(d) == 5 and d.ids.dtype == torch.long
    assert torch.equal(d.by_ids([13, 10]), d.images[[3, 0]])
    sub = d.subset(np.array([14, 11]))
    assert sub.ids.tolist() == [14, 11] and sub.labels.tolist() == [4, 1] and sub.names == ["e", "b"]
    assert torch.equal(sub.images, d.images[[4, 1]])
    with pytest.raises(KeyError, match="99"):
        d.by_ids([10, 99])
    with pytest.raises(KeyError, match="2 id\\(s\\).*5, 6"):
        d.subset([5, 6])


def test_fingerprint_depends_on_content_not_name():
    a, b = _ds(name="a"), _ds(name="b", labels=[1] * 5)
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 16
    c = _ds()
    c.images[0, 0, 0, 0] += 1e-3
    assert ImageDataset(c.images, c.ids).fingerprint() != a.fingerprint()
    assert ImageDataset(a.images, a.ids + 1).fingerprint() != a.fingerprint()
    # a subset in the same order is the same content
    assert a.subset(a.ids).fingerprint() == a.fingerprint()


# ---------------------------------------------------------------------- digits
def test_digits_range_ids_and_sizes():
    d8 = load_digits(size=8, split="all")
    assert len(d8) == 1797 and d8.ids.tolist() == list(range(1797))
    assert d8.images.min() >= -1 and d8.images.max() <= 1 and d8.images.min() == -1
    d16 = load_digits(size=16, split="train", limit=10)
    assert d16.image_shape == (1, 16, 16) and len(d16) == 10
    assert torch.equal(d16.ids, digits_split_ids("train")[:10])
    # a smooth resize keeps each image's mean brightness close
    assert torch.allclose(d16.images.mean((1, 2, 3)), d8.by_ids(d16.ids).mean((1, 2, 3)), atol=0.05)


def test_digits_read_without_sklearn_equal_sklearns():
    """The digits are read from scikit-learn's bundled CSV without importing sklearn.datasets (kernel memory);
    pixels and classes equal sklearn's own loader, and the import stays out of sys.modules."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits as sk_load

    from diffinfluence_widgets.data.digits import _raw_digits

    images, labels = _raw_digits()
    sk = sk_load()
    assert torch.equal(images[:, 0] * 16.0, torch.from_numpy(sk.images.astype(np.float32)))
    assert torch.equal(labels, torch.from_numpy(sk.target.astype(np.int64)))
    code = ("import sys; from diffinfluence_widgets.data import load_digits; load_digits(8, limit=4); "
            "print('sklearn.datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_digits_split_disjoint_stable_stratified():
    tr, ho = digits_split_ids("train"), digits_split_ids("heldout")
    assert set(tr.tolist()).isdisjoint(ho.tolist()) and len(tr) + len(ho) == 1797
    assert abs(len(ho) / 1797 - 0.2) < 0.01
    # independent of size and limit, dependent on seed
    assert torch.equal(load_digits(size=8, split="heldout").ids, load_digits(size=12, split="heldout").ids)
    assert torch.equal(load_digits(size=8, split="heldout", limit=30).ids, ho[:30])
    assert not torch.equal(digits_split_ids("heldout", seed=1), ho)
    labels = load_digits(size=8, split="heldout").labels
    counts = torch.bincount(labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # ~20% of ~180 per class
    with pytest.raises(ValueError, match="split must be one of"):
        load_digits(split="test")
    with pytest.raises(ValueError, match="size must be a positive integer"):
        load_digits(size=0)


# ---------------------------------------------------------------------- conversions
def test_to_uint8_and_png_round_trip():
    d = load_digits(size=8, split="all", limit=3)
    png = to_png(d.images[1], scale=3)
    im = Image.open(io.BytesIO(png))
    assert im.size == (24, 24) and im.mode == "L"
    arr = torch.from_numpy(np.array(im))
    u8 = to_uint8(d.images[1])[0]
    assert torch.equal(arr[::3, ::3], u8) and torch.equal(arr[2::3, 1::3], u8)
    rgb = Image.open(io.BytesIO(to_png(torch.zeros(3, 2, 2))))
    assert rgb.mode == "RGB" and np.asarray(rgb).max() == 128
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0, 7.0])).tolist() == [0, 128, 255, 255]
    with pytest.raises(ValueError, match="C = 1 or 3"):
        to_png(torch.zeros(2, 4, 4))


def _write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    b = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    _write(tmp_path / "cats" / "b.png", b)
    _write(tmp_path / "cats" / "a.png", a)
    _write(tmp_path / "dogs" / "c.bmp", a)
    (tmp_path / "notes.txt").write_text("not an image")
    d = from_image_folder(tmp_path)
    assert d.names == ["cats/a.png", "cats/b.png", "dogs/c.bmp"] and d.ids.tolist() == [0, 1, 2]
    assert d.labels.tolist() == [0, 0, 1] and d.meta["classes"] == ["cats", "dogs"]
    assert d.image_shape == (1, 6, 6)
    assert torch.equal(to_uint8(d.images[0])[0], torch.from_numpy(a))  # exact 8-bit round trip
    rgb = from_image_folder(tmp_path, channels=3, size=3)
    assert rgb.image_shape == (3, 3, 3) and torch.equal(rgb.images[:, 0], rgb.images[:, 2])
    # mixed colour modes -> RGB by default
    _write(tmp_path / "dogs" / "d.png", rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    assert from_image_folder(tmp_path).image_shape == (3, 6, 6)
    # mixed sizes need size=
    _write(tmp_path / "dogs" / "e.png", rng.integers(0, 256, (8, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="different sizes.*dogs/e.png.*size="):
        from_image_folder(tmp_path)
    assert from_image_folder(tmp_path, size=4).image_shape == (3, 4, 4)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_image_folder(tmp_path / "nope")
    with pytest.raises(ValueError, match="holds no images"):
        from_image_folder(tmp_path)
    _write(tmp_path / "x.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="channels must be 1"):
        from_image_folder(tmp_path, channels=4)


def test_from_torch_dataset_formats():
    rng = np.random.default_rng(1)
    u8 = torch.from_numpy(rng.integers(0, 256, (4, 1, 5, 5), dtype=np.uint8))

    class Tuples(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return u8[i], torch.tensor(i % 2)

    d = from_torch_dataset(Tuples())
    assert d.ids.tolist() == [0, 1, 2, 3] and d.labels.tolist() == [0, 1, 0, 1]
    assert torch.equal(to_uint8(d.images), u8)
    # [0, 1] floats (ToTensor style) and PIL images give the same result; limit and size work
    floats = [(u8[i].float() / 255,) for i in range(4)]
    pils = [Image.fromarray(u8[i, 0].numpy()) for i in range(4)]
    assert torch.allclose(from_torch_dataset(floats).images, d.images, atol=1e-6)
    assert torch.allclose(from_torch_dataset(pils, limit=2).images, d.images[:2], atol=1e-6)
    assert from_torch_dataset(pils, size=3).image_shape == (1, 3, 3)
    assert from_torch_dataset(pils, channels=3).image_shape == (3, 5, 5)
    # HWC numpy arrays
    hwc = [rng.integers(0, 256, (5, 5, 3), dtype=np.uint8) for _ in range(2)]
    assert from_torch_dataset(hwc).image_shape == (3, 5, 5)
    with pytest.raises(ValueError, match="float images must be in"):
        from_torch_dataset([torch.full((1, 4, 4), 3.0)])
    with pytest.raises(ValueError, match="item 0.*1 or 3 channels"):
        from_torch_dataset([torch.zeros(2, 5, 4, 4)])
