"""Faults and bad input: every one is refused with the exact error type and a message naming the file or value,
and a process killed (SIGKILL) at any point of training, the curvature fit or the store build resumes to the
bit-identical result of an uninterrupted run.

The catalogue (:data:`CASES`) is one parametrised case per fault; each case builds what it needs on a tiny model
(1×8×8 digits, ≈20k parameters) and returns ``(call, error type, text the message must contain)``.
Kill points are drawn from a seeded RNG, so every run exercises the same points.
"""
from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from diffinfluence_widgets._io import CorruptArtifactError, atomic_write_text, file_mode
from diffinfluence_widgets.data import ImageDataset, load_digits
from diffinfluence_widgets.demo import DEMO_CONFIGS, DemoCacheError, build_demo
from diffinfluence_widgets.diffusion import DiffusionModel, tiny_unet_config
from diffinfluence_widgets.diffusion.train import TrainConfig, train_model
from diffinfluence_widgets.store import (ProjectedStore, StoreCorruptError, StoreMismatchError, build_gradient_store,
                                         build_store)
from diffinfluence_widgets.influence.artifacts import CheckpointMismatchError
from diffinfluence_widgets.influence.curvature import Curvature, fit_curvature
from diffinfluence_widgets.influence.gradients import layer_shapes, per_example_gradients
from diffinfluence_widgets.influence.projection import make_projector
from diffinfluence_widgets.influence.scores import Scores
from diffinfluence_widgets.measurements import get_measurement

torch.set_num_threads(1)


# ============================================================================================ shared artifacts
def _model(seed: int = 0) -> DiffusionModel:
    return DiffusionModel.from_config(tiny_unet_config(), seed=seed).to("cpu", torch.float32)


def _fit(model, data, **kw):
    return fit_curvature(model, data, num_draws=2, batch_size=4, progress=False, **kw)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One tiny model, dataset, curvature, scores, store and training checkpoint, saved once; cases copy them."""
    root = tmp_path_factory.mktemp("faults")
    model, data = _model(0), load_digits(size=8, split="train", limit=8)
    curv = _fit(model, data)
    curv.save(root / "curvature")
    g = per_example_gradients(model, data.images[:3], data.ids[:3], "loss", num_draws=2, progress=False)
    sc = Scores(torch.randn(2, 8, dtype=torch.float64), torch.tensor([100, 101]), torch.as_tensor(data.ids), None,
                None, {"measurement": "loss"}, model.fingerprint(), data.fingerprint())
    sc.save(root / "scores")
    ids = np.asarray(data.ids)
    build_store(root / "store", ids, lambda lo, hi: {"features": torch.randn(hi - lo, 4,
                                                                                  generator=torch.Generator().manual_seed(lo))},
                {"model_fingerprint": model.fingerprint(), "dataset_fingerprint": data.fingerprint()},
                shard_size=4, progress=False)
    train_model(model, data, TrainConfig.tiny(steps=2, checkpoint_every=1), progress=False,
                checkpoint_dir=root / "train")
    return {"root": root, "model": model, "data": data, "curvature": curv, "grads": g}


def _copy(env, name: str, tmp: Path) -> Path:
    import shutil

    dst = tmp / name
    src = env["root"] / name
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    return dst


def _replace_file(path: Path, data: bytes) -> None:
    # a new inode: a file that is memory-mapped by a loaded model must not shrink under it (SIGBUS)
    path.unlink()
    path.write_bytes(data)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    _replace_file(path, data[: max(1, int(len(data) * keep))])


def _flip_bit(path: Path, where: float = 0.9) -> None:
    """Flip one bit inside the payload (far from the header, so the container still parses)."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x04
    _replace_file(path, bytes(data))


# ============================================================================================ the catalogue
def case_images_wrong_shape(env, tmp):
    bad = ImageDataset(torch.zeros(4, 1, 6, 6), torch.arange(4), name="six")
    return lambda: _fit(env["model"], bad), ValueError, "(4, 1, 6, 6)"


def case_images_nan(env, tmp):
    x = env["data"].images[:4].clone()
    x[2, 0, 3, 3] = float("nan")
    return lambda: ImageDataset(x, torch.arange(4), name="nan"), ValueError, "NaN or infinite values (1 of 4 images, first at position 2)"


def case_images_nan_given_to_the_model(env, tmp):
    x = env["data"].images[:4].clone()
    x[1, 0, 3, 3] = float("inf")
    return lambda: env["model"].check_images(x, "query images"), ValueError, "query images contain NaN"


def case_non_image_file_in_a_folder(env, tmp):
    from PIL import Image

    from diffinfluence_widgets.data import from_image_folder

    Image.new("L", (8, 8), 128).save(tmp / "a.png")
    (tmp / "b.png").write_text("this is not a picture")
    return lambda: from_image_folder(tmp, size=8), ValueError, str(tmp / "b.png")


def case_damping_zero(env, tmp):
    return lambda: env["curvature"].precondition(env["grads"], 0.0), ValueError, "got 0.0"


def case_damping_negative(env, tmp):
    return lambda: env["curvature"].precondition(env["grads"], -1e-3), ValueError, "got -0.001"


def case_damping_nan(env, tmp):
    return lambda: env["curvature"].inverse_eigenvalues(float("nan")), ValueError, "got nan"


def case_damping_zero_trak(env, tmp):
    from diffinfluence_widgets.influence.trak import TRAKScorer

    t = TRAKScorer(ProjectedStore.open(env["root"] / "store").arrays["features"])
    return lambda: t.query_feature(t.rotate(np.ones(t.k)), 0.0), ValueError, "got 0.0"


def case_damping_zero_session(env, tmp):
    import traitlets

    from diffinfluence_widgets.session import AttributionSession
    from diffinfluence_widgets.widgets._standin import StandInBackend

    s = AttributionSession(StandInBackend(num_train=60, num_heldout=2, num_generated=0), threaded=False)
    return lambda: setattr(s, "damping", 0.0), traitlets.TraitError, "got 0.0"


def case_unknown_method(env, tmp):
    return lambda: _fit(env["model"], env["data"], method="kfc"), ValueError, "'kfc'"


def case_unknown_fisher(env, tmp):
    return lambda: _fit(env["model"], env["data"], fisher="true"), ValueError, "'true'"


def case_unknown_measurement(env, tmp):
    return lambda: get_measurement("los"), ValueError, "'los'"


def case_unknown_query_id(env, tmp):
    sc = Scores.load(env["root"] / "scores")
    return lambda: sc.row(123456), KeyError, "123456"


def case_unknown_train_id_in_store(env, tmp):
    st = ProjectedStore.open(env["root"] / "store")
    return lambda: st.positions([3, 987654]), KeyError, "987654"


def case_empty_dataset_curvature(env, tmp):
    empty = ImageDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long), name="nothing")
    return lambda: _fit(env["model"], empty), ValueError, "'nothing' has 0 images"


def case_empty_dataset_training(env, tmp):
    empty = ImageDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long), name="nothing")
    return (lambda: train_model(env["model"], empty, TrainConfig.tiny(), progress=False), ValueError,
            "'nothing' has 0 images")


def case_empty_dataset_store(env, tmp):
    empty = ImageDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long), name="nothing")
    proj = make_projector(layer_shapes(env["model"]), 16)
    return (lambda: build_gradient_store(tmp / "st", env["model"], empty, proj, num_draws=1, progress=False),
            ValueError, "empty dataset")


def case_curvature_of_another_model(env, tmp):
    other = _model(1)
    return (lambda: Curvature.load(env["root"] / "curvature", model=other), ValueError,
            other.fingerprint())


def case_store_of_another_model(env, tmp):
    other = _model(1)
    return (lambda: ProjectedStore.open(env["root"] / "store", model=other), StoreMismatchError,
            other.fingerprint())


def case_demo_cache_of_another_config(env, tmp):
    atomic_write_text(tmp / "manifest.json", json.dumps({"format": "diffinfluence-demo-cache", "version": 1,
                                                         "config_name": "demo"}))
    return (lambda: build_demo("tiny", tmp, progress=False, until="train"), DemoCacheError,
            "'demo' config, not 'tiny'")


def case_folder_that_is_not_a_demo_cache(env, tmp):
    (tmp / "thesis.tex").write_text("keep me")
    (tmp / "model").mkdir()  # a folder named like a demo step does not make it a demo cache
    return (lambda: build_demo("tiny", tmp, progress=False, rebuild=True, until="train"), DemoCacheError,
            str(tmp))


def case_curvature_checkpoint_of_another_model(env, tmp):
    import diffinfluence_widgets.influence.curvature as C

    calls = {"n": 0}
    orig = C._run_pass

    def stop_early(problem, fisher, consume, desc, progress, state=None, on_batch=None):
        def cb(i):
            on_batch(i)
            calls["n"] += 1
            if calls["n"] == 1:
                raise KeyboardInterrupt
        return orig(problem, fisher, consume, desc, progress, state, cb)

    C._run_pass = stop_early
    try:
        with pytest.raises(KeyboardInterrupt):
            _fit(env["model"], env["data"], checkpoint_dir=tmp)
    finally:
        C._run_pass = orig
    other = _model(1)
    return lambda: _fit(other, env["data"], checkpoint_dir=tmp), CheckpointMismatchError, "factors-rank0-of1"


def _corrupt_case(artifact: str, file: str, how, error=CorruptArtifactError, load=None):
    def case(env, tmp):
        folder = _copy(env, artifact, tmp)
        target = folder / file
        how(target)
        return (lambda: load(folder)), error, str(target)
    return case


_load_curv = lambda p: Curvature.load(p)  # noqa: E731
_load_scores = lambda p: Scores.load(p)  # noqa: E731
_open_store = lambda p: ProjectedStore.open(p, verify=True)  # noqa: E731


def _load_train_ckpt(folder: Path):
    m, d = _model(0), load_digits(size=8, split="train", limit=8)
    return train_model(m, d, TrainConfig.tiny(steps=3, checkpoint_every=1), progress=False, checkpoint_dir=folder)


case_curvature_truncated = _corrupt_case("curvature", "curvature.safetensors", _truncate, load=_load_curv)
case_curvature_bit_flip = _corrupt_case("curvature", "curvature.safetensors", _flip_bit, load=_load_curv)
case_curvature_manifest_truncated = _corrupt_case("curvature", "manifest.json", _truncate, load=_load_curv)
case_scores_truncated = _corrupt_case("scores", "scores.safetensors", _truncate, load=_load_scores)
case_scores_bit_flip = _corrupt_case("scores", "scores.safetensors", _flip_bit, load=_load_scores)
case_scores_manifest_truncated = _corrupt_case("scores", "manifest.json", _truncate, load=_load_scores)
case_store_manifest_truncated = _corrupt_case("store", "manifest.json", _truncate, StoreCorruptError, _open_store)
case_store_shard_bit_flip = _corrupt_case("store", "shards/shard-00001.npz", _flip_bit, StoreCorruptError,
                                          _open_store)
case_store_shard_truncated = _corrupt_case("store", "shards/shard-00000.npz", _truncate, StoreCorruptError,
                                           _open_store)
case_store_ids_truncated = _corrupt_case("store", "ids.npy", _truncate, StoreCorruptError, _open_store)
case_training_checkpoint_truncated = _corrupt_case("train", "train_checkpoint.pt", _truncate,
                                                   load=_load_train_ckpt)
case_training_checkpoint_bit_flip = _corrupt_case("train", "train_checkpoint.pt", lambda p: _flip_bit(p, 0.5),
                                                  load=_load_train_ckpt)


def _curvature_ckpt_corrupt(how):
    def case(env, tmp):
        case_curvature_checkpoint_of_another_model(env, tmp)  # leaves a partial checkpoint in tmp
        f = tmp / "factors-rank0-of1.safetensors"
        how(f)
        return lambda: _fit(env["model"], env["data"], checkpoint_dir=tmp), CorruptArtifactError, str(f)
    return case


case_curvature_checkpoint_truncated = _curvature_ckpt_corrupt(_truncate)
case_curvature_checkpoint_bit_flip = _curvature_ckpt_corrupt(_flip_bit)

CASES = {name[5:]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fault_catalogue(name, env, tmp_path):
    call, error, text = CASES[name](env, tmp_path)
    with pytest.raises(Exception) as info:
        call()
    assert type(info.value) is error, f"{name}: raised {type(info.value).__name__}: {info.value}"
    msg = str(info.value) if not isinstance(info.value, KeyError) else str(info.value.args[0])
    assert text in msg, f"{name}: message does not name {text!r}: {msg}"


def test_corrupt_artifact_error_is_a_value_error_and_store_corruption_is_both():
    assert issubclass(CorruptArtifactError, ValueError)
    assert issubclass(StoreCorruptError, CorruptArtifactError) and issubclass(StoreCorruptError, RuntimeError)


def test_files_follow_the_umask(tmp_path, env):
    old = os.umask(0o027)
    try:
        assert file_mode() == 0o640
        atomic_write_text(tmp_path / "a.txt", "x")
        env["curvature"].save(tmp_path / "c")
        for p in (tmp_path / "a.txt", tmp_path / "c" / "manifest.json", tmp_path / "c" / "curvature.safetensors"):
            assert (p.stat().st_mode & 0o777) == 0o640, p
    finally:
        os.umask(old)
    atomic_write_text(tmp_path / "b.txt", "x")
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o666 & ~old


# ============================================================================================ demo repairs
@pytest.mark.slow
def test_demo_rebuilds_a_corrupt_step_and_rebuild_keeps_foreign_files(tmp_path):
    quick = DEMO_CONFIGS["tiny"].replace(train={"steps": 2, "batch_size": 8, "checkpoint_every": 1},
                                         train_limit=32, curvature_draws=2)
    first = build_demo(quick, tmp_path, threads=1, progress=False, until="curvature")
    _truncate(tmp_path / "curvature" / "curvature.safetensors")
    with pytest.warns(RuntimeWarning, match="curvature.safetensors"):
        again = build_demo(quick, tmp_path, threads=1, progress=False, until="curvature")
    assert not again.info["steps"]["curvature"]["reused"] and again.info["steps"]["train"]["reused"]
    for n in first.curvature.layer_names:
        assert torch.equal(again.curvature.eigenvalues[n], first.curvature.eigenvalues[n])
    # a corrupt model: retrained (to the same weights), not a crash
    weights = next((tmp_path / "model").rglob("*.safetensors"))
    _truncate(weights)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        third = build_demo(quick, tmp_path, threads=1, progress=False, until="train")
    assert third.model.fingerprint() == first.model.fingerprint()
    # --rebuild of a demo cache removes only what the demo wrote
    (tmp_path / "thesis.tex").write_text("keep me")
    (tmp_path / "notes").mkdir()
    build_demo(quick, tmp_path, threads=1, progress=False, until="train", rebuild=True)
    assert (tmp_path / "thesis.tex").read_text() == "keep me" and (tmp_path / "notes").is_dir()


# ============================================================================================ SIGKILL
def _killed_at(target, kill_at: int, phase: str) -> bool:
    """Run ``target()`` in a forked child that SIGKILLs itself at its ``kill_at``-th atomic rename: ``"before"``
    (the temporary file is complete, not yet renamed) or ``"after"`` (just renamed, before the next write).
    Returns whether the child was killed (``False``: it finished before reaching that point)."""
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            real, count = os.replace, [0]

            def replace(src, dst, **kw):
                count[0] += 1
                if count[0] == kill_at and phase == "before":
                    os.kill(os.getpid(), signal.SIGKILL)
                real(src, dst, **kw)
                if count[0] == kill_at and phase == "after":
                    os.kill(os.getpid(), signal.SIGKILL)

            os.replace = replace
            target()
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status):
        assert os.WEXITSTATUS(status) == 0, "the child failed instead of being killed"
        return False
    assert os.WTERMSIG(status) == signal.SIGKILL
    return True


def _kill_points(seed: int, n_writes: int, count: int = 3) -> list[tuple[int, str]]:
    rng = random.Random(seed)
    return [(rng.randint(1, n_writes), rng.choice(("before", "after"))) for _ in range(count)]


@pytest.mark.slow
def test_training_killed_anywhere_resumes_bit_identically(tmp_path):
    data = load_digits(size=8, split="train", limit=16)
    cfg = TrainConfig.tiny(steps=6, batch_size=8, checkpoint_every=1)
    ref = train_model(_model(0), data, cfg, progress=False)
    survived = 0
    for i, (k, phase) in enumerate(_kill_points(1, cfg.steps)):
        ck = tmp_path / f"run{i}"
        assert _killed_at(lambda: train_model(_model(0), data, cfg, progress=False, checkpoint_dir=ck), k, phase)
        if (ck / "train_checkpoint.pt").is_file():  # another initial model: refused
            with pytest.raises(ValueError, match="belongs to another run"):
                train_model(_model(1), data, cfg, progress=False, checkpoint_dir=ck)
        done = train_model(_model(0), data, cfg, progress=False, checkpoint_dir=ck)
        for (n, a), b in zip(ref.unet.state_dict().items(), done.unet.state_dict().values()):
            assert torch.equal(a, b), (k, phase, n)
        assert [p.name for p in ck.iterdir()] == ["train_checkpoint.pt"]  # no temporaries of the killed run left
        survived += 1
    assert survived == 3


@pytest.mark.slow
def test_curvature_fit_killed_anywhere_resumes_bit_identically(tmp_path):
    data = load_digits(size=8, split="train", limit=8)
    kw = dict(num_draws=2, batch_size=2, progress=False)
    ref = fit_curvature(_model(0), data, **kw)
    n_writes = 4 + 1 + 4  # K-FAC pass (4 batches), the eigen stage, EK-FAC pass (4 batches)
    for i, (k, phase) in enumerate(_kill_points(2, n_writes, 4)):
        ck = tmp_path / f"run{i}"
        assert _killed_at(lambda: fit_curvature(_model(0), data, checkpoint_dir=ck, **kw), k, phase)
        if list(ck.glob("factors-*.safetensors")):
            with pytest.raises(CheckpointMismatchError, match="model_fingerprint"):
                fit_curvature(_model(1), data, checkpoint_dir=ck, **kw)
        done = fit_curvature(_model(0), data, checkpoint_dir=ck, **kw)
        for n in ref.layer_names:
            for part in ("eigenvalues", "q_a", "q_b"):
                assert torch.equal(getattr(done, part)[n], getattr(ref, part)[n]), (k, phase, n, part)
        assert done.num_points == ref.num_points
        assert not list(ck.iterdir())  # the checkpoint and any temporary of the killed run are gone


@pytest.mark.slow
def test_store_build_killed_anywhere_resumes_bit_identically(tmp_path):
    model, data = _model(0), load_digits(size=8, split="train", limit=8)
    proj = make_projector(layer_shapes(model), 64, seed=0)
    kw = dict(num_draws=2, shard_size=2, batch_size=4, progress=False)
    ref = build_gradient_store(tmp_path / "ref", model, data, proj, **kw)
    n_writes = 2 + 2 * 4 + 1  # manifest + ids, (data + side file) per shard, final manifest
    for i, (k, phase) in enumerate(_kill_points(3, n_writes)):
        st = tmp_path / f"run{i}"
        assert _killed_at(lambda: build_gradient_store(st, model, data, proj, **kw), k, phase)
        if (st / "manifest.json").is_file():  # another model: refused
            with pytest.raises(StoreMismatchError, match="model_fingerprint"):
                build_gradient_store(st, _model(1), data, proj, **kw)
        done = build_gradient_store(st, model, data, proj, **kw)
        assert np.array_equal(done.arrays["features"], ref.arrays["features"]), (k, phase)
        assert np.array_equal(done.ids, ref.ids)
        listing = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*"))  # noqa: E731
        assert listing(st) == listing(tmp_path / "ref")  # no temporaries of the killed run left


def test_a_corrupt_trak_cache_is_recomputed_with_a_warning(env, tmp_path):
    from diffinfluence_widgets.influence.trak import TRAKScorer

    folder = _copy(env, "store", tmp_path)
    first = TRAKScorer.from_store(ProjectedStore.open(folder))
    (cache,) = folder.glob("trak-gram-eigh-*.npz")
    for damage in (_flip_bit, _truncate):
        damage(cache)
        with pytest.warns(RuntimeWarning, match=str(cache)):
            again = TRAKScorer.from_store(ProjectedStore.open(folder))
        assert np.array_equal(again.sigma, first.sigma) and np.array_equal(again.u, first.u)


def test_rebuild_removes_only_listed_entries_and_never_leaves_the_folder(tmp_path):
    from diffinfluence_widgets._io import remove_listed_entries

    root, outside = tmp_path / "cache", tmp_path / "outside.txt"
    (root / "model").mkdir(parents=True)
    (root / "model" / "w.bin").write_bytes(b"w")
    (root / ".tmp-model-123").mkdir()
    (root / "thesis.tex").write_text("keep")
    outside.write_text("keep")
    (root / "link").symlink_to(tmp_path)  # a listed symlink is unlinked, its target untouched
    gone = remove_listed_entries(root, ["model", ".tmp-model-*", "link", "../outside.txt", "*", "/etc", ".."])
    assert gone == [".tmp-model-123", "link", "model"]
    assert sorted(p.name for p in root.iterdir()) == ["thesis.tex"] and outside.read_text() == "keep"


def test_a_failed_request_leaves_no_stale_result_to_export(tmp_path):
    from diffinfluence_widgets.session import AttributionSession
    from diffinfluence_widgets.widgets._standin import StandInBackend

    backend = StandInBackend(num_train=60, num_heldout=3, num_generated=0)
    good, bad = [q.id for q in backend.queries()][:2]
    backend.fail_query = bad
    s = AttributionSession(backend, threaded=False, query_id=good)
    s.wait()
    assert s.result_is_current and s.export(tmp_path / "good.csv").is_file()
    s.update(query_id=bad)  # this request fails
    assert s.error and s.query_id == bad and s.result.query_id == good and not s.result_is_current
    for suffix in (".csv", ".json", ".html", ".png"):
        with pytest.raises(RuntimeError, match=rf"'query_id': {bad}.*last request failed.*stand-in failure"):
            s.export(tmp_path / f"stale{suffix}")
        assert not (tmp_path / f"stale{suffix}").exists()
    s.update(query_id=good)  # a good request makes the result current again
    assert s.result_is_current and s.current_result().query_id == good
    s.close()
    # a threaded session: while a newer request runs, the result held is for older settings and is refused
    backend.prepare_delay = 0.3
    t = AttributionSession(backend, threaded=True, query_id=good)
    t.wait()
    t.update(query_id=[q.id for q in backend.queries()][2])
    with pytest.raises(RuntimeError, match="still being computed"):
        t.export(tmp_path / "busy.csv")
    t.wait()
    assert t.result_is_current and t.export(tmp_path / "busy.csv").is_file()
    t.close()


def test_headless_report_refuses_a_failed_query_instead_of_reusing_the_last_result(tmp_path):
    from types import SimpleNamespace

    from diffinfluence_widgets.cli import write_report
    from diffinfluence_widgets.widgets._standin import StandInBackend

    backend = StandInBackend(num_train=60, num_heldout=3, num_generated=0)
    first, second = sorted(q.id for q in backend.queries())[:2]
    backend.fail_query = second
    art = SimpleNamespace(backend=backend, info={"config": "standin", "steps": {}})
    with pytest.raises(RuntimeError, match=rf"'query_id': {second}.*last request failed"):
        write_report(art, tmp_path, num_queries=3, k=4)
    assert list(tmp_path.glob(f"query{first}_*")) and not list(tmp_path.glob(f"query{second}_*"))
