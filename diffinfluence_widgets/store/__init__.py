"""The store room: sharded, checksummed stores of projected training gradients (``method.md`` §6).

Scores are ``s[q, j] = (P_λ g_q)ᵀ g_j`` with ``P_λ = (G + λI)⁻¹``. Only the query is preconditioned; the training
side is a store of randomly projected gradients ``R g_j`` that never depends on λ, the query's measurement or
the query, so one FAISS index serves every setting of the explorer. Top-k opponents are the top-k of the negated
query. Sign convention: a **positive** score means removing the training example is predicted to **increase** the
query's measurement (a proponent for the loss).

The file reads top to bottom in the order the work happens:

1. **Store** (:func:`build_store`, :func:`build_gradient_store`, :class:`ProjectedStore`): shards of projected
   training gradients written atomically (temporary file + ``os.replace``), each with a checksum; a manifest
   with the model and dataset fingerprints, the training-side measurement, S draws, the draw seed, the
   projection (kind, seed, k) and the dtype (float32). An interrupted build resumes and skips finished shards;
   under ``torchrun`` the shards are split across ranks. Opening checks fingerprints, settings and checksums.
2. **Search** (:class:`FeatureIndex`): FAISS ``IndexFlatIP`` (exact) by default; for large N ``"pca"`` (a reduced
   8-bit scan + exact re-ranking), ``"ivf"`` or ``"hnsw"``; proponents and opponents from one call.
3. **Query path** (:class:`KFACQuery`): the query gradient is rotated into the (E)K-FAC eigenbasis once; a new λ
   is then an elementwise division followed by the projection. For the Kronecker projection the products
   ``R_B Q_B`` and ``R_A Q_A`` are precomputed per layer, so a query is never rotated back to parameter space.
4. **Backend** (:class:`IndexBackend`): implements :class:`~diffinfluence_widgets.backend.InfluenceBackend`
   for the K-FAC family and the TRAK family (:mod:`.influence.trak`).

Two store *spaces* are supported. ``"parameter"`` is the method's literal design: ``φ_j = R g_j``. ``"eigen"``
**(ours)** stores ``φ_j = R (Qᵀ g_j ⊘ √(Λ + λ₀))`` — training gradients in the curvature's eigenbasis, whitened by
a fixed reference damping λ₀ — and projects the query as ``R (√(Λ + λ₀) ⊙ Qᵀ g_q ⊘ (Λ + λ))``. The inner product is
the same quantity (a diagonal change of variables), still independent of λ, measurement and query, but the
random-projection error ``‖u‖‖v‖/√k`` is far smaller because neither side is dominated by near-null directions
of the curvature at small λ. It depends on the curvature, whose fingerprint the manifest then records. Measured on
256 digits (demo UNet after 500 steps, k = 4096, 8 held-out queries): recall@10 against exact EK-FAC scores at
λ = 1e-8 was 0.04–0.09 for the parameter-space store and 0.78 for the eigen store (0.90 at k = 16 384), and the
exact top-10 was inside the projected top-50 for 99 % of the queries — which is what exact rescoring of the
candidates (``rescore_candidates``) relies on. λ₀ defaults to the K-FAC family's default damping, where the two
sides are balanced.
"""
from __future__ import annotations

from .features import build_gradient_store, default_whiten_damping, store_feature_fn
from .manifest import STORE_FORMAT, STORE_VERSION, StoreCorruptError, StoreError, StoreMismatchError
from .shards import ProjectedStore, build_store

__all__ = ["StoreError", "StoreCorruptError", "StoreMismatchError", "build_store", "build_gradient_store",
           "ProjectedStore", "STORE_FORMAT", "STORE_VERSION", "store_feature_fn", "default_whiten_damping"]
