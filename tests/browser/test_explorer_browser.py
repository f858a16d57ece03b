"""The explorer in headless Chromium against real Voila and JupyterLab servers on 127.0.0.1.

Every check of "what the gallery shows" compares the DOM (ids, exact scores, decoded thumbnails) with
``backend.search`` recomputed here in the test process on an identically built backend, at the settings that
Python itself wrote into the page (``.dinf-status``), and with the kernel's own direct ``backend.search``.
Screenshots go to ``test-artifacts/``.
"""
import json
import time
from html import unescape

import numpy as np
import pytest

import harness as H
from diffinfluence_widgets.widgets.controls import MEASUREMENT_HELP, METHOD_HELP

pytestmark = pytest.mark.browser

PAGE_SIZE = 12


def wait_settled(page, after: int, timeout=60_000) -> dict:
    """Wait for a result newer than ``after`` that is the latest (session idle) and fully rendered."""
    page.wait_for_function(
        """([sel, after]) => {
          const g = document.querySelector(sel);
          const st = document.querySelector('.dinf-status .dinf-status-text');
          if (!g || !st || g.dataset.state !== 'ready') return false;
          const rid = Number(g.dataset.renderedRequest);
          if (!(rid > after) || String(rid) !== g.dataset.requestId || Number(st.dataset.request) !== rid) return false;
          if (st.dataset.json && JSON.parse(st.dataset.json).refining) return false;  // its exact answer follows
          const imgs = [...g.querySelectorAll('.dinf-gallery-body img.dinf-thumb')];
          return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
        }""", arg=[H.GALLERY, after], timeout=timeout)
    return H.python_status(page)


def wait_slider_settled(page, after: int, timeout=60_000) -> dict:
    """After a drag: wait until Python's result is at the slider's final position (exponent in aria-valuetext, 2 decimals)."""
    page.wait_for_function(
        """() => {
          const h = document.querySelector('.dinf-explorer .dinf-damping .noUi-handle');
          const t = document.querySelector('.dinf-status .dinf-status-text');
          if (!h || !t || !t.dataset.json) return false;
          const d = Number(JSON.parse(t.dataset.json).damping);
          return Math.abs(Math.log10(d) - Number(h.getAttribute('aria-valuetext'))) < 6e-3;
        }""", timeout=timeout)
    return wait_settled(page, after, timeout)


# Notebook 7.6's own core bundle throws this on a blank notebook too (checked with a one-cell "1+1" notebook in the
# same isolated set-up): not ours, so it is the one error the Notebook 7 test lets through.
NOTEBOOK7_CORE_ERROR = "Cannot read properties of undefined (reading 'schema')"


def stable_box(page, locator, timeout=20.0):
    """The element's box once it stopped moving (a freshly shown plotly figure resizes to its container)."""
    t0, last = time.monotonic(), None
    while time.monotonic() - t0 < timeout:
        box = locator.bounding_box()
        if box is not None and box == last:
            return box
        last = box
        page.wait_for_timeout(250)
    return last


def no_errors(page, browser, allow: tuple[str, ...] = ()):
    errs = [e for e in H.real_errors(page, browser.blocked)
            if not any(a in e and "/static/notebook/notebook_core." in e for a in allow)]
    assert errs == [], errs
    assert all("127.0.0.1" not in u and "localhost" not in u for u in browser.blocked)


def open_voila(page, voila):
    t0 = time.monotonic()
    page.goto(voila.url + "/", wait_until="domcontentloaded", timeout=120_000)
    H.wait_explorer(page)
    print(f"voila: explorer visible after {time.monotonic() - t0:.1f}s")
    return wait_settled(page, 0)


def drag_and_check(page, backend, dx) -> dict:
    before = H.python_status(page)
    H.drag_damping(page, dx)
    st = wait_slider_settled(page, before["request_id"])
    assert float(st["damping"]) != float(before["damping"])
    H.check_gallery_matches_backend(page, backend, PAGE_SIZE)
    return st


# ----------------------------------------------------------------------------------------------- Voila
def test_voila_renders_and_damping_reorders_as_backend_says(page, voila, browser, backend):
    st = open_voila(page, voila)
    dom = H.gallery_dom(page)
    assert len(dom["proponents"]) == PAGE_SIZE and len(dom["opponents"]) == PAGE_SIZE
    assert all(t["w"] == 64 for t in dom["proponents"] + dom["opponents"])  # PNGs decoded from binary buffers
    assert "Positive score" in dom["sign"] and "Negative score" in dom["sign"]  # the sign, read once in words
    assert dom["proponents"][0]["label"].startswith("Proponent 1: training image")
    H.check_gallery_matches_backend(page, backend, PAGE_SIZE)
    H.screenshot(page, "voila-01-initial")
    rankings = {tuple(t["id"] for t in dom["proponents"])}
    # drag the log-scale damping slider both ways: each time the gallery equals backend.search at the new λ
    for dx in (-150, 90, 160):
        st = drag_and_check(page, backend, dx)
        rankings.add(tuple(t["id"] for t in H.gallery_dom(page)["proponents"]))
    assert len(rankings) > 1, "moving the damping should have reordered the gallery"
    # keyboard on the slider handle (live update as well)
    before = H.python_status(page)
    H.damping_handle(page).focus()
    page.keyboard.press("ArrowLeft")
    st = wait_slider_settled(page, before["request_id"])
    assert float(st["damping"]) < float(before["damping"])
    H.check_gallery_matches_backend(page, backend, PAGE_SIZE)
    H.screenshot(page, "voila-02-after-damping")
    no_errors(page, browser)


def test_voila_badge_then_refined_gallery_is_the_exact_answer(page, voila, browser, backend):
    """The gallery marks the answer; once refined it reads "exact ✓" and equals check_backend's exact answer, and
    the "Check exact" button reports a full overlap."""
    open_voila(page, voila)
    page.wait_for_function(
        """(sel) => {
          const b = document.querySelector(sel + ' .dinf-badge');
          const t = document.querySelector('.dinf-status .dinf-status-text');
          return b && b.dataset.exact === 'true' && t && t.dataset.json && JSON.parse(t.dataset.json).exact;
        }""", arg=H.GALLERY, timeout=120_000)
    st = wait_settled(page, 0)
    badge = page.locator(f"{H.GALLERY} .dinf-badge").first  # the main gallery (compare views have their own)
    assert badge.get_attribute("aria-label") == "answer status"
    assert badge.text_content().startswith("exact ✓") and st["badge"].startswith("exact ✓")
    H.check_gallery_matches_backend(page, backend, PAGE_SIZE)  # the refined answer = backend.refine, bit for bit
    exact = H.expected_search(backend, st)
    assert exact.exact and exact.exact_over == "all"
    # an approximate answer is marked as such until its refinement arrives: drag, then catch the first stage
    before = H.python_status(page)
    H.drag_damping(page, -120)
    st2 = wait_slider_settled(page, before["request_id"])
    assert st2["badge"].startswith("exact") or st2["badge"].startswith("approximate")
    page.get_by_role("button", name="Check exact").click()
    page.wait_for_function("() => { const c = document.querySelector('.dinf-check-text span');"
                           " return c && ['exact', 'differs'].includes(c.dataset.state); }", timeout=60_000)
    rep = json.loads(unescape(page.get_attribute(".dinf-check-text span", "data-json")))
    k = int(st2["k"])
    if st2["exact"]:
        assert rep["proponents"]["overlap"] == rep["opponents"]["overlap"] == k
    assert "of the exact top" in page.locator(".dinf-check-text").text_content()
    H.screenshot(page, "voila-badge-exact")
    no_errors(page, browser)


def test_voila_query_proxy_method_band_generate(page, voila, browser, backend):
    st = open_voila(page, voila)
    # choose another query in the picker
    target = [q.id for q in backend.queries()][3]
    page.click(f".dinf-picker .dinf-query[data-id='{target}']")
    st = wait_settled(page, st["request_id"])
    assert st["query_id"] == target
    assert page.get_attribute(".dinf-picker", "data-selected") == str(target)
    H.check_gallery_matches_backend(page, backend, PAGE_SIZE)
    # the measurement proxy
    page.select_option(".dinf-measurement select", label=MEASUREMENT_HELP["square_norm"])
    st = wait_settled(page, st["request_id"])
    assert st["measurement"] == "square_norm"
    H.check_gallery_matches_backend(page, backend, PAGE_SIZE)
    # the method: λ resets to the new family's default
    page.select_option(".dinf-method select", label=METHOD_HELP["trak"])
    st = wait_settled(page, st["request_id"])
    assert st["method"] == "trak" and float(st["damping"]) == backend.default_damping["trak"]
    H.check_gallery_matches_backend(page, backend, PAGE_SIZE)
    # a timestep band
    page.select_option(".dinf-band select", label="t ∈ [250, 500)")
    st = wait_settled(page, st["request_id"])
    assert st["band"] == [250, 500]
    H.check_gallery_matches_backend(page, backend, PAGE_SIZE)
    # generate a new query with a seed (the same sample is drawn here, from the same seed)
    new_id = backend.generate_query(42).id
    page.fill(".dinf-picker .dinf-seed", "42")
    page.click(".dinf-picker .dinf-generate-btn")
    st = wait_settled(page, st["request_id"], timeout=120_000)
    assert st["query_id"] == new_id
    page.wait_for_selector(f".dinf-picker .dinf-query[data-id='{new_id}'].dinf-selected img")
    H.check_gallery_matches_backend(page, backend, PAGE_SIZE)
    H.screenshot(page, "voila-03-query-proxy-method")
    no_errors(page, browser)


def test_voila_keyboard_navigation_and_pages(page, voila, browser, backend):
    st = open_voila(page, voila)
    first = page.locator(f"{H.GALLERY} .dinf-tile[data-role=proponent]").first
    first.focus()
    active = lambda: page.evaluate("() => { const a = document.activeElement;"
                                   " return a && a.dataset ? [a.dataset.role, Number(a.dataset.index)] : null; }")
    assert active() == ["proponent", 0]
    page.keyboard.press("ArrowRight")
    assert active() == ["proponent", 1]
    page.keyboard.press("End")
    assert active()[0] == "opponent"
    page.keyboard.press("Home")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("Enter")  # larger view + selection (round trip to Python: selected_text)
    tile_id = page.get_attribute(f"{H.GALLERY} .dinf-tile[data-role=proponent][data-index='1']", "data-id")
    page.wait_for_selector(f"{H.GALLERY} .dinf-zoom:not([hidden])")
    assert page.get_attribute(f"{H.GALLERY} .dinf-zoom", "data-id") == tile_id
    page.wait_for_function("(id) => document.querySelector('.dinf-gallery .dinf-zoom-text').textContent"
                           ".includes('proponent #2 · training image ' + id)", arg=tile_id)
    assert page.get_attribute(f"{H.GALLERY} .dinf-zoom-img", "alt").endswith(f"training image {tile_id}")
    H.screenshot(page, "voila-04-keyboard-zoom")
    page.keyboard.press("Escape")
    page.wait_for_selector(f"{H.GALLERY} .dinf-zoom", state="hidden")
    # next page with the keyboard: ranks 13..16 arrive from Python
    page.keyboard.press("PageDown")
    page.wait_for_function("(sel) => document.querySelector(sel).dataset.renderedPage === '1'", arg=H.GALLERY)
    dom = H.gallery_dom(page)
    assert [t["rank"] for t in dom["proponents"]] == [13, 14, 15, 16]
    H.check_gallery_matches_backend(page, backend, PAGE_SIZE)
    assert active() is not None and active()[0] == "proponent"  # focus stays in the gallery
    page.keyboard.press("PageUp")
    page.wait_for_function("(sel) => document.querySelector(sel).dataset.renderedPage === '0'", arg=H.GALLERY)
    no_errors(page, browser)


def test_voila_plots_map_selection_compare(page, voila, browser, backend):
    st = open_voila(page, voila)
    page.wait_for_selector(".dinf-plot-dist .js-plotly-plot .bars path", state="attached")
    # rank stability across a damping sweep
    page.click(".dinf-tabs .lm-TabBar-tab:has-text('Damping sweep')")
    page.wait_for_selector(".dinf-plot-sweep .js-plotly-plot .scatterlayer .trace", state="visible", timeout=90_000)
    H.screenshot(page, "voila-05a-sweep", ".dinf-plot-sweep")
    page.click(".dinf-tabs .lm-TabBar-tab:has-text('Timestep bands')")
    page.wait_for_selector(".dinf-plot-bands .js-plotly-plot .bars path", state="attached", timeout=90_000)
    H.screenshot(page, "voila-05b-bands", ".dinf-plot-bands")
    # the 2-D map: click a highlighted proponent -> the gallery shows it (linked selection)
    page.click(".dinf-tabs .lm-TabBar-tab:has-text('Gradient map')")
    # traces: one per class, then the top-k proponents, the top-k opponents and the selected image (last)
    pts = ".dinf-plot-map .js-plotly-plot .scatterlayer .trace:nth-last-of-type(3) path.point"
    page.wait_for_selector(pts, state="visible", timeout=90_000)
    page.locator(".dinf-plot-map .js-plotly-plot").scroll_into_view_if_needed()
    # pinned by the click (a hover only previews the image, unpinned)
    zoom_shown = ("() => { const z = document.querySelector('.dinf-gallery .dinf-zoom');"
                  " return z && !z.hidden && z.dataset.pinned === '1' && /training image \\d+/.test(z.textContent); }")
    for attempt in range(4):
        # plotly hit-tests through hover; a redraw between hover and click can swallow the click: retry
        box = stable_box(page, page.locator(pts).nth(attempt))
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(cx - 6, cy - 6)
        page.mouse.move(cx, cy, steps=3)
        try:
            page.wait_for_selector(".dinf-plot-map .hoverlayer .hovertext", state="attached", timeout=5_000)
        except Exception:
            print("no hover at", box, page.evaluate(
                "([x, y]) => { const e = document.elementFromPoint(x, y); return e && e.outerHTML.slice(0, 160); }",
                [cx, cy]))
            continue
        page.mouse.click(cx, cy)
        try:
            page.wait_for_function(zoom_shown, timeout=10_000)
            break
        except Exception:
            if attempt == 3:
                raise
    zid = int(page.get_attribute(f"{H.GALLERY} .dinf-zoom", "data-id"))
    assert zid in set(int(i) for i in backend.train_ids)
    page.wait_for_selector(".dinf-plot-map .js-plotly-plot .scatterlayer .trace:last-of-type path.point")
    assert "principal direction" in page.locator(".dinf-plot-map .xtitle").first.text_content()
    # hovering another point previews it in the gallery's larger view only while nothing is pinned: pinned here
    zoom_text = page.inner_text(f"{H.GALLERY} .dinf-zoom-text")
    assert f"training image {zid}" in zoom_text
    H.screenshot(page, "voila-05-map-selection", ".dinf-plot-map")
    # the query is marked (✕, the trace before the three highlight traces) and the mark moves with the query
    marker = ".dinf-plot-map .js-plotly-plot .scatterlayer .trace:nth-last-of-type(4) path.point"
    page.wait_for_selector(marker, state="attached", timeout=60_000)
    note = ".dinf-plot-map .dinf-map-query"
    first = page.get_attribute(note, "data-query"), page.get_attribute(note, "data-xy")
    assert int(first[0]) == H.python_status(page)["query_id"]
    assert np.allclose([float(v) for v in first[1].split(",")], backend.map_2d_query(int(first[0])), rtol=1e-4)
    where = page.get_attribute(marker, "transform")
    other = next(q.id for q in backend.queries() if q.id != int(first[0]))
    page.locator(f".dinf-picker .dinf-query[data-id='{other}']").scroll_into_view_if_needed()
    page.click(f".dinf-picker .dinf-query[data-id='{other}']")
    page.wait_for_function("([sel, q]) => { const e = document.querySelector(sel); "
                           "return e && e.dataset.query === q; }", arg=[note, str(other)], timeout=90_000)
    xy = [float(v) for v in page.get_attribute(note, "data-xy").split(",")]
    assert np.allclose(xy, backend.map_2d_query(other), rtol=1e-4) and page.get_attribute(note, "data-xy") != first[1]
    page.wait_for_selector(marker, state="attached")
    page.wait_for_function("([sel, t]) => { const e = document.querySelector(sel); return e && "
                           "e.getAttribute('transform') !== t; }", arg=[marker, where], timeout=30_000)
    # compare mode
    page.click(".dinf-tabs .lm-TabBar-tab:has-text('Compare')")
    page.wait_for_selector(".dinf-agreement [data-metric='spearman']", timeout=60_000)
    page.wait_for_selector(".dinf-compare-gallery-b .dinf-tile img")
    rho = float(page.inner_text(".dinf-agreement [data-metric='spearman']"))
    assert -1.0 <= rho <= 1.0
    page.locator(".dinf-compare").scroll_into_view_if_needed()
    H.screenshot(page, "voila-06-compare", ".dinf-compare")
    no_errors(page, browser)


# ----------------------------------------------------------------------------------------------- JupyterLab
KERNEL_IDLE = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!k && k.status === 'idle';
}"""


def test_lab_explorer_damping_proxy_method_keyboard(page, lab, browser, backend):
    t0 = time.monotonic()
    page.goto(f"{lab.url}/lab/tree/explorer.ipynb?reset", wait_until="domcontentloaded", timeout=120_000)
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", state="visible", timeout=120_000)
    page.wait_for_function(KERNEL_IDLE, timeout=120_000)
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    H.wait_explorer(page)
    print(f"lab: explorer visible after {time.monotonic() - t0:.1f}s")
    st = wait_settled(page, 0)
    H.check_gallery_matches_backend(page, backend, PAGE_SIZE)
    H.screenshot(page, "lab-01-initial")
    for dx in (-140, 200):
        st = drag_and_check(page, backend, dx)
    page.select_option(".dinf-measurement select", label=MEASUREMENT_HELP["elbo_simplified"])
    st = wait_settled(page, st["request_id"])
    assert st["measurement"] == "elbo_simplified"
    H.check_gallery_matches_backend(page, backend, PAGE_SIZE)
    page.select_option(".dinf-method select", label=METHOD_HELP["kfac"])
    st = wait_settled(page, st["request_id"])
    assert st["method"] == "kfac"
    H.check_gallery_matches_backend(page, backend, PAGE_SIZE)
    tile = page.locator(f"{H.GALLERY} .dinf-tile[data-role=proponent]").first
    tile.focus()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("Enter")
    page.wait_for_selector(f"{H.GALLERY} .dinf-zoom:not([hidden])")
    H.screenshot(page, "lab-02-after-changes")
    # ask the kernel directly: the session holds what the page shows
    page.evaluate("() => { const nb = window.jupyterapp.shell.currentWidget.content; nb.activeCellIndex = 2; }")
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-cell')")
    out = page.locator(".jp-OutputArea-output:has-text('PYCHECK')")
    out.wait_for(timeout=60_000)
    text = out.inner_text()
    assert f"PYCHECK {st['request_id']} " in text and " kfac " in text
    no_errors(page, browser)
    H.lab_delete_sessions(lab)


# ----------------------------------------------------------------------------------------------- Notebook 7
def test_notebook7_explorer_damping(page, notebook7, browser, backend):
    t0 = time.monotonic()
    page.goto(f"{notebook7.url}/notebooks/explorer.ipynb", wait_until="domcontentloaded", timeout=120_000)
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", state="visible", timeout=120_000)
    page.wait_for_function(KERNEL_IDLE, timeout=120_000)
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    H.wait_explorer(page)
    print(f"notebook 7: explorer visible after {time.monotonic() - t0:.1f}s")
    st = wait_settled(page, 0)
    H.check_gallery_matches_backend(page, backend, PAGE_SIZE)
    drag_and_check(page, backend, -120)
    H.screenshot(page, "notebook7-01-after-damping")
    no_errors(page, browser, allow=(NOTEBOOK7_CORE_ERROR,))
    H.lab_delete_sessions(notebook7)
