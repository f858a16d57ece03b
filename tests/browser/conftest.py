"""Fixtures for the browser tests: one server of each kind and one headless Chromium per test session."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import harness as H  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if not Path(H.CHROMIUM).exists():
        skip = pytest.mark.skip(reason=f"no Chromium at {H.CHROMIUM} (apt-get install -y chromium)")
        for it in items:
            if "browser" in it.keywords:
                it.add_marker(skip)


@pytest.fixture(scope="session")
def backend():
    return H.make_backend()


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        ctx = H.launch_browser(pw, tmp_path_factory.mktemp("chromium-profile"))
        ctx.set_default_timeout(60_000)
        yield ctx
        ctx.close()


def _server(kind, tmp_path_factory, backend):
    # ``backend`` first: it builds the demo cache (when missing) that the kernel then only loads
    srv = H.start_server(kind, tmp_path_factory.mktemp(kind))
    try:
        yield srv
    finally:
        left = H.stop_server(srv)
        if left:
            print(f"[{kind}] killed leftover pids {left}")


@pytest.fixture(scope="module")
def voila(tmp_path_factory, backend):
    yield from _server("voila", tmp_path_factory, backend)


@pytest.fixture(scope="module")
def lab(tmp_path_factory, backend):
    yield from _server("lab", tmp_path_factory, backend)


@pytest.fixture(scope="module")
def notebook7(tmp_path_factory, backend):
    yield from _server("notebook", tmp_path_factory, backend)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    rep = (yield).get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture
def page(browser, request):
    pg = browser.new_page()
    H.watch_console(pg)
    yield pg
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        H.ARTIFACTS.mkdir(parents=True, exist_ok=True)
        try:
            pg.screenshot(path=str(H.ARTIFACTS / f"FAILED-{request.node.name}.png"), full_page=True)
            (H.ARTIFACTS / f"FAILED-{request.node.name}.html").write_text(pg.content())
            (H.ARTIFACTS / f"FAILED-{request.node.name}.console.txt").write_text("\n".join(pg.errors))
        except Exception as e:  # the page may be gone
            print(f"could not save failure evidence: {e}")
    pg.close()
