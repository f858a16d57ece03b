"""Run by tests/test_distributed_build.py, alone or under torchrun: a small tiny-config demo build into argv[1]."""
import sys

import torch

torch.set_num_threads(1)

from diffinfluence_widgets import distributed as dist_utils  # noqa: E402
from diffinfluence_widgets.demo import DEMO_CONFIGS, build_demo  # noqa: E402

# 260 training images: two store shards (256 + 4), so that both ranks compute one
CONFIG = DEMO_CONFIGS["tiny"].replace(train_limit=260, heldout_limit=2, train={"steps": 8, "batch_size": 16},
                                      curvature_draws=2, store_draws=2, query_draws=2, k=64, num_generated=0,
                                      methods=("ekfac", "trak"))

if __name__ == "__main__":
    dist_utils.init_from_env("cpu")
    build_demo(CONFIG, sys.argv[1], device="cpu", progress=False, threads=1, shared=True)
