"""The queries a backend offers: held-out images and generated samples (with their sampling trajectories).

Generated queries are sampled once with the full DDPM sampler and cached under the backend's ``cache_dir``
(keyed by the model fingerprint and the seed); their ids are ``GENERATED_ID_BASE + seed``.
"""
from __future__ import annotations

import io
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from .._io import CorruptArtifactError, atomic_write_bytes as _atomic_write_bytes, state_digest
from ..backend import QueryItem
from ..diffusion.sampling import Trajectory, sample
from ..influence.capture import model_lock

__all__ = ["GENERATED_ID_BASE", "QueryBook"]

#: generated queries get ids ``GENERATED_ID_BASE + seed`` (stable across sessions; held-out ids must stay below)
GENERATED_ID_BASE = 1_000_000


class QueryBook:
    """Thread-safe table of :class:`~diffinfluence_widgets.backend.QueryItem` s and trajectories by query id."""

    def __init__(self, model, heldout, cache_dir: str | Path, *, device=None):
        self.model, self.device = model, device
        self.cache_dir = Path(cache_dir)
        self._model_fp = model.fingerprint()
        self._lock = threading.RLock()
        self._queries: dict[int, QueryItem] = {}
        self._trajectories: dict[int, Trajectory] = {}
        labels = getattr(heldout, "labels", None)
        for n, (i, img) in enumerate(zip(torch.as_tensor(heldout.ids).tolist(), heldout.images)):
            if int(i) >= GENERATED_ID_BASE:
                raise ValueError(f"held-out id {i} collides with generated query ids (>= {GENERATED_ID_BASE})")
            label = f"held-out #{int(i)}" + (f" (label {int(labels[n])})" if labels is not None else "")
            self._queries[int(i)] = QueryItem(id=int(i), kind="heldout", image=img.numpy().astype(np.float32),
                                              label=label)

    def all(self) -> list[QueryItem]:
        with self._lock:
            return list(self._queries.values())

    def get(self, query_id: int) -> tuple[QueryItem, Trajectory | None]:
        """The query and its trajectory (``None`` for held-out images); ``KeyError`` naming an unknown id."""
        with self._lock:
            if int(query_id) not in self._queries:
                raise KeyError(f"unknown query id {query_id}; known: {sorted(self._queries)[:10]}...")
            return self._queries[int(query_id)], self._trajectories.get(int(query_id))

    def generate(self, seed: int) -> QueryItem:
        """Sample one image with this seed (full DDPM sampler, trajectory kept); cached under ``cache_dir``."""
        seed = int(seed)
        qid = GENERATED_ID_BASE + seed
        with self._lock:
            if qid in self._queries:
                return self._queries[qid]
        path = self.cache_dir / "queries" / f"generated-{self._model_fp}-{seed}.pt"
        data = None
        if path.is_file():
            try:
                data = torch.load(path, weights_only=True)
                body = {k: data[k] for k in ("image", "timesteps", "states")}
                if data.get("sha256") != state_digest(body):
                    raise CorruptArtifactError(f"{path} fails its SHA-256 checksum", path)
            except Exception as e:  # truncated / corrupt: say so, then sample again
                warnings.warn(f"cached query {path} is unreadable ({type(e).__name__}: {e}); regenerating it",
                              RuntimeWarning, stacklevel=2)
                data = None
        if data is None:
            with model_lock(self.model.unet):  # no capture may run on the network meanwhile
                res = sample(self.model, ids=[0], seed=seed, keep_trajectory=True, device=self.device)
            data = {"image": res.images[0].cpu(), "timesteps": res.trajectory.timesteps.cpu(),
                    "states": res.trajectory.states.cpu()}
            path.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            torch.save({**data, "sha256": state_digest(data)}, buf)
            _atomic_write_bytes(path, buf.getvalue())
        item = QueryItem(id=qid, kind="generated", image=data["image"].numpy().astype(np.float32),
                         label=f"generated, seed {seed}", meta={"seed": seed})
        with self._lock:
            self._queries[qid] = item
            self._trajectories[qid] = Trajectory(data["timesteps"], data["states"])
        return item
