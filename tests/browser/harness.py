"""Drive the explorer in a real headless Chromium against a real Voila or JupyterLab server on 127.0.0.1.

Used by the browser tests (``tests/browser``) and by ``bench/widgets.py``. The servers run in their own process
session in a throwaway root with isolated Jupyter config / runtime / settings folders; they are stopped by PID.
Every request that is not to 127.0.0.1 is aborted in the browser (no network, no CDN).
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from html import unescape
from pathlib import Path

import nbformat

from diffinfluence_widgets.serving import stop_process_tree

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("DINF_TEST_ARTIFACTS", REPO / "test-artifacts"))

# The notebook under test. ``backend_code()`` builds the backend in the kernel; ``make_backend()`` builds the very
# same backend in the test process so the test can recompute ``backend.search`` itself. By default that is the real
# IndexBackend of the digits demo ("tiny" config, cached under .cache/); DINF_BROWSER_BACKEND=standin uses the
# deterministic test double instead.
BACKEND = os.environ.get("DINF_BROWSER_BACKEND", "demo")
DEMO_CONFIG = os.environ.get("DINF_BROWSER_DEMO_CONFIG", "tiny")
DEMO_CACHE = Path(os.environ.get("DINF_BROWSER_DEMO_CACHE", REPO / ".cache" / "dinf-widgets" / DEMO_CONFIG))
STANDIN_ARGS = dict(num_train=int(os.environ.get("DINF_BROWSER_STANDIN_TRAIN", 600)), num_heldout=6, num_generated=6,
                    seed=0)


def backend_code() -> str:
    if BACKEND == "standin":
        return ("from diffinfluence_widgets.widgets._standin import StandInBackend\n"
                f"backend = StandInBackend(**{STANDIN_ARGS!r})\n"
                "BACKEND_KIND = 'stand-in (test double)'\n")
    if BACKEND == "demo":
        return ("from diffinfluence_widgets.demo import load_or_build_demo\n"
                f"backend = load_or_build_demo({DEMO_CONFIG!r}, {str(DEMO_CACHE)!r}, threads=1, progress=False)\n"
                f"BACKEND_KIND = 'digits demo ({DEMO_CONFIG})'\n")
    raise ValueError(f"DINF_BROWSER_BACKEND must be 'demo' or 'standin', got {BACKEND!r}")


def make_backend():
    """The notebook's backend, built here (for the demo: from the same cache; builds it when missing)."""
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass
    ns: dict = {}
    exec(backend_code(), ns)
    return ns["backend"]


def write_notebook(path: Path, k: int = 16, page_size: int = 12, check_backend: bool = True) -> Path:
    setup = ("import os\n"
             "os.environ.setdefault('OMP_NUM_THREADS', '1')\n"
             "try:\n    import torch; torch.set_num_threads(1)\nexcept ImportError:\n    pass\n"
             + backend_code() +
             "from diffinfluence_widgets.widgets import InfluenceExplorer\n"
             f"explorer = InfluenceExplorer(backend, check_backend={check_backend}, k={k}, page_size={page_size})\n"
             "explorer")
    check = ("explorer.session.wait()\n"
             "r = explorer.session.result\n"
             "print('PYCHECK', r.request_id, r.query_id, r.measurement, r.method, repr(r.damping), "
             "[i.id for i in r.proponents])")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell("# Influence explorer (browser test)"),
                nbformat.v4.new_code_cell(setup), nbformat.v4.new_code_cell(check)]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


# ----------------------------------------------------------------------------------------------- servers
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false"},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


@dataclass
class Server:
    kind: str
    proc: subprocess.Popen
    port: int
    root: Path
    log: Path
    children: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp: Path) -> dict:
    env = dict(os.environ)
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                     ("JUPYTERLAB_SETTINGS_DIR", "lab-settings"), ("JUPYTERLAB_WORKSPACES_DIR", "lab-workspaces"),
                     ("IPYTHONDIR", "ipython")):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(tmp / sub)
    for rel, body in LAB_SETTINGS.items():
        f = tmp / "lab-settings" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(body))
    env.update(JUPYTER_PLATFORM_DIRS="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               ANYWIDGET_HMR="0")
    return env


def start_server(kind: str, tmp: Path, notebook: str = "explorer.ipynb", check_backend: bool = True) -> Server:
    root = tmp / "root"
    write_notebook(root / notebook, check_backend=check_backend)
    port = free_port()
    auth = ["--IdentityProvider.token=", "--ServerApp.disable_check_xsrf=True"]
    if kind == "lab":
        cmd = [str(BIN / "jupyter"), "lab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--port={port}",
               "--ServerApp.port_retries=0", f"--ServerApp.root_dir={root}", *auth,
               "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        if os.geteuid() == 0:
            cmd.append("--ServerApp.allow_root=True")
    elif kind == "notebook":
        cmd = [str(BIN / "jupyter"), "notebook", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--port={port}",
               "--ServerApp.port_retries=0", f"--ServerApp.root_dir={root}", *auth,
               "--JupyterNotebookApp.expose_app_in_browser=True"]
        if os.geteuid() == 0:
            cmd.append("--ServerApp.allow_root=True")
    elif kind == "voila":
        cmd = [str(BIN / "voila"), str(root / notebook), "--no-browser", "--Voila.ip=127.0.0.1", f"--port={port}",
               "--Voila.port_retries=0", "--show_tracebacks=True",
               # Notebook 7's lab extension cannot load inside Voila (module federation error): leave it out
               "--VoilaConfiguration.extension_denylist=['@jupyter-notebook/lab-extension']"]
    else:
        raise ValueError(f"kind must be 'lab', 'notebook' or 'voila', got {kind!r}")
    log = tmp / f"{kind}.log"
    proc = subprocess.Popen(cmd, cwd=root, env=_env(tmp), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    srv = Server(kind, proc, port, root, log)
    ready = f"{srv.url}/api/status" if kind in ("lab", "notebook") else f"{srv.url}/voila/templates/lab/static/voila.js"
    wait_http(ready, srv, timeout=120)
    return srv


def wait_http(url: str, srv: Server, timeout: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"{srv.kind} exited with {srv.proc.returncode}; log:\n{srv.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s; log:\n{srv.log.read_text()[-3000:]}")


def stop_server(srv: Server) -> list[int]:
    """SIGTERM the server by PID (it shuts its kernels down); SIGKILL any recorded child still alive (returned)."""
    return stop_process_tree(srv.proc)


def lab_delete_sessions(srv: Server) -> None:
    with urllib.request.urlopen(f"{srv.url}/api/sessions", timeout=10) as r:
        for s in json.load(r):
            urllib.request.urlopen(urllib.request.Request(f"{srv.url}/api/sessions/{s['id']}", method="DELETE"),
                                   timeout=30).close()


# ----------------------------------------------------------------------------------------------- browser
LOCAL = re.compile(r"^(https?|wss?)://(127\.0\.0\.1|localhost)[:/]")


def launch_browser(pw, profile: Path, viewport=(1400, 1000)):
    ctx = pw.chromium.launch_persistent_context(
        str(profile), executable_path=CHROMIUM, headless=True,
        args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"],
        viewport={"width": viewport[0], "height": viewport[1]})
    ctx.blocked = []

    def route(r):
        if LOCAL.match(r.request.url) or r.request.url.startswith(("data:", "blob:")):
            r.continue_()
        else:
            ctx.blocked.append(r.request.url)
            r.abort()
    ctx.route("**/*", route)
    return ctx


def watch_console(page) -> list[str]:
    """Collect console errors and uncaught page errors on ``page.errors``."""
    page.errors = []

    def on_console(msg):
        if msg.type == "error":
            page.errors.append(f"console: {msg.text} @ {msg.location.get('url', '')}")
    page.on("console", on_console)
    page.on("pageerror", lambda e: page.errors.append(f"pageerror: {e} | {(getattr(e, 'stack', '') or '')[:400]}"))
    return page.errors


def real_errors(page, blocked: list[str]) -> list[str]:
    """Console errors minus the failed loads of what we blocked on purpose (Voila's font CDN)."""
    out = []
    for e in page.errors:
        if "net::ERR_FAILED" in e and any(b.split("?")[0] in e for b in blocked):
            continue
        if "Failed to load resource: net::ERR_FAILED" in e and blocked:
            continue
        out.append(e)
    return out


# ----------------------------------------------------------------------------------------------- page helpers
GALLERY = ".dinf-explorer .dinf-gallery"


def wait_explorer(page, timeout=120_000) -> None:
    page.wait_for_selector(f"{GALLERY} .dinf-tile img.dinf-thumb", state="visible", timeout=timeout)
    wait_gallery_rendered(page, timeout=timeout)
    page.wait_for_selector(".dinf-explorer .dinf-picker .dinf-query img", state="visible", timeout=timeout)
    page.wait_for_selector(".dinf-explorer .dinf-damping .noUi-handle", state="visible", timeout=timeout)


def wait_gallery_rendered(page, after_request: int | None = None, timeout=60_000) -> int:
    """Wait until the gallery shows (decoded) a result newer than ``after_request`` and Python's status agrees."""
    after = -1 if after_request is None else int(after_request)
    page.wait_for_function(
        """([sel, after]) => {
          const g = document.querySelector(sel);
          if (!g || !g.dataset.renderedRequest) return false;
          const rid = Number(g.dataset.renderedRequest);
          if (rid <= after || g.dataset.renderedVersion === undefined) return false;
          const imgs = [...g.querySelectorAll('.dinf-gallery-body img.dinf-thumb')];
          if (!imgs.length || !imgs.every(i => i.complete && i.naturalWidth > 0)) return false;
          const st = document.querySelector('.dinf-status .dinf-status-text');
          return !!st && Number(st.dataset.request) === rid;
        }""", arg=[GALLERY, after], timeout=timeout)
    return int(page.get_attribute(GALLERY, "data-rendered-request"))


def gallery_dom(page) -> dict:
    """What the gallery shows: ids, exact scores (Python's repr), ranks, per role; plus image decode sizes."""
    return page.evaluate(
        """(sel) => {
          const g = document.querySelector(sel);
          const tiles = (role) => [...g.querySelectorAll(`.dinf-tile[data-role=${role}]`)].map(t => ({
            id: Number(t.dataset.id), score: t.dataset.scoreText, rank: Number(t.dataset.rank),
            label: t.getAttribute('aria-label'), w: t.querySelector('img').naturalWidth}));
          return {request: Number(g.dataset.renderedRequest), page: Number(g.dataset.renderedPage),
                  caption: g.querySelector('.dinf-caption').textContent,
                  sign: g.querySelector('.dinf-sign').textContent,
                  proponents: tiles('proponent'), opponents: tiles('opponent')};
        }""", GALLERY)


def python_status(page) -> dict:
    raw = page.get_attribute(".dinf-status .dinf-status-text", "data-json")
    return json.loads(unescape(raw))


def expected_search(backend, status: dict):
    """``backend.search`` at the status's settings, or ``backend.refine`` when the shown answer is the refined one."""
    band = tuple(status["band"]) if status["band"] else None
    p = backend.prepare(status["query_id"], status["measurement"], status["method"], band)
    if status.get("exact") and callable(getattr(backend, "refine", None)):
        return backend.refine(p, float(status["damping"]), int(status["k"]))
    route = status.get("route")
    return backend.search(p, float(status["damping"]), int(status["k"]), *((route,) if route else ()))


def check_gallery_matches_backend(page, backend, page_size: int = 12) -> dict:
    """The gallery's ids and scores are exactly ``backend.search`` (``backend.refine`` once refined) at the settings
    Python reports."""
    dom = gallery_dom(page)
    st = python_status(page)
    assert dom["request"] == st["request_id"]
    lo = dom["page"] * page_size
    # 1. exactly what the kernel's backend.search says at these settings (computed there directly, not through
    #    the session): same ids in the same order, bit-identical scores
    bs = st["backend_search"]
    for role, key in (("proponents", "proponent"), ("opponents", "opponent")):
        got = dom[role]
        assert [t["id"] for t in got] == bs[f"{key}_ids"][lo:lo + page_size], role
        assert [float(t["score"]) for t in got] == [float(v) for v in bs[f"{key}_scores"][lo:lo + page_size]], role
        assert all(t["w"] > 0 for t in got), f"{role}: undecoded thumbnails"
    # 2. an independent backend built in the test process agrees (float32 query gradients recomputed in another
    #    process: scores to 1e-5 relative; ids must match wherever the scores are not tied within that tolerance)
    exp = expected_search(backend, st)
    for role, ids, scores in (("proponents", exp.proponent_ids, exp.proponent_scores),
                              ("opponents", exp.opponent_ids, exp.opponent_scores)):
        got = dom[role]
        ref_scores = [float(v) for v in scores[lo:lo + page_size]]
        for t, ref in zip(got, ref_scores):
            assert abs(float(t["score"]) - ref) <= 1e-5 * max(abs(ref), 1e-30) + 1e-12, (role, t, ref)
        ref_ids = [int(i) for i in ids[lo:lo + page_size]]
        for n, (t, rid) in enumerate(zip(got, ref_ids)):
            if t["id"] != rid:
                others = [s_ for m, s_ in enumerate(ref_scores) if m != n]
                assert any(abs(ref_scores[n] - o) <= 1e-5 * abs(ref_scores[n]) for o in others), (role, n, t, rid)
    return {"dom": dom, "status": st}


def damping_handle(page):
    return page.locator(".dinf-explorer .dinf-damping .noUi-handle").first


def drag_damping(page, dx: float) -> None:
    h = damping_handle(page)
    h.scroll_into_view_if_needed()
    box = h.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + dx, y, steps=6)
    page.mouse.up()


def screenshot(page, name: str, selector: str | None = None) -> Path:
    """Save a screenshot under test-artifacts/ (of one element when ``selector`` is given: Voila and Lab scroll
    inside their own containers, so a "full page" shot is only the viewport)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    p = ARTIFACTS / f"{name}.png"
    if selector:
        page.locator(selector).first.screenshot(path=str(p))
    else:
        page.screenshot(path=str(p), full_page=True)
    return p
