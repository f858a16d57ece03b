"""``diffinfluence``: the command line.

    diffinfluence demo               build (or reuse) the digits demo and serve the explorer with Voila
    diffinfluence demo --headless    build, write a static report (HTML + PNG + CSV/JSON) and exit
    diffinfluence train              step 1 only: train (or reuse) the demo model
    diffinfluence build              steps 1-3: model, curvature, projected-gradient index
    diffinfluence serve              serve the explorer on an existing (or new) cache
    diffinfluence evaluate           LDS (retraining on random subsets) of the demo's attributions

Every command takes ``--config {demo,tiny}``, ``--cache-dir``, ``--device`` and ``--threads``.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# The package's modules (torch, numpy) and Pillow are imported inside the commands, on purpose: --threads sets OMP_NUM_THREADS,
# which must happen before torch (and its OpenMP runtime) is loaded; `diffinfluence --help` stays fast as well.

__all__ = ["main", "build_parser"]

DEFAULT_PORT = 8866


def _default_threads() -> int:
    """``$DIFFINFLUENCE_THREADS`` when set; else the cores idle right now (CPU count minus the 1-minute load
    average, rounded), at least 1 and at most 4. Several OpenMP threads competing with other busy processes for few
    cores are many times slower than one (measured: 2 threads on a busy 2-core machine, 5 s per training step of the
    demo; 1 thread, 0.2 s)."""
    env = os.environ.get("DIFFINFLUENCE_THREADS", "").strip()
    if env:
        try:
            return int(env)
        except ValueError:
            raise SystemExit(f"diffinfluence: DIFFINFLUENCE_THREADS must be an integer, got {env!r}") from None
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        load = 0.0
    return max(1, min(4, cores, int(cores - load + 0.5)))


def _pool_size(text: str):
    """``--pool-size``: ``auto`` or an integer ≥ 0."""
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an integer ≥ 0, got {text!r}")
    return n


# ---------------------------------------------------------------------------------------------- parser
#: defaults of the options the demo's evaluation shares with --data (they are None in the parser)
_DEMO_DEFAULTS = {"seeds": 1, "num_queries": 4, "methods": "ekfac,kfac,trak", "measure_draws": 128, "workers": 1}


def _add_data_arguments(e: argparse.ArgumentParser) -> None:
    """The ``--data`` options of ``diffinfluence evaluate``."""
    g = e.add_argument_group("your own data (--data): the digits benchmark's protocol on an image folder")
    g.add_argument("--data", type=Path, default=None, metavar="FOLDER",
                   help="an image folder (png/jpg/bmp/webp, recursively; one sub-folder per class gives labels): "
                        "evaluate every method on it instead of the demo")
    g.add_argument("--image-size", type=int, default=16, help="resize images to this square size (default: "
                                                               "%(default)s)")
    g.add_argument("--channels", type=int, choices=(1, 3), default=None, help="1 grey, 3 RGB (default: from files)")
    g.add_argument("--preset", choices=("quick", "full"), default="quick",
                   help="protocol sizes: 'quick' (M=12, K=2, 64 queries) or 'full' (M=40, K=3, 48 queries); "
                        "the size flags override them (default: %(default)s)")
    g.add_argument("--unet-channels", default="8,16", help="UNet block widths (default: %(default)s)")
    g.add_argument("--train-steps", type=int, default=400, help="steps per (re)trained model (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=64, help="training batch size (default: %(default)s)")
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: %(default)s)")
    g.add_argument("--ema-decay", type=float, default=0.995, help="EMA decay (default: %(default)s)")
    g.add_argument("--fraction", type=float, default=None, help="share of the training set each subset keeps")
    g.add_argument("--grad-draws", type=int, default=None,
                   help="(t, ε) draws per per-example gradient, both sides (the 2026-11 runs: 32)")
    g.add_argument("--query-draws", type=int, default=None, help="(t, ε) draws per query gradient (default: 512)")
    g.add_argument("--train-draws", type=int, default=None,
                   help="(t, ε) draws per training gradient (default: 128)")
    g.add_argument("--ensemble", type=int, default=None,
                   help="full-data models (seeds 0…E-1) the recommended default's scores are averaged over "
                        "(default: 3; 1 = one model)")
    g.add_argument("--curvature-draws", type=int, default=None, help="(t, ε) draws per image in the curvature")
    g.add_argument("--trak-dim", type=int, default=None, help="TRAK projection dimension")
    g.add_argument("--cf-queries", type=int, default=None, help="queries of the counterfactual retraining (0: skip)")
    g.add_argument("--cf-fractions", default=None, help="comma-separated shares removed per query (default: "
                                                         "0.02,0.1)")
    g.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples (default: 1000)")
    g.add_argument("--query-sample-seed", type=int, default=None,
                   help="seed of the generated queries (default: 1000): another value evaluates a fresh query set "
                        "on the same retrained models, e.g. a validation set for choosing λ")


def build_parser() -> argparse.ArgumentParser:
    from .demo_names import CACHE_ENV, CONFIG_NAMES  # no torch: parsing and serving stay light

    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="diffinfluence", formatter_class=fmt,
        description="Influence functions for diffusion models (K-FAC / EK-FAC, Mlodozeniec et al., ICLR 2025), "
                    "explored in notebook widgets.",
        epilog="Start with `diffinfluence demo` (or `diffinfluence demo --config tiny` for a 30-second build).\n"
               "Sign convention: a positive score means removing the training image is predicted to increase "
               "the query's measurement (for the loss: a proponent).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("demo build")
    g.add_argument("--config", choices=sorted(CONFIG_NAMES), default="demo",
                   help="'demo': 16×16 digits, a few CPU minutes to build; 'tiny': 8×8 digits, seconds "
                        "(default: %(default)s)")
    g.add_argument("--cache-dir", type=Path, default=None,
                   help=f"cache folder of this config (default: ${CACHE_ENV}/<config> or "
                        "./diffinfluence-cache/<config>); a second run reuses it")
    g.add_argument("--rebuild", action="store_true",
                   help="delete the demo's files in the cache folder (those its manifest lists; nothing else) and "
                        "build from scratch (also the way out of a cache built for another config); a folder "
                        "that is not a demo cache is never deleted")
    g.add_argument("--device", default=None, help="'cpu', 'cuda', 'cuda:1' … (default: CUDA when available)")
    g.add_argument("--threads", type=int, default=_default_threads(),
                   help="torch CPU threads (default: $DIFFINFLUENCE_THREADS, else the idle cores now, 1 to 4: "
                        "%(default)s; more threads than idle cores is many times slower)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")

    serve = argparse.ArgumentParser(add_help=False)
    s = serve.add_argument_group("server")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help="Voila port on 127.0.0.1 (default: %(default)s)")
    s.add_argument("--exit-after", type=float, default=None, metavar="SECONDS",
                   help="stop the server after this many seconds (smoke tests); default: run until Ctrl-C")
    s.add_argument("--cull-idle", type=float, default=60.0, metavar="SECONDS",
                   help="shut down a kernel whose page was closed or reloaded after this many idle seconds "
                        "(default: %(default)s)")
    s.add_argument("--pool-size", type=_pool_size, default="auto",
                   help="kernels kept preheated (the app already run) so a page opens at once; 0 starts each "
                        "page's kernel on demand (a few seconds more, one thin kernel less: ~0.1 GB; the backend "
                        "itself runs once, in its own process); 'auto': 1 when 1.5 GB of memory are available "
                        "(cgroup limits included), else 0 (default: %(default)s)")

    d = sub.add_parser("demo", parents=[common, serve], formatter_class=fmt,
                       help="build (or reuse) the digits demo and serve the explorer (or --headless: write a report)",
                       description="Train the small digits model, generate queries, fit the EK-FAC curvature, "
                                   "project the training gradients and build the index (each step cached and "
                                   "reused), then serve the explorer with Voila on 127.0.0.1 and print its URL.")
    d.add_argument("--headless", action="store_true",
                   help="do not serve: write a static report (report.html, report.png, per-query CSV/JSON/PNG "
                        "cards) and exit")
    d.add_argument("--report-dir", type=Path, default=None,
                   help="where --headless writes the report (default: <cache-dir>/report)")
    d.add_argument("--num-queries", type=int, default=4, help="queries in the --headless report (default: 4)")
    d.add_argument("--k", type=int, default=8, help="proponents / opponents per query in the report (default: 8)")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", parents=[common], formatter_class=fmt, help="train (or reuse) the demo model",
                       description="Step 1 of the demo: train the UNet on the digits (EMA weights, resumable "
                                   "from a checkpoint) and save it with diffusers' save_pretrained into "
                                   "<cache-dir>/model.")
    t.set_defaults(func=cmd_train)

    b = sub.add_parser("build", parents=[common], formatter_class=fmt,
                       help="build (or reuse) model, curvature and projected-gradient index",
                       description="Steps 1-3 of the demo without serving: model, EK-FAC curvature, "
                                   "projected-gradient store + FAISS index + generated queries.")
    b.add_argument("--until", choices=("train", "curvature", "index"), default="index",
                   help="stop after this step (default: %(default)s)")
    b.set_defaults(func=cmd_build)

    sv = sub.add_parser("serve", parents=[common, serve], formatter_class=fmt,
                        help="serve the explorer with Voila on 127.0.0.1",
                        description="Serve the explorer app (a one-cell notebook) with Voila. Builds the demo "
                                    "first when the cache is missing.")
    sv.set_defaults(func=cmd_serve)

    e = sub.add_parser("evaluate", parents=[common], formatter_class=fmt,
                       help="linear datamodelling score (LDS) of the demo's attributions",
                       description="Retrain the demo model on random halves of the training set (resumable "
                                   "cache), measure the held-out queries' loss under each retrained model, and "
                                   "report the LDS (Spearman between predicted and actual change, mean ± "
                                   "standard error over queries) of each method. Retraining dominates the time: "
                                   "subsets × seeds trainings of the config's model.")
    e.add_argument("--num-subsets", type=int, default=None,
                   help="random subsets M (default: 8 tiny, 16 demo; with --data: the preset's)")
    e.add_argument("--seeds", type=int, default=None, help="training seeds per subset K (default: 1; ≥ 2 adds the "
                                                            "exact-retraining oracle; with --data: the preset's)")
    e.add_argument("--num-queries", type=int, default=None, help="queries (default: 4 held-out; with --data: the "
                                                                  "preset's generated queries)")
    e.add_argument("--methods", default=None,
                   help="comma-separated methods (default: ekfac,kfac,trak; with --data: every method of the preset)")
    e.add_argument("--measure-draws", type=int, default=None,
                   help="(t, ε) draws when measuring the retrained models (default: 128; with --data: the preset's)")
    e.add_argument("--workers", type=int, default=None, help="retraining processes (default: 1; with --data: the "
                                                              "preset's)")
    e.add_argument("--out", type=Path, default=None, help="results folder (default: <cache-dir>/evaluation, "
                                                           "with --data <cache-dir>/report)")
    _add_data_arguments(e)
    e.set_defaults(func=cmd_evaluate)
    return p


# ---------------------------------------------------------------------------------------------- helpers
def _threads(args) -> int:
    if args.threads < 1:
        raise SystemExit(f"diffinfluence: --threads must be a positive integer, got {args.threads}")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    return args.threads


def _build(args, until: str = "index", shared: bool = False):
    from .demo import build_demo

    return build_demo(args.config, args.cache_dir, device=args.device, progress=not args.quiet,
                      threads=_threads(args), rebuild=args.rebuild, until=until, shared=shared)


def threads_text(n: int) -> str:
    return f"{n} thread" if n == 1 else f"{n} threads"


def _summary(art) -> str:
    info = art.info
    parts = [f"{k}: {'reused' if v['reused'] else 'built'} in {v['seconds']:.1f} s" for k, v in info["steps"].items()]
    return (f"config {info['config']} · cache {info['cache_dir']} · {threads_text(info['threads'])} · device "
            f"{info['device']}\n  " + "\n  ".join(parts) + f"\n  total {info['total_seconds']:.1f} s")


# ---------------------------------------------------------------------------------------------- commands
def _join_ranks(args) -> bool:
    """Under torchrun: join the process group (gloo on CPU, NCCL on CUDA); True on the rank that reports."""
    _threads(args)  # OMP_NUM_THREADS before torch loads
    from . import distributed as dist_utils

    dist_utils.init_from_env(args.device)
    if dist_utils.rank_and_world()[0] != 0:
        args.rebuild = False  # rank 0 alone may clear the cache
        return False
    return True


def cmd_train(args) -> int:
    # under torchrun the ranks train data-parallel (diffusion.train: one gradient all-reduce per step)
    lead = _join_ranks(args)
    art = _build(args, "train", shared=True)
    if not lead:
        return 0
    print(_summary(art))
    print(f"model: {art.cache_dir / 'model'} (fingerprint {art.model.fingerprint()})")
    return 0


def cmd_build(args) -> int:
    # under torchrun: data-parallel training, the curvature fit and the store shards split over the ranks
    lead = _join_ranks(args)
    art = _build(args, args.until, shared=True)
    if not lead:
        return 0
    print(_summary(art))
    if art.backend is not None:
        b = art.backend
        print(f"index: {len(b.train_ids)} training images · {len(b.queries())} queries · methods {b.methods}")
    return 0


def cmd_demo(args) -> int:
    if not args.headless:
        return _serve_demo(args)
    art = _build(args, "index")
    print(_summary(art))
    out = args.report_dir or (art.cache_dir / "report")
    paths = write_report(art, out, num_queries=args.num_queries, k=args.k)
    print(f"report: {paths['html']}")
    print(f"        {paths['png']}")
    return 0


def cmd_serve(args) -> int:
    return _serve_demo(args)


def _serve_demo(args) -> int:
    """Check the port, make sure the cache is complete (building it in a child process when it is not), then
    serve. This process never loads the backend: only Voila's kernels do."""
    from .demo_names import check_config_name, default_cache_dir  # never .demo here: it imports torch
    from .serving import ServeError, check_port, stop_process_tree, stop_signals

    from .serving import auto_pool_size

    threads = _threads(args)
    args.pool_auto = args.pool_size == "auto"
    if args.pool_auto:
        args.pool_size = auto_pool_size()
    if not args.cull_idle > 0:
        raise SystemExit(f"diffinfluence: --cull-idle must be positive seconds, got {args.cull_idle}")
    try:
        check_port(args.port)  # before anything slow
    except ServeError as e:
        print(f"diffinfluence: {e}", file=sys.stderr)
        return 2
    name = check_config_name(args.config)
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir(name)
    # the check needs torch (the settings digest) and a build needs everything: both run in a child process
    cmd = [sys.executable, "-m", "diffinfluence_widgets.serving", name, str(cache_dir), "--threads", str(threads)]
    cmd += (["--rebuild"] if args.rebuild else []) + (["--quiet"] if args.quiet else [])
    cmd += ["--device", args.device] if args.device else []
    child = subprocess.Popen(cmd, start_new_session=True)
    code = None
    with stop_signals():
        try:
            code = child.wait()
        finally:
            if child.poll() is None:
                stop_process_tree(child)
    if code is None:
        return 130
    if code != 0:
        return code
    return _serve(args, name, cache_dir)


def _serve(args, config: str, cache_dir: Path) -> int:
    from .app import write_app_notebook
    from .serving import BackendProcess, ServeError, VoilaServer, stop_signals

    app_dir = Path(cache_dir) / "app"
    nb = write_app_notebook(app_dir / "explorer.ipynb", config=config, cache_dir=str(Path(cache_dir).resolve()),
                            threads=args.threads)
    # one backend process for every page: the kernels connect to it (address and key in their environment)
    backend = BackendProcess(config, Path(cache_dir).resolve(), threads=args.threads, verbose=not args.quiet)
    spare = "preheating the app" if args.pool_size else "no preheated kernel"
    if getattr(args, "pool_auto", False) and not args.pool_size:
        spare += ": less than 1.5 GB of memory available (--pool-size auto)"
    print(f"loading the influence backend and starting Voila on http://127.0.0.1:{args.port}/ ({spare}) …",
          flush=True)
    stopped = True
    server = None
    with stop_signals():
        try:
            backend.start()
            server = VoilaServer(nb, args.port, app_dir / "jupyter-config",
                                 env={"OMP_NUM_THREADS": "1", **backend.env}, cull_idle=args.cull_idle,
                                 pool_size=args.pool_size, verbose=not args.quiet)
            server.start()
            backend.wait_ready()
            server.wait_ready()
            print(f"\n  The explorer is ready: {server.url}\n"
                  f"  (the token in the URL is this server's password; Ctrl-C to stop)\n"
                  f"  On a remote machine: ssh -L {args.port}:127.0.0.1:{args.port} <user>@<host>, then open "
                  "the URL above locally.\n", flush=True)
            deadline = None if args.exit_after is None else time.monotonic() + args.exit_after
            # until Voila exits, the backend process dies (then everything stops: it is not restarted) or time is up
            while server.proc.poll() is None and backend.alive():
                if deadline is not None and time.monotonic() >= deadline:
                    break
                time.sleep(0.2)
            if not backend.alive():
                print(f"diffinfluence: {backend.problem()}; stopping the server", file=sys.stderr, flush=True)
                stopped = False
            else:
                stopped = server.proc.poll() is None or server.proc.returncode in (0, -signal.SIGTERM)
        except ServeError as e:
            print(f"diffinfluence: {e}", file=sys.stderr)
            stopped = False
        finally:
            if server is not None:
                server.stop()
            backend.stop()
    return 0 if stopped else 1


def write_report(art, out: Path, *, num_queries: int = 4, k: int = 8) -> dict:
    """A static report of the demo: for a few queries (generated first, then held-out) the top-k proponents and
    opponents at the default settings (EK-FAC, loss, λ = 1e-8), as HTML / PNG cards plus CSV / JSON; an index
    ``report.html`` and a stacked ``report.png``."""
    from PIL import Image

    from ._io import atomic_write, atomic_write_text
    from .backend import SIGN_CONVENTION
    from .session import AttributionSession

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    backend = art.backend
    session = AttributionSession(backend, threaded=False, k=int(k))
    queries = sorted(backend.queries(), key=lambda q: (q.kind != "generated", q.id))[: max(1, int(num_queries))]
    sections, cards = [], []
    for q in queries:
        session.update(query_id=q.id)
        r = session.current_result()  # never a previous query's result after a failure
        stem = f"query{q.id}_{r.measurement}_{r.method}"
        for suffix in (".csv", ".json", ".html", ".png"):
            session.export(out / f"{stem}{suffix}")
        png = (out / f"{stem}.png").read_bytes()
        cards.append(Image.open(io.BytesIO(png)).convert("RGB"))
        sections.append(
            f"<section><h2>Query {q.id} — {html.escape(q.label or q.kind)}</h2>"
            f"<img alt='influence card for query {q.id}' src='data:image/png;base64,"
            f"{base64.b64encode(png).decode()}'><p>"
            + " · ".join(f"<a href='{stem}{s}'>{s[1:].upper()}</a>" for s in (".html", ".csv", ".json"))
            + "</p></section>")
    session.close()
    info = art.info
    steps = "".join(f"<li>{html.escape(name)}: {'reused' if v['reused'] else 'built'} in {v['seconds']:.1f} s</li>"
                    for name, v in info["steps"].items())
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>diffinfluence demo report</title></head>"
            "<body style='font-family:sans-serif;max-width:1000px;margin:auto'>"
            "<h1>Influence functions for diffusion models — digits demo</h1>"
            f"<p>Config <b>{html.escape(info['config'])}</b>, {len(backend.train_ids)} training images, method "
            f"EK-FAC (K-FAC-expand, GGN<sup>model</sup>), measurement: loss, damping 1e-8.</p>"
            f"<p><em>{html.escape(SIGN_CONVENTION)}</em></p><ul>{steps}</ul>{''.join(sections)}</body></html>")
    html_path, png_path = out / "report.html", out / "report.png"
    atomic_write_text(html_path, page)
    width = max(c.width for c in cards)
    sheet = Image.new("RGB", (width, sum(c.height for c in cards)), "white")
    y = 0
    for c in cards:
        sheet.paste(c, (0, y))
        y += c.height
    atomic_write(png_path, lambda tmp: sheet.save(tmp, format="PNG"))
    atomic_write_text(out / "demo_info.json", json.dumps(info, indent=1))
    return {"html": html_path, "png": png_path, "queries": [q.id for q in queries]}


def cmd_evaluate(args) -> int:
    from . import distributed as dist_utils
    from .evaluation.command import run_on_data
    from .evaluation.run import evaluate_methods, lds_table

    if args.data is not None:
        return run_on_data(args)
    for k, v in _DEMO_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    # under torchrun: rank 0 builds (or reuses) the demo alone, then every rank joins and shares the retraining
    if dist_utils.env_rank() != 0:
        args.rebuild = False
    art = dist_utils.rank0_first(lambda: _build(args, "index"), device=args.device)
    try:
        result, path = evaluate_methods(art, methods, num_queries=args.num_queries, num_subsets=args.num_subsets,
                                        seeds=args.seeds, workers=args.workers, measure_draws=args.measure_draws,
                                        device=args.device, out=args.out, progress=not args.quiet)
    except ValueError as e:
        raise SystemExit(f"diffinfluence evaluate: {e}") from None
    if dist_utils.env_rank() != 0:
        return 0  # every rank holds the same result; rank 0 reports
    print("\n" + lds_table(result))
    print(f"\nwrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .demo_names import DemoCacheError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DemoCacheError as e:
        print(f"diffinfluence: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
