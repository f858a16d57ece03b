"""The demo's names and folders, without the demo itself: what ``diffinfluence demo / serve`` need to parse their
arguments and find the cache, in a module that imports no torch, diffusers or numpy.

:mod:`diffinfluence_widgets.demo` (the build, which needs torch) re-exports everything here; the serving command
line and the Voila server process import only this module, so they stay ~50 MB instead of the ~400 MB that
loading torch and diffusers costs (the cache check and any build run in a child process).
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CONFIG_NAMES", "CACHE_ENV", "SMALL_ENV", "CACHE_FORMAT", "CACHE_VERSION", "DemoCacheError",
           "BACKEND_ADDRESS_ENV", "BACKEND_KEY_ENV",
           "check_config_name", "config_from_env", "default_cache_dir"]

#: the demo configs (``demo.DEMO_CONFIGS`` holds their settings; a test keeps the two in step)
CONFIG_NAMES = ("demo", "tiny")
#: environment variable naming the parent of the cache folders (default ``./diffinfluence-cache``; the config's
#: cache is ``<parent>/<config name>``)
CACHE_ENV = "DIFFINFLUENCE_CACHE"
#: ``DIFFINFLUENCE_SMALL=1`` makes notebooks and ``config_from_env()`` pick the ``"tiny"`` config
SMALL_ENV = "DIFFINFLUENCE_SMALL"
#: where ``diffinfluence serve``'s one backend process listens (a Unix socket in a private folder) and its key (hex):
#: set for Voila and so for every kernel it starts; the served app then uses that backend instead of loading its own
BACKEND_ADDRESS_ENV = "DIFFINFLUENCE_BACKEND_ADDRESS"
BACKEND_KEY_ENV = "DIFFINFLUENCE_BACKEND_KEY"
CACHE_FORMAT = "diffinfluence-demo-cache"
CACHE_VERSION = 1


class DemoCacheError(RuntimeError):
    """The cache folder belongs to another demo config (or another version of its settings)."""


def check_config_name(config) -> str:
    """The name of a demo config: ``config`` itself when it is one of :data:`CONFIG_NAMES`, the ``name`` of a
    ``DemoConfig``; else a ``ValueError`` naming the value and the choices."""
    name = getattr(config, "name", config)
    if not isinstance(name, str) or (name not in CONFIG_NAMES and not hasattr(config, "name")):
        raise ValueError(f"unknown demo config {config!r}; expected one of {sorted(CONFIG_NAMES)}")
    return name


def config_from_env(default: str = "demo") -> str:
    """``"tiny"`` when ``DIFFINFLUENCE_SMALL`` is set to a true value (1 / true / yes), else ``default``."""
    return "tiny" if os.environ.get(SMALL_ENV, "").strip().lower() in ("1", "true", "yes", "on") else default


def default_cache_dir(config="demo") -> Path:
    """``$DIFFINFLUENCE_CACHE/<config name>`` when the variable is set, else ``./diffinfluence-cache/<config name>``.

    The variable names the *parent* folder, so the ``"tiny"`` and ``"demo"`` caches never share a folder.
    ``config``: a config name or a ``DemoConfig``.
    """
    env = os.environ.get(CACHE_ENV)
    parent = Path(env).expanduser() if env else Path.cwd() / "diffinfluence-cache"
    return parent / check_config_name(config)
