"""TRAK-family baselines in the projected space (``method.md`` §5): TRAK, D-TRAK and Journey-TRAK.

All three score ``s[q, j] = φ(x′)ᵀ (ΦᵀΦ + λI)⁻¹ φ(x_j)`` where ``φ(x) = R ∇f(x)`` are randomly projected gradients
and ``Φ`` ``[N, k]`` stacks the projected *training* gradients (the GGN^loss / empirical Fisher in projected space).
They differ only in the functions differentiated:

=============  ==============================  ===============================================
method         query side ``f`` (measurement)  training side (store)
=============  ==============================  ===============================================
TRAK           the chosen measurement (loss)    ∇ loss           (the K-FAC parameter-space store)
D-TRAK         square norm                      ∇ square norm    (its own store)
Journey-TRAK   per-step trajectory loss         ∇ loss
=============  ==============================  ===============================================

``ΦᵀΦ = U diag(σ) Uᵀ`` is eigendecomposed once, so a new λ is an elementwise division:
``(ΦᵀΦ + λI)⁻¹ φ_q = U (Uᵀ φ_q ⊘ (σ + λ))`` — :meth:`TRAKScorer.rotate` once per query, :meth:`TRAKScorer.query_feature`
per λ, and the result is searched in the same FAISS index as the K-FAC family. λ here is **not comparable** with
the K-FAC family's damping (it is added to ΦᵀΦ, which carries no 1/N); :meth:`TRAKScorer.default_damping` is
relative to the spectrum of ΦᵀΦ.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np

from .._io import CorruptArtifactError, atomic_write_bytes, state_digest
from ..config import check_damping

__all__ = ["TRAKScorer", "DEFAULT_TRAK_RELATIVE_DAMPING"]

#: default λ for the TRAK family, as a multiple of the mean eigenvalue of ΦᵀΦ (see :meth:`TRAKScorer.default_damping`).
#: Swept on the digits benchmark (``bench/digits_benchmark.py --quick``, k = 1024, relative λ = 10⁻⁶ … 10², LDS):
#: TRAK peaked at 10 (17.6 %; 16.7 % at 1), D-TRAK at 1 (24.5 %; 24.0 % at 0.1); both are flat (≈ 12–14 %) below
#: 10⁻³ — the "scores ≈ 0 at small λ" regime of the paper — so 1 is near the best for both.
DEFAULT_TRAK_RELATIVE_DAMPING = 1.0


class TRAKScorer:
    """``(ΦᵀΦ + λI)⁻¹`` in the projected space, for any λ after one eigendecomposition.

    Parameters
    ----------
    features:
        ``Φ``, ``[N, k]`` projected training gradients (float32 is fine: the Gram matrix is formed in float64).
    """

    def __init__(self, features: np.ndarray, *, eig: tuple[np.ndarray, np.ndarray] | None = None):
        self.features = np.asarray(features)
        if self.features.ndim != 2:
            raise ValueError(f"features must be [N, k], got shape {self.features.shape}")
        if eig is None:
            phi = self.features.astype(np.float64)
            gram = phi.T @ phi
            sigma, u = np.linalg.eigh(gram)
            eig = (np.clip(sigma, 0.0, None), u)
        self.sigma, self.u = eig

    @classmethod
    def from_store(cls, store, array: str = "features", cache: bool = True) -> "TRAKScorer":
        """Build from a :class:`~diffinfluence_widgets.store.ProjectedStore`; the eigendecomposition is cached in
        the store folder (keyed by the shards' checksums, written atomically)."""
        feats = store.arrays[array]
        path = cls.cache_path(store, array)
        if cache and path.is_file():
            try:
                with np.load(path) as z:
                    sigma, u, digest = z["sigma"], z["u"], bytes(z["sha256"]).decode()
                if state_digest([sigma, u]) != digest:
                    raise CorruptArtifactError(f"{path} fails its SHA-256 checksum", path)
                return cls(feats, eig=(sigma, u))
            except Exception as e:  # unreadable or altered cache: say so, recompute and rewrite it
                warnings.warn(f"cached TRAK eigendecomposition {path} is unreadable ({type(e).__name__}: {e}); "
                              "recomputing it", RuntimeWarning, stacklevel=2)
        out = cls(feats)
        if cache:
            buf = io.BytesIO()
            np.savez(buf, sigma=out.sigma, u=out.u,
                     sha256=np.frombuffer(state_digest([out.sigma, out.u]).encode(), dtype=np.uint8))
            atomic_write_bytes(path, buf.getvalue())
        return out

    @staticmethod
    def cache_path(store, array: str = "features") -> Path:
        """Where :meth:`from_store` caches the eigendecomposition of ``store``'s ``array``."""
        key = hashlib.sha256("".join(s["sha256"] for s in store.manifest["shards"]).encode() + array.encode())
        return Path(store.path) / f"trak-gram-eigh-{key.hexdigest()[:16]}.npz"

    @classmethod
    def cached_spectrum(cls, store, array: str = "features") -> np.ndarray | None:
        """The eigenvalues σ of ΦᵀΦ from :meth:`from_store`'s cache, read without the ``[k, k]`` eigenvectors
        (``k = 4096``: 134 MB); ``None`` when there is no readable cache. Not checked against the cache's digest
        (that needs the eigenvectors): :meth:`from_store` checks the whole file when the eigenvectors are loaded."""
        path = cls.cache_path(store, array)
        try:
            with np.load(path) as z:  # an .npz is read member by member: only sigma is decompressed
                sigma = np.asarray(z["sigma"], dtype=np.float64)
        except Exception:  # missing, truncated, unreadable: the caller builds the scorer the slow way
            return None
        return sigma if sigma.ndim == 1 else None

    @staticmethod
    def damping_from_spectrum(sigma: np.ndarray, relative: float = DEFAULT_TRAK_RELATIVE_DAMPING) -> float:
        """:meth:`default_damping` for the eigenvalues ``sigma``."""
        return float(relative * max(np.asarray(sigma).mean(), np.finfo(np.float64).tiny))

    @property
    def k(self) -> int:
        return int(self.u.shape[0])

    def default_damping(self, relative: float = DEFAULT_TRAK_RELATIVE_DAMPING) -> float:
        """``relative`` × the mean eigenvalue of ΦᵀΦ (the baselines need a swept λ; this is the sweep's centre)."""
        return self.damping_from_spectrum(self.sigma, relative)

    def rotate(self, query_features: np.ndarray) -> np.ndarray:
        """``Uᵀ φ_q`` (``[..., k]``, float64): do once per query."""
        q = np.asarray(query_features, dtype=np.float64)
        if q.shape[-1] != self.k:
            raise ValueError(f"query features have dimension {q.shape[-1]}, the store holds {self.k}")
        return q @ self.u

    def query_feature(self, rotated: np.ndarray, damping: float) -> np.ndarray:
        """``(ΦᵀΦ + λI)⁻¹ φ_q`` from the rotated query (float64); search it against Φ."""
        return (rotated / (self.sigma + check_damping(damping))) @ self.u.T

    def scores(self, rotated: np.ndarray, damping: float) -> np.ndarray:
        """``[..., N]`` scores of every training example (float64)."""
        q = self.query_feature(rotated, damping)
        out = np.empty((*q.shape[:-1], self.features.shape[0]))
        for a in range(0, self.features.shape[0], 8192):  # float64 a block at a time, never the whole store
            out[..., a:a + 8192] = q @ self.features[a:a + 8192].astype(np.float64).T
        return out
