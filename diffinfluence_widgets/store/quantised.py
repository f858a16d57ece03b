"""An 8-bit copy of the exact store: the first answer of a new query, over every training image (issue 9).

Row ``j`` of the exact store (:mod:`.exact`) holds ``r_j = Qᵀ g_j``, the training gradient in the curvature's
eigenbasis. This copy keeps one signed byte per coordinate, ``c_ji = round(r_ji / s_i)``, with one scale per
coordinate ``s_i = max_j |r_ji| / 127`` (coordinates differ by orders of magnitude; the largest entry of a column,
often the most influential example's, is kept at full range rather than clipped). For a query ``u = Qᵀ g_q`` and any
λ the scan gives

    ŝ_j = Σ_i (u_i s_i / (Λ_i + λ)) c_ji,   |ŝ_j − s_j| ≤ ½ Σ_i |u_i| s_i / (Λ_i + λ)  (+ float32 rounding)

for every training image in one pass over ``N × P`` bytes — a quarter of the float32 exact store — with exact
per-coordinate damping, so one file serves both methods (EK-FAC, K-FAC) and every λ.

Why not a sketch: on the demo (N = 512, P = 698 785) the training rows are close to full rank inside every eigenvalue
decade, so random projections and CountSketches of up to 65 536 dimensions reached recall@10 0.40–0.73 at small λ
(``bench/instant_sketch.py``); this copy reaches the recall of float16 storage (``bench/RESULTS.md``).

Files, under the exact store's folder (``int8/``): ``codes.npy`` (``[N, P]`` int8), ``scales.npy`` (``[P]``
float32) and ``manifest.json`` (written last) naming the exact store it was made from (its settings and shard
checksums). Each file is written to a temporary name and renamed into place. A copy made from another exact store
is refused by :meth:`QuantisedStore.open` and rebuilt by :func:`build_quantised_store`; it is derived data, made
in two streamed passes over the exact store (seconds for the demo).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .._io import atomic_write, atomic_write_npy, atomic_write_text
from .exact import (ExactStore, ExactStoreCorruptError, ExactStoreError, ExactStoreMismatchError, npy_layout,
                    read_exactly)
from .manifest import read_finished_manifest

__all__ = ["QuantisedStore", "build_quantised_store", "QUANTISED_FORMAT"]

QUANTISED_FORMAT = "diffinfluence-int8-exact-store"
_LEVELS = 127
#: columns converted to float32 at a time during a scan (rows × this × 4 bytes: kept in cache)
_SCAN_COLUMNS = 65536


def source_digest(exact: ExactStore) -> str:
    """What identifies the exact store a copy was made from: its settings, ids and shard checksums."""
    man = exact.manifest
    body = json.dumps({"settings": man["settings"], "ids_sha256": man.get("ids_sha256"),
                       "shards": [s["sha256"] for s in man["shards"]]}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


@dataclass
class QuantisedStore:
    """An opened 8-bit copy: ``ids`` ``[N]``, ``scales`` ``[P]`` float32 and where the codes are (read in chunks)."""

    path: Path
    manifest: dict
    ids: np.ndarray
    scales: np.ndarray
    offset: int  # byte offset of the codes in codes.npy

    @property
    def num_parameters(self) -> int:
        return int(self.scales.shape[0])

    @property
    def bytes_per_example(self) -> int:
        return self.num_parameters

    def __len__(self) -> int:
        return len(self.ids)

    def chunks(self, chunk_bytes: int = 32 << 20) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, [rows, P] int8 block)``, every block read into the same buffer (valid until the next)."""
        P, n = self.num_parameters, len(self.ids)
        step = max(1, int(chunk_bytes) // max(P, 1))
        buf = np.empty((min(step, max(n, 1)), P), dtype=np.int8)
        with open(self.path / "codes.npy", "rb", buffering=0) as f:
            f.seek(self.offset)
            for lo in range(0, n, step):
                rows = min(n, lo + step) - lo
                read_exactly(f, buf[:rows], f"{self.path / 'codes.npy'} ended early; rebuild the copy")
                yield lo, buf[:rows]

    def dequantised(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Rows ``lo … hi − 1`` as float32 ``c_ji s_i`` (for checks; the scan never forms them)."""
        hi = len(self.ids) if hi is None else int(hi)
        out = []
        for a, block in self.chunks():
            b = a + block.shape[0]
            if b > lo and a < hi:
                out.append(block[max(lo, a) - a:min(hi, b) - a].astype(np.float32) * self.scales)
        return np.concatenate(out) if out else np.zeros((0, self.num_parameters), np.float32)

    def scan(self, weights: np.ndarray | torch.Tensor) -> np.ndarray:
        """``[N]`` float64: ``Σ_i w_i s_i c_ji`` for every row (``w`` ``[P]``, e.g. ``u ⊘ (Λ + λ)``)."""
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64) * self.scales, dtype=torch.float32)
        if w.shape != (self.num_parameters,):
            raise ValueError(f"weights must be [{self.num_parameters}], got {tuple(w.shape)}")
        out = np.empty(len(self.ids))
        for lo, block in self.chunks():
            t = torch.from_numpy(block)
            acc = torch.zeros(block.shape[0], dtype=torch.float64)
            for c in range(0, self.num_parameters, _SCAN_COLUMNS):
                acc += (t[:, c:c + _SCAN_COLUMNS].float() @ w[c:c + _SCAN_COLUMNS]).double()
            out[lo:lo + block.shape[0]] = acc.numpy()
        return out

    def error_bound(self, weights: np.ndarray | torch.Tensor) -> float:
        """A bound on ``|scan(w)_j − Σ_i w_i r_ji|`` from the rounding to bytes: ``½ Σ_i |w_i| s_i``."""
        return 0.5 * float(np.abs(np.asarray(weights, dtype=np.float64)) @ self.scales.astype(np.float64))

    @classmethod
    def open(cls, path: str | Path, exact: ExactStore | None = None) -> "QuantisedStore":
        """Open a finished copy; refuse one made from another exact store than ``exact`` (when given), or one whose
        files are missing or truncated."""
        root = Path(path)
        man = read_finished_manifest(root, QUANTISED_FORMAT, "8-bit exact-store copy", "build_quantised_store(...)",
                                     ExactStoreError, ExactStoreCorruptError)
        if exact is not None and man.get("source") != source_digest(exact):
            raise ExactStoreMismatchError(f"{root} was made from another exact store ({man.get('source')}, expected "
                                          f"{source_digest(exact)}); rebuild it with build_quantised_store")
        n, P = int(man["num_examples"]), int(man["num_parameters"])
        f = root / "ids.npy"
        try:
            ids = np.load(f)
            f = root / "scales.npy"
            scales = np.load(f)
            f = root / "codes.npy"
            shape, fortran, dt, offset = npy_layout(f)
        except (OSError, ValueError) as e:
            raise ExactStoreCorruptError(f"{f} of the 8-bit copy cannot be read ({e}); rebuild the copy") from None
        size = (root / "codes.npy").stat().st_size
        if (shape != (n, P) or dt != np.int8 or fortran or offset + n * P != size or ids.shape != (n,)
                or scales.shape != (P,) or scales.dtype != np.float32):
            raise ExactStoreCorruptError(f"the 8-bit copy at {root} holds codes.npy {dt} {shape} ({size} bytes), "
                                         f"expected int8 {(n, P)} with {n} ids and {P} scales; rebuild it")
        if exact is not None and not np.array_equal(ids, exact.ids):
            raise ExactStoreMismatchError(f"{root} lists other ids than the exact store {exact.path}")
        return cls(root, man, ids, scales, offset)


def build_quantised_store(exact: ExactStore, path: str | Path | None = None, *, progress: bool = False,
                          chunk_bytes: int = 32 << 20) -> QuantisedStore:
    """Open the 8-bit copy of ``exact`` at ``path`` (default: ``exact.path / "int8"``), or make it (two streamed
    passes: the column maxima, then the codes) when it is missing, unreadable or made from another exact store."""
    root = Path(path) if path is not None else exact.path / "int8"
    if (root / "manifest.json").is_file():
        try:
            return QuantisedStore.open(root, exact)
        except ExactStoreError as e:
            warnings.warn(f"{e}; making it again", RuntimeWarning, stacklevel=2)
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").unlink(missing_ok=True)  # an unfinished copy is never opened
    n, P = len(exact), exact.num_parameters
    bar = tqdm(total=2 * n, desc="8-bit copy of the exact store (instant answers)", unit="img", disable=not progress)
    amax = np.zeros(P, dtype=np.float64)
    for lo, block in exact.chunks(chunk_bytes):
        np.maximum(amax, np.abs(block).max(0), out=amax)
        bar.update(block.shape[0])
    scales = np.where(amax > 0, amax / _LEVELS, 1.0).astype(np.float32)
    inv = (1.0 / scales.astype(np.float64))

    def write_codes(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.dtype(np.int8).str, "fortran_order": False,
                                                     "shape": (n, P)})
            for _, blk in exact.chunks(chunk_bytes):
                codes = np.clip(np.rint(blk * inv), -_LEVELS, _LEVELS).astype(np.int8)
                f.write(codes.tobytes())
                bar.update(blk.shape[0])
            f.flush()
            os.fsync(f.fileno())

    atomic_write(root / "codes.npy", write_codes)
    atomic_write_npy(root / "scales.npy", scales)
    atomic_write_npy(root / "ids.npy", np.asarray(exact.ids, dtype=np.int64))
    bar.close()
    atomic_write_text(root / "manifest.json", json.dumps({
        "format": QUANTISED_FORMAT, "complete": True, "source": source_digest(exact), "num_examples": n,
        "num_parameters": P, "levels": _LEVELS, "scale": "per coordinate: max |r_ji| over j / 127"}, indent=1))
    return QuantisedStore.open(root, exact)
