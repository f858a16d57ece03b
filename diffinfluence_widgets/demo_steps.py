"""The demo build's cached steps: each step's ``step.json`` (written by rank 0 only under ``torchrun``), resumable
checkpoint folders, publishing a finished folder, and the build's log."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from . import distributed as dist_utils
from ._io import CorruptArtifactError, atomic_write_text as _atomic_write_text
from .influence.artifacts import CheckpointMismatchError

__all__ = ["_read_json", "_publish_dir", "_Log", "_step_done", "_checkpoint_dir", "_resumable", "_write_step"]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _publish_dir(tmp: Path, final: Path) -> None:
    """Move a finished temporary folder into place (the old one, if any, is removed first)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


class _Log:
    def __init__(self, progress: bool):
        self.progress = progress

    def __call__(self, msg: str) -> None:
        if self.progress:
            print(f"[diffinfluence demo] {msg}", file=sys.stderr, flush=True)

    def loud(self, msg: str) -> None:
        """A problem being repaired: a warning, whatever ``progress`` says."""
        warnings.warn(f"[diffinfluence demo] {msg}", RuntimeWarning, stacklevel=3)


def _step_done(root: Path, step: str, cfg, expect: dict, log: "_Log") -> dict | None:
    meta = _read_json(root / step / "step.json")
    if meta is None:
        return None
    if meta.get("step_digest") != cfg.digest(step):
        log(f"{root / step} was built with other settings: rebuilding it")
        return None
    if any(meta.get(k) != v for k, v in expect.items()):
        return None
    return meta


def _checkpoint_dir(root: Path, name: str, digest: str) -> Path:
    """A resumable step's checkpoint folder; one left by an interrupted run with other settings is discarded."""
    d = root / name
    mark = d / "step_digest.txt"
    if d.exists() and (not mark.is_file() or mark.read_text().strip() != digest):
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    if not mark.is_file():
        _atomic_write_text(mark, digest)
    return d


def _resumable(run, root: Path, name: str, digest: str, log: "_Log", shared: bool = False):
    """``run(checkpoint_dir)``; a corrupt or foreign checkpoint is discarded (with a warning) and the step rerun.
    ``shared``: every rank runs the step; rank 0 prepares the folder while the others wait (a corrupt checkpoint
    then stops the run)."""
    if shared:
        if dist_utils.rank_and_world()[0] == 0:
            _checkpoint_dir(root, name, digest)
        dist_utils.barrier()
        return run(root / name)
    try:
        return run(_checkpoint_dir(root, name, digest))
    except (CorruptArtifactError, CheckpointMismatchError) as e:
        log.loud(f"the checkpoint in {root / name} is unusable ({e}); starting that step over")
        shutil.rmtree(root / name, ignore_errors=True)
        return run(_checkpoint_dir(root, name, digest))


def _write_step(root: Path, step: str, cfg, seconds: float, cpu0: float, write: bool = True, **extra) -> dict:
    meta = {"step": step, "config_name": cfg.name, "step_digest": cfg.digest(step), "seconds": round(seconds, 3),
            # process CPU time of the step (all threads): unlike wall time, it does not grow on a busy machine
            "cpu_seconds": round(time.process_time() - cpu0, 3),
            "threads": torch.get_num_threads(), "finished": time.time(), **extra}
    if write:  # (False on the ranks other than 0 of a build shared across ranks)
        _atomic_write_text(root / step / "step.json", json.dumps(meta, indent=1, sort_keys=True))
    return meta
