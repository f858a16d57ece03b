"""Distributed builds: 2 gloo processes give the same projected-gradient store and the same (E)K-FAC curvature as
1 process (training set sharded across ranks; factor sums all-reduced)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SHARD = 4


def _setup():
    from diffinfluence_widgets.data import load_digits
    from diffinfluence_widgets.diffusion.model import DiffusionModel, tiny_unet_config
    from diffinfluence_widgets.influence.gradients import layer_shapes
    from diffinfluence_widgets.influence.projection import make_projector

    train = load_digits(size=8, split="train", limit=18)  # 5 shards of ≤ 4: rank 0 gets 3, rank 1 gets 2
    model = DiffusionModel.from_config(tiny_unet_config(8), seed=0)
    proj = make_projector(layer_shapes(model), 256, seed=7)
    return model, train, proj


def _build(out: Path, *, with_curvature: bool = True):
    from diffinfluence_widgets.store import build_gradient_store
    from diffinfluence_widgets.influence.curvature import fit_curvature

    model, train, proj = _setup()
    store = build_gradient_store(out / "store", model, train, proj, num_draws=4, seed=3, shard_size=SHARD,
                                 batch_size=3, progress=False)
    curv = fit_curvature(model, train, num_draws=4, seed=3, batch_size=3, progress=False) if with_curvature else None
    return store, curv


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    import diffinfluence_widgets.store.features as features

    seen: list[int] = []
    real = features.projected_gradients  # the store's factor-wise projected gradients

    def spy(model, images, ids, *a, **k):  # record which training examples this rank differentiates
        seen.extend(int(i) for i in ids)
        return real(model, images, ids, *a, **k)

    features.projected_gradients = spy
    try:
        store, curv = _build(Path(out))
        Path(out, f"rank{rank}.json").write_text(json.dumps({"ids": seen, "n": len(store)}))
        if rank == 0:
            curv.save(Path(out) / "curvature")
        else:
            curv.save(Path(out) / "curvature-rank1")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_build_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    from diffinfluence_widgets.store import ProjectedStore
    from diffinfluence_widgets.influence.curvature import Curvature

    two = tmp_path / "two"
    two.mkdir()
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(two)), nprocs=2, join=True)
    one_store, one_curv = _build(tmp_path / "one")

    # the training set was split across the ranks: disjoint, complete, shard-aligned (round robin)
    seen = [json.loads((two / f"rank{r}.json").read_text())["ids"] for r in (0, 1)]
    ids = [int(i) for i in one_store.ids]
    assert sorted(seen[0] + seen[1]) == sorted(ids) and not set(seen[0]) & set(seen[1])
    assert seen[0] == ids[0:4] + ids[8:12] + ids[16:18] and seen[1] == ids[4:8] + ids[12:16]

    st2 = ProjectedStore.open(two / "store", verify=True)
    assert np.array_equal(st2.ids, one_store.ids)
    assert np.allclose(st2.arrays["features"], one_store.arrays["features"], rtol=1e-5, atol=1e-6)
    man = json.loads((two / "store" / "manifest.json").read_text())
    assert man["complete"] and man["num_shards"] == 5
    assert man["settings"] == json.loads((tmp_path / "one" / "store" / "manifest.json").read_text())["settings"]

    # K-FAC / EK-FAC factors: each rank fitted its shard and the sums were all-reduced -> same curvature on every
    # rank, equal to the 1-process fit
    for name in ("curvature", "curvature-rank1"):
        c2 = Curvature.load(two / name)
        for n in one_curv.layer_names:
            for attr in ("lambda_a", "lambda_b", "eigenvalues"):
                a, b = getattr(c2, attr)[n].double(), getattr(one_curv, attr)[n].double()
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-9 * float(b.abs().max())), (name, n, attr)
            # eigenbases agree up to sign / rotation within degenerate eigenvalues: compare the projectors Q diag Qᵀ
            for q, lam in (("q_a", "lambda_a"), ("q_b", "lambda_b")):
                A = getattr(c2, q)[n].double() @ torch.diag(getattr(c2, lam)[n].double()) @ getattr(c2, q)[n].double().T
                B = (getattr(one_curv, q)[n].double() @ torch.diag(getattr(one_curv, lam)[n].double())
                     @ getattr(one_curv, q)[n].double().T)
                assert torch.allclose(A, B, rtol=1e-5, atol=1e-8 * float(B.abs().max())), (name, n, q)
