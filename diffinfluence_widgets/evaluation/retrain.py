"""Retraining orchestration for the evaluations (``method.md`` §7): many (subset, seed) jobs, resumable, parallel.

A *job* is "train a fresh model on these training ids with this seed". The LDS needs M × K of them, retraining
without the top influences a few more, and they take most of an evaluation's time, so:

* **Content-addressed cache.** A job's folder name is a hash of everything its result depends on: the base
  model's architecture and noise schedule (``model_spec``), the dataset fingerprint, the kept ids, the seed and the
  training configuration. The same job asked for by two protocols (e.g. the full-data models) is trained once.
* **Atomic results.** The trained (EMA) model is saved with a ``manifest.json`` into a temporary folder that is
  renamed into place with ``os.replace``: a folder under ``jobs/`` is always complete. Loading checks the manifest.
* **Resume.** Finished jobs are skipped. An unfinished job trains with ``checkpoint_dir=checkpoints/<key>``, so a
  job killed mid-way continues from its own last training checkpoint; the checkpoint is deleted once the job's
  model is in place.
* **Parallel.** ``num_workers > 1`` runs jobs in that many spawned processes, each with
  ``torch.set_num_threads(1)``. If a worker dies (e.g. SIGKILL), the run raises ``BrokenProcessPool``; running it
  again resumes.
* **Ground truth with common random numbers.** :meth:`RetrainCache.measure` measures every job's model on the
  queries with the same seeded (t, ε) draws (``measurements.measure`` draws depend only on (seed, query id)),
  and caches the values per job.

The training function defaults to ``diffusion.train.train_model``; any function with its signature
``train_fn(model, dataset, config, *, device=None, progress=True, checkpoint_dir=None) -> DiffusionModel`` works
(it must be importable by name — a module-level function — when ``num_workers > 1``). The seed of a job sets the
model's initialisation and, when the config has a ``seed`` field, the training randomness
(``dataclasses.replace(config, seed=seed)``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import time
import uuid
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import multiprocessing as mp
import numpy as np
import torch

from .._io import atomic_write_bytes, atomic_write_text
from ..data.dataset import ImageDataset
from ..diffusion.model import DiffusionModel
from ..measurements import get_measurement, measure

__all__ = ["RetrainJob", "RetrainCache", "model_spec_of", "config_to_dict"]

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class RetrainJob:
    """Train a fresh model on ``kept_ids`` with ``seed``. ``tag`` is a human label (not part of the key)."""

    kept_ids: tuple[int, ...]
    seed: int
    tag: str = ""

    def __post_init__(self) -> None:
        ids = tuple(int(i) for i in self.kept_ids)
        if len(set(ids)) != len(ids):
            raise ValueError(f"job {self.tag!r}: kept_ids contain duplicates")
        if not ids:
            raise ValueError(f"job {self.tag!r}: kept_ids is empty; a model needs at least one training example")
        object.__setattr__(self, "kept_ids", tuple(sorted(ids)))
        object.__setattr__(self, "seed", int(self.seed))


def model_spec_of(model: DiffusionModel) -> dict[str, Any]:
    """Architecture + noise schedule of a model: what a fresh model for a retraining job is built from."""
    cfg = {k: v for k, v in dict(model.unet.config).items() if not k.startswith("_")}
    sc = model.scheduler.config
    return {"unet_config": json.loads(json.dumps(cfg, default=_json_default)),
            "num_train_timesteps": int(sc.num_train_timesteps), "beta_start": float(sc.beta_start),
            "beta_end": float(sc.beta_end)}


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-able view of a training configuration (dataclass, dict or object with ``__dict__``)."""
    if dataclasses.is_dataclass(config):
        d = dataclasses.asdict(config)
    elif isinstance(config, dict):
        d = dict(config)
    else:
        d = dict(vars(config))
    return json.loads(json.dumps({"type": type(config).__name__, **d}, sort_keys=True, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()[:16]


def _config_for_seed(config: Any, seed: int) -> Any:
    if dataclasses.is_dataclass(config) and any(f.name == "seed" for f in dataclasses.fields(config)):
        return dataclasses.replace(config, seed=int(seed))
    return config


def _default_train_fn() -> Callable[..., DiffusionModel]:
    from ..diffusion.train import train_model  # imported late: evaluation must import without it

    return train_model


# ---------------------------------------------------------------------------------------------------- worker side
_WORKER: dict[str, Any] = {}


def _worker_init(dataset: ImageDataset, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(int(threads))
    _WORKER["dataset"] = dataset


def _train_job(cache_dir: str, key: str, manifest: dict[str, Any], job: RetrainJob, model_spec: dict[str, Any],
               config: Any, train_fn: Callable[..., DiffusionModel] | None, device: Any,
               dataset: ImageDataset | None = None) -> str:
    """Train one job and move its model into place atomically. Runs in a worker or in the caller's process."""
    dataset = dataset if dataset is not None else _WORKER["dataset"]
    root = Path(cache_dir)
    final = root / "jobs" / key
    if (final / MANIFEST).is_file():
        return str(final)
    fn = train_fn or _default_train_fn()
    with torch.random.fork_rng(devices=[]):  # from_config seeds the global generator: keep the caller's intact
        model = DiffusionModel.from_config(dict(model_spec["unet_config"]),
                                           num_train_timesteps=model_spec["num_train_timesteps"],
                                           beta_start=model_spec["beta_start"], beta_end=model_spec["beta_end"],
                                           seed=job.seed)
    subset = dataset.subset(list(job.kept_ids))
    ckpt = root / "checkpoints" / key
    ckpt.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    trained = fn(model, subset, _config_for_seed(config, job.seed), device=device, progress=False,
                 checkpoint_dir=ckpt)
    tmp = root / "jobs" / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    trained.to("cpu").save_pretrained(tmp / "model")
    full = dict(manifest, model_fingerprint=trained.fingerprint(), train_seconds=round(time.time() - t0, 2))
    atomic_write_text(tmp / MANIFEST, json.dumps(full, indent=1, default=_json_default))
    try:
        os.replace(tmp, final)
    except OSError:  # another process finished the same job first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(ckpt, ignore_errors=True)
    return str(final)


def _measure_job(job_dir: str, images: torch.Tensor, ids: list[int], measurement: str, num_draws: int,
                 seed: int, cache_name: str, device: Any) -> np.ndarray:
    out = Path(job_dir) / "measurements" / f"{cache_name}.npy"
    if out.is_file():
        try:
            return np.load(out)
        except Exception as e:  # truncated / corrupt cache: say so and measure again
            warnings.warn(f"cached measurement {out} is unreadable ({type(e).__name__}: {e}); measuring again",
                          RuntimeWarning, stacklevel=2)
    model = DiffusionModel.from_pretrained(Path(job_dir) / "model")
    if device is not None:
        model.to(device)
    model.unet.eval()
    vals = measure(model, images, ids, measurement, num_draws=num_draws, seed=seed).numpy()
    buf = io.BytesIO()
    np.save(buf, vals)
    atomic_write_bytes(out, buf.getvalue())
    return vals


def _measure_job_worker(args: tuple) -> np.ndarray:
    return _measure_job(*args)


# ---------------------------------------------------------------------------------------------------- the cache
class RetrainCache:
    """A folder of retrained models for one (base architecture, dataset, training config).

    Parameters
    ----------
    cache_dir:
        Where ``jobs/<key>/{model,manifest.json}`` and ``checkpoints/<key>`` live.
    model:
        A ``DiffusionModel`` (only its architecture and schedule are used; each job initialises fresh weights
        from its seed) or a spec dict from :func:`model_spec_of`.
    dataset:
        The full training set; jobs name the ids they keep.
    config:
        The training configuration handed to ``train_fn`` (e.g. ``TrainConfig.demo()``).
    train_fn:
        Defaults to ``diffusion.train.train_model``.
    """

    def __init__(self, cache_dir: str | Path, model: DiffusionModel | dict[str, Any], dataset: ImageDataset,
                 config: Any, *, train_fn: Callable[..., DiffusionModel] | None = None) -> None:
        self.root = Path(cache_dir)
        self.model_spec = model if isinstance(model, dict) else model_spec_of(model)
        for k in ("unet_config", "num_train_timesteps", "beta_start", "beta_end"):
            if k not in self.model_spec:
                raise ValueError(f"model spec lacks {k!r}; build it with model_spec_of(model)")
        if not isinstance(dataset, ImageDataset):
            raise TypeError(f"dataset must be an ImageDataset, got {type(dataset).__name__}")
        self.dataset = dataset
        self.config = config
        self.train_fn = train_fn
        self.base_fingerprint = _sha(self.model_spec)
        self.dataset_fingerprint = dataset.fingerprint()
        self.config_dict = config_to_dict(config)
        self.train_fn_name = (f"{train_fn.__module__}.{train_fn.__qualname__}" if train_fn is not None
                              else "diffinfluence_widgets.diffusion.train.train_model")
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)

    # -------------------------------------------------------------- bookkeeping
    def manifest_for(self, job: RetrainJob) -> dict[str, Any]:
        return {"base_model_fingerprint": self.base_fingerprint, "model_spec": self.model_spec,
                "dataset_fingerprint": self.dataset_fingerprint, "kept_ids": list(job.kept_ids),
                "num_kept": len(job.kept_ids), "seed": job.seed, "train_config": self.config_dict,
                "train_fn": self.train_fn_name, "tag": job.tag}

    def key(self, job: RetrainJob) -> str:
        m = self.manifest_for(job)
        m.pop("tag")
        m.pop("model_spec")
        return _sha(m)

    def job_dir(self, job: RetrainJob) -> Path:
        return self.root / "jobs" / self.key(job)

    def is_done(self, job: RetrainJob) -> bool:
        return (self.job_dir(job) / MANIFEST).is_file()

    def check_manifest(self, job: RetrainJob) -> dict[str, Any]:
        """The stored manifest of a finished job, after checking that it belongs to this job."""
        path = self.job_dir(job) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"job {job.tag or self.key(job)!r} has not been trained yet ({path} missing)")
        got = json.loads(path.read_text())
        want = self.manifest_for(job)
        for k in ("base_model_fingerprint", "dataset_fingerprint", "kept_ids", "seed", "train_config"):
            if got.get(k) != want[k]:
                raise ValueError(f"cached job {path.parent.name} does not match: manifest field {k!r} differs "
                                 "(a stale or foreign cache folder; delete it to retrain)")
        return got

    def load(self, job: RetrainJob, device: Any = None) -> DiffusionModel:
        """The trained (EMA) model of a finished job."""
        self.check_manifest(job)
        model = DiffusionModel.from_pretrained(self.job_dir(job) / "model")
        return model.to(device) if device is not None else model

    # -------------------------------------------------------------- training
    def run(self, jobs: Sequence[RetrainJob], *, num_workers: int = 1, device: Any = None,
            progress: bool = True, threads_per_worker: int = 1) -> list[Path]:
        """Train every unfinished job; returns the job folders in the order of ``jobs``.

        ``num_workers <= 1`` trains in this process; more starts that many spawned processes, each with
        ``torch.set_num_threads(threads_per_worker)``.
        """
        jobs = list(jobs)
        todo, seen = [], set()
        for job in jobs:
            k = self.key(job)
            if k not in seen and not self.is_done(job):
                todo.append(job)
            seen.add(k)
        if progress:
            print(f"[retrain] {len(jobs)} jobs, {len(jobs) - len(todo)} already done, {len(todo)} to train "
                  f"({max(1, num_workers)} worker(s))", flush=True)
        t0 = time.time()

        def args(job: RetrainJob) -> tuple:
            return (str(self.root), self.key(job), self.manifest_for(job), job, self.model_spec, self.config,
                    self.train_fn, device)

        if num_workers <= 1:
            for i, job in enumerate(todo):
                _train_job(*args(job), dataset=self.dataset)
                if progress:
                    print(f"[retrain] {i + 1}/{len(todo)} {job.tag or self.key(job)} "
                          f"({time.time() - t0:.0f}s)", flush=True)
        elif todo:
            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(max_workers=int(num_workers), mp_context=ctx, initializer=_worker_init,
                                     initargs=(self.dataset, threads_per_worker)) as ex:
                futures = [ex.submit(_train_job, *args(job)) for job in todo]
                for i, (job, fut) in enumerate(zip(todo, futures)):
                    fut.result()
                    if progress:
                        print(f"[retrain] {i + 1}/{len(todo)} {job.tag or self.key(job)} "
                              f"({time.time() - t0:.0f}s)", flush=True)
        for job in jobs:
            self.check_manifest(job)
        return [self.job_dir(job) for job in jobs]

    # -------------------------------------------------------------- ground truth
    def measure(self, jobs: Sequence[RetrainJob], images: torch.Tensor, ids: Sequence[int], *,
                measurement: str = "loss", num_draws: int = 256, seed: int = 0, num_workers: int = 1,
                device: Any = None) -> np.ndarray:
        """``[len(jobs), Q]`` measurements of the queries under every job's model, with common random numbers.

        Every model sees the same (t, ε) draws for a query (they depend on ``(seed, query id)`` only). Values are
        cached per job, keyed by the measurement, draws, seed and the queries' ids and pixels.
        """
        name = get_measurement(measurement).name
        if get_measurement(measurement).needs_trajectory:
            raise ValueError(f"measurement {name!r} needs sampling trajectories; the ground-truth step supports "
                             "trajectory-free measurements (e.g. 'loss', 'elbo_simplified')")
        images = images.detach().to("cpu", torch.float32).contiguous()
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if len(ids) != images.shape[0]:
            raise ValueError(f"got {len(ids)} query ids for {images.shape[0]} query images")
        h = hashlib.sha256(images.numpy().tobytes())
        h.update(json.dumps([ids, name, int(num_draws), int(seed)]).encode())
        cache_name = f"{name.replace('=', '_')}-{h.hexdigest()[:16]}"
        for job in jobs:
            self.check_manifest(job)
        argl = [(str(self.job_dir(job)), images, ids, name, int(num_draws), int(seed), cache_name, device)
                for job in jobs]
        if num_workers <= 1:
            rows = [_measure_job(*a) for a in argl]
        else:
            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(max_workers=int(num_workers), mp_context=ctx, initializer=_worker_init,
                                     initargs=(None, 1)) as ex:
                rows = list(ex.map(_measure_job_worker, argl))
        return np.stack(rows) if rows else np.zeros((0, len(ids)))
