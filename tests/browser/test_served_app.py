"""The explorer as users get it: ``diffinfluence serve`` (token, preheated kernel, kernel culling) in headless Chromium.

- reloading the page five times leaves no kernel behind (each replaced page's kernel is shut down at once) and the
  server's memory flat; closing the page leaves only the preheated spare;
- the query is shown large beside its proponents and opponents, tiles carry ids and class labels;
- Journey-TRAK cannot be combined with a held-out query; gallery, dropdowns and zoom name the same settings;
- an export arrives as a browser download whose bytes are the result on screen;
- screenshots of the explorer at 1400×1000 and 1024×768 go to ``docs/``.
"""
from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import harness as H
from diffinfluence_widgets.serving import descendants, process_alive
from diffinfluence_widgets.widgets.controls import MEASUREMENT_HELP, METHOD_HELP, _label

pytestmark = pytest.mark.browser

CULL_IDLE = 45  # seconds a kernel without a page may idle before the server shuts it down (--cull-idle); shorter
#: values cull a page's kernel before a slow browser connects (its pool protection ends when the page takes it)
DOCS = H.REPO / "docs"


def _rss_mb(pid: int) -> float:
    try:
        return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
    except (OSError, IndexError):
        return 0.0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Served:
    def __init__(self, proc, url, log):
        self.proc, self.url, self.log = proc, url, log

    def processes(self) -> dict[str, list[int]]:
        kids = [p for p in descendants(self.proc.pid) if process_alive(p)]
        return {"voila": [p for p in kids if " -m voila " in _cmdline(p) + " "],
                "kernels": [p for p in kids if "ipykernel_launcher" in _cmdline(p)],
                "backend": [p for p in kids if "diffinfluence_widgets.remote" in _cmdline(p)]}


@pytest.fixture(scope="module")
def served(backend, tmp_path_factory):
    """``diffinfluence serve`` on the browser tests' demo cache (built by the ``backend`` fixture)."""
    log = tmp_path_factory.mktemp("served") / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    port = H.free_port()
    cmd = [sys.executable, "-m", "diffinfluence_widgets.cli", "serve", "--config", H.DEMO_CONFIG, "--cache-dir",
           str(H.DEMO_CACHE), "--threads", "1", "--port", str(port), "--cull-idle", str(CULL_IDLE),
           "--pool-size", "1"]  # the spare whatever memory this machine has free (auto)
    if H.BACKEND != "demo":
        pytest.skip("the served app is the digits demo (DINF_BROWSER_BACKEND=demo)")
    out = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and url is None:
        if proc.poll() is not None:
            raise RuntimeError(f"diffinfluence serve exited {proc.returncode}:\n{log.read_text()}")
        for line in log.read_text().splitlines():
            if "The explorer is ready:" in line:
                url = line.split("ready:", 1)[1].strip()
        time.sleep(0.3)
    if url is None:
        proc.send_signal(signal.SIGTERM)
        raise TimeoutError(log.read_text())
    s = Served(proc, url, log)
    try:
        yield s
    finally:
        kids = s.processes()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        left = [p for p in kids["voila"] + kids["kernels"] + kids["backend"] if process_alive(p)]
        for p in left:
            os.kill(p, signal.SIGKILL)
        assert left == [], f"survived SIGTERM of the CLI: {left}"


def wait_ready(page, after: int = 0, timeout=120_000) -> dict:
    """The gallery shows (decoded) the latest result, newer than ``after``, and Python's status line agrees."""
    page.wait_for_function(
        """([sel, after]) => {
          const g = document.querySelector(sel);
          const st = document.querySelector('.dinf-status .dinf-status-text');
          if (!g || !st || g.dataset.state !== 'ready') return false;
          const rid = Number(g.dataset.renderedRequest);
          if (!(rid > after) || String(rid) !== g.dataset.requestId || Number(st.dataset.request) !== rid) return false;
          const imgs = [...g.querySelectorAll('img.dinf-thumb, img.dinf-query-img')];
          return imgs.length > 1 && imgs.every(i => i.complete && i.naturalWidth > 0);
        }""", arg=[H.GALLERY, after], timeout=timeout)
    return H.python_status(page)


def wait_settled(page, after: int, timeout=180_000, **want) -> dict:
    """:func:`wait_ready` until the shown result has the settings ``want`` (e.g. ``query_id=…``): an answer for the
    previous settings (a refinement finished just before the click reached Python) may be shown first, correctly
    labelled, and is then replaced."""
    deadline = time.monotonic() + timeout / 1000
    while True:
        st = wait_ready(page, after, timeout=timeout)
        if all(st.get(k) == v for k, v in want.items()) or time.monotonic() > deadline:
            return st
        after = st["request_id"]


def open_app(page, served) -> tuple[dict, float]:
    t0 = time.monotonic()
    page.goto(served.url, wait_until="domcontentloaded", timeout=120_000)
    H.wait_explorer(page)
    st = wait_ready(page)
    return st, time.monotonic() - t0


def settings_named(page) -> dict:
    """The settings as the gallery caption, the dropdowns, the zoom and Python's status line name them."""
    return page.evaluate("""() => {
      const label = (c) => { const s = document.querySelector(`.dinf-explorer ${c} select`);
                             return s && s.selectedIndex >= 0 ? s.options[s.selectedIndex].textContent.replace(/\u00a0/g, ' ') : null; };
      const z = document.querySelector('.dinf-explorer .dinf-gallery .dinf-zoom');
      return {caption: document.querySelector('.dinf-explorer .dinf-gallery .dinf-caption').textContent,
              method: label('.dinf-method'), measurement: label('.dinf-measurement'),
              method_options: [...document.querySelectorAll('.dinf-explorer .dinf-method select option')].map(o => o.textContent.replace(/\u00a0/g, ' ')),
              zoom: z && !z.hidden ? z.querySelector('.dinf-zoom-text').textContent : null,
              query: document.querySelector('.dinf-explorer .dinf-gallery .dinf-query-text').textContent,
              note: document.querySelector('.dinf-explorer .dinf-controls-note').textContent,
              damping: document.querySelector('.dinf-explorer .dinf-damping-value').textContent};
    }""")


def assert_consistent(page, st: dict) -> dict:
    s = settings_named(page)
    assert f"query {st['query_id']} · {st['measurement']} · {st['method']} ·" in s["caption"], (s, st)
    assert s["method"] == _label(st["method"], METHOD_HELP), (s, st)
    assert s["measurement"] == _label(st["measurement"], MEASUREMENT_HELP), (s, st)
    assert s["query"].startswith(f"query {st['query_id']} ")
    # the λ next to the slider is the session's (not the slider's grid point) and the caption's
    lam = f"{float(st['damping']):.3g}"
    assert s["damping"] == lam and f"· damping {lam} ·" in s["caption"], (s, st)
    if s["zoom"] is not None:
        assert f"for query {st['query_id']}, {st['method']}," in s["zoom"], (s, st)
    return s


# ----------------------------------------------------------------------------------------------- tests
def test_reloads_free_their_kernels_and_memory(page, served, browser):
    st, first = open_app(page, served)
    procs = served.processes()
    assert len(procs["voila"]) == 1 and len(procs["backend"]) == 1  # one backend process for every page
    server, shared = procs["voila"][0], procs["backend"][0]
    rss0, shared0 = _rss_mb(server), _rss_mb(shared)
    times = []
    for _ in range(5):
        before = set(served.processes()["kernels"])
        t0 = time.monotonic()
        page.reload(wait_until="domcontentloaded")
        H.wait_explorer(page)
        wait_ready(page)
        times.append(time.monotonic() - t0)
        # the replaced page's kernel is shut down at once (the gallery's request on pagehide), long before the
        # culling (CULL_IDLE s idle) would: one of the kernels alive before the reload is gone
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and before <= set(served.processes()["kernels"]):
            time.sleep(0.5)
        assert not before <= set(served.processes()["kernels"]), "the reloaded page's kernel is still alive"
    # the five replaced pages' kernels are culled once idle without a page; the open page's and the preheated
    # spare remain
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and len(served.processes()["kernels"]) > 2:
        time.sleep(1)
    kernels = served.processes()["kernels"]
    rss1, shared1 = _rss_mb(server), _rss_mb(shared)
    total = rss1 + shared1 + sum(_rss_mb(k) for k in kernels)
    print(f"first page {first:.1f} s; reloads {', '.join(f'{t:.1f}' for t in times)} s; server RSS {rss0:.0f} → "
          f"{rss1:.0f} MB; backend {shared0:.0f} → {shared1:.0f} MB; {len(kernels)} kernels alive with the page "
          f"open; server + backend + kernels {total:.0f} MB")
    assert len(kernels) <= 2, f"kernels leaked: {kernels}"
    assert rss1 - rss0 <= 200, (rss0, rss1)
    assert shared1 - shared0 <= 200, (shared0, shared1)  # the pages share its prepared queries (a bounded LRU)
    # closing the page: its kernel goes as well; only the preheated spare stays
    page.goto("about:blank")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and len(served.processes()["kernels"]) > 1:
        time.sleep(1)
    assert len(served.processes()["kernels"]) <= 1, served.processes()
    assert not [e for e in H.real_errors(page, browser.blocked) if "403" not in e], page.errors


def test_query_labels_invalid_combination_and_consistent_settings(page, served, browser, backend):
    st, _ = open_app(page, served)
    # the query large, with its label; tiles with id and class label; one sign reading; the predicted change
    q = page.locator(f"{H.GALLERY} .dinf-query-img").first
    assert q.bounding_box()["width"] >= 140 and q.evaluate("i => i.naturalWidth") > 0
    tile_ids = page.locator(f"{H.GALLERY} .dinf-tile .dinf-tile-id").all_inner_texts()[:24]
    assert tile_ids and all(t.startswith("#") and " · " in t for t in tile_ids), tile_ids
    assert page.locator(f"{H.GALLERY} .dinf-sign").first.inner_text().count("helped the model make this") == 1
    assert "(1/N) Σ s" in page.locator(f"{H.GALLERY} .dinf-readout").first.inner_text()
    # plots draw through the app's own plotly widget (plotly's lab extension is left out of the served page)
    page.wait_for_selector(".dinf-plot-dist .js-plotly-plot .bars path", state="attached", timeout=90_000)
    assert_consistent(page, st)
    queries = backend.queries()
    gen = next(x.id for x in queries if x.kind == "generated")
    held = next(x.id for x in queries if x.kind == "heldout")
    # a generated query: Journey-TRAK is offered and works
    page.click(f".dinf-picker .dinf-query[data-id='{gen}']")
    st = wait_settled(page, st["request_id"], query_id=gen)
    assert METHOD_HELP["journey_trak"] in settings_named(page)["method_options"]
    page.select_option(".dinf-method select", label=METHOD_HELP["journey_trak"])
    st = wait_settled(page, st["request_id"], method="journey_trak")
    assert st["method"] == "journey_trak"
    tile = page.locator(f"{H.GALLERY} .dinf-tile[data-role=proponent]").first
    tile.click()  # pin the larger view
    page.wait_for_function("() => /for query \\d+, journey_trak,/.test("
                           "document.querySelector('.dinf-gallery .dinf-zoom-text').textContent)")
    assert_consistent(page, st)
    H.screenshot(page, "served-01-journey-trak")
    # a held-out query: Journey-TRAK cannot go with it — the method switches, the option is gone, the reason shown
    page.click(f".dinf-picker .dinf-query[data-id='{held}']")
    st = wait_settled(page, st["request_id"], query_id=held)
    assert st["query_id"] == held and st["method"] != "journey_trak"
    page.wait_for_function("() => document.querySelector('.dinf-zoom-text').textContent.includes('for query "
                           f"{held},')")
    s = assert_consistent(page, st)
    assert METHOD_HELP["journey_trak"] not in s["method_options"] and "Journey-TRAK" in s["note"]
    assert "generated" in s["note"]
    assert page.locator(".dinf-explorer .dinf-error:visible").count() == 0
    H.screenshot(page, "served-02-heldout")
    assert not H.real_errors(page, browser.blocked), page.errors


def test_export_is_a_browser_download_of_the_result_on_screen(page, served, browser, tmp_path):
    st, _ = open_app(page, served)
    page.click(".dinf-tabs .lm-TabBar-tab:has-text('Export')")
    btn = page.locator(".dinf-export .dinf-export-csv")
    btn.scroll_into_view_if_needed()
    with page.expect_download(timeout=60_000) as d:
        btn.click()
    dl = d.value
    assert dl.suggested_filename == f"query{st['query_id']}_{st['measurement']}_{st['method']}_lambda" \
                                   f"{float(st['damping']):.3g}.csv".replace("=", "-")
    path = tmp_path / dl.suggested_filename
    dl.save_as(str(path))
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert [int(r["train_id"]) for r in rows if r["role"] == "proponent"] == st["proponents"]
    assert {int(r["query_id"]) for r in rows} == {st["query_id"]}
    page.wait_for_selector(".dinf-export-link:not([hidden])")
    assert "sent to your browser" in page.inner_text(".dinf-export-message")
    assert not H.real_errors(page, browser.blocked), page.errors


@pytest.mark.parametrize("size", [(1400, 1000), (1024, 768)])
def test_screenshots_for_the_docs(page, served, size):
    page.set_viewport_size({"width": size[0], "height": size[1]})
    st, _ = open_app(page, served)
    tile = page.locator(f"{H.GALLERY} .dinf-tile[data-role=proponent]").nth(1)
    tile.hover()
    page.wait_for_selector(f"{H.GALLERY} .dinf-zoom:not([hidden])")
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / f"explorer-{size[0]}x{size[1]}.png"))
