"""The Binder configuration: requirements, runtime, postBuild, start — and what repo2docker would build from it.

``repo2docker --no-build --debug .`` prints the Dockerfile without Docker; it is in the ``test`` extra, so CI
always runs that check (it is skipped only outside CI when repo2docker is not installed).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BINDER = REPO / "binder"


def _requirements() -> list[str]:
    return [ln.strip() for ln in (BINDER / "requirements.txt").read_text().splitlines()
            if ln.strip() and not ln.strip().startswith("#")]


def test_requirements_install_the_project_and_a_cpu_torch():
    req = _requirements()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in req
    torch_pins = [r for r in req if re.match(r"torch\b", r)]
    assert torch_pins == ["torch==2.13.0+cpu"], torch_pins
    project = [r for r in req if r.startswith("-e .")]
    assert project, "binder/requirements.txt must install the repository itself (-e .): Binder ignores pyproject"
    assert "widgets" in project[0], "the explorer needs the widgets extra (voila, anywidget, plotly …)"


def test_widgets_extra_has_what_binder_serves():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    widgets = " ".join(meta["project"]["optional-dependencies"]["widgets"])
    for pkg in ("voila", "jupyterlab", "anywidget", "ipywidgets", "plotly"):
        assert pkg in widgets
    assert meta["project"]["scripts"]["diffinfluence"] == "diffinfluence_widgets.cli:main"


def test_runtime_and_scripts():
    assert (BINDER / "runtime.txt").read_text().strip() == "python-3.12"
    post = (BINDER / "postBuild").read_text()
    assert post.startswith("#!/bin/bash") and "set -e" in post
    assert "diffinfluence build --config tiny" in post and "diffinfluence build --config demo" in post
    assert os.access(BINDER / "postBuild", os.X_OK) and os.access(BINDER / "start", os.X_OK)
    start = (BINDER / "start").read_text()
    assert 'exec "$@"' in start and "DIFFINFLUENCE_CACHE" in start
    # both scripts point at the same cache
    assert re.search(r'DIFFINFLUENCE_CACHE="\$\{HOME\}/diffinfluence-cache"', post)
    assert re.search(r'DIFFINFLUENCE_CACHE="\$\{HOME\}/diffinfluence-cache"', start)
    for script in ("postBuild", "start"):
        subprocess.run(["bash", "-n", str(BINDER / script)], check=True)
    # kernels of closed pages are culled, tracebacks stay on the server (the JSON the script writes is valid)
    blocks = re.findall(r"<<'JSON'\n(.*?)\nJSON", post, flags=re.S)
    configs = [json.loads(b) for b in blocks]
    kernel = next(c["MappingKernelManager"] for c in configs if "MappingKernelManager" in c)
    assert kernel["cull_idle_timeout"] > 0 and kernel["cull_connected"] is False
    assert any(c.get("VoilaConfiguration", {}).get("show_tracebacks") is False for c in configs)
    # no preheated spare: Binder's Voila is a server extension (no kernel pool, no shared backend process), so each
    # page's kernel loads its own backend (~0.8 GB) and a spare beside it would not fit Binder's 1-2 GB
    assert all(c.get("VoilaConfiguration", {}).get("preheat_kernel") is False for c in configs if "VoilaConfiguration" in c)


def test_launch_links_point_at_real_files():
    readme = (REPO / "README.md").read_text()
    stop = r"[^)\s\"'&`]+"
    labpaths = re.findall(rf"labpath=({stop})", readme)
    urlpaths = re.findall(rf"urlpath=voila%2Frender%2F({stop})|urlpath=voila/render/({stop})", readme)
    assert labpaths and urlpaths
    for p in labpaths:
        assert (REPO / p.replace("%2F", "/")).is_file(), p
    for a, b in urlpaths:
        assert (REPO / (a or b).replace("%2F", "/")).is_file(), a or b


def _repo2docker() -> str | None:
    return shutil.which("repo2docker", path=str(Path(sys.executable).parent)) or shutil.which("repo2docker")


def test_repo2docker_would_build_it(tmp_path):
    exe = _repo2docker()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("repo2docker is missing in CI: install the test extra (jupyter-repo2docker)")
        pytest.skip("repo2docker not installed (pip install jupyter-repo2docker)")
    p = subprocess.run([exe, "--no-build", "--debug", str(REPO)], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "Building conda environment for python=3.12" in out
    assert 'pip install --no-cache-dir -r "binder/requirements.txt"' in out
    assert "RUN ./binder/postBuild" in out
    assert 'R2D_ENTRYPOINT="${REPO_DIR}/binder/start"' in out
    # with a binder/ folder the root-level files are ignored: the Dockerfile must not read them
    assert "pyproject.toml" not in out and "setup.py" not in out
