"""The exact store: every training example's full loss gradient, rotated into the curvature's eigenbasis, on disk.

Row ``j`` holds ``Qᵀ g_j`` for every curvature layer (``Q_Bᵀ G_j Q_A``, flattened row-major, layers concatenated in
the curvature's order), with ``g_j`` the training-loss gradient averaged over the store's S seeded draws (the same
draws as the projected store and as :func:`~diffinfluence_widgets.influence.scores.compute_scores` with
``train_num_draws=S, train_seed=seed``). EK-FAC and K-FAC share this eigenbasis (only their eigenvalues differ),
so one store serves both, and the exact score of a query at any damping λ is

    s[q, j] = Σ_l ⟨ Qᵀ g_q,l ⊘ (Λ_l + λ), Qᵀ g_j,l ⟩

— an elementwise division of the *query* followed by one streamed matrix-vector product: a new λ never needs a
training gradient (:mod:`.refine` builds the explorer's exact answers on it).

Files: ``manifest.json`` (identity + shard list, written last), ``shards/shard-NNNNN.npy`` (``[rows, P]`` in the
store's dtype, read in chunks into a reused buffer, never memory-mapped) and a JSON sidecar per shard (rows,
bytes, SHA-256). Each shard is written to a temporary file and renamed into place, so an interrupted build
resumes at the first unfinished shard. A store built for another model, dataset, curvature eigenbasis, draws or
dtype is refused (:class:`ExactStoreMismatchError`).

Cost: ``P × itemsize`` bytes per training example on disk (P = the number of curvature parameters; the demo UNet:
698 785 → 2.8 MB in float32), nothing in memory beyond the page cache: queries stream it in chunks of
``chunk_bytes`` read into one reused buffer.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from tqdm.auto import tqdm

from .._io import atomic_write_npy, atomic_write_text, sha256_file as _sha256_file
from ..influence.gradients import per_example_gradients
from .manifest import StoreCorruptError, StoreError, StoreMismatchError, read_finished_manifest, shard_done

__all__ = ["ExactStore", "ExactShard", "ExactStoreError", "ExactStoreCorruptError", "ExactStoreMismatchError",
           "build_exact_store", "curvature_basis_fingerprint", "EXACT_STORE_FORMAT"]

EXACT_STORE_FORMAT = "diffinfluence-exact-store"
EXACT_STORE_VERSION = 1
_DTYPES = {"float32": np.float32, "float64": np.float64}


class ExactStoreError(StoreError):
    """Something is wrong with an exact store."""


class ExactStoreCorruptError(ExactStoreError, StoreCorruptError):
    """A shard or the manifest is missing, truncated or fails its checksum."""


class ExactStoreMismatchError(ExactStoreError, StoreMismatchError):
    """The store was built for another model, dataset, curvature or setting."""


def curvature_basis_fingerprint(curvature) -> str:
    """SHA-256 (16 hex) of the curvature's eigenbases ``Q_A``, ``Q_B`` and layer order: what the rows depend on."""
    h = hashlib.sha256()
    for n in curvature.layer_names:
        h.update(n.encode())
        for q in (curvature.q_a[n], curvature.q_b[n]):
            t = q.detach().to("cpu", torch.float64).contiguous()
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _json(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)


def _canonical(obj):
    return json.loads(json.dumps(obj, sort_keys=True))


def _shard(s: int) -> str:
    return f"shard-{s:05d}"


def _settings_digest(head: Mapping) -> str:
    key = {k: head[k] for k in ("settings", "ids_sha256", "shard_size")}
    return hashlib.sha256(_json(key).encode()).hexdigest()[:16]


def _layout(curvature) -> tuple[list[str], dict[str, list[int]], dict[str, int]]:
    names = list(curvature.layer_names)
    shapes = {n: [int(s) for s in curvature.eigenvalues[n].shape] for n in names}
    offsets, o = {}, 0
    for n in names:
        offsets[n] = o
        o += shapes[n][0] * shapes[n][1]
    return names, shapes, offsets


def npy_layout(path: Path) -> tuple[tuple, bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, byte offset of the data)`` from a ``.npy`` file's header (OSError /
    ValueError when it cannot be read)."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dt = header(fh)
        return tuple(shape), bool(fortran), dt, fh.tell()


def read_exactly(f, view: np.ndarray, early: str) -> None:
    """Fill the C-contiguous ``view`` from the open file ``f`` (at its position); :class:`ExactStoreCorruptError`
    with the message ``early`` when the file ends first."""
    mv = memoryview(view.reshape(-1).view(np.uint8))
    got = 0
    while got < len(mv):
        n = f.readinto(mv[got:])
        if not n:
            raise ExactStoreCorruptError(early)
        got += n


@dataclass(frozen=True)
class ExactShard:
    """Where one shard's rows live: the ``.npy`` file, the byte offset of its data and its row range."""

    path: Path
    offset: int
    lo: int
    hi: int


@dataclass
class ExactStore:
    """An opened exact store: ``ids`` ``[N]`` and where each shard's rows are (read on demand, never mapped)."""

    path: Path
    manifest: dict
    ids: np.ndarray
    shards: list[ExactShard]

    @property
    def settings(self) -> dict:
        return self.manifest["settings"]

    @property
    def layer_names(self) -> list[str]:
        return list(self.settings["layers"])

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {n: tuple(s) for n, s in self.settings["shapes"].items()}

    @property
    def offsets(self) -> dict[str, int]:
        return dict(self.manifest["offsets"])

    @property
    def num_parameters(self) -> int:
        return int(self.manifest["num_parameters"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(_DTYPES[self.settings["dtype"]])

    @property
    def bytes_per_example(self) -> int:
        return self.num_parameters * self.dtype.itemsize

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, ids: Sequence[int]) -> np.ndarray:
        if not hasattr(self, "_pos"):
            self._pos = {int(i): p for p, i in enumerate(self.ids)}
        try:
            return np.array([self._pos[int(i)] for i in ids], dtype=np.int64)
        except KeyError as e:
            raise KeyError(f"id {e.args[0]} is not in the exact store {self.path}") from None

    def _fill(self, f, shard: ExactShard, lo: int, view: np.ndarray) -> None:
        """Read rows ``lo … lo + len(view)`` of ``shard`` (open file ``f``) into the C-contiguous ``view``."""
        f.seek(shard.offset + (lo - shard.lo) * self.bytes_per_example)
        read_exactly(f, view, f"shard {shard.path} ended early (truncated?); rerun the build")

    def read(self, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``lo … hi − 1`` (store order) as ``[hi − lo, P]`` in the store's dtype, read into ``out`` when
        given (a C-contiguous buffer of at least that many rows, reused across calls), else into a new array."""
        lo, hi = int(lo), int(hi)
        if not 0 <= lo <= hi <= len(self.ids):
            raise IndexError(f"rows {lo}..{hi} are outside the exact store's {len(self.ids)} rows")
        if out is None:
            out = np.empty((hi - lo, self.num_parameters), dtype=self.dtype)
        if out.dtype != self.dtype or out.shape[1:] != (self.num_parameters,) or out.shape[0] < hi - lo \
                or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {self.dtype} [≥ {hi - lo}, {self.num_parameters}] array")
        view = out[:hi - lo]
        for sh in self.shards:
            a, b = max(lo, sh.lo), min(hi, sh.hi)
            if a < b:
                with open(sh.path, "rb", buffering=0) as f:
                    self._fill(f, sh, a, view[a - lo:b - lo])
        return view

    def rows(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """``[len(positions), P]`` copies of the given rows (store order positions), in the store's dtype."""
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        out = np.empty((len(pos), self.num_parameters), dtype=self.dtype)
        for r, p in enumerate(pos):
            if not 0 <= p < len(self.ids):
                raise IndexError(f"row {p} is outside the exact store's {len(self.ids)} rows")
            self.read(p, p + 1, out[r:r + 1])
        return out

    def chunks(self, chunk_bytes: int = 32 << 20) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, [rows, P] block)`` of at most ``chunk_bytes`` (at least one row), in store order.

        Every block is read into the *same* buffer (valid until the next one): a pass over the store holds
        ``chunk_bytes`` in memory, and the file is read, not mapped, so the process does not grow by the store's
        size (the page cache still keeps it for the next pass).
        """
        step = max(1, int(chunk_bytes) // max(self.bytes_per_example, 1))
        buf = np.empty((min(step, max(len(self.ids), 1)), self.num_parameters), dtype=self.dtype)
        for lo in range(0, len(self.ids), step):
            hi = min(len(self.ids), lo + step)
            yield lo, self.read(lo, hi, buf)

    # -------------------------------------------------------------------------------------------- open
    @classmethod
    def open(cls, path: str | Path, *, model=None, dataset=None, curvature=None,
             expect: Mapping[str, Any] | None = None, verify: bool = False) -> "ExactStore":
        """Open a finished store; refuse it when built for another model / dataset / curvature / setting, or when a
        shard is missing or truncated (``verify=True`` also checks every shard's SHA-256)."""
        root = Path(path)
        man = read_finished_manifest(root, EXACT_STORE_FORMAT, "exact store", "build_exact_store(...)",
                                     ExactStoreError, ExactStoreCorruptError)
        st = man["settings"]
        checks = {}
        if model is not None:
            checks["model_fingerprint"] = model.fingerprint()
        if dataset is not None:
            checks["dataset_fingerprint"] = dataset.fingerprint()
        if curvature is not None:
            checks["curvature_basis"] = curvature_basis_fingerprint(curvature)
        checks.update(_canonical(dict(expect or {})))
        for k, v in checks.items():
            if st.get(k) != v:
                raise ExactStoreMismatchError(
                    f"exact store {root} has {k}={json.dumps(st.get(k))[:100]}, expected {json.dumps(v)[:100]} "
                    "(built for another model, dataset, curvature or setting); rebuild it")
        try:
            ids = np.load(root / "ids.npy")
        except (OSError, ValueError) as e:
            raise ExactStoreCorruptError(f"{root / 'ids.npy'} cannot be read ({e}); rebuild the exact store") from None
        shards = []
        for sh in man["shards"]:
            f = root / "shards" / f"{_shard(sh['index'])}.npy"
            if not f.is_file():
                raise ExactStoreCorruptError(f"shard {f} of the exact store is missing; rebuild / resume it")
            if f.stat().st_size != sh["bytes"]:
                raise ExactStoreCorruptError(f"shard {f} is truncated: {f.stat().st_size} bytes, the manifest "
                                             f"says {sh['bytes']}; rerun the build to redo it")
            if verify and _sha256_file(f) != sh["sha256"]:
                raise ExactStoreCorruptError(f"shard {f} fails its SHA-256 checksum (corrupt); rerun the build")
            try:
                shape, fortran, dt, offset = npy_layout(f)
            except (OSError, ValueError) as e:
                raise ExactStoreCorruptError(f"shard {f} cannot be read ({e}); rerun the build") from None
            want = np.dtype(_DTYPES[st["dtype"]])
            if tuple(shape) != (sh["rows"], man["num_parameters"]) or dt != want or fortran:
                raise ExactStoreCorruptError(f"shard {f} holds {dt} {shape}, expected "
                                             f"{st['dtype']} {(sh['rows'], man['num_parameters'])}")
            if offset + sh["rows"] * man["num_parameters"] * want.itemsize != sh["bytes"]:
                raise ExactStoreCorruptError(f"shard {f} has {sh['bytes']} bytes, not a header and "
                                             f"{sh['rows']} rows")
            shards.append(ExactShard(f, offset, sh["lo"], sh["hi"]))
        return cls(root, man, ids, shards)


# ------------------------------------------------------------------------------------------------ build
def build_exact_store(path: str | Path, model, dataset, curvature, *, num_draws: int = 64, seed: int = 0,
                      dtype: str = "float32", shard_size: int = 64, batch_size: int = 16, device=None,
                      overwrite: bool = False, progress: bool = True,
                      on_gradients: Callable[[Any], None] | None = None) -> ExactStore:
    """Compute (or resume, or just open) the exact store of ``dataset`` under ``model`` and ``curvature``.

    ``num_draws`` / ``seed``: the training-side draws (use the projected store's, so both describe one method).
    ``dtype``: ``"float32"`` (the explorer) or ``"float64"`` (exactness tests). ``shard_size``: rows per shard
    file (the unit of atomic writes and of resuming). ``on_gradients(LayerGradients)`` sees every batch of
    training gradients (e.g. a benchmark accumulating reference scores in the same pass). A folder holding a
    store with other settings is refused unless ``overwrite=True``.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if isinstance(shard_size, bool) or int(shard_size) < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    root = Path(path)
    names, shapes, offsets = _layout(curvature)
    num_params = sum(a * b for a, b in shapes.values())
    ids = np.asarray(torch.as_tensor(dataset.ids).numpy(), dtype=np.int64).reshape(-1)
    if len(ids) == 0:
        raise ValueError(f"the dataset {dataset.fingerprint()} is empty: there is nothing to store")
    settings = _canonical({
        "model_fingerprint": model.fingerprint(), "dataset_fingerprint": dataset.fingerprint(),
        "curvature_basis": curvature_basis_fingerprint(curvature), "measurement": "loss",
        "num_draws": int(num_draws), "draw_seed": int(seed), "dtype": dtype, "layers": names, "shapes": shapes,
        "gradient_mode": "eval", "bias": "folded into the layer input as a constant 1"})
    n = len(ids)
    shard_size = int(shard_size)
    num_shards = max(1, math.ceil(n / shard_size))
    head = {"format": EXACT_STORE_FORMAT, "version": EXACT_STORE_VERSION, "settings": settings, "num_examples": n,
            "ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest()[:16], "shard_size": shard_size,
            "num_shards": num_shards, "num_parameters": num_params, "offsets": offsets}
    mf = root / "manifest.json"
    if mf.is_file():
        try:
            old = json.loads(mf.read_text())
        except ValueError:
            old = None  # unreadable: resume through the shards' sidecars
        if old is not None:
            same = all(old.get(k) == head[k] for k in ("format", "version", "settings", "ids_sha256", "shard_size"))
            if same and old.get("complete"):
                try:
                    return ExactStore.open(root, verify=False)
                except ExactStoreCorruptError as e:
                    warnings.warn(f"{e}; resuming the build", RuntimeWarning, stacklevel=2)
            elif not same and not overwrite:
                diffs = [f"{k}: store has {json.dumps(old.get('settings', {}).get(k))[:60]}, expected "
                         f"{json.dumps(v)[:60]}" for k, v in settings.items() if old.get("settings", {}).get(k) != v]
                raise ExactStoreMismatchError(f"{root} holds an exact store built with other settings ("
                                              + "; ".join(diffs[:4] or ["ids or shard size differ"])
                                              + "); pass overwrite=True to rebuild it")
            elif not same:
                for p in (root / "shards").glob("shard-*"):
                    p.unlink()
    (root / "shards").mkdir(parents=True, exist_ok=True)
    atomic_write_text(mf, _json({**head, "complete": False, "shards": []}))
    atomic_write_npy(root / "ids.npy", ids)

    digest = _settings_digest(head)
    np_dtype = _DTYPES[dtype]
    todo = [s for s in range(num_shards) if not _shard_done(root, s, digest)]
    bar = tqdm(total=n, desc="exact training gradients (for exact top-k)", unit="img", disable=not progress)
    bar.update(n - sum(min(n, (s + 1) * shard_size) - s * shard_size for s in todo))
    images, tids = dataset.images, torch.as_tensor(dataset.ids, dtype=torch.long)
    for s in todo:
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        final = root / "shards" / f"{_shard(s)}.npy"
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
        os.close(fd)
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype, shape=(hi - lo, num_params))
            for a in range(lo, hi, int(batch_size)):
                b = min(hi, a + int(batch_size))
                g = per_example_gradients(model, images[a:b], tids[a:b], "loss", num_draws=num_draws, seed=seed,
                                          batch_size=batch_size, device=device)
                if on_gradients is not None:
                    on_gradients(g)
                rot = curvature.rotate({m: g.layers[m].to("cpu", torch.float64) for m in names})
                for m in names:
                    if not torch.isfinite(rot[m]).all():
                        raise ValueError(f"training gradients of examples {a}..{b} (layer {m}) contain NaN/inf")
                    out[a - lo:b - lo, offsets[m]:offsets[m] + rot[m][0].numel()] = \
                        rot[m].reshape(b - a, -1).numpy().astype(np_dtype)
                bar.update(b - a)
            out.flush()
            del out
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            meta = {"index": s, "lo": lo, "hi": hi, "rows": hi - lo, "bytes": os.path.getsize(tmp),
                    "sha256": _sha256_file(Path(tmp)), "settings_sha256": digest}
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        atomic_write_text(final.with_suffix(".json"), _json(meta))
    bar.close()
    shards = []
    for s in range(num_shards):
        meta = json.loads((root / "shards" / f"{_shard(s)}.json").read_text())
        shards.append({k: meta[k] for k in ("index", "lo", "hi", "rows", "bytes", "sha256")})
    atomic_write_text(mf, _json({**head, "complete": True, "shards": shards,
                                 "bytes_per_example": num_params * np.dtype(np_dtype).itemsize}))
    return ExactStore.open(root)


def _shard_done(root: Path, s: int, digest: str) -> bool:
    return shard_done(root / "shards" / f"{_shard(s)}.json", root / "shards" / f"{_shard(s)}.npy", digest,
                      stacklevel=4)
