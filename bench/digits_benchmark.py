#!/usr/bin/env python
"""Digits benchmark: the paper's two evaluations (``method.md`` §7) end to end on the bundled digits.

A thin driver over the public API (``diffinfluence_widgets.evaluation.evaluate`` + ``write_report``):

1. Train the full-data model (seed 0) on ``num_train`` 8×8 digits and generate ``num_queries`` query samples.
2. **LDS.** Draw M subsets (α = 50%), retrain each with K seeds (resumable cache, ``num_workers`` processes),
   measure every query's loss under every model with common random numbers → targets ``[Q, M, K]``.
3. Score every training example for every query with each method (``evaluation.attribute``): K-FAC and EK-FAC
   influence (loss, expand, GGN^model), the ablations GGN^loss and reduce, TRAK and D-TRAK, pixel cosine
   similarity (raw and mean-centred), the exact-retraining oracle, and the recommended default (row ``default``:
   EK-FAC averaged over 3 full-data models, λ = 1e-3 · τ; every gradient method uses 512 query / 128 training
   draws). Every family is swept over damping λ: absolute
   for the K-FAC family (the paper's untuned 1e-8 is absolute), relative to the mean eigenvalue of ΦᵀΦ for TRAK.
4. LDS with the standard error over queries and the two-way bootstrap over queries × subsets; paired differences
   between methods, each with its two-way bootstrap 95% interval.
5. **Retraining without the top 2% / 10%** of the training set for a few queries, for the chosen methods
   (each at its best swept λ, K-FAC also at the untuned 1e-8), against removing a random 2% / 10%.
6. Print the tables, write ``results.json``, ``table.md`` and plotly figures (HTML + PNG) to ``--out``.

Retrained models are cached under ``--cache`` (default ``artifacts/bench-digits/<preset>``); rerunning after an
interruption resumes. ``--quick`` is a ~10–15 minute single-thread setting; the default (full) setting takes
about 90 minutes with ``--workers 2`` on 2 CPU cores. ``diffinfluence evaluate --data FOLDER`` runs the same
protocol on any image folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from diffinfluence_widgets.data import load_digits
from diffinfluence_widgets.diffusion import tiny_unet_config
from diffinfluence_widgets.diffusion.train import TrainConfig
from diffinfluence_widgets.evaluation import EvaluationSettings, evaluate, tables, write_report

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Digits:
    """The data, architecture and training recipe (the protocol's sizes are ``EvaluationSettings``)."""

    size: int = 8
    num_train: int = 512
    unet_channels: tuple[int, int] = (8, 16)
    train_steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    ema_decay: float = 0.995

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.train_steps, batch_size=self.batch_size, lr=self.lr, warmup=50,
                           ema_decay=self.ema_decay, checkpoint_every=max(50, self.train_steps // 4))

    def unet_config(self) -> dict:
        return dict(tiny_unet_config(self.size), block_out_channels=tuple(self.unet_channels),
                    norm_num_groups=min(4, self.unet_channels[0]))


def override(obj, field: str, value: str):
    """``obj`` with ``field`` set from a command-line string (tuples as ``1,2``; nested ``attribution.x``)."""
    head, _, rest = field.partition(".")
    cur = getattr(obj, head)
    if rest:
        return dataclasses.replace(obj, **{head: override(cur, rest, value)})
    if isinstance(cur, tuple):
        conv = type(cur[0]) if cur else float
        val = tuple(conv(x) for x in value.split(",")) if value else ()
    elif cur is None:  # an optional number (e.g. query_sample_seed)
        val = None if value.lower() == "none" else (int(value) if value.lstrip("-").isdigit() else float(value))
    else:
        val = type(cur)(value)
    return dataclasses.replace(obj, **{head: val})


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the ~10-15 minute single-thread setting")
    ap.add_argument("--workers", type=int, default=None, help="retraining processes (default: preset's)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    ap.add_argument("--cache", type=Path, default=None, help="retraining cache folder")
    ap.add_argument("--out", type=Path, default=None, help="where tables and figures go")
    ap.add_argument("--clip", type=Path, default=None,
                    help="folder of a locally stored CLIP model (transformers format): adds a CLIP-similarity row")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a setting of Digits or EvaluationSettings, e.g. --set num_subsets=20, "
                         "--set attribution.trak_dim=2048 (repeatable; tuples as 1,2)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    preset = "quick" if args.quick else "full"
    data = Digits(num_train=160, train_steps=400) if args.quick else Digits()
    s = EvaluationSettings.quick() if args.quick else EvaluationSettings.full()
    for kv in args.set:
        k, _, v = kv.partition("=")
        target = data if k.split(".")[0] in {f.name for f in dataclasses.fields(data)} else s
        if k.split(".")[0] not in {f.name for f in dataclasses.fields(target)}:
            ap.error(f"unknown setting {k!r}")
        if target is data:
            data = override(data, k, v)
        else:
            s = override(s, k, v)
    if args.workers is not None:
        s = dataclasses.replace(s, num_workers=args.workers)
    cache_dir = args.cache or ROOT / "artifacts" / "bench-digits" / preset
    out = args.out or ROOT / "bench" / "results" / f"digits-{preset}"

    extra = {}
    if args.clip is not None:
        from diffinfluence_widgets.evaluation.baselines import clip_image_encoder, feature_similarity

        encoder = clip_image_encoder(args.clip)
        extra["CLIP"] = lambda q, train: feature_similarity(encoder, q, train, name="clip").matrix
    train = load_digits(size=data.size, split="train", limit=data.num_train)
    ev = evaluate(data.unet_config(), train, data.train_config(), cache_dir, settings=s, extra_scores=extra)
    cmd = "python bench/digits_benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = write_report(ev, out, command=cmd, extra={"preset": preset, "digits": dataclasses.asdict(data)},
                          log=lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True))
    print("\n" + tables(ev) + "\n")
    print(f"timings (s): {ev.timings}\nfigures: {result['figures']}")
    return result


if __name__ == "__main__":
    main()
