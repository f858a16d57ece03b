"""The GPU check's steps (run by ``bench/gpu.sh``; each step also runs on the CPU for a smoke test).

    python bench/gpu_check.py agree --device cuda [--size small|tiny]
        (a) curvature factors and influence scores computed on ``--device`` equal the CPU's (float64, ≤ 1e-4
            relative) on a small UNet with attention. Prints ``AGREE factors=<rel> scores=<rel> OK|FAIL``.
    python bench/gpu_check.py throughput --device cuda [--config cifar10] [--dtype float32|tf32|bf16]
        (b) per-example gradient ÷ training throughput (one draw per row), curvature rows/s and store
            examples/s. Prints ``THROUGHPUT ...`` lines.
    torchrun --nproc_per_node 2 bench/gpu_check.py store --device cuda --out DIR2
    python bench/gpu_check.py store --device cuda --out DIR1
    python bench/gpu_check.py same-store DIR1 DIR2
        (c) a 2-rank store build (NCCL on CUDA, gloo on CPU) equals the 1-rank one. Prints ``STORE equal=<bool>``.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

from diffinfluence_widgets.data import load_digits
from diffinfluence_widgets.diffusion import DiffusionModel, cifar10_unet_config, demo_unet_config, tiny_unet_config

CONFIGS = {"tiny": tiny_unet_config, "demo": demo_unet_config, "cifar10": cifar10_unet_config}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def agree(args) -> bool:
    """(a) Factors and scores on ``args.device`` vs on the CPU, float64."""
    from diffinfluence_widgets.influence.curvature import fit_curvature
    from diffinfluence_widgets.influence.scores import compute_scores

    size = 8 if args.size == "tiny" else 16
    cfg = tiny_unet_config(size) if args.size == "tiny" else demo_unet_config(size)  # attention in both
    n_train = 8 if args.size == "tiny" else 32
    train = load_digits(size=size, split="train", limit=n_train)
    held = load_digits(size=size, split="heldout", limit=3)
    out = {}
    for dev in ("cpu", args.device):
        model = DiffusionModel.from_config(cfg, seed=0).to(dev, torch.float64)
        curv = fit_curvature(model, train, num_draws=4, batch_size=8, device=dev, dtype=torch.float64,
                             progress=False)
        sc = compute_scores(model, curv, held.images, held.ids, train, damping=1e-3, num_draws=4,
                            train_num_draws=4, batch_size=8, device=dev, dtype=torch.float64, progress=False)
        # eigenvectors are defined up to sign / rotation: compare the factors Q diag(λ) Qᵀ
        fac = torch.cat([(curv.q_a[n].double().cpu() @ torch.diag(curv.lambda_a[n].double().cpu())
                          @ curv.q_a[n].double().cpu().T).reshape(-1) for n in curv.layer_names] +
                        [(curv.q_b[n].double().cpu() @ torch.diag(curv.lambda_b[n].double().cpu())
                          @ curv.q_b[n].double().cpu().T).reshape(-1) for n in curv.layer_names] +
                        [curv.eigenvalues[n].double().cpu().reshape(-1) for n in curv.layer_names])
        out[dev] = (fac, torch.as_tensor(sc.matrix).double())
    rf, rs = _rel(out[args.device][0], out["cpu"][0]), _rel(out[args.device][1], out["cpu"][1])
    ok = rf <= 1e-4 and rs <= 1e-4
    print(f"AGREE device={args.device} size={args.size} factors={rf:.2e} scores={rs:.2e} {'OK' if ok else 'FAIL'}",
          flush=True)
    return ok


@contextlib.contextmanager
def _precision(mode: str, dev: torch.device):
    """float32 (TF32 off), tf32 (TF32 matmuls/convs on CUDA) or bf16 (CUDA autocast)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "tf32"
    try:
        if mode == "bf16":
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def throughput(args) -> None:
    """(b) Gradient ÷ training throughput (one draw per row), curvature rows/s, store examples/s."""
    from diffinfluence_widgets.influence.curvature import fit_curvature
    from diffinfluence_widgets.influence.gradients import layer_shapes, per_example_gradients
    from diffinfluence_widgets.influence.projected import projected_gradients
    from diffinfluence_widgets.influence.projection import make_projector
    from diffinfluence_widgets.data.dataset import ImageDataset

    dev = torch.device(args.device)
    model = DiffusionModel.from_config(CONFIGS[args.config](), seed=0).to(dev)
    C, H, W = model.image_shape
    B = args.batch_size
    x = (torch.rand(B, C, H, W, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(dev)
    opt = torch.optim.Adam(model.unet.parameters(), lr=1e-4)
    data = ImageDataset(x.cpu(), list(range(B)), name="throughput")
    proj = make_projector(layer_shapes(model), args.k, seed=0)

    def train_step():
        t = torch.randint(0, model.num_train_timesteps, (B,), device=dev)
        eps = torch.randn_like(x)
        opt.zero_grad(set_to_none=True)
        loss = (model.predict_noise(model.add_noise(x, eps, t), t) - eps).pow(2).mean()
        loss.backward()
        opt.step()

    steps = {"train": train_step,
             "gradients": lambda: per_example_gradients(model, x, torch.arange(B), num_draws=1, batch_size=B,
                                                        max_rows=B, device=dev),
             "store": lambda: projected_gradients(model, x, torch.arange(B), proj, num_draws=1, batch_size=B,
                                                  max_rows=B, device=dev),
             "curvature": lambda: fit_curvature(model, data, method="kfac", num_draws=1, batch_size=B, device=dev,
                                                progress=False)}
    with _precision(args.dtype, dev):
        model.unet.train()
        times: dict[str, list[float]] = {k: [] for k in steps}
        for name, fn in steps.items():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in steps.items():
                _sync(dev)
                t0 = time.perf_counter()
                fn()
                _sync(dev)
                times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    print(f"THROUGHPUT config={args.config} device={dev} dtype={args.dtype} B={B} threads={torch.get_num_threads()} "
          f"train_rows/s={B / best['train']:.1f} gradient_rows/s={B / best['gradients']:.1f} "
          f"store_examples/s={B / best['store']:.1f} curvature_rows/s={B / best['curvature']:.1f} "
          "(curvature: K-FAC pass + eigendecompositions, one draw per example)", flush=True)
    print(f"RATIO gradients/train (one draw per row) = {best['train'] / best['gradients']:.3f}", flush=True)


def store(args) -> None:
    """(c) One store build; under torchrun the shards are split across ranks."""
    from diffinfluence_widgets.distributed import init_from_env
    from diffinfluence_widgets.store import build_gradient_store
    from diffinfluence_widgets.influence.gradients import layer_shapes
    from diffinfluence_widgets.influence.projection import make_projector

    init_from_env(args.device)
    dev = torch.device(args.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    size = 8 if args.size == "tiny" else 16
    cfg = tiny_unet_config(size) if args.size == "tiny" else demo_unet_config(size)
    model = DiffusionModel.from_config(cfg, seed=0).to(dev, torch.float64)
    train = load_digits(size=size, split="train", limit=24)
    proj = make_projector(layer_shapes(model), 256, seed=1)
    build_gradient_store(Path(args.out), model, train, proj, num_draws=4, seed=0, shard_size=5, batch_size=4,
                         device=dev, progress=False)


def same_store(args) -> bool:
    import numpy as np

    from diffinfluence_widgets.store import ProjectedStore

    a, b = (ProjectedStore.open(p, verify=True) for p in args.dirs)
    fa, fb = a.arrays["features"], b.arrays["features"]
    rel = float(np.linalg.norm(fa - fb) / max(np.linalg.norm(fb), 1e-30))
    ok = bool(np.array_equal(a.ids, b.ids)) and rel <= 1e-5
    print(f"STORE equal={ok} rel={rel:.2e} n={len(a)}", flush=True)
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("agree")
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", choices=("tiny", "small"), default="small")
    p = sub.add_parser("throughput")
    p.add_argument("--device", default="cuda")
    p.add_argument("--config", choices=sorted(CONFIGS), default="cifar10")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", choices=("float32", "tf32", "bf16"), default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--k", type=int, default=4096)
    p = sub.add_parser("store")
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", choices=("tiny", "small"), default="small")
    p.add_argument("--out", required=True)
    p = sub.add_parser("same-store")
    p.add_argument("dirs", nargs=2)
    for p in sub.choices.values():
        p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cmd == "agree":
        return 0 if agree(args) else 1
    if args.cmd == "throughput":
        throughput(args)
        return 0
    if args.cmd == "store":
        store(args)
        return 0
    return 0 if same_store(args) else 1


if __name__ == "__main__":
    sys.exit(main())
