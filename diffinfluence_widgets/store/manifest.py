"""Store manifests: format, errors, canonical JSON and the digests a manifest records."""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from .. import distributed as dist_utils
from .._io import CorruptArtifactError, sha256_file as _sha256_file

__all__ = ["STORE_FORMAT", "STORE_VERSION", "StoreError", "StoreCorruptError", "StoreMismatchError"]


STORE_FORMAT = "diffinfluence-projected-store"


STORE_VERSION = 1


class StoreError(RuntimeError):
    """Something is wrong with a projected-gradient store."""


class StoreCorruptError(StoreError, CorruptArtifactError):
    """A shard or the manifest is missing, truncated or fails its checksum (also a
    :class:`~diffinfluence_widgets._io.CorruptArtifactError`)."""


class StoreMismatchError(StoreError):
    """The store was built for another model, dataset or setting."""


def read_finished_manifest(root: Path, fmt: str, name: str, hint: str, error: type = StoreError,
                           corrupt: type = StoreCorruptError) -> dict:
    """The manifest of the finished store at ``root`` (format ``fmt``), or ``error`` / ``corrupt`` naming the file and
    what to do: ``name`` says what kind of store it is, ``hint`` how to build one."""
    mf = root / "manifest.json"
    if not mf.is_file():
        raise error(f"no {name} at {root} (manifest.json missing); build it with {hint}")
    try:
        man = json.loads(mf.read_text())
    except ValueError as e:
        raise corrupt(f"{mf} is not valid JSON ({e}); rebuild the {name}") from None
    if man.get("format") != fmt:
        raise error(f"{mf} is not a {fmt} manifest")
    if not man.get("complete"):
        raise error(f"{name} {root} is incomplete (its build was interrupted); run the build again to resume it")
    return man


def shard_done(side: Path, data: Path, digest: str, stacklevel: int = 3) -> bool:
    """Whether a shard (``data``, described by its side file ``side``) is finished for the settings ``digest`` and
    intact (size and SHA-256); a truncated or corrupt one is reported and counted as not done, so it is recomputed."""
    if not (side.is_file() and data.is_file()):
        return False
    try:
        meta = json.loads(side.read_text())
    except ValueError:
        return False
    if meta.get("settings_sha256") != digest:
        return False
    if data.stat().st_size != meta.get("bytes") or _sha256_file(data) != meta.get("sha256"):
        warnings.warn(f"shard {data} is truncated or corrupt; recomputing it", RuntimeWarning, stacklevel=stacklevel)
        return False
    return True


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True, default=_json_default).encode()


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, torch.dtype):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _canonical(obj):
    """JSON round trip so tuples/lists and int/float types compare the way they are stored."""
    return json.loads(json.dumps(obj, sort_keys=True, default=_json_default))


def _ids_digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()[:16]


def _barrier() -> None:
    if dist_utils.is_distributed() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def _shard_name(s: int) -> str:
    return f"shard-{s:05d}"


def _diff_settings(found: Mapping, expected: Mapping) -> list[str]:
    keys = sorted(set(found) | set(expected))
    return [f"{k}: store has {found.get(k)!r}, expected {expected.get(k)!r}" for k in keys
            if found.get(k) != expected.get(k)]


def _settings_digest(head: Mapping) -> str:
    key = {k: head[k] for k in ("settings", "ids_sha256", "shard_size")}
    return hashlib.sha256(_json_bytes(key)).hexdigest()[:16]


def _curvature_fingerprint(curvature) -> str | None:
    if curvature is None:
        return None
    h = hashlib.sha256()
    h.update(_json_bytes({"settings": getattr(curvature, "settings", {}),
                          "model": getattr(curvature, "model_fingerprint", ""),
                          "dataset": getattr(curvature, "dataset_fingerprint", "")}))
    for n in curvature.layer_names:
        h.update(n.encode())
        h.update(curvature.eigenvalues[n].detach().to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()[:16]
