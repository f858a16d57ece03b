"""Throughput of per-example (x, t, ε) gradient extraction vs a plain training step, on the same model and batch.

Prints one ratio from one run (both sides measured here, interleaved):

    ratio = (examples/s of per-example gradients) / (examples/s of a plain training step)

A "plain training step" is zero_grad + forward + mean loss + backward + Adam step on a batch of B (x, t, ε) rows.
Per-example extraction is :func:`per_example_gradients` on the same number of (x, t, ε) rows, arranged as
B / S examples × S draws, producing a ``[B / S, d_out, d_in+1]`` gradient (the average over the example's draws)
for every tracked layer. Both sides are reported in (x, t, ε) rows per second. ``--draws 1`` is the extreme case
of one gradient per row; the method itself always averages S ≥ 8 draws per example (method §1), which is the
default here. Goal (issue 2): ratio ≥ 0.5; issue 13: ≥ 0.8 with one draw per row. A third side passes the previous
result as ``out=`` (what a streaming consumer such as ``iter_gradients(reuse_buffers=True)`` does: no fresh
``B × P`` buffer to fault in per batch); a fourth times the store's factor-wise projected gradients
(``influence.projected``, ``--k``) on the same rows.

    python bench/gradients.py --threads 1 --config demo --batch-size 64
    python bench/gradients.py --device cuda --config cifar10 --batch-size 32     # on a GPU machine
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import diffinfluence_widgets  # noqa: F401  (before torch: the package's allocation setting, as the CLI has it)
import torch

from diffinfluence_widgets.diffusion import DiffusionModel, cifar10_unet_config, demo_unet_config, tiny_unet_config
from diffinfluence_widgets.influence.gradients import layer_shapes, per_example_gradients
from diffinfluence_widgets.influence.projected import projected_gradients
from diffinfluence_widgets.influence.projection import make_projector

CONFIGS = {"tiny": tiny_unet_config, "demo": demo_unet_config, "cifar10": cifar10_unet_config}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="demo")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--draws", type=int, default=8, help="S draws per example (B must be a multiple)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (reported with the figure)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--k", type=int, default=4096, help="projected dimension of the factor-wise side")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    model = DiffusionModel.from_config(CONFIGS[args.config](), seed=0).to(dev)
    C, H, W = model.image_shape
    B = args.batch_size
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(B, C, H, W, generator=g) * 2 - 1).to(dev)
    S = args.draws
    if B % S:
        ap.error(f"--batch-size {B} must be a multiple of --draws {S}")
    ids = torch.arange(B // S)
    n_params = sum(o * i for o, i in layer_shapes(model).values())
    opt = torch.optim.Adam(model.unet.parameters(), lr=1e-4)

    def train_step():
        t = torch.randint(0, model.num_train_timesteps, (B,), device=dev)
        eps = torch.randn_like(x)
        opt.zero_grad(set_to_none=True)
        loss = (model.predict_noise(model.add_noise(x, eps, t), t) - eps).pow(2).mean()
        loss.backward()
        opt.step()

    def per_example():
        return per_example_gradients(model, x[:B // S], ids, "loss", num_draws=S, batch_size=B // S, max_rows=B,
                                     device=dev)

    reused = [per_example()]

    def per_example_reused():  # a streaming consumer: each batch overwrites the previous one's buffers
        reused[0] = per_example_gradients(model, x[:B // S], ids, "loss", num_draws=S, batch_size=B // S,
                                          max_rows=B, device=dev, out=reused[0])

    proj = make_projector(layer_shapes(model), args.k, seed=0)

    def projected():  # what the store computes: R g per example, factor-wise (no per-example gradient formed)
        return projected_gradients(model, x[:B // S], ids, proj, "loss", num_draws=S, batch_size=B // S,
                                   max_rows=B, device=dev)

    sides = (("train", train_step), ("per_example", per_example), ("per_example_reused", per_example_reused),
             ("projected", projected))
    model.unet.train()
    for _, fn in sides:  # warm-up
        fn()
    times = {name: [] for name, _ in sides}
    for _ in range(args.repeats):
        for name, fn in sides:
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = (B / med["per_example"]) / (B / med["train"])
    out = {"config": args.config, "tracked_params": n_params, "batch_size": B, "draws": S, "threads": args.threads,
           "device": str(dev), "train_ex_per_s": B / med["train"], "per_example_ex_per_s": B / med["per_example"],
           "ratio": ratio, "reused_ratio": med["train"] / med["per_example_reused"],
           "projected_ex_per_s": B / med["projected"],
           "projected_ratio": med["train"] / med["projected"], "k": args.k}
    print(f"config={args.config} tracked_params={n_params} rows={B} ({B // S} examples x {S} draws) device={dev} "
          f"threads={args.threads} THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}")
    print(f"plain training step   : {B / med['train']:9.1f} (x,t,eps) rows/s (median of {args.repeats})")
    print(f"per-example gradients : {B / med['per_example']:9.1f} (x,t,eps) rows/s (median of {args.repeats})")
    print(f"  same, out= reused   : {B / med['per_example_reused']:9.1f} (x,t,eps) rows/s (median of {args.repeats}; "
          "a streaming consumer's buffers)")
    print(f"projected gradients   : {B / med['projected']:9.1f} (x,t,eps) rows/s (median of {args.repeats}; "
          f"factor-wise, k={args.k})")
    print(f"ratio (per-example / training step) = {ratio:.2f}   (goal >= 0.8)")
    print(f"ratio (per-example, out= reused / training step) = {med['train'] / med['per_example_reused']:.2f}")
    print(f"ratio (projected / training step) = {med['train'] / med['projected']:.2f}   (goal >= 0.8)")
    return out


if __name__ == "__main__":
    main()
