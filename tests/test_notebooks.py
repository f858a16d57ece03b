"""Every notebook in ``notebooks/`` runs top to bottom (small config: ``DIFFINFLUENCE_SMALL=1``).

This is the nbmake layer (Python errors in cells), done with nbclient so that the environment (small config,
one shared cache, one thread) is set here and every new notebook is picked up by the glob. The explorer's
JavaScript is covered by the browser tests.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_every_tutorial_is_here():
    names = {p.name for p in NOTEBOOKS}
    for want in ("01_quickstart.ipynb", "02_measurements_and_damping.ipynb", "03_evaluating_attributions.ipynb",
                 "04_your_own_model_and_data.ipynb", "explorer_app.ipynb"):
        assert want in names


@pytest.fixture(scope="module")
def notebook_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("nb-cache")
    env = {"DIFFINFLUENCE_SMALL": "1", "DIFFINFLUENCE_CACHE": str(cache), "DIFFINFLUENCE_THREADS": "1",
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits the test process's environment
    yield cache
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, notebook_env, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(str(path), as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError with the cell's traceback on failure
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    nbformat.write(nb, str(tmp_path / path.name))  # executed copy, for a look when debugging


def test_shipped_app_notebook_is_generated():
    """``notebooks/explorer_app.ipynb`` (Binder's Voila link) is exactly what ``diffinfluence serve`` writes with
    the defaults: regenerate it with ``python -c "from diffinfluence_widgets.app import write_app_notebook;
    write_app_notebook('notebooks/explorer_app.ipynb')"``."""
    import nbformat

    from diffinfluence_widgets.app import app_notebook

    shipped = nbformat.read(str(REPO / "notebooks" / "explorer_app.ipynb"), as_version=4)
    assert [c.source for c in shipped.cells] == [c.source for c in app_notebook().cells]


def test_notebooks_are_saved_without_outputs():
    import nbformat

    for p in NOTEBOOKS:
        nb = nbformat.read(str(p), as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{p.name} has outputs"


def test_app_kernel_gives_memory_back_after_each_request(monkeypatch):
    """The served app trims the heap after every request (busy or refining turning false), and only then."""
    import traitlets

    from diffinfluence_widgets import app

    calls = []
    monkeypatch.setattr(app, "_malloc_trim", lambda: calls.append)

    class Session(traitlets.HasTraits):
        busy = traitlets.Bool(False)
        refining = traitlets.Bool(False)

    s = Session()
    assert app.give_back_memory(s)
    s.busy = True
    s.refining = True
    assert calls == []
    s.busy = False
    s.refining = False
    assert calls == [0, 0]
    assert "give_back_memory(explorer.session)" in app._source(None, None, None)
    if sys.platform.startswith("linux"):
        assert app._malloc_trim() is not None  # the real glibc function
