"""Serving the explorer with Voila: port check, a cache check that loads nothing, one shared backend process, and a
server that stops cleanly.

``diffinfluence serve`` / ``demo`` hold no backend themselves: they check the port first, then whether the demo
cache is complete (by reading its small JSON manifests only), build it in a child process when it is not, then start

- **one backend process** (:class:`BackendProcess`: ``python -m diffinfluence_widgets.remote``) that loads the demo
  backend once and answers every page's kernel over a Unix socket in a private 0700 folder, authenticated with a
  random key; address and key reach the kernels through Voila's environment, never a command line. The kernels are
  thin (:class:`~diffinfluence_widgets.remote.RemoteBackend`: no torch, ~0.1 GB instead of ~0.8 GB each) and share
  its prepared queries. If the backend process dies, every page says "the influence backend stopped: …" in one
  line and this command stops the whole server with exit status 1 (it does not restart the backend);

and Voila with

- a random **token** (the printed URL carries it; the token travels in a private config file, not on the
  command line, so other local users cannot read it from the process list);
- ``show_tracebacks=False`` (errors reach the browser as one line, never as a traceback);
- **freeing a page's kernel when the page goes**: Voila's own shutdown request on page unload is refused
  (``403 … '_xsrf' argument missing``, voila-dashboards/voila#1458), so the app's gallery sends it again on
  ``pagehide``, authenticated with the page's token (:func:`~diffinfluence_widgets.app.free_kernel_on_leave`);
  **kernel culling** stays the fallback: a kernel with no open page is shut down after ``cull_idle`` seconds idle
  (``cull_connected=False``);
- **preheated kernels** (a pool of ``pool_size``; the pooled kernel has already run the app, so a page is ready in
  a second or two instead of waiting for a kernel to start; with thin kernels a spare costs ~0.1 GB);
- terminal noise filtered ("not trusted", websocket ping warnings).

SIGTERM, SIGINT and SIGHUP stop Voila, the backend process and every process they started (kernels run in their own
sessions, so they are found through ``/proc`` and stopped by PID after Voila had its chance to shut them down).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ._io import atomic_write_bytes
from .app import APP_READY
from .demo_names import BACKEND_ADDRESS_ENV, BACKEND_KEY_ENV

__all__ = ["ServeError", "check_port", "demo_cache_problem", "voila_config", "VoilaServer", "descendants",
           "process_alive", "stop_process_tree", "stop_signals", "available_memory", "auto_pool_size", "SPARE_NEEDS_BYTES",
           "BackendProcess", "BACKEND_READY"]


class ServeError(RuntimeError):
    """The explorer cannot be served (port taken, Voila failed to start)."""


# ---------------------------------------------------------------------------------------------- checks
def check_port(port: int, host: str = "127.0.0.1") -> None:
    """Raise :class:`ServeError` when ``host:port`` cannot be bound (checked before anything slow happens)."""
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ServeError(f"--port must be an integer between 1 and 65535, got {port!r}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServeError(f"port {port} on {host} is in use ({e.strerror}); choose another with --port") from None


def demo_cache_problem(config: str, cache_dir: str | Path) -> str | None:
    """``None`` when the demo cache in ``cache_dir`` is complete for ``config`` (every step written with the
    current settings, the steps agreeing on the model); else why not. Reads JSON manifests only (milliseconds)."""
    from .demo import CACHE_FORMAT, CACHE_VERSION, demo_config  # torch: only where a cache is checked (a child)

    cfg = demo_config(config)
    root = Path(cache_dir)

    def read(p: Path) -> dict | None:
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    mf = read(root / "manifest.json")
    if mf is None:
        return f"{root} has no demo manifest yet"
    if (mf.get("format"), mf.get("version"), mf.get("config_name")) != (CACHE_FORMAT, CACHE_VERSION, cfg.name):
        return f"{root} holds another config or cache format"
    if mf.get("config_digest") != cfg.digest():
        return f"the {cfg.name!r} settings changed since {root} was built"
    steps = {}
    for step in ("model", "curvature", "index"):
        meta = read(root / step / "step.json")
        if meta is None or meta.get("step_digest") != cfg.digest(step):
            return f"step {step!r} is missing or outdated in {root}"
        steps[step] = meta
    fp = steps["model"].get("model_fingerprint")
    if any(steps[s].get("model_fingerprint") != fp for s in ("curvature", "index")):
        return f"the curvature or index in {root} belongs to another model"
    return None


# ---------------------------------------------------------------------------------------------- memory
#: memory ``--pool-size auto`` asks for before keeping a preheated spare kernel: the one backend process (~0.8 GB on
#: the demo), Voila and the command line (~0.17 GB), and thin kernels (~0.1 GB each: the open page's, the spare, and
#: a reloaded page's old one until it is freed), with a margin (bench/RESULTS.md, "one shared backend")
SPARE_NEEDS_BYTES = 3 << 29  # 1.5 GiB


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory() -> int | None:
    """Bytes this process tree may still use: ``MemAvailable``, lowered to the cgroup's limit minus its usage
    (containers, Binder: cgroup v2 ``memory.max`` or v1 ``memory.limit_in_bytes``). ``None`` where unknown."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < (1 << 60):  # "max" / a huge value: no limit
            room = max(0, limit - usage)
            avail = room if avail is None else min(avail, room)
            break
    return avail


def auto_pool_size(avail: int | None = None) -> int:
    """``--pool-size auto``: one preheated spare kernel (a page ready at once instead of after a kernel start) when
    :data:`SPARE_NEEDS_BYTES` are available, else none (under 1.5 GB: one kernel started per page)."""
    avail = available_memory() if avail is None else avail
    return 1 if avail is not None and avail >= SPARE_NEEDS_BYTES else 0


# ---------------------------------------------------------------------------------------------- Voila
#: seconds Voila waits before refilling the kernel pool after a page took the preheated kernel
FILL_DELAY_S = 6.0


def voila_config(token: str, *, cull_idle: float = 60.0, cull_interval: float | None = None,
                 pool_size: int = 1) -> dict:
    """The Voila / Jupyter server configuration of the explorer (written as ``voila.json``)."""
    if cull_idle <= 0:
        raise ValueError(f"cull_idle must be positive seconds, got {cull_idle!r}")
    if pool_size < 0:
        raise ValueError(f"pool_size must be ≥ 0, got {pool_size!r}")
    interval = cull_interval if cull_interval is not None else max(1, min(30, int(cull_idle // 3) or 1))
    return {
        "Voila": {"ip": "127.0.0.1", "port_retries": 0, "open_browser": False, "token": token},
        "VoilaConfiguration": {
            "show_tracebacks": False,
            "preheat_kernel": pool_size > 0,
            "default_pool_size": int(pool_size),
            # Notebook 7's lab extension cannot load inside Voila (module federation error): leave it out. The
            # app draws plotly through its own widget (plotly.js sent over the widget channel once the page is
            # idle): plotly's lab extension (4.7 MB) and JupyterLab's Voila preview are not needed on the page
            "extension_denylist": ["@jupyter-notebook/lab-extension", "jupyterlab-plotly",
                                   "@voila-dashboards/jupyterlab-preview"],
        },
        "MappingKernelManager": {"cull_idle_timeout": int(round(cull_idle)), "cull_interval": int(interval),
                                 "cull_connected": False, "cull_busy": False},
        # refill the pool only after the page that took the preheated kernel has loaded: on a small machine the
        # refill's imports (torch, diffusers) would otherwise compete with that page for the CPU
        "VoilaKernelManager": {"fill_delay": float(FILL_DELAY_S)},
    }


#: Voila and kernel log lines that only alarm users: the app notebook is ours (not "trusted" or not), the ping and
#: TCP-transport warnings are defaults for 127.0.0.1, and we print the URL (with its token) ourselves
NOISE = re.compile(r"is not trusted|websocket_ping_timeout|WebSocket ping|running over TCP without encryption"
                   r"|Voil[aà] is running at|^\s*http://\S+:\d+/\S*$|token=|Use Control-C to stop"
                   r"|cookie secret|notebook-signing key|connection files|Serving static files"
                   # Voila's own shutdown on unload (refused, voila#1458): the page's gallery sends one that works
                   r"|'_xsrf' argument missing|POST /voila/api/shutdown/")


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    kids: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for p in proc.iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return not Path("/proc").is_dir()
    return state != "Z"


def stop_process_tree(proc: subprocess.Popen, grace: float = 20.0) -> list[int]:
    """SIGTERM ``proc`` (its process group when it leads one) and wait; then SIGKILL every descendant recorded
    before the signal that is still alive. Returns the PIDs that had to be killed."""
    kids = descendants(proc.pid)
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    killed = []
    deadline = time.monotonic() + 5
    for pid in kids:
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if process_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    # a killed kernel takes a moment to give back its memory and exit (longer on a busy machine): return only when
    # it is gone, so that "the command exited" means "everything it started has stopped"
    deadline = time.monotonic() + 10
    while any(process_alive(pid) for pid in killed) and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed


class _Stop(BaseException):
    """Raised in the main thread by SIGTERM / SIGHUP (SIGINT raises KeyboardInterrupt)."""


class stop_signals:
    """Context manager: SIGTERM and SIGHUP raise :class:`_Stop` and SIGINT raises ``KeyboardInterrupt`` in the main
    thread (also where SIGINT was inherited as ignored), so ``finally`` blocks run and the children are stopped; the
    previous handlers are restored on exit."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)

    def __enter__(self):
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._raise)
            # Ctrl-C stops the server even where SIGINT came in ignored (a command started with `&` from a script)
            self._old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise _Stop(signal.Signals(signum).name)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return exc[0] is not None and issubclass(exc[0], (_Stop, KeyboardInterrupt))


@dataclass
class VoilaServer:
    """Voila on one notebook, on 127.0.0.1, in its own process session and Jupyter config folder."""

    notebook: Path
    port: int
    config_dir: Path
    env: dict = field(default_factory=dict)
    cull_idle: float = 60.0
    cull_interval: float | None = None
    pool_size: int = 1
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    verbose: bool = True
    proc: subprocess.Popen | None = None
    pool_ready: threading.Event = field(default_factory=threading.Event)
    log_lines: list = field(default_factory=list)
    #: how many kernels have finished running the app (the preheated ones and those of pages)
    apps_ready: int = 0

    @property
    def status_file(self) -> Path:
        """``server.json`` beside the config (mode 0600: it holds the token): URL, PIDs and ``apps_ready``, for
        tools that drive a running server (the browser bench)."""
        return self.config_dir / "server.json"

    def _write_status(self) -> None:
        body = {"url": self.url, "port": self.port, "voila_pid": None if self.proc is None else self.proc.pid,
                "cli_pid": os.getpid(), "pool_size": self.pool_size, "apps_ready": self.apps_ready}
        try:
            atomic_write_bytes(self.status_file, json.dumps(body).encode())
            os.chmod(self.status_file, 0o600)
        except OSError:
            pass

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/?token={self.token}"

    def start(self) -> "VoilaServer":
        self.config_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.config_dir, 0o700)
        cfg = voila_config(self.token, cull_idle=self.cull_idle, cull_interval=self.cull_interval,
                           pool_size=self.pool_size)
        cfg["Voila"]["port"] = int(self.port)
        atomic_write_bytes(self.config_dir / "voila.json", json.dumps(cfg, indent=1).encode())
        os.chmod(self.config_dir / "voila.json", 0o600)
        env = {**os.environ, **self.env, "JUPYTER_CONFIG_DIR": str(self.config_dir), "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "voila", str(self.notebook)]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=str(self.notebook.parent), start_new_session=True, bufsize=1)
        if self.pool_size == 0:
            self.pool_ready.set()
        self._write_status()
        threading.Thread(target=self._pump, name="voila-log", daemon=True).start()
        return self

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.log_lines.append(line)
            del self.log_lines[:-400]
            if APP_READY in line:
                self.apps_ready += 1
                self._write_status()
                self.pool_ready.set()
                continue
            if NOISE.search(line):
                continue
            if self.verbose or "[E " in line or "[W " in line or "Traceback" in line:
                sys.stderr.write(line)
                sys.stderr.flush()

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Until Voila answers and (with a pool) the first kernel has run the app."""
        deadline = time.monotonic() + timeout
        static = f"http://127.0.0.1:{self.port}/voila/templates/lab/static/voila.js"
        up = False
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = "".join(self.log_lines[-20:])
                raise ServeError(f"Voila exited with code {self.proc.returncode}:\n{tail}")
            if not up:
                try:
                    with urllib.request.urlopen(static, timeout=2):
                        up = True
                except OSError:
                    pass
            if up and self.pool_ready.wait(0.2):
                return
            time.sleep(0.2)
        raise ServeError(f"Voila was not ready within {timeout:.0f} s")

    def stop(self) -> list[int]:
        killed = [] if self.proc is None else stop_process_tree(self.proc)
        try:
            self.status_file.unlink()
        except OSError:
            pass
        return killed


# ---------------------------------------------------------------------------------------------- the backend process
#: the line :mod:`diffinfluence_widgets.remote` prints once its backend is loaded (kept in step by a test)
BACKEND_READY = "diffinfluence: influence backend ready"


@dataclass
class BackendProcess:
    """The one backend of a server: ``python -m diffinfluence_widgets.remote`` (a child of this process, in its own
    session) listening on a Unix socket in a private 0700 folder, with a random key. :attr:`env` (address and key)
    goes to Voila's environment, so every kernel finds it; neither is ever on a command line."""

    config: str
    cache_dir: Path
    threads: int = 1
    verbose: bool = True
    proc: subprocess.Popen | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    log_lines: list = field(default_factory=list)
    folder: Path | None = None
    env: dict = field(default_factory=dict)

    def start(self) -> "BackendProcess":
        self.folder = Path(tempfile.mkdtemp(prefix="dinf-backend-"))  # mode 0700: only this user reaches the socket
        os.chmod(self.folder, 0o700)
        self.env = {BACKEND_ADDRESS_ENV: str(self.folder / "backend.sock"), BACKEND_KEY_ENV: secrets.token_hex(32)}
        env = {**os.environ, **self.env, "OMP_NUM_THREADS": str(self.threads), "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "diffinfluence_widgets.remote", self.config, str(self.cache_dir),
               "--threads", str(self.threads)]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, bufsize=1)
        threading.Thread(target=self._pump, name="backend-log", daemon=True).start()
        return self

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.log_lines.append(line)
            del self.log_lines[:-200]
            if BACKEND_READY in line:
                self.ready.set()
                if not self.verbose:
                    continue
            if self.verbose or "Error" in line or "Traceback" in line or "could not" in line:
                sys.stderr.write(line)
                sys.stderr.flush()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def problem(self) -> str:
        """Why the backend process is gone (its exit status and last lines)."""
        tail = "".join(self.log_lines[-8:]).strip()
        return f"the influence backend stopped (exit status {self.proc.returncode})" + (f":\n{tail}" if tail else "")

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Until the backend is loaded; :class:`ServeError` when the process exits first."""
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.2):
            if not self.alive():
                raise ServeError(self.problem())
            if time.monotonic() > deadline:
                raise ServeError(f"the influence backend was not ready within {timeout:.0f} s")

    def stop(self) -> list[int]:
        killed = [] if self.proc is None else stop_process_tree(self.proc)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        return killed


# ---------------------------------------------------------------------------------------------- the cache child
def prepare_cache(config: str, cache_dir: str | Path, *, threads: int, rebuild: bool = False, quiet: bool = False,
                  device: str | None = None) -> None:
    """Check the demo cache and build what is missing. ``diffinfluence serve`` runs this in a child process, so
    the torch / diffusers imports and the build's memory are given back before Voila starts."""
    problem = "rebuild requested" if rebuild else demo_cache_problem(config, cache_dir)
    if problem is None:
        print(f"reusing the {config!r} demo cache in {cache_dir}", flush=True)
        return
    print(f"building the {config!r} demo cache in {cache_dir} ({problem}) …", flush=True)
    from .demo import build_demo

    build_demo(config, cache_dir, device=device, progress=not quiet, threads=threads, rebuild=rebuild)


def _main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m diffinfluence_widgets.serving",
                                description="check (and build) the demo cache for `diffinfluence serve`")
    p.add_argument("config")
    p.add_argument("cache_dir", type=Path)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    from .demo_names import DemoCacheError

    try:
        prepare_cache(a.config, a.cache_dir, threads=a.threads, rebuild=a.rebuild, quiet=a.quiet, device=a.device)
    except DemoCacheError as e:
        print(f"diffinfluence: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())
