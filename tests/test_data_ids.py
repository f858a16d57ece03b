"""Ids and labels given by the caller survive every dataset constructor and subsetting (issue 15); image folders
stream (issue 11 p.8): a non-image file is named, a huge image is decoded small or refused before decoding."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffinfluence_widgets.data import ImageDataset, from_arrays, from_image_folder, from_torch_dataset

IDS = [907, 13, 4242, 5]
LABELS = [3, 1, 4, 1]


def _arrays(n=4, size=6):
    return np.random.default_rng(0).integers(0, 256, (n, size, size), dtype=np.uint8)


def _folder(tmp_path, arrs):
    for i, a in enumerate(arrs):
        Image.fromarray(a).save(tmp_path / f"img{i}.png")
    return tmp_path


def _constructors(tmp_path):
    arrs = _arrays()
    pils = [Image.fromarray(a) for a in arrs]
    yield "arrays(uint8 NHW)", from_arrays(arrs, IDS, LABELS)
    yield "arrays(float NCHW)", from_arrays(torch.from_numpy(arrs).float()[:, None] / 255, IDS, LABELS)
    yield "arrays(PIL list)", from_arrays(pils, IDS, LABELS, size=4)
    yield "torch dataset", from_torch_dataset([(p, 0) for p in pils], ids=IDS, labels=LABELS)
    yield "image folder", from_image_folder(_folder(tmp_path, arrs), ids=IDS, labels=LABELS)
    yield "ImageDataset", ImageDataset(torch.from_numpy(arrs).float()[:, None] / 127.5 - 1, IDS, LABELS)


def test_ids_and_labels_survive_every_constructor_and_subsetting(tmp_path):
    ref = torch.from_numpy(_arrays()).float()[:, None] / 127.5 - 1
    for what, d in _constructors(tmp_path):
        assert d.ids.tolist() == IDS and d.labels.tolist() == LABELS, what
        if d.image_shape[-1] == 6:  # the same pixels, in the given order, whatever the constructor
            assert torch.allclose(d.images, ref, atol=1e-6), what
        sub = d.subset([5, 907])
        assert sub.ids.tolist() == [5, 907] and sub.labels.tolist() == [1, 3], what
        assert torch.equal(sub.images, d.by_ids([5, 907])), what
        assert sub.subset([907]).labels.tolist() == [3], what


def test_torch_dataset_indices_keep_source_ids():
    arrs = _arrays(10)
    ds = [(torch.from_numpy(a), i % 3) for i, a in enumerate(arrs)]
    d = from_torch_dataset(ds, indices=[7, 2, 9])
    assert d.ids.tolist() == [7, 2, 9] and d.labels.tolist() == [1, 2, 0]
    assert torch.equal(d.images[0, 0], torch.from_numpy(arrs[7]).float() / 127.5 - 1)
    with pytest.raises(IndexError, match=r"indices \[10\]"):
        from_torch_dataset(ds, indices=[1, 10])


@pytest.mark.parametrize("kw,match", [(dict(ids=[1, 2]), "got 2 ids for 4"), (dict(ids=[1, 1, 2, 3]), "unique"),
                                      (dict(labels=[0]), "got 1 labels for 4"),
                                      (dict(ids=[0.5, 1, 2, 3]), "integers")])
def test_bad_ids_or_labels_are_refused(tmp_path, kw, match):
    arrs = _arrays()
    for make in (lambda: from_arrays(arrs, **kw), lambda: from_image_folder(_folder(tmp_path, arrs), **kw)):
        with pytest.raises((ValueError, TypeError), match=match):
            make()


def test_from_arrays_refuses_non_images():
    with pytest.raises(TypeError, match="numpy array, a torch tensor or a list"):
        from_arrays("images.npy")
    with pytest.raises(ValueError, match=r"got shape \(4, 4\)"):
        from_arrays(np.zeros((4, 4), np.uint8))


def test_image_folder_names_a_non_image_file(tmp_path):
    _folder(tmp_path, _arrays(2))
    (tmp_path / "fake.png").write_text("not a png at all")
    with pytest.raises(ValueError, match="fake.png"):
        from_image_folder(tmp_path)


def test_image_folder_huge_images(tmp_path):
    """10 000 × 10 000: a PNG is refused before its pixels are decoded (message names the file and the limit);
    a JPEG is decoded by the codec at 1/8 scale and works."""
    big = Image.new("L", (10_000, 10_000), 128)
    (tmp_path / "png").mkdir()
    big.save(tmp_path / "png" / "huge.png")
    with pytest.raises(ValueError, match=r"huge\.png.*10000×10000.*max_pixels"):
        from_image_folder(tmp_path / "png", size=8)
    (tmp_path / "jpg").mkdir()
    big.save(tmp_path / "jpg" / "huge.jpg", quality=90)
    del big
    d = from_image_folder(tmp_path / "jpg", size=8)
    assert d.image_shape == (1, 8, 8) and abs(float(d.images.mean()) - (128 / 127.5 - 1)) < 0.02


def test_image_folder_shrinks_large_images_like_a_direct_resize(tmp_path):
    """The box reduction before the antialiased resize keeps the result close to resizing the full image."""
    from diffinfluence_widgets.data import resize

    rng = np.random.default_rng(1)
    smooth = np.kron(rng.integers(0, 256, (8, 8)), np.ones((64, 64))).astype(np.uint8)  # 512 × 512
    Image.fromarray(smooth).save(tmp_path / "a.png")
    d = from_image_folder(tmp_path, size=16)
    direct = resize(torch.from_numpy(smooth).float()[None, None] / 127.5 - 1, 16)
    assert (d.images - direct).abs().max() < 0.05
