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
import urllib.request
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


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .demo import CACHE_ENV, DEMO_CONFIGS

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
    g.add_argument("--config", choices=sorted(DEMO_CONFIGS), default="demo",
                   help="'demo': 16×16 digits, a few CPU minutes to build; 'tiny': 8×8 digits, seconds "
                        "(default: %(default)s)")
    g.add_argument("--cache-dir", type=Path, default=None,
                   help=f"cache folder of this config (default: ${CACHE_ENV}/<config> or "
                        "./diffinfluence-cache/<config>); a second run reuses it")
    g.add_argument("--rebuild", action="store_true",
                   help="delete the cache folder and build from scratch (also the way out of a cache built for "
                        "another config or other settings)")
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
    e.add_argument("--num-subsets", type=int, default=None, help="random subsets M (default: 8 tiny, 16 demo)")
    e.add_argument("--seeds", type=int, default=1, help="training seeds per subset K (default: %(default)s; ≥ 2 "
                                                         "adds the exact-retraining oracle)")
    e.add_argument("--num-queries", type=int, default=4, help="held-out queries (default: %(default)s)")
    e.add_argument("--methods", default="ekfac,kfac,trak",
                   help="comma-separated methods (default: %(default)s)")
    e.add_argument("--measure-draws", type=int, default=128,
                   help="(t, ε) draws when measuring the retrained models (default: %(default)s)")
    e.add_argument("--workers", type=int, default=1, help="retraining processes (default: %(default)s)")
    e.add_argument("--out", type=Path, default=None, help="results folder (default: <cache-dir>/evaluation)")
    e.set_defaults(func=cmd_evaluate)
    return p


# ---------------------------------------------------------------------------------------------- helpers
def _threads(args) -> int:
    if args.threads < 1:
        raise SystemExit(f"diffinfluence: --threads must be a positive integer, got {args.threads}")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    return args.threads


def _build(args, until: str = "index"):
    from .demo import build_demo

    return build_demo(args.config, args.cache_dir, device=args.device, progress=not args.quiet,
                      threads=_threads(args), rebuild=args.rebuild, until=until)


def _summary(art) -> str:
    info = art.info
    parts = [f"{k}: {'reused' if v['reused'] else 'built'} in {v['seconds']:.1f} s" for k, v in info["steps"].items()]
    return (f"config {info['config']} · cache {info['cache_dir']} · {info['threads']} threads · device "
            f"{info['device']}\n  " + "\n  ".join(parts) + f"\n  total {info['total_seconds']:.1f} s")


# ---------------------------------------------------------------------------------------------- commands
def cmd_train(args) -> int:
    art = _build(args, "train")
    print(_summary(art))
    print(f"model: {art.cache_dir / 'model'} (fingerprint {art.model.fingerprint()})")
    return 0


def cmd_build(args) -> int:
    art = _build(args, args.until)
    print(_summary(art))
    if art.backend is not None:
        b = art.backend
        print(f"index: {len(b.train_ids)} training images · {len(b.queries())} queries · methods {b.methods}")
    return 0


def cmd_demo(args) -> int:
    art = _build(args, "index")
    print(_summary(art))
    if args.headless:
        out = args.report_dir or (art.cache_dir / "report")
        paths = write_report(art, out, num_queries=args.num_queries, k=args.k)
        print(f"report: {paths['html']}")
        print(f"        {paths['png']}")
        return 0
    return _serve(args, art.config.name, art.cache_dir)


def cmd_serve(args) -> int:
    art = _build(args, "index")  # reuses the cache (seconds) or builds it; the app then only loads
    print(_summary(art))
    return _serve(args, art.config.name, art.cache_dir)


def _serve(args, config: str, cache_dir: Path) -> int:
    from .app import write_app_notebook

    nb = write_app_notebook(Path(cache_dir) / "app" / "explorer.ipynb", config=config,
                            cache_dir=str(Path(cache_dir).resolve()), threads=args.threads)
    url = f"http://127.0.0.1:{args.port}/"
    cmd = [sys.executable, "-m", "voila", str(nb), "--no-browser", "--Voila.ip=127.0.0.1", f"--port={args.port}",
           "--Voila.port_retries=0", "--show_tracebacks=True",
           # Notebook 7's lab extension cannot load inside Voila: leave it out
           "--VoilaConfiguration.extension_denylist=['@jupyter-notebook/lab-extension']"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    print(f"starting Voila on {url} …", flush=True)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                print(f"diffinfluence: Voila exited with code {proc.returncode} (is port {args.port} in use? "
                      "try --port)", file=sys.stderr)
                return proc.returncode or 1
            try:
                with urllib.request.urlopen(f"{url}voila/templates/lab/static/voila.js", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    print("diffinfluence: Voila did not come up within 120 s", file=sys.stderr)
                    return 1
                time.sleep(0.5)
        print(f"\n  The explorer is ready: {url}\n  (Ctrl-C to stop)\n", flush=True)
        if args.exit_after is not None:
            try:
                proc.wait(timeout=args.exit_after)
            except subprocess.TimeoutExpired:
                pass
        else:
            proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # Voila shuts its kernels down on SIGTERM
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return 0


def write_report(art, out: Path, *, num_queries: int = 4, k: int = 8) -> dict:
    """A static report of the demo: for a few queries (generated first, then held-out) the top-k proponents and
    opponents at the default settings (EK-FAC, loss, λ = 1e-8), as HTML / PNG cards plus CSV / JSON; an index
    ``report.html`` and a stacked ``report.png``."""
    from PIL import Image

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
        r = session.result
        if r is None:
            raise RuntimeError(f"no result for query {q.id}: {session.error}")
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
    tmp = html_path.with_name(f".tmp-{html_path.name}")
    tmp.write_text(page)
    os.replace(tmp, html_path)
    width = max(c.width for c in cards)
    sheet = Image.new("RGB", (width, sum(c.height for c in cards)), "white")
    y = 0
    for c in cards:
        sheet.paste(c, (0, y))
        y += c.height
    tmp = png_path.with_name(f".tmp-{png_path.name}")
    sheet.save(tmp, format="PNG")
    os.replace(tmp, png_path)
    (out / "demo_info.json").write_text(json.dumps(info, indent=1))
    return {"html": html_path, "png": png_path, "queries": [q.id for q in queries]}


def cmd_evaluate(args) -> int:
    from . import distributed as dist_utils
    from .evaluation.run import evaluate_methods, lds_table

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
    from .demo import DemoCacheError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DemoCacheError as e:
        print(f"diffinfluence: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
