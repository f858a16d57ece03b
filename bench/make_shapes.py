#!/usr/bin/env python
"""Write a procedurally generated image folder of coloured shapes on textured backgrounds (issue 14).

A dataset unlike the bundled digits, for ``diffinfluence evaluate --data``: RGB, four classes (circle, square,
triangle, ring; one sub-folder each, so the folder carries labels), each image a shape of random colour, size and
position over one of four backgrounds (flat, horizontal or vertical stripes, checkerboard) in a random colour pair.
Images are drawn at ``--draw-size`` pixels (default 32) with 4× supersampling, so ``from_image_folder(size=8)``
box-reduces them to anti-aliased small images. Everything is a function of ``--seed``; nothing is downloaded.

    python bench/make_shapes.py --out /tmp/shapes --num 160
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("circle", "ring", "square", "triangle")


def _shape_mask(kind: str, n: int, cx: float, cy: float, r: float) -> np.ndarray:
    y, x = np.mgrid[0:n, 0:n] + 0.5
    dx, dy = x - cx, y - cy
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if kind == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if kind == "triangle":  # apex up: inside when below the two slanted edges and above the base
        h = 1.7 * r
        top, base = cy - h / 2, cy + h / 2
        half = (y - top) / h * r
        return (y >= top) & (y <= base) & (np.abs(dx) <= half)
    raise ValueError(f"unknown shape {kind!r}; expected one of {CLASSES}")


def _background(kind: int, n: int, c0: np.ndarray, c1: np.ndarray, period: int) -> np.ndarray:
    y, x = np.mgrid[0:n, 0:n]
    sel = {0: np.zeros((n, n), bool), 1: (y // period) % 2 == 1, 2: (x // period) % 2 == 1,
           3: ((x // period) + (y // period)) % 2 == 1}[kind]
    return np.where(sel[..., None], c1, c0)


def make_image(rng: np.random.Generator, kind: str, size: int = 32, supersample: int = 4) -> np.ndarray:
    """One ``[size, size, 3]`` uint8 image of shape ``kind`` (supersampled, then box-averaged)."""
    n = size * supersample
    dark = rng.uniform(0, 0.45, 3)
    bg = _background(int(rng.integers(0, 4)), n, dark, np.clip(dark + rng.uniform(0.1, 0.3, 3), 0, 1),
                     period=supersample * int(rng.integers(4, 9)))
    r = rng.uniform(0.22, 0.4) * n
    cx, cy = rng.uniform(r, n - r), rng.uniform(r, n - r)
    colour = rng.uniform(0.55, 1.0, 3)
    colour[rng.integers(0, 3)] *= rng.uniform(0.1, 0.5)  # a saturated hue, not grey
    img = np.where(_shape_mask(kind, n, cx, cy, r)[..., None], colour, bg)
    img = img.reshape(size, supersample, size, supersample, 3).mean((1, 3))
    return np.round(img * 255).astype(np.uint8)


def write_folder(out: Path, num: int, seed: int = 0, size: int = 32) -> list[Path]:
    """``num`` images split evenly over the classes, ``out/<class>/<index>.png``; returns the paths."""
    if num < len(CLASSES):
        raise ValueError(f"--num must be at least {len(CLASSES)} (one image per class), got {num}")
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(num):
        kind = CLASSES[i % len(CLASSES)]
        p = out / kind / f"{i:05d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(make_image(rng, kind, size)).save(p)
        paths.append(p)
    return paths


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--num", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--draw-size", type=int, default=32)
    args = ap.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} is not empty; choose a new folder (ids follow the sorted file list)")
    paths = write_folder(args.out, args.num, args.seed, args.draw_size)
    print(f"wrote {len(paths)} images to {args.out}")


if __name__ == "__main__":
    main()
