"""The ``diffinfluence`` command line: help texts, the headless demo, reuse, serve (Voila), evaluate, errors."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "diffinfluence_widgets.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(*args, timeout=600, check=True):
    p = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=ENV)
    if check and p.returncode != 0:
        raise AssertionError(f"diffinfluence {' '.join(args)} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cli") / "tiny"


def test_console_script_is_installed():
    exe = shutil.which("diffinfluence", path=str(Path(sys.executable).parent))
    assert exe, "the `diffinfluence` console script is missing: pip install -e ."
    p = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "demo" in p.stdout


@pytest.mark.parametrize("command", ["demo", "train", "build", "serve", "evaluate"])
def test_help(command):
    top = run("--help").stdout
    assert command in top and "Sign convention" in top
    text = run(command, "--help").stdout
    assert "--config" in text and "--cache-dir" in text and "--threads" in text
    if command in ("demo", "serve"):
        assert "--port" in text
    if command == "demo":
        assert "--headless" in text


def test_bad_input_is_a_clear_error(tmp_path):
    p = run("demo", "--config", "huge", check=False)
    assert p.returncode == 2 and "invalid choice: 'huge'" in p.stderr
    p = run(check=False)
    assert p.returncode == 2 and "COMMAND" in p.stderr
    (tmp_path / "notes.txt").write_text("not a cache")
    p = run("build", "--config", "tiny", "--cache-dir", str(tmp_path), "--threads", "1", check=False)
    assert p.returncode == 2 and "is not a demo cache" in p.stderr and (tmp_path / "notes.txt").exists()
    assert "--rebuild" not in p.stderr  # rebuilding would not help: nothing here may be deleted


@pytest.mark.slow
def test_headless_demo_then_reuse(cache):
    p = run("demo", "--config", "tiny", "--cache-dir", str(cache), "--threads", "1", "--headless", "--quiet")
    report = cache / "report"
    assert (report / "report.html").stat().st_size > 1000
    assert (report / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (report / "report.html").read_text()
    assert "Proponent" in html or "proponent" in html.lower()
    assert len(list(report.glob("query*_loss_ekfac.csv"))) == 4
    info = json.loads((report / "demo_info.json").read_text())
    assert info["reused"] is False

    t0 = time.perf_counter()
    p = run("demo", "--config", "tiny", "--cache-dir", str(cache), "--threads", "1", "--headless", "--quiet")
    wall = time.perf_counter() - t0
    info = json.loads((report / "demo_info.json").read_text())
    assert info["reused"] is True and info["total_seconds"] < 10
    assert "reused" in p.stdout
    print(f"second headless run: {wall:.1f} s wall (imports included), build steps {info['total_seconds']:.2f} s")

    # a cache of another config is refused, not reused or overwritten
    p = run("build", "--config", "demo", "--cache-dir", str(cache), check=False)
    assert p.returncode == 2 and "holds the 'tiny' config" in p.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_runs_voila_on_localhost(cache):
    run("build", "--config", "tiny", "--cache-dir", str(cache), "--threads", "1", "--quiet")
    port = _free_port()
    proc = subprocess.Popen([*CLI, "serve", "--config", "tiny", "--cache-dir", str(cache), "--threads", "1",
                             "--quiet", "--port", str(port), "--exit-after", "90"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                            start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if "The explorer is ready" in line:
                break
        assert any(f"http://127.0.0.1:{port}/" in ln for ln in lines), "".join(lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=120) as r:
            page = r.read().decode()
        # Voila executed the app notebook: the explorer's widget view is in the page, no Python traceback
        assert "application/vnd.jupyter.widget-view+json" in page
        assert "Influence explorer" in page
        assert '"output_type": "error"' not in page
    finally:
        if proc.poll() is None:
            proc.terminate()  # SIGTERM: the CLI stops Voila (and its kernels) by PID
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_evaluate_writes_lds(cache, tmp_path):
    out = tmp_path / "eval"
    p = run("evaluate", "--config", "tiny", "--cache-dir", str(cache), "--threads", "1", "--quiet",
            "--num-subsets", "3", "--num-queries", "2", "--methods", "ekfac,trak", "--measure-draws", "16",
            "--out", str(out))
    res = json.loads((out / "lds.json").read_text())
    assert [r["method"] for r in res["rows"]] == ["ekfac", "trak"]
    assert all(-1.0 <= r["lds_mean"] <= 1.0 for r in res["rows"])
    assert "LDS on 2 held-out queries" in p.stdout
    p = run("evaluate", "--config", "tiny", "--cache-dir", str(cache), "--methods", "nope", check=False)
    assert p.returncode != 0 and "unknown or unsupported methods" in p.stderr
