"""The persistence layer: atomic writes, SHA-256 checksums and one typed error for a damaged artifact.

* **Atomic.** Every artifact is written to a temporary file in its own folder, flushed to disk, then renamed into
  place: a reader sees either the old file or the complete new one, never a torn write, even if the process is
  killed midway (the rename is atomic on POSIX file systems).
* **Ordinary permissions.** The file gets mode ``0o666 & ~umask``, exactly what ``open(path, "w")`` would give
  (the temporary file's private 0600 is not kept).
* **Checked.** Writers record the SHA-256 of every payload in the artifact's manifest; readers check it and
  raise :class:`CorruptArtifactError`, whose message names the file, for a truncated, unreadable or altered one.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = ["CorruptArtifactError", "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "file_mode", "sha256_bytes", "sha256_file", "check_sha256", "read_json", "save_safetensors",
           "load_safetensors", "state_digest", "remove_listed_entries", "remove_stale_temporaries"]


class CorruptArtifactError(ValueError):
    """An artifact on disk is truncated, unreadable or fails its SHA-256 checksum.

    A :class:`ValueError`, so code that already treats a bad artifact as a bad value keeps working. ``path`` is the
    damaged file; the message always names it.
    """

    def __init__(self, message: str, path: str | Path | None = None):
        if path is not None and str(path) not in message:
            message = f"{path}: {message}"
        super().__init__(message)
        self.path = None if path is None else Path(path)


# ---------------------------------------------------------------------------------------------- writing
_umask_lock = threading.Lock()


def file_mode() -> int:
    """``0o666 & ~umask``: the mode ``open()`` gives a new file."""
    try:  # Linux ≥ 4.7 reports the umask without changing it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:  # elsewhere: set and restore (the lock keeps our own threads from racing)
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` to produce the file, flush it to disk, then rename it onto ``path``.

    The result has mode ``0o666 & ~umask`` (:func:`file_mode`); the parent folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def remove_stale_temporaries(folder: str | Path, name: str = "*") -> int:
    """Delete the temporary files :func:`atomic_write` left in ``folder`` for target ``name`` (a glob) when a
    process was killed between writing and renaming; return how many. Call it only where no other process is
    writing the same files (e.g. when a resumable step starts)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.glob(f".{name}.*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_npy(path: str | Path, array) -> Path:
    """``np.save(array)`` written atomically."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_write_json(path: str | Path, obj: Any, **dumps_kw) -> Path:
    """``json.dumps(obj, indent=1, sort_keys=True, **dumps_kw)`` written atomically."""
    kw = {"indent": 1, "sort_keys": True, **dumps_kw}
    return atomic_write_text(path, json.dumps(obj, **kw))


# ---------------------------------------------------------------------------------------------- checksums
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for blk in iter(lambda: f.read(1 << 20), b""):
            h.update(blk)
    return h.hexdigest()


def check_sha256(path: str | Path, expected: str | None, data: bytes | None = None) -> None:
    """Raise :class:`CorruptArtifactError` naming ``path`` unless its SHA-256 is ``expected``.

    ``data``: the file's bytes when already read. ``expected=None`` (a manifest that records no checksum) is an
    error too: such an artifact cannot be trusted.
    """
    if not expected:
        raise CorruptArtifactError(f"{path} has no SHA-256 in its manifest (written by an older version?); "
                                   "rebuild it", path)
    got = sha256_bytes(data) if data is not None else sha256_file(path)
    if got != expected:
        raise CorruptArtifactError(f"{path} fails its SHA-256 checksum (corrupt or altered: {got[:12]}… "
                                   f"!= {expected[:12]}… in the manifest); rebuild it", path)


# ---------------------------------------------------------------------------------------------- reading
def read_json(path: str | Path, what: str = "manifest") -> dict:
    """Parse a JSON file; a missing file raises ``FileNotFoundError``, a truncated or unparsable one
    :class:`CorruptArtifactError` naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist") from None
    except UnicodeDecodeError as e:
        raise CorruptArtifactError(f"{what} {path} is not text ({e.reason}); it is corrupt", path) from None
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise CorruptArtifactError(f"{what} {path} is not valid JSON ({e}); it is truncated or corrupt",
                                   path) from None
    if not isinstance(obj, dict):
        raise CorruptArtifactError(f"{what} {path} holds a JSON {type(obj).__name__}, expected an object", path)
    return obj


def save_safetensors(path: str | Path, tensors: Mapping, metadata: Mapping[str, str] | None = None) -> str:
    """Write ``tensors`` as one safetensors file in **one** atomic write; return the file's SHA-256."""
    from safetensors.torch import save

    data = save(dict(tensors), metadata=dict(metadata) if metadata else None)
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def load_safetensors(path: str | Path, sha256: str | None = None, *, check: bool = True, device: str = "cpu",
                     with_metadata: bool = False):
    """Read a safetensors file, check its SHA-256 (when ``check``) and parse it.

    Truncated, unparsable or altered files raise :class:`CorruptArtifactError` naming the file.
    Returns the tensors (and the header metadata when ``with_metadata``).
    """
    from safetensors.torch import load

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{str(path)!r} does not exist") from None
    if check:
        check_sha256(path, sha256, data)
    try:
        tensors = load(data)
        meta = _safetensors_metadata(data) if with_metadata else None
    except Exception as e:  # safetensors raises its own SafetensorError (not a ValueError) for a bad header
        raise CorruptArtifactError(f"{path} cannot be read as safetensors ({type(e).__name__}: {e}); it is "
                                   "truncated or corrupt", path) from None
    if device != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return (tensors, meta) if with_metadata else tensors


def _safetensors_metadata(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    return dict(header.get("__metadata__") or {})


def state_digest(obj) -> str:
    """SHA-256 of a nested structure of dicts, lists, tensors / arrays and scalars (e.g. a training checkpoint's
    state), independent of how it is serialised: stored beside the state, it lets a loader detect altered bytes
    that the container format itself would accept."""
    h = hashlib.sha256()

    def walk(o) -> None:
        if isinstance(o, dict):
            h.update(b"{")
            for k in sorted(o, key=str):
                h.update(repr(k).encode() + b":")
                walk(o[k])
            h.update(b"}")
        elif isinstance(o, (list, tuple)):
            h.update(b"[")
            for v in o:
                walk(v)
            h.update(b"]")
        elif hasattr(o, "detach") and hasattr(o, "dtype"):  # a torch tensor
            t = o.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(__import__("torch").uint8).numpy().tobytes())
        elif hasattr(o, "tobytes") and hasattr(o, "dtype"):  # a numpy array
            h.update(f"A{o.dtype}{o.shape}".encode() + o.tobytes())
        else:
            h.update(repr(o).encode())

    walk(obj)
    return h.hexdigest()


def remove_listed_entries(root: str | Path, patterns) -> list[str]:
    """Delete the top-level entries of ``root`` whose names match one of ``patterns`` (names or globs, e.g. the
    list a manifest keeps of what its writer created); return their names. Nothing else is touched: patterns with a
    path separator or ``..`` and bare wildcards (``*``) are ignored, so a manifest can never send the deletion outside
    ``root`` or sweep the whole folder, and a symbolic link is removed, never followed."""
    root = Path(root)
    pats = [p for p in (patterns if isinstance(patterns, (list, tuple)) else [])
            if isinstance(p, str) and p.strip("*?") and "/" not in p and "\\" not in p and not p.startswith("..")]
    gone = []
    for p in sorted(root.iterdir()):
        if any(fnmatch.fnmatchcase(p.name, pat) for pat in pats):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            gone.append(p.name)
    return gone
