#!/usr/bin/env python
"""Peak memory of ``from_image_folder`` on large photos (issue 11 p.8).

Writes ``--num`` random RGB JPEGs (or PNGs with ``--format png``) of ``--pixels`` × ``--pixels`` into a temporary
folder, then reads them with ``from_image_folder(size=--size)`` in a fresh child process and prints the child's peak
RSS (``ru_maxrss``) next to the baseline of a child that only imports the package, so the difference is what
reading the folder costs. Goal: ≤ 300 MB for 200 images of 2000 × 2000.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = """
import os, resource, sys, time
import torch
torch.set_num_threads(1)
from diffinfluence_widgets.data import from_image_folder
t0 = time.time()
d = from_image_folder(sys.argv[1], size=int(sys.argv[2])) if sys.argv[1] != "-" else None
dt = time.time() - t0
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, dt, "" if d is None else d.image_shape)
"""


def child(folder: str, size: int) -> tuple[float, float, str]:
    out = subprocess.run([sys.executable, "-c", CHILD, folder, str(size)], check=True, capture_output=True,
                         text=True).stdout.split(maxsplit=2)
    return float(out[0]), float(out[1]), out[2].strip() if len(out) > 2 else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num", type=int, default=200)
    ap.add_argument("--pixels", type=int, default=2000)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--format", choices=("jpeg", "png"), default="jpeg")
    args = ap.parse_args()
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="bench-image-folder-") as tmp:
        rng = np.random.default_rng(0)
        t0 = time.time()
        base = rng.integers(0, 256, (args.pixels // 16, args.pixels // 16, 3), dtype=np.uint8)
        for i in range(args.num):  # smooth-ish photos (a random 16×-upsampled pattern), one per file
            img = Image.fromarray(np.roll(base, i, axis=0)).resize((args.pixels, args.pixels), Image.BILINEAR)
            img.save(Path(tmp) / f"photo{i:04d}.{'jpg' if args.format == 'jpeg' else 'png'}")
        size_mb = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 2 ** 20
        print(f"wrote {args.num} {args.format} files of {args.pixels}×{args.pixels} ({size_mb:.0f} MiB) "
              f"in {time.time() - t0:.0f}s")
        base_rss, _, _ = child("-", args.size)
        peak, dt, shape = child(tmp, args.size)
    full = args.num * args.pixels ** 2 * 3 / 2 ** 20
    print(f"from_image_folder(size={args.size}) on {args.num} × {args.pixels}² {args.format}: peak RSS "
          f"{peak:.0f} MiB (import alone {base_rss:.0f} MiB, reading adds {peak - base_rss:.0f} MiB); "
          f"{dt:.1f}s; result {shape}; all images decoded at full size would hold {full:.0f} MiB "
          f"(ratio {full / max(peak - base_rss, 1):.0f}×)")


if __name__ == "__main__":
    main()
