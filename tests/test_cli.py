"""The ``diffinfluence`` command line: help texts, the headless demo, reuse, serve (Voila), evaluate, errors."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
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
    p = run("demo", "--config", "tiny", "--cache-dir", str(cache), "--threads", "1", "--headless")
    # a first impression without noise: progress bars, our own log lines, and no warning from a dependency
    noise = [ln for ln in p.stderr.splitlines() if "warn" in ln.lower() or "accelerate" in ln.lower()]
    assert noise == [], noise
    assert "1 threads" not in p.stderr + p.stdout and "1 thread" in p.stderr + p.stdout
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


def test_serve_checks_the_port_before_loading_anything(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        t0 = time.perf_counter()
        p = run("serve", "--config", "tiny", "--cache-dir", str(tmp_path / "tiny"), "--port", str(port), check=False,
                timeout=60)
    assert p.returncode == 2 and f"port {port}" in p.stderr and "--port" in p.stderr
    assert not (tmp_path / "tiny").exists()  # nothing was built or loaded
    print(f"port refusal after {time.perf_counter() - t0:.1f} s")


def _start_serve(cache, *extra):
    """``diffinfluence serve`` in its own session; returns (proc, url with token, output lines so far)."""
    port = _free_port()
    proc = subprocess.Popen([*CLI, "serve", "--config", "tiny", "--cache-dir", str(cache), "--threads", "1",
                             "--quiet", "--port", str(port), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                            start_new_session=True)
    lines, url = [], None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if "The explorer is ready" in line:
            url = line.split("ready:", 1)[1].strip()
            break
    if url is None:
        _stop(proc)
        raise AssertionError("".join(lines))
    return proc, url, lines


def _stop(proc, sig=None) -> list[int]:
    """Signal the CLI (SIGTERM by default) and wait for it. Returns its children (recorded before the signal) still
    alive 0.5 s after it exited, and kills those, so that a failing test leaves no server behind."""
    import signal as S

    from diffinfluence_widgets.serving import descendants, process_alive

    kids = descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(sig or S.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    time.sleep(0.5)
    alive = [k for k in kids if process_alive(k)]
    for k in alive:
        try:
            os.kill(k, S.SIGKILL)
        except ProcessLookupError:
            pass
    return alive


@pytest.mark.slow
def test_serve_runs_voila_on_localhost(cache):
    from diffinfluence_widgets.serving import descendants

    run("build", "--config", "tiny", "--cache-dir", str(cache), "--threads", "1", "--quiet")
    proc, url, lines = _start_serve(cache)
    try:
        assert url.startswith("http://127.0.0.1:") and "?token=" in url and len(url.split("token=")[1]) >= 24
        base = url.split("?")[0]
        # without the token: sent to the login page, no explorer
        try:
            with urllib.request.urlopen(base, timeout=60) as r:
                anonymous, where = r.read().decode(), r.geturl()
        except urllib.error.HTTPError as e:
            anonymous, where = "", f"HTTP {e.code}"
        assert "widget-view" not in anonymous and ("login" in where or where.startswith("HTTP 40")), where
        with urllib.request.urlopen(url, timeout=120) as r:
            page = r.read().decode()
        # Voila executed the app notebook (in the preheated kernel): the explorer's view, no Python traceback
        assert "application/vnd.jupyter.widget-view+json" in page
        assert "Influence explorer" in page
        assert '"output_type": "error"' not in page and "Traceback" not in page
        kids = descendants(proc.pid)
        assert len(kids) >= 3  # the backend process, Voila and at least the page's kernel
        assert any("diffinfluence_widgets.remote" in _cmdline(k) for k in kids)  # the one shared backend
    finally:
        alive = _stop(proc)  # SIGTERM: the CLI stops Voila and every kernel it started
    out = proc.stdout.read()
    assert proc.returncode == 0, out
    assert alive == [], f"children survived SIGTERM: {alive}"
    text = "".join(lines) + out
    for noise in ("not trusted", "DeprecationWarning", "accelerate", "TCP without encryption"):
        assert noise not in text, text


def test_parsing_imports_no_torch():
    """Argument parsing (every command) and the serving module load neither torch nor diffusers."""
    code = ("import sys; from diffinfluence_widgets import cli, serving, demo_names; p = cli.build_parser(); "
            "[p.parse_args([c]) for c in ('demo', 'serve', 'build', 'train', 'evaluate')]; "
            "print(sorted(m for m in ('torch', 'diffusers', 'numpy') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr


def test_pool_size_auto_keeps_a_spare_only_with_room(monkeypatch):
    """--pool-size: 'auto' or an integer ≥ 0; auto keeps a preheated spare only with SPARE_NEEDS_BYTES free, and
    reads a container's cgroup limit (1 GB left: no room for the backend process, Voila and two kernels)."""
    from diffinfluence_widgets import serving
    from diffinfluence_widgets.cli import build_parser

    p = build_parser()
    assert p.parse_args(["serve"]).pool_size == "auto"
    assert p.parse_args(["serve", "--pool-size", "2"]).pool_size == 2
    for bad in ("-1", "many"):
        with pytest.raises(SystemExit):
            p.parse_args(["serve", "--pool-size", bad])
    assert serving.auto_pool_size(serving.SPARE_NEEDS_BYTES) == 1
    assert serving.auto_pool_size(2 << 30) == 1  # thin kernels: a 2 GB Binder keeps a spare
    assert serving.auto_pool_size(1 << 30) == 0
    files = {"/sys/fs/cgroup/memory.max": "2147483648\n", "/sys/fs/cgroup/memory.current": "1073741824\n"}
    monkeypatch.setattr(serving, "_read_int", lambda path: int(files[path]) if files.get(path, "x")[0].isdigit()
                        else None)
    assert serving.available_memory() <= 1 << 30 and serving.auto_pool_size() == 0
    files["/sys/fs/cgroup/memory.max"] = "max"  # no limit: /proc/meminfo decides
    assert serving.available_memory() is None or serving.available_memory() > 1 << 30


SERVE_LIGHT = """
import json, sys
from diffinfluence_widgets import cli
code = cli.main(sys.argv[1:])
hwm = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) // 1024
heavy = sorted(m for m in ('torch', 'diffusers', 'numpy', 'faiss', 'PIL') if m in sys.modules)
print('SERVE-LIGHT ' + json.dumps({'code': code, 'heavy': heavy, 'peak_mb': hwm}))
"""


@pytest.mark.slow
def test_serve_process_imports_no_torch(cache):
    """The command line that waits on Voila holds no backend: parsing, the port check, the cache check (a child
    process), writing the app and running Voila leave torch, diffusers and numpy out of its ``sys.modules``."""
    run("build", "--config", "tiny", "--cache-dir", str(cache), "--threads", "1", "--quiet")
    p = subprocess.run([sys.executable, "-c", SERVE_LIGHT, "serve", "--config", "tiny", "--cache-dir", str(cache),
                        "--threads", "1", "--quiet", "--port", str(_free_port()), "--pool-size", "0",
                        "--exit-after", "0.5"], capture_output=True, text=True, timeout=300, env=ENV)
    line = [x for x in p.stdout.splitlines() if x.startswith("SERVE-LIGHT ")]
    assert line, p.stdout + p.stderr
    out = json.loads(line[-1].split(" ", 1)[1])
    assert out["code"] == 0, p.stdout + p.stderr
    assert "The explorer is ready" in p.stdout  # Voila really ran
    assert out["heavy"] == [], out
    print(f"serving CLI peak RSS {out['peak_mb']} MB")


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGHUP", "SIGINT"])
def test_serve_stops_everything_on_hangup_and_interrupt(cache, signame):
    import signal as S

    from diffinfluence_widgets.serving import descendants

    run("build", "--config", "tiny", "--cache-dir", str(cache), "--threads", "1", "--quiet")
    proc, url, _ = _start_serve(cache, "--pool-size", "1")
    try:
        assert descendants(proc.pid), "Voila should be running"
    finally:
        alive = _stop(proc, getattr(S, signame))
    assert alive == [], f"children survived {signame}: {alive}"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.slow
def test_serve_stops_with_an_error_when_the_backend_dies(cache):
    """The one backend process is not restarted: when it dies the command line says so, stops Voila and its
    kernels, and exits with status 1; the backend's key is never on a command line."""
    import signal as S

    from diffinfluence_widgets.serving import descendants

    run("build", "--config", "tiny", "--cache-dir", str(cache), "--threads", "1", "--quiet")
    proc, url, _ = _start_serve(cache, "--pool-size", "1")
    try:
        kids = descendants(proc.pid)
        backend = [k for k in kids if "diffinfluence_widgets.remote" in _cmdline(k)]
        assert len(backend) == 1, [_cmdline(k) for k in kids]
        key = Path(f"/proc/{backend[0]}/environ").read_bytes().split(b"DIFFINFLUENCE_BACKEND_KEY=")[1].split(b"\0")[0]
        assert len(key) == 64 and not any(key.decode() in _cmdline(k) for k in [proc.pid, *kids])
        os.kill(backend[0], S.SIGKILL)
        proc.wait(timeout=60)
    finally:
        alive = _stop(proc)
    out = proc.stdout.read()
    assert proc.returncode == 1, out
    assert "the influence backend stopped" in out and "stopping the server" in out, out
    assert alive == [], f"children survived: {alive}"


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
