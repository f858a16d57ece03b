"""One tiny LDS retraining + measurement run; launched by tests/test_distributed_jobs.py with or without torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/lds_torchrun_script.py CACHE OUT
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch


def main(cache_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    from diffinfluence_widgets.data import load_digits
    from diffinfluence_widgets.diffusion.model import DiffusionModel, tiny_unet_config
    from diffinfluence_widgets.diffusion.train import TrainConfig
    from diffinfluence_widgets.distributed import init_from_env, rank_and_world
    from diffinfluence_widgets.evaluation import RetrainCache, generate_subsets, lds, lds_targets

    init_from_env("cpu")
    rank, world = rank_and_world()
    out_p = Path(out)
    out_p.mkdir(parents=True, exist_ok=True)
    (out_p / f"pid-rank{rank}").write_text(str(os.getpid()))
    train = load_digits(size=8, split="train", limit=16)
    held = load_digits(size=8, split="heldout", limit=2)
    model = DiffusionModel.from_config(tiny_unet_config(8), seed=0)
    cache = RetrainCache(cache_dir, model, train, TrainConfig.tiny(steps=int(os.environ.get("LDS_TEST_STEPS", "20"))))
    subsets = generate_subsets(np.asarray(train.ids), 3, fraction=0.5, seed=0)
    targets = lds_targets(cache, subsets, [0, 1], held.images, held.ids, num_draws=8, progress=True)
    scores = np.random.default_rng(0).normal(size=(len(held), len(train)))
    res = lds(scores, subsets, targets, query_ids=held.ids)
    if rank == 0:
        tmp = out_p / f".tmp-{os.getpid()}.npz"
        np.savez(tmp, targets=targets, lds=np.array([res.mean]), world=np.array([world]))
        os.replace(tmp, out_p / "result.npz")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
