"""Saved influence artifacts: manifests checked on load, and the resumable curvature-fit checkpoint.

Both go through :mod:`.._io` (atomic writes, SHA-256 of every payload, :class:`CorruptArtifactError` naming the
damaged file).

The **curvature checkpoint** is one safetensors file per rank. Its header carries the fit's identity (model and
dataset fingerprints, draws, seed, batch layout, settings), the stage of the fit (which pass, how many batches of
it are done) and the SHA-256 of the partial sums, so the sums and the count of batches they contain are always
written together, in one atomic write: a kill at any instant leaves either the previous state or the next one,
never a mixture that would count a batch twice. A checkpoint of another fit is refused
(:class:`CheckpointMismatchError`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping

import torch

from .._io import CorruptArtifactError, load_safetensors, read_json, save_safetensors

__all__ = ["read_manifest", "CheckpointMismatchError", "save_fit_checkpoint", "load_fit_checkpoint",
           "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "diffinfluence-curvature-checkpoint"
CHECKPOINT_VERSION = 2


class CheckpointMismatchError(ValueError):
    """A resumable checkpoint belongs to another fit (model, dataset or settings differ)."""


def read_manifest(path: Path, payload: str, fmt: str, what: str, *, model=None, dataset=None,
                  expect: Mapping | None = None) -> dict:
    """Read ``path/manifest.json`` of an artifact and refuse it for another model, dataset or setting.

    ``payload`` is the data file that must sit beside the manifest; ``what`` names the artifact in errors. A
    truncated or unparsable manifest raises :class:`CorruptArtifactError` naming it.
    """
    mf = path / "manifest.json"
    if not mf.is_file() or not (path / payload).is_file():
        raise FileNotFoundError(f"no saved {what} in {str(path)!r} (expected manifest.json and {payload})")
    man = read_json(mf, f"{what} manifest")
    if man.get("format") != fmt:
        raise ValueError(f"{mf} is not a {fmt} manifest (format={man.get('format')!r})")
    for key in ("model_fingerprint", "dataset_fingerprint", "settings"):
        if key not in man:
            raise CorruptArtifactError(f"{what} manifest {mf} lacks {key!r}; it is corrupt", mf)
    if model is not None and man["model_fingerprint"] != model.fingerprint():
        raise ValueError(f"{what} in {str(path)!r} was built for model {man['model_fingerprint']}, but the given "
                         f"model is {model.fingerprint()}; rebuild it for this model")
    if dataset is not None and man["dataset_fingerprint"] != dataset.fingerprint():
        raise ValueError(f"{what} in {str(path)!r} was built on dataset {man['dataset_fingerprint']}, but the "
                         f"given dataset is {dataset.fingerprint()}; rebuild it for this dataset")
    for k, v in (expect or {}).items():
        if man["settings"].get(k) != v:
            raise ValueError(f"{what} in {str(path)!r} has {k}={man['settings'].get(k)!r}, expected {v!r}")
    return man


# ---------------------------------------------------------------------------------------------- fit checkpoint
def _sums_digest(sums: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(sums):
        t = sums[k].detach().cpu().contiguous()
        h.update(k.encode() + b"\0" + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_fit_checkpoint(path: Path, sums: Mapping[str, torch.Tensor], identity: Mapping, stage: Mapping) -> None:
    """Write the partial sums, the fit's identity and its stage as one file, in one atomic write."""
    cpu = {k: v.detach().cpu().contiguous() for k, v in sums.items()}
    meta = {"format": CHECKPOINT_FORMAT, "version": str(CHECKPOINT_VERSION),
            "identity": json.dumps(dict(identity), sort_keys=True, default=str),
            "stage": json.dumps(dict(stage), sort_keys=True), "sums_sha256": _sums_digest(cpu)}
    save_safetensors(path, cpu, metadata=meta)


def load_fit_checkpoint(path: Path, identity: Mapping, keys) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint written by :func:`save_fit_checkpoint` for the fit ``identity``.

    Returns ``(sums, stage)``. Another fit's checkpoint raises :class:`CheckpointMismatchError` naming what
    differs; a damaged one :class:`CorruptArtifactError` naming the file. ``keys``: the sums this fit needs.
    """
    path = Path(path)
    sums, meta = load_safetensors(path, check=False, with_metadata=True)
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != str(CHECKPOINT_VERSION):
        raise CheckpointMismatchError(f"{path} is not a curvature checkpoint of this version (format "
                                      f"{meta.get('format')!r}, version {meta.get('version')!r}); delete it to "
                                      "start the fit over")
    if _sums_digest(sums) != meta.get("sums_sha256"):
        raise CorruptArtifactError(f"curvature checkpoint {path} fails its SHA-256 checksum; delete it to start "
                                   "the fit over", path)
    try:
        saved_id, stage = json.loads(meta["identity"]), json.loads(meta["stage"])
    except (KeyError, ValueError) as e:
        raise CorruptArtifactError(f"curvature checkpoint {path} has an unreadable header ({e})", path) from None
    want = json.loads(json.dumps(dict(identity), sort_keys=True, default=str))
    diffs = [f"{k}: checkpoint has {saved_id.get(k)!r}, this fit {want.get(k)!r}"
             for k in sorted(set(saved_id) | set(want)) if saved_id.get(k) != want.get(k)]
    if diffs:
        raise CheckpointMismatchError(f"curvature checkpoint {path} belongs to another fit (" + "; ".join(diffs[:4])
                                      + "); use another checkpoint_dir or delete it to start over")
    missing = sorted(set(keys) - set(sums))
    if missing:
        raise CorruptArtifactError(f"curvature checkpoint {path} lacks the sums {missing[:3]}", path)
    return sums, stage
