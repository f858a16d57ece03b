"""``diffinfluence evaluate --data FOLDER``: the digits benchmark's protocol on any image folder.

The command line's evaluate subcommand (its ``--data`` options are defined in ``cli.py``, which imports no
package module before ``--threads`` is applied) calls :func:`run_on_data` when ``--data`` is given: it reads the folder
(:func:`~diffinfluence_widgets.data.from_image_folder`, resized to ``--image-size``), builds the UNet from
``--unet-channels`` and the training recipe from ``--train-steps`` / ``--batch-size`` / ``--lr`` / ``--ema-decay``,
takes the protocol's sizes from ``--preset`` (``quick`` or ``full``, :class:`.benchmark.EvaluationSettings`) and
any size flag given, runs :func:`.benchmark.evaluate` (resumable: rerun the same command after an interruption)
and writes the same tables, ``results.json`` and figures as ``bench/digits_benchmark.py``, with a two-way
bootstrap interval for every paired difference.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ..data import from_image_folder
from ..diffusion.model import tiny_unet_config
from ..diffusion.train import TrainConfig
from .attribution import METHODS
from .benchmark import DEFAULT_ROW, EvaluationSettings, evaluate
from .report import tables, write_report

__all__ = ["run_on_data", "METHOD_ALIASES"]

#: the command line's short method names (as the demo's backend spells them) -> :data:`.attribution.METHODS`
METHOD_ALIASES = {"kfac": "K-FAC", "ekfac": "EK-FAC", "kfac_loss": "K-FAC GGN^loss", "ekfac_loss": "EK-FAC GGN^loss",
                  "kfac_reduce": "K-FAC reduce", "kfac_reduce_loss": "K-FAC reduce GGN^loss", "trak": "TRAK",
                  "dtrak": "D-TRAK", "d_trak": "D-TRAK", "pixel": "pixel", "pixel_centred": "pixel (centred)"}
def _settings(args) -> EvaluationSettings:
    base = EvaluationSettings.quick() if args.preset == "quick" else EvaluationSettings.full()
    kw = {}
    for flag, field in (("num_subsets", "num_subsets"), ("seeds", "num_seeds"), ("num_queries", "num_queries"),
                        ("measure_draws", "target_draws"), ("workers", "num_workers"), ("fraction", "fraction"),
                        ("cf_queries", "cf_queries"), ("bootstrap", "bootstrap"), ("ensemble", "ensemble"),
                        ("query_sample_seed", "query_sample_seed")):
        if getattr(args, flag, None) is not None:
            kw[field] = getattr(args, flag)
    if args.cf_fractions:
        try:
            kw["cf_fractions"] = tuple(float(f) for f in args.cf_fractions.split(",") if f.strip())
        except ValueError:
            raise SystemExit(f"diffinfluence evaluate: --cf-fractions must be numbers like 0.02,0.1, got "
                             f"{args.cf_fractions!r}") from None
    att = {f: getattr(args, f, None) for f in ("grad_draws", "query_draws", "train_draws", "curvature_draws",
                                               "trak_dim") if getattr(args, f, None) is not None}
    if att:
        if "grad_draws" in att:  # both sides; a query / train flag given with it must agree (checked there)
            att.setdefault("query_draws", att["grad_draws"])
            att.setdefault("train_draws", att["grad_draws"])
        try:
            kw["attribution"] = dataclasses.replace(base.attribution, **att)
        except ValueError as e:
            raise SystemExit(f"diffinfluence evaluate: {e}") from None
    if args.methods:
        names = [METHOD_ALIASES.get(m.strip(), m.strip()) for m in args.methods.split(",") if m.strip()]
        bad = [m for m in names if m not in METHODS]
        if bad:
            raise SystemExit(f"diffinfluence evaluate: unknown methods {bad}; choose from "
                             f"{sorted(METHOD_ALIASES)} or {list(METHODS)}")
        fam = {f: tuple(n for n in names if METHODS[n].family == f) for f in ("kfac", "trak", "similarity")}
        kw.update(kfac_methods=fam["kfac"], trak_methods=fam["trak"], similarity_methods=fam["similarity"],
                  cf_methods=tuple(m for m in base.cf_methods if m.split(" (")[0] in (*names, DEFAULT_ROW)))
    try:
        return dataclasses.replace(base, **kw)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"diffinfluence evaluate: {e}") from None


def run_on_data(args) -> int:
    """``diffinfluence evaluate --data FOLDER ...``: evaluate, print the tables, write the report."""
    if args.rebuild:
        raise SystemExit("diffinfluence evaluate --data: the retraining cache is content-addressed (another folder, "
                         "model or recipe never reuses it); delete the --cache-dir folder yourself to start over")
    try:
        widths = tuple(int(c) for c in args.unet_channels.split(","))
        recipe = TrainConfig(steps=args.train_steps, batch_size=args.batch_size, lr=args.lr, warmup=50,
                             ema_decay=args.ema_decay, checkpoint_every=max(50, args.train_steps // 4))
    except (TypeError, ValueError) as e:
        raise SystemExit(f"diffinfluence evaluate: bad model or training flag: {e}") from None
    train = from_image_folder(args.data, size=args.image_size, channels=args.channels)
    unet = dict(tiny_unet_config(args.image_size, train.image_shape[0]), block_out_channels=widths,
                norm_num_groups=min(4, widths[0]))
    settings = _settings(args)
    cache = args.cache_dir or Path("diffinfluence-cache") / f"evaluate-{Path(args.data).resolve().name}"
    out = args.out or cache / "report"
    ev = evaluate(unet, train, recipe, cache, settings=settings, device=args.device, progress=not args.quiet)
    write_report(ev, out, command="diffinfluence evaluate " + " ".join(getattr(args, "argv", []) or []),
                 extra={"data": str(args.data), "image_size": args.image_size, "unet": unet,
                        "train_config": dataclasses.asdict(recipe)},
                 log=lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True))
    print("\n" + tables(ev) + f"\n\nwrote {out}/table.md, results.json and figures")
    return 0
