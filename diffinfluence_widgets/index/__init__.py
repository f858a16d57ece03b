"""Search: the FAISS index over stored features (:mod:`.faiss_index`) and the projected backend built on it
(:mod:`.backend`, :class:`IndexBackend`), with the queries it offers (:mod:`.queries`)."""
from __future__ import annotations

from .backend import RESCORE_CACHE_BYTES, IndexBackend
from .faiss_index import FeatureIndex
from .queries import GENERATED_ID_BASE, QueryBook

__all__ = ["IndexBackend", "FeatureIndex", "QueryBook", "GENERATED_ID_BASE", "RESCORE_CACHE_BYTES"]
