"""Sharded stores: :func:`build_store` writes shards atomically (resumable, split across ``torchrun`` ranks) and
:class:`ProjectedStore` opens them after checking fingerprints, settings and checksums."""
from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import distributed as dist_utils
from .._io import atomic_write_bytes as _atomic_write_bytes, remove_stale_temporaries
from ..influence.projection import projector_from_spec
from .manifest import (STORE_FORMAT, STORE_VERSION, StoreCorruptError, StoreError, StoreMismatchError, _barrier,
                       _canonical, _diff_settings, _ids_digest, _json_bytes, _settings_digest, _sha256_file,
                       _shard_name, read_finished_manifest, shard_done)

__all__ = ["build_store", "ProjectedStore"]


def build_store(path: str | Path, ids: Sequence[int] | np.ndarray | torch.Tensor,
                compute: Callable[[int, int], Mapping[str, torch.Tensor]], settings: Mapping[str, Any], *,
                shard_size: int = 256, resume: bool = True, overwrite: bool = False,
                progress: bool = True) -> "ProjectedStore":
    """Build (or resume) a store of per-example feature arrays in shards.

    Parameters
    ----------
    ids:
        ``[N]`` example ids, in store order.
    compute:
        ``compute(lo, hi)`` returns ``{array name: [hi - lo, dim] tensor}`` for examples ``ids[lo:hi]``; it must be
        deterministic (shards are computed independently and in any order, on any rank).
    settings:
        Everything the features depend on (model / dataset fingerprints, measurement, draws, projection, ...).
        A store whose settings differ is refused (:class:`StoreMismatchError`) unless ``overwrite=True``.
    shard_size:
        Examples per shard file; each finished shard is written atomically with its SHA-256 and is skipped when
        the build is resumed.

    Under ``torchrun`` (an initialised process group) rank r computes shards r, r + W, r + 2W, ...; rank 0 writes
    the manifest. Every rank returns the opened store.
    """
    root = Path(path)
    ids = np.asarray(torch.as_tensor(np.asarray(ids) if not isinstance(ids, torch.Tensor) else ids)
                     .to(torch.long).cpu().numpy(), dtype=np.int64)
    if ids.ndim != 1 or len(np.unique(ids)) != len(ids):
        raise ValueError("store ids must be a 1-D array of unique integers")
    if len(ids) == 0:
        raise ValueError(f"cannot build a store at {str(root)!r} for an empty dataset (0 ids)")
    if int(shard_size) < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    shard_size = int(shard_size)
    n = len(ids)
    num_shards = max(1, math.ceil(n / shard_size))
    settings = _canonical(dict(settings))
    head = {"format": STORE_FORMAT, "version": STORE_VERSION, "settings": settings, "num_examples": n,
            "ids_sha256": _ids_digest(ids), "shard_size": shard_size, "num_shards": num_shards, "dtype": "float32"}
    rank, world = dist_utils.rank_and_world()
    mf = root / "manifest.json"
    if world == 1 and resume and mf.is_file():  # already finished with these settings: just open it
        try:
            old = json.loads(mf.read_text())
            if old.get("complete") and all(old.get(k) == head[k] for k in
                                           ("format", "version", "settings", "ids_sha256", "shard_size")):
                return ProjectedStore.open(root, verify=True)
        except (ValueError, StoreError):
            pass  # unreadable or damaged: fall through to the resuming build, which repairs shards
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        (root / "shards").mkdir(exist_ok=True)
        # temporary files of a build killed mid-write (the other ranks wait at the barrier below)
        remove_stale_temporaries(root) + remove_stale_temporaries(root / "shards")
        try:
            old = json.loads(mf.read_text()) if mf.is_file() else None
        except ValueError:  # a torn manifest says nothing: shards are checked one by one below
            warnings.warn(f"store manifest {mf} is corrupt; resuming the build from its checked shards",
                          RuntimeWarning, stacklevel=2)
            old = None
        if old is not None:
            same = all(old.get(k) == head[k] for k in ("format", "version", "settings", "ids_sha256", "shard_size"))
            if not same:
                if not overwrite:
                    diffs = _diff_settings(old.get("settings", {}), settings)
                    if old.get("ids_sha256") != head["ids_sha256"]:
                        diffs.append("the example ids differ")
                    if old.get("shard_size") != shard_size:
                        diffs.append(f"shard_size: store has {old.get('shard_size')}, expected {shard_size}")
                    raise StoreMismatchError(f"{root} holds a store built with other settings ("
                                             + "; ".join(diffs[:6]) + "); pass overwrite=True to rebuild it")
                for p in (root / "shards").iterdir():
                    p.unlink()
            elif not resume:
                for p in (root / "shards").iterdir():
                    p.unlink()
        elif not resume:
            for p in (root / "shards").iterdir():
                p.unlink()
        _atomic_write_bytes(mf, _json_bytes({**head, "complete": False, "arrays": {}, "shards": []}))
        buf = io.BytesIO()
        np.save(buf, ids)
        _atomic_write_bytes(root / "ids.npy", buf.getvalue())
    _barrier()

    mine = list(range(rank, num_shards, world))
    todo = [s for s in mine if not _shard_done(root, s, head)]
    bar = tqdm(total=sum(min(n, (s + 1) * shard_size) - s * shard_size for s in mine),
               desc=f"training gradients ({root.name.rsplit('-', 1)[0]})" + (f" [rank {rank}]" if world > 1 else ""), unit="img",
               disable=not progress)
    bar.update(sum(min(n, (s + 1) * shard_size) - s * shard_size for s in mine if s not in todo))
    for s in todo:
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        arrays = compute(lo, hi)
        _write_shard(root, s, lo, hi, ids[lo:hi], arrays, head)
        bar.update(hi - lo)
    bar.close()
    _barrier()
    if rank == 0:
        _finalize(root, head)
    _barrier()
    return ProjectedStore.open(root, verify=False)


def _shard_done(root: Path, s: int, head: Mapping) -> bool:
    base = root / "shards" / _shard_name(s)
    return shard_done(base.with_suffix(".json"), base.with_suffix(".npz"), _settings_digest(head), stacklevel=4)


def _write_shard(root: Path, s: int, lo: int, hi: int, ids: np.ndarray, arrays: Mapping[str, torch.Tensor],
                 head: Mapping) -> None:
    out = {"ids": np.ascontiguousarray(ids, dtype=np.int64)}
    for name, a in arrays.items():
        a = a.detach().to("cpu", torch.float32).numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float32)
        if a.ndim != 2 or a.shape[0] != hi - lo:
            raise ValueError(f"compute({lo}, {hi}) returned array {name!r} of shape {a.shape}, "
                             f"expected [{hi - lo}, dim]")
        if not np.isfinite(a).all():
            raise ValueError(f"array {name!r} of examples {lo}..{hi} contains NaN/inf (check the model and data)")
        out[f"array/{name}"] = np.ascontiguousarray(a)
    buf = io.BytesIO()
    np.savez(buf, **out)
    data = buf.getvalue()
    sdir = root / "shards"
    _atomic_write_bytes(sdir / f"{_shard_name(s)}.npz", data)
    meta = {"index": s, "lo": lo, "hi": hi, "rows": hi - lo, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "settings_sha256": _settings_digest(head),
            "arrays": {k[6:]: list(v.shape) for k, v in out.items() if k.startswith("array/")}}
    _atomic_write_bytes(sdir / f"{_shard_name(s)}.json", _json_bytes(meta))


def _finalize(root: Path, head: Mapping) -> None:
    shards, arrays = [], None
    for s in range(head["num_shards"]):
        side = root / "shards" / f"{_shard_name(s)}.json"
        if not side.is_file():
            raise StoreCorruptError(f"shard {s} of {root} was never written (did a rank fail?)")
        meta = json.loads(side.read_text())
        shards.append({k: meta[k] for k in ("index", "lo", "hi", "rows", "bytes", "sha256")})
        a = {k: v[1] for k, v in meta["arrays"].items()}
        if arrays is not None and a != arrays:
            raise StoreCorruptError(f"shard {s} of {root} holds arrays {a}, others {arrays}")
        arrays = a
    man = {**head, "complete": True, "arrays": {k: {"dim": d} for k, d in (arrays or {}).items()},
           "shards": shards, "bytes_per_example": (4 * sum((arrays or {}).values()) + 8)}
    _atomic_write_bytes(root / "manifest.json", _json_bytes(man))


@dataclass
class ProjectedStore:
    """An opened store: ``ids`` ``[N]`` int64 and ``arrays[name]`` ``[N, dim]`` float32, in store order."""

    path: Path
    manifest: dict
    ids: np.ndarray
    arrays: dict[str, np.ndarray]

    @property
    def settings(self) -> dict:
        return self.manifest["settings"]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def bytes_per_example(self) -> int:
        return int(self.manifest["bytes_per_example"])

    def projector(self, array: str | None = None):
        """The projection the array was built with (from the manifest)."""
        spec = self.settings.get("projection")
        if spec is None:
            raise StoreError(f"store {self.path} records no projection")
        return projector_from_spec(spec)

    def positions(self, ids: Sequence[int]) -> np.ndarray:
        """Row of each id (clear error for unknown ids)."""
        if not hasattr(self, "_pos"):
            self._pos = {int(i): p for p, i in enumerate(self.ids)}
        try:
            return np.array([self._pos[int(i)] for i in ids], dtype=np.int64)
        except KeyError as e:
            raise KeyError(f"id {e.args[0]} is not in the store {self.path}") from None

    @classmethod
    def open(cls, path: str | Path, *, model=None, dataset=None, expect: Mapping[str, Any] | None = None,
             verify: bool = True) -> "ProjectedStore":
        """Open a finished store; refuse it if it was built for another model / dataset / setting or is corrupt.

        ``expect`` maps setting names to required values (e.g. ``{"measurement": "loss", "projection": spec}``).
        ``verify`` checks every shard's SHA-256 (sizes are always checked).
        """
        root = Path(path)
        man = read_finished_manifest(root, STORE_FORMAT, "projected-gradient store", "build_gradient_store(...)")
        st = man["settings"]
        if model is not None:
            fp = model.fingerprint() if hasattr(model, "fingerprint") else str(model)
            if st.get("model_fingerprint") != fp:
                raise StoreMismatchError(f"store {root} was built for model {st.get('model_fingerprint')}, but the "
                                         f"given model is {fp}; rebuild the store for this model")
        if dataset is not None:
            fp = dataset.fingerprint() if hasattr(dataset, "fingerprint") else str(dataset)
            if st.get("dataset_fingerprint") != fp:
                raise StoreMismatchError(f"store {root} was built on dataset {st.get('dataset_fingerprint')}, but "
                                         f"the given dataset is {fp}; rebuild the store for this dataset")
        for k, v in _canonical(dict(expect or {})).items():
            if st.get(k) != v:
                raise StoreMismatchError(f"store {root} has {k}={json.dumps(st.get(k))[:120]}, expected "
                                         f"{json.dumps(v)[:120]}; rebuild it with these settings")
        try:
            ids = np.load(root / "ids.npy")
        except Exception as e:  # missing, truncated or not an .npy file
            raise StoreCorruptError(f"{root / 'ids.npy'} cannot be read ({type(e).__name__}: {e}); rerun the "
                                    "build with resume=True", root / "ids.npy") from None
        if _ids_digest(ids) != man.get("ids_sha256"):
            raise StoreCorruptError(f"{root / 'ids.npy'} fails its checksum (the manifest's ids_sha256); rerun "
                                    "the build with resume=True", root / "ids.npy")
        parts: dict[str, list[np.ndarray]] = {k: [] for k in man["arrays"]}
        for sh in man["shards"]:
            f = root / "shards" / f"{_shard_name(sh['index'])}.npz"
            if not f.is_file():
                raise StoreCorruptError(f"shard {sh['index']} ({f}) is missing; rerun the build with resume=True")
            if f.stat().st_size != sh["bytes"]:
                raise StoreCorruptError(f"shard {sh['index']} ({f}) is truncated: {f.stat().st_size} bytes, the "
                                        f"manifest says {sh['bytes']}; rerun the build with resume=True to redo it")
            if verify and _sha256_file(f) != sh["sha256"]:
                raise StoreCorruptError(f"shard {sh['index']} ({f}) fails its SHA-256 checksum (corrupt); rerun "
                                        "the build with resume=True to redo it")
            try:
                with np.load(f) as z:
                    if not np.array_equal(z["ids"], ids[sh["lo"]:sh["hi"]]):
                        raise StoreCorruptError(f"shard {sh['index']} ({f}) holds other ids than the manifest says")
                    for k in parts:
                        parts[k].append(z[f"array/{k}"])
            except StoreCorruptError:
                raise
            except Exception as e:  # zip / npy parse errors
                raise StoreCorruptError(f"shard {sh['index']} ({f}) cannot be read ({type(e).__name__}: {e}); "
                                        "rerun the build with resume=True to redo it") from None
        arrays = {k: np.ascontiguousarray(np.concatenate(v)) for k, v in parts.items()}
        return cls(root, man, ids, arrays)
