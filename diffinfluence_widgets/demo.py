"""The digits demo, built once and cached: what ``diffinfluence demo``, the notebooks and Binder open.

:func:`load_or_build_demo` runs the whole pipeline of the method on scikit-learn's bundled digits (no download)
and returns an :class:`~diffinfluence_widgets.index.IndexBackend` ready for the explorer:

1. **train** the small UNet (EMA weights; resumable from ``train-checkpoint/``) → ``model/``;
2. **fit the curvature** (EK-FAC, K-FAC-expand, GGN^model: the paper's settings; resumable) → ``curvature/``;
3. **index**: project the training gradients into the store, build the FAISS index and generate the sampled
   queries (with their trajectories) → ``index/`` (the :class:`IndexBackend` cache, resumable shard by shard).

Each step writes its result into a temporary folder that is renamed into place only when complete, followed by
a small ``step.json`` manifest (digest of the settings the step depends on, fingerprints, seconds taken). A second
call finds every step done and only loads: it starts in seconds. A step whose settings changed is rebuilt (and
says so); a cache folder of another config, or a folder that is not a demo cache, is **refused** with a clear
error. ``rebuild=True`` rebuilds a demo cache from scratch, deleting only the entries its manifest says the demo
wrote (files of anyone else in the folder are kept); a folder without a readable demo manifest is never deleted.
A step whose saved artifact is corrupt (truncated, failing its checksum) is rebuilt with a warning. Nothing is
reused silently.

Configs: ``"tiny"`` (8×8 digits, a ≈20k-parameter UNet; well under a minute on one core — tests, CI, small
Binder machines) and ``"demo"`` (16×16 digits, recognisable samples; a few minutes on two cores).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import distributed as dist_utils
from ._io import atomic_write_text as _atomic_write_text, remove_listed_entries
from .config import DEFAULT_METHODS, Approximation, Fisher, Method, choice
from .data import load_digits
from .demo_names import (CACHE_ENV, CACHE_FORMAT, CACHE_VERSION, CONFIG_NAMES, SMALL_ENV, DemoCacheError,
                         config_from_env, default_cache_dir)
from .diffusion import DiffusionModel, resolve_device, train_model
from .diffusion.model import demo_unet_config, tiny_unet_config
from .diffusion.train import TrainConfig
from .index import IndexBackend
from .influence.curvature import Curvature, fit_curvature
from .demo_steps import _Log, _publish_dir, _read_json, _resumable, _step_done, _write_step
__all__ = ["DemoConfig", "DEMO_CONFIGS", "DemoCacheError", "DemoArtifacts", "load_or_build_demo", "build_demo",
           "default_cache_dir",
           "demo_config", "config_from_env", "CACHE_ENV", "SMALL_ENV", "CACHE_FORMAT", "CACHE_VERSION"]

STEPS = ("train", "curvature", "index")
#: every entry of a cache folder the demo writes (names or glob patterns, top level only); recorded in the cache's
#: manifest, and all that ``rebuild=True`` ever deletes
DEMO_ENTRIES = ("manifest.json", "last_run.json", "model", "curvature", "index", "train-checkpoint",
                "curvature-checkpoint", ".tmp-model-*", ".tmp-curvature-*", ".manifest.json.*.tmp",
                ".last_run.json.*.tmp")


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo build depends on. A cached step is reused only when :meth:`digest` of its settings
    (and of every step before it) matches; otherwise it is rebuilt."""

    name: str = _f("demo", "preset name")
    image_size: int = _f(16, "digits are resized to image_size × image_size")
    unet: str = _f("demo", "'tiny' (tiny_unet_config) or 'demo' (demo_unet_config)")
    model_seed: int = _f(0, "seed of the UNet initialisation")
    train_limit: int | None = _f(None, "keep the first train_limit training ids (None: the whole train split)")
    heldout_limit: int = _f(16, "held-out images offered as queries")
    train: dict = _f(None, "TrainConfig overrides on top of the preset named by train_preset")
    train_preset: str = _f("demo", "'demo' or 'tiny' (TrainConfig presets)")
    curvature_draws: int = _f(16, "(t, ε) draws per training image in the (E)K-FAC factors")
    store_draws: int = _f(16, "(t, ε) draws per training image in the projected training gradients")
    query_draws: int = _f(64, "(t, ε) draws of a query's measurement gradient")
    k: int = _f(4096, "projection dimension of the store (Kronecker: k_b · k_a)")
    num_generated: int = _f(8, "sampled queries generated up front (seeds 0..num_generated-1)")
    methods: tuple = _f(tuple(m.value for m in DEFAULT_METHODS), "methods offered in the explorer")
    batch_size: int = _f(32, "examples per gradient batch")

    def __post_init__(self) -> None:
        if self.unet not in ("tiny", "demo"):
            raise ValueError(f"DemoConfig.unet must be 'tiny' or 'demo', got {self.unet!r}")
        if self.train_preset not in ("tiny", "demo"):
            raise ValueError(f"DemoConfig.train_preset must be 'tiny' or 'demo', got {self.train_preset!r}")
        for n in ("image_size", "heldout_limit", "curvature_draws", "store_draws", "query_draws", "k", "batch_size"):
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"DemoConfig.{n} must be a positive integer, got {v!r}")
        object.__setattr__(self, "methods", tuple(choice(Method, m, "DemoConfig.methods").value for m in self.methods))
        if isinstance(self.num_generated, bool) or not isinstance(self.num_generated, int) or self.num_generated < 0:
            raise ValueError(f"DemoConfig.num_generated must be a non-negative integer, got {self.num_generated!r}")

    def train_config(self):
        preset = TrainConfig.tiny if self.train_preset == "tiny" else TrainConfig.demo
        return preset(**(self.train or {}))

    def unet_config(self) -> dict:
        return (tiny_unet_config if self.unet == "tiny" else demo_unet_config)(sample_size=self.image_size)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["methods"] = list(self.methods)
        d["train_config"] = self.train_config().to_dict()
        d["unet_config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.unet_config().items()}
        return d

    def digest(self, step: str | None = None) -> str:
        """Hash of every setting (resolved train and UNet configs included), or of the settings one build step
        depends on (``"model"``, ``"curvature"``, ``"index"``; each includes the steps before it)."""
        d = self.to_dict()
        if step is not None:
            if step not in _STEP_FIELDS:
                raise ValueError(f"step must be one of {tuple(_STEP_FIELDS)}, got {step!r}")
            keys = [k for st in _STEP_FIELDS for k in _STEP_FIELDS[st]][: _step_upto(step)]
            d = {k: d[k] for k in keys}
        body = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def replace(self, **changes) -> "DemoConfig":
        return dataclasses.replace(self, **changes)


#: the settings each build step depends on (a step also depends on everything before it)
_STEP_FIELDS = {
    "model": ("image_size", "unet", "unet_config", "model_seed", "train_limit", "train_config"),
    "curvature": ("curvature_draws",),
    "index": ("heldout_limit", "store_draws", "query_draws", "k", "num_generated", "methods", "batch_size"),
}


def _step_upto(step: str) -> int:
    n = 0
    for st, fields in _STEP_FIELDS.items():
        n += len(fields)
        if st == step:
            return n
    raise ValueError(step)


DEMO_CONFIGS: dict[str, DemoConfig] = {
    # 8×8 digits, ≈20k parameters: the whole build takes seconds on one core (tests, CI, Binder-small)
    "tiny": DemoConfig(name="tiny", image_size=8, unet="tiny", train_limit=256, heldout_limit=8,
                       train={"steps": 60, "batch_size": 32, "checkpoint_every": 30}, train_preset="tiny",
                       curvature_draws=4, store_draws=4, query_draws=8, k=256, num_generated=2,
                       batch_size=64),
    # 16×16 digits, recognisable samples. 512 training images and 8 curvature draws per image keep the build to
    # minutes on a CPU: the (E)K-FAC factors of the conv layers cost ~35 ms per (image, draw) on one core
    "demo": DemoConfig(name="demo", train_limit=512, heldout_limit=16, curvature_draws=8, store_draws=8,
                       query_draws=32, k=4096, num_generated=6),
}


def demo_config(config: str | DemoConfig = "demo") -> DemoConfig:
    """The :class:`DemoConfig` named ``config`` (``"demo"`` or ``"tiny"``), or ``config`` itself."""
    if isinstance(config, DemoConfig):
        return config
    if not isinstance(config, str) or config not in DEMO_CONFIGS:
        raise ValueError(f"unknown demo config {config!r}; expected one of {sorted(DEMO_CONFIGS)}")
    return DEMO_CONFIGS[config]


# ---------------------------------------------------------------------------------------------- files
def _remove_demo_entries(root: Path, man: dict) -> list[str]:
    """Delete the entries of ``root`` that the demo manifest ``man`` lists (version-1 manifests predate the list:
    their fixed layout); return their names."""
    return remove_listed_entries(root, man.get("entries", list(DEMO_ENTRIES)))


# ---------------------------------------------------------------------------------------------- the build
def _check_root(root: Path, cfg: DemoConfig, rebuild: bool, log: _Log) -> None:
    """Create / validate ``root/manifest.json``. A cache of another config (or not a demo cache at all) is refused
    unless ``rebuild``; one of the same config built with other settings has its outdated steps rebuilt."""
    mf = root / "manifest.json"
    want = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "config_name": cfg.name}
    if root.exists() and not root.is_dir():
        raise DemoCacheError(f"cache folder {str(root)!r} is a file, not a folder; choose another cache folder "
                             f"(cache_dir=... / --cache-dir / ${CACHE_ENV})")
    if root.exists() and any(root.iterdir()):
        old = _read_json(mf)
        if not isinstance(old, dict) or old.get("format") != CACHE_FORMAT:
            # nothing here says what the demo wrote, so nothing may be deleted: not even with rebuild
            raise DemoCacheError(f"cache folder {str(root)!r} is not a demo cache (it has files but no readable "
                                 "demo manifest.json), so it is left untouched. Choose another cache folder "
                                 f"(cache_dir=... / --cache-dir / ${CACHE_ENV}), a new or empty one.")
        same = all(old.get(k) == v for k, v in want.items())
        if not same:
            if old.get("config_name") != cfg.name:
                why = f"it holds the {old.get('config_name')!r} config, not {cfg.name!r}"
            else:
                why = f"it was written by another cache format (version {old.get('version')} vs {CACHE_VERSION})"
            if not rebuild:
                raise DemoCacheError(f"cache folder {str(root)!r} cannot be used: {why}. Use another cache folder "
                                     f"(cache_dir=... / --cache-dir / ${CACHE_ENV}) or rebuild it "
                                     "(rebuild=True / --rebuild), which deletes the demo's files in it (and "
                                     "nothing else).")
            log(f"rebuilding {root}: {why}; removing " + ", ".join(_remove_demo_entries(root, old)))
        elif rebuild:
            log("rebuild requested: removing " + ", ".join(_remove_demo_entries(root, old)) + f" from {root}")
        elif old.get("config_digest") != cfg.digest():
            log(f"the {cfg.name!r} settings changed since {root} was built: the steps they affect are rebuilt")
    root.mkdir(parents=True, exist_ok=True)
    old = _read_json(mf)
    if old is None or old.get("config_digest") != cfg.digest() or old.get("entries") != list(DEMO_ENTRIES):
        _atomic_write_text(mf, json.dumps({**want, "config_digest": cfg.digest(), "config": cfg.to_dict(),
                                           "entries": list(DEMO_ENTRIES), "written": time.time()},
                                          indent=1, sort_keys=True, default=str))


@dataclass
class DemoArtifacts:
    """What :func:`build_demo` produced (``None`` for the steps after ``until``)."""

    config: DemoConfig
    cache_dir: Path
    train: Any
    heldout: Any
    model: Any
    curvature: Any = None
    backend: Any = None
    info: dict = field(default_factory=dict)


def load_or_build_demo(config: str | DemoConfig = "demo", cache_dir: str | Path | None = None, *,
                       device=None, progress: bool = True, threads: int | None = None, rebuild: bool = False):
    """Build (or reopen from ``cache_dir``) the digits demo and return its
    :class:`~diffinfluence_widgets.index.IndexBackend`.

    Parameters
    ----------
    config:
        ``"demo"`` (16×16 digits, a few CPU minutes) or ``"tiny"`` (8×8, seconds; tests, CI, small machines),
        or a :class:`DemoConfig`.
    cache_dir:
        Where the model, curvature and index are kept. Default: ``$DIFFINFLUENCE_CACHE/<config>`` or
        ``./diffinfluence-cache/<config>``. A folder holding another config is refused (:class:`DemoCacheError`).
    device:
        ``None``: CUDA when available, else CPU.
    threads:
        ``torch.set_num_threads(threads)`` for the build (and afterwards); ``None`` keeps the current setting.
    rebuild:
        Delete the demo's entries in ``cache_dir`` (those its manifest lists; other files are kept) and build from
        scratch. A non-empty folder without a readable demo manifest is refused, never deleted.

    The backend carries ``backend.demo_info``: the config, cache folder, and per step whether it was reused and
    how many seconds it took.
    """
    return build_demo(config, cache_dir, device=device, progress=progress, threads=threads,
                      rebuild=rebuild).backend


def build_demo(config: str | DemoConfig = "demo", cache_dir: str | Path | None = None, *,
               device=None, progress: bool = True, threads: int | None = None, rebuild: bool = False,
               until: str = "index", shared: bool = False) -> DemoArtifacts:
    """:func:`load_or_build_demo`, stopping after step ``until`` (``"train"``, ``"curvature"`` or ``"index"``)
    and returning every artifact (:class:`DemoArtifacts`). ``shared=True``: every rank of the initialised process
    group calls this together and they share each step (README, "Past one machine"); the ranks other than 0 get
    no backend."""
    cfg = demo_config(config)
    if until not in STEPS:
        raise ValueError(f"until must be one of {STEPS}, got {until!r}")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(cfg)
    # shared=True under torchrun (an initialised process group): every rank runs this; they train data-parallel,
    # fit the curvature and compute store shards each on their share; rank 0 alone writes the shared artifacts
    rank, world = dist_utils.rank_and_world() if shared else (0, 1)
    lead, barrier = rank == 0, (dist_utils.barrier if world > 1 else (lambda: None))
    log = _Log(progress and lead)
    t_start = time.perf_counter()
    if lead:
        _check_root(root, cfg, rebuild, log)
    barrier()
    info: dict[str, Any] = {"config": cfg.name, "config_digest": cfg.digest(), "cache_dir": str(root),
                            "device": str(dev), "threads": torch.get_num_threads(), "steps": {}}

    train = load_digits(size=cfg.image_size, split="train", limit=cfg.train_limit)
    heldout = load_digits(size=cfg.image_size, split="heldout", limit=cfg.heldout_limit)
    data_fp = train.fingerprint()

    # ---- 1. the model (EMA weights)
    t0, c0 = time.perf_counter(), time.process_time()
    meta = _step_done(root, "model", cfg, {"dataset_fingerprint": data_fp}, log)
    model = None
    if meta is not None:
        try:
            model = DiffusionModel.from_pretrained(root / "model").to(dev, torch.float32)
        except Exception as e:  # truncated / unreadable weights or config
            log.loud(f"the saved model in {root / 'model'} is unreadable ({type(e).__name__}: {str(e)[:200]}); "
                     "retraining it")
            model, meta = None, None
        if model is not None and model.fingerprint() != meta.get("model_fingerprint"):
            log.loud(f"{root / 'model'} does not match its manifest (fingerprint {model.fingerprint()} vs "
                     f"{meta.get('model_fingerprint')}: corrupt or altered); retraining it")
            model, meta = None, None
    if model is None:
        log(f"step 1/3: training the {cfg.name!r} UNet on {len(train)} digits ({cfg.image_size}×{cfg.image_size}, "
            f"{cfg.train_config().steps} steps, {torch.get_num_threads()} "
            f"thread{'' if torch.get_num_threads() == 1 else 's'})")
        init = DiffusionModel.from_config(cfg.unet_config(), seed=cfg.model_seed).to(dev, torch.float32)
        model = _resumable(lambda ck: train_model(init, train, cfg.train_config(), device=dev, progress=progress
                                                  and lead, checkpoint_dir=ck, data_parallel=world > 1),
                           root, "train-checkpoint", cfg.digest("model"), log, shared=world > 1)
        if lead:
            tmp = root / f".tmp-model-{os.getpid()}"
            if tmp.exists():
                shutil.rmtree(tmp)
            model.save_pretrained(tmp)
            _publish_dir(tmp, root / "model")
        barrier()
        # reload what was saved, so the fingerprint is the one every later run sees
        model = DiffusionModel.from_pretrained(root / "model").to(dev, torch.float32)
        meta = _write_step(root, "model", cfg, time.perf_counter() - t0, c0, write=lead, dataset_fingerprint=data_fp,
                           model_fingerprint=model.fingerprint())
        if lead:
            shutil.rmtree(root / "train-checkpoint", ignore_errors=True)
        info["steps"]["train"] = {"reused": False, "seconds": meta["seconds"], "cpu_seconds": meta["cpu_seconds"]}
    else:
        info["steps"]["train"] = {"reused": True, "seconds": round(time.perf_counter() - t0, 3),
                                  "build_seconds": meta.get("seconds")}
    model.unet.eval()
    model_fp = meta["model_fingerprint"]
    art = DemoArtifacts(cfg, root, train, heldout, model, info=info)
    if until == "train":
        return _finish(art, t_start, log)

    # ---- 2. the curvature
    t0, c0 = time.perf_counter(), time.process_time()
    expect = {"dataset_fingerprint": data_fp, "model_fingerprint": model_fp}
    meta = _step_done(root, "curvature", cfg, expect, log)
    curvature = None
    if meta is not None:
        try:
            curvature = Curvature.load(root / "curvature", model=model, dataset=train)
        except (ValueError, FileNotFoundError, OSError) as e:  # CorruptArtifactError is a ValueError
            log.loud(f"the saved curvature is unusable ({e}); refitting it")
    if curvature is None:
        log(f"step 2/3: fitting EK-FAC curvature ({cfg.curvature_draws} draws per image)")
        curvature = _resumable(lambda ck: fit_curvature(model, train, method=Method.EKFAC,
                                                        kfac_approx=Approximation.EXPAND, fisher=Fisher.MODEL,
                                                        num_draws=cfg.curvature_draws, device=dev,
                                                        progress=progress, batch_size=cfg.batch_size,
                                                        checkpoint_dir=ck),
                               root, "curvature-checkpoint", cfg.digest("curvature") + model_fp, log, shared=world > 1)
        if lead:  # every rank holds the same all-reduced curvature
            tmp = root / f".tmp-curvature-{os.getpid()}"
            if tmp.exists():
                shutil.rmtree(tmp)
            curvature.save(tmp)
            _publish_dir(tmp, root / "curvature")
        meta = _write_step(root, "curvature", cfg, time.perf_counter() - t0, c0, write=lead, **expect)
        if lead:
            shutil.rmtree(root / "curvature-checkpoint", ignore_errors=True)
        barrier()
        info["steps"]["curvature"] = {"reused": False, "seconds": meta["seconds"],
                                      "cpu_seconds": meta["cpu_seconds"]}
    else:
        info["steps"]["curvature"] = {"reused": True, "seconds": round(time.perf_counter() - t0, 3),
                                      "build_seconds": meta.get("seconds")}
    art.curvature = curvature
    if until == "curvature":
        return _finish(art, t_start, log)

    # ---- 3. projected training gradients, FAISS index, generated queries (the IndexBackend's own cache)
    t0, c0 = time.perf_counter(), time.process_time()
    meta = _step_done(root, "index", cfg, expect, log)
    if meta is None:
        log(f"step 3/3: projecting training gradients (k={cfg.k}, {cfg.store_draws} draws), building the index, "
            f"sampling {cfg.num_generated} queries")
    (root / "index").mkdir(exist_ok=True)
    kw = dict(k=cfg.k, num_draws=cfg.store_draws, query_num_draws=cfg.query_draws, methods=tuple(cfg.methods),
              batch_size=cfg.batch_size, device=dev)
    if world > 1 and meta is None:  # the stores' shards split over the ranks, then rank 0 alone finishes the index
        IndexBackend.build(model, train, heldout, curvature, root / "index", num_generated=0, exact_store=False,
                           progress=False, **kw)
        if not lead:
            barrier()  # wait for rank 0's index (queries, exact store) so that the command ends together
            return _finish(art, t_start, log, write=False)  # rank 0 records the run
    backend = IndexBackend.build(model, train, heldout, curvature, root / "index", num_generated=cfg.num_generated,
                                 progress=progress and meta is None, **kw)
    if world > 1 and meta is None:
        barrier()
    if meta is None:
        meta = _write_step(root, "index", cfg, time.perf_counter() - t0, c0, **expect)
        info["steps"]["index"] = {"reused": False, "seconds": meta["seconds"], "cpu_seconds": meta["cpu_seconds"]}
    else:
        info["steps"]["index"] = {"reused": True, "seconds": round(time.perf_counter() - t0, 3),
                                  "build_seconds": meta.get("seconds")}
    backend.demo_info = info
    art.backend = backend
    return _finish(art, t_start, log)


def _finish(art: DemoArtifacts, t_start: float, log: _Log, write: bool = True) -> DemoArtifacts:
    info = art.info
    info["total_seconds"] = round(time.perf_counter() - t_start, 3)
    info["reused"] = all(s["reused"] for s in info["steps"].values())
    if write:
        _atomic_write_text(art.cache_dir / "last_run.json", json.dumps(info, indent=1, sort_keys=True))
    log(("reused the cached demo" if info["reused"] else "demo ready") + f" in {info['total_seconds']:.1f} s "
        f"({art.cache_dir})")
    return art
