"""Peak memory of the influence pipeline's heavy passes: bounded by the batch, not by N or the parameter count.

Each measurement runs in a fresh child process (peak RSS only grows within a process) and prints one line:

    MEM phase=<p> config=<c> B=<batch> N=<examples> peak_rss_mb=<x> delta_rss_mb=<x - rss before the pass>
        [cuda_peak_alloc_mb=<y>]

Phases (both stream the training set in batches of B, one draw per example by default: memory, not accuracy, is
measured here):

* ``store`` — gradients + projection: the store build (``store.build_gradient_store``, Kronecker projection,
  factor-wise via ``influence.projected``) writing N projected gradients to a temporary store.
* ``factors`` — K-FAC factor accumulation: the K-FAC pass of the curvature fit (A and B sums in float64 for every
  layer, GGN^model, expand), without the eigendecompositions (which depend only on the layer sizes).
* ``materialised`` (reference, small B only) — the old path: whole per-example gradients, then projection.

Then a summary: peak growth with B on ``--config`` (default ``cifar10``: ``cifar10_unet_config()``, ~36M
parameters), and the ratio of peaks at N = 100 vs N = 1000 on ``--n-config`` (default ``demo``; pass
``--n-config cifar10`` for the full-size check, which takes ~35 CPU-minutes per phase at 1 thread):

    RATIO peak(N=1000)/peak(N=100) phase=<p> = <r>      (goal: within 10 %)

    python bench/memory.py --threads 1
    python bench/memory.py --device cuda --n-config cifar10          # on a GPU machine
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import diffinfluence_widgets  # noqa: F401  (before torch: the package's allocation setting, as the CLI has it)
import torch

CONFIGS = ("tiny", "demo", "cifar10")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(phase: str, config: str, B: int, N: int, draws: int, device: str, threads: int, k: int) -> dict:
    torch.set_num_threads(threads)
    from diffinfluence_widgets.data.dataset import ImageDataset
    from diffinfluence_widgets.diffusion import DiffusionModel, cifar10_unet_config, demo_unet_config, tiny_unet_config
    from diffinfluence_widgets.influence.gradients import layer_shapes
    from diffinfluence_widgets.influence.projection import make_projector

    cfg = {"tiny": tiny_unet_config, "demo": demo_unet_config, "cifar10": cifar10_unet_config}[config]()
    dev = torch.device(device)
    model = DiffusionModel.from_config(cfg, seed=0).to(dev)
    C, H, W = model.image_shape
    g = torch.Generator().manual_seed(0)
    data = ImageDataset(torch.rand(N, C, H, W, generator=g) * 2 - 1, list(range(N)), name="memory-bench")
    proj = make_projector(layer_shapes(model), k, seed=0)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    before = _current_rss_mb()
    t0 = time.perf_counter()
    if phase == "store":
        from diffinfluence_widgets.store import build_gradient_store

        with tempfile.TemporaryDirectory() as tmp:
            build_gradient_store(Path(tmp) / "store", model, data, proj, num_draws=draws, batch_size=B,
                                 shard_size=max(B, 64), device=dev, progress=False)
    elif phase == "factors":
        from diffinfluence_widgets.influence.capture import LayerCapture, frozen_eval, layer_shape
        from diffinfluence_widgets.influence.curvature import _cotangents, _diffusion_problem

        problem = _diffusion_problem(model, data.images, torch.as_tensor(data.ids), num_draws=draws, seed=0,
                                     batch_size=B, max_rows=max(B * draws, 1), dev=dev, dtype=model.dtype)
        sums = {}
        for n, m in problem.layers.items():
            o, i = layer_shape(m)
            sums[n] = (torch.zeros(i, i, dtype=torch.float64, device=dev),
                       torch.zeros(o, o, dtype=torch.float64, device=dev))
        with frozen_eval(model.unet), LayerCapture(problem.layers, root=problem.root) as cap:
            for forward in problem.batches():
                cap.clear()
                with torch.enable_grad():
                    out, target, z = forward()
                    for cot in _cotangents(out, target, z, "model"):
                        torch.autograd.backward(out, grad_tensors=cot)
                for n in problem.layers:
                    for rec in cap.calls(n):
                        a, b = rec.a, rec.b  # [rows, R, d_in+1], [rows, R, d_out]: expand = positions as data
                        sums[n][0].add_((a.flatten(0, 1).T @ a.flatten(0, 1)).double())
                        sums[n][1].add_((b.flatten(0, 1).T @ b.flatten(0, 1)).double())
                        del a, b
                        rec.drop_unfolded_()  # as the curvature fit does: one layer's im2col copy at a time
                cap.clear()
    elif phase == "materialised":
        from diffinfluence_widgets.influence.gradients import per_example_gradients

        for lo in range(0, N, B):
            gr = per_example_gradients(model, data.images[lo:lo + B], data.ids[lo:lo + B], num_draws=draws,
                                       batch_size=B, device=dev)
            proj.project(gr.layers)
            del gr
    else:
        raise ValueError(f"phase must be store, factors or materialised, got {phase!r}")
    res = {"phase": phase, "config": config, "B": B, "N": N, "peak_rss_mb": round(_rss_mb(), 1),
           "delta_rss_mb": round(_rss_mb() - before, 1), "seconds": round(time.perf_counter() - t0, 1)}
    if dev.type == "cuda":
        res["cuda_peak_alloc_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    return res


def run_child(args, phase: str, config: str, B: int, N: int) -> dict:
    cmd = [sys.executable, __file__, "--child", phase, config, str(B), str(N), "--draws", str(args.draws),
           "--device", args.device, "--threads", str(args.threads), "--k", str(args.k)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    line = " ".join(f"{key}={v}" for key, v in res.items())
    print(f"MEM {line}", flush=True)
    return res


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=4, metavar=("PHASE", "CONFIG", "B", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--config", choices=CONFIGS, default="cifar10", help="model for the batch-size sweep")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--n-config", choices=CONFIGS + ("none",), default="demo",
                    help="model for the N = 100 vs 1000 check ('none': skip it)")
    ap.add_argument("--n-values", type=int, nargs=2, default=[100, 1000])
    ap.add_argument("--n-batch-size", type=int, default=8)
    ap.add_argument("--phases", nargs="+", default=["store", "factors"])
    ap.add_argument("--materialised-max-batch", type=int, default=8,
                    help="run the materialised reference up to this batch size (it needs B × params floats)")
    ap.add_argument("--draws", type=int, default=1, help="(t, ε) draws per example")
    ap.add_argument("--k", type=int, default=4096, help="projected dimension")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (reported with the figures)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.child:
        phase, config, B, N = args.child
        print(json.dumps(child(phase, config, int(B), int(N), args.draws, args.device, args.threads, args.k)))
        return []
    print(f"# threads={args.threads} device={args.device} draws={args.draws} k={args.k}", flush=True)
    results = []
    for phase in args.phases:
        for B in args.batch_sizes:
            results.append(run_child(args, phase, args.config, B, 2 * B))  # two batches: growth would show
    if args.materialised_max_batch > 0:
        for B in [b for b in args.batch_sizes if b <= args.materialised_max_batch]:
            results.append(run_child(args, "materialised", args.config, B, 2 * B))
    for phase in args.phases if args.n_config != "none" else []:
        lo, hi = (run_child(args, phase, args.n_config, args.n_batch_size, n) for n in args.n_values)
        results += [lo, hi]
        print(f"RATIO peak(N={args.n_values[1]})/peak(N={args.n_values[0]}) phase={phase} config={args.n_config} "
              f"= {hi['peak_rss_mb'] / lo['peak_rss_mb']:.3f}"
              + (f" cuda={hi['cuda_peak_alloc_mb'] / lo['cuda_peak_alloc_mb']:.3f}" if "cuda_peak_alloc_mb" in hi
                 else ""), flush=True)
    for phase in args.phases:
        rows = [r for r in results if r["phase"] == phase and r["config"] == args.config and r["N"] == 2 * r["B"]]
        print(f"SWEEP phase={phase} config={args.config} " +
              " ".join(f"B={r['B']}:{r['delta_rss_mb']}MB" for r in rows), flush=True)
    return results


if __name__ == "__main__":
    main()
