"""The digits demo build: cached steps, a second run that only loads, stale / foreign caches refused."""
from __future__ import annotations

import json
import time

import pytest
import torch

from diffinfluence_widgets.demo import (DEMO_CONFIGS, DemoCacheError, build_demo, config_from_env, default_cache_dir,
                                        demo_config, load_or_build_demo)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "tiny"
    t0 = time.perf_counter()
    backend = load_or_build_demo("tiny", root, threads=1, progress=False)
    return root, backend, time.perf_counter() - t0


def test_unknown_config_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown demo config 'huge'.*'demo', 'tiny'"):
        demo_config("huge")
    with pytest.raises(ValueError, match="threads"):
        load_or_build_demo("tiny", "/nonexistent-never-created", threads=0)


def test_config_switch_and_default_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("DIFFINFLUENCE_SMALL", raising=False)
    assert config_from_env() == "demo"
    monkeypatch.setenv("DIFFINFLUENCE_SMALL", "1")
    assert config_from_env() == "tiny"
    monkeypatch.delenv("DIFFINFLUENCE_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_cache_dir("tiny") == tmp_path / "diffinfluence-cache" / "tiny"
    monkeypatch.setenv("DIFFINFLUENCE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir("demo") == tmp_path / "c" / "demo"
    assert DEMO_CONFIGS["tiny"].digest() != DEMO_CONFIGS["demo"].digest()
    assert DEMO_CONFIGS["tiny"].replace(k=512).digest() != DEMO_CONFIGS["tiny"].digest()
    assert default_cache_dir(DEMO_CONFIGS["tiny"].replace(name="mine")) == tmp_path / "c" / "mine"
    with pytest.raises(ValueError, match=r"unknown demo config 'huge'"):
        default_cache_dir("huge")


def test_light_names_agree_with_the_configs():
    """The torch-free names the command line parses with (demo_names) are the configs the build knows."""
    from diffinfluence_widgets import demo_names

    assert sorted(demo_names.CONFIG_NAMES) == sorted(DEMO_CONFIGS)
    assert all(name == cfg.name for name, cfg in DEMO_CONFIGS.items())


def test_first_build_makes_a_working_backend(tiny_cache):
    root, backend, seconds = tiny_cache
    info = backend.demo_info
    assert not info["reused"] and info["threads"] == 1
    assert {"model", "curvature", "index", "manifest.json"} <= {p.name for p in root.iterdir()}
    for step in ("model", "curvature", "index"):
        meta = json.loads((root / step / "step.json").read_text())
        assert meta["config_name"] == "tiny" and meta["step_digest"] == DEMO_CONFIGS["tiny"].digest(step)
    assert not any(p.name.startswith(".tmp") for p in root.iterdir())
    kinds = {q.kind for q in backend.queries()}
    assert kinds == {"generated", "heldout"}
    q = backend.queries()[0].id
    r = backend.search(backend.prepare(q, "loss", "ekfac"), 1e-8, 5)
    assert len(r.proponent_ids) == 5 and r.proponent_scores[0] >= r.opponent_scores[0]
    print(f"tiny demo build: {seconds:.1f} s on 1 thread")


def test_second_run_reuses_the_cache(tiny_cache):
    root, first, _ = tiny_cache
    t0 = time.perf_counter()
    again = load_or_build_demo("tiny", root, threads=1, progress=False)
    seconds = time.perf_counter() - t0
    info = again.demo_info
    assert info["reused"] and all(s["reused"] for s in info["steps"].values())
    print(f"tiny demo reuse: {seconds:.2f} s")
    assert again.model.fingerprint() == first.model.fingerprint()
    q = first.queries()[0].id
    a = first.scores(first.prepare(q, "loss", "ekfac"), 1e-8)
    b = again.scores(again.prepare(q, "loss", "ekfac"), 1e-8)
    assert torch.allclose(torch.as_tensor(a), torch.as_tensor(b))


def test_cache_of_another_config_is_refused(tiny_cache, tmp_path):
    root, _, _ = tiny_cache
    with pytest.raises(DemoCacheError, match="holds the 'tiny' config, not 'demo'.*--rebuild"):
        load_or_build_demo("demo", root, progress=False)
    # nothing was touched
    assert json.loads((root / "manifest.json").read_text())["config_digest"] == DEMO_CONFIGS["tiny"].digest()


def test_step_digests_cover_what_each_step_depends_on():
    base = DEMO_CONFIGS["tiny"]
    k = base.replace(k=64)
    assert k.digest("model") == base.digest("model") and k.digest("curvature") == base.digest("curvature")
    assert k.digest("index") != base.digest("index")
    draws = base.replace(curvature_draws=8)
    assert draws.digest("model") == base.digest("model") and draws.digest("curvature") != base.digest("curvature")
    assert draws.digest("index") != base.digest("index")  # a later step depends on the earlier ones
    steps = base.replace(train={"steps": 7})
    assert all(steps.digest(s) != base.digest(s) for s in ("model", "curvature", "index"))
    with pytest.raises(ValueError, match="step must be one of"):
        base.digest("everything")


def test_a_folder_that_is_not_a_demo_cache_is_never_deleted(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    for rebuild in (False, True):
        with pytest.raises(DemoCacheError):
            load_or_build_demo("tiny", tmp_path, progress=False, rebuild=rebuild)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_changed_settings_rebuild_only_the_steps_they_affect(tmp_path):
    quick = DEMO_CONFIGS["tiny"].replace(train={"steps": 2, "batch_size": 8, "checkpoint_every": 1})
    first = build_demo(quick, tmp_path, threads=1, progress=False, until="curvature")
    assert not first.info["reused"]
    again = build_demo(quick, tmp_path, threads=1, progress=False, until="curvature")
    assert again.info["reused"] and again.model.fingerprint() == first.model.fingerprint()
    # other curvature settings: the model is reused, the curvature refitted (never the stale one reused)
    more = quick.replace(curvature_draws=2)
    third = build_demo(more, tmp_path, threads=1, progress=False, until="curvature")
    assert third.info["steps"]["train"]["reused"] and not third.info["steps"]["curvature"]["reused"]
    assert third.curvature.settings["num_draws"] == 2
    # other training settings: everything from the model on is rebuilt
    changed = more.replace(train={"steps": 3, "batch_size": 8, "checkpoint_every": 1})
    fourth = build_demo(changed, tmp_path, threads=1, progress=False, until="train")
    assert not fourth.info["steps"]["train"]["reused"]
    assert fourth.model.fingerprint() != first.model.fingerprint()
    rebuilt = build_demo(changed, tmp_path, threads=1, progress=False, until="train", rebuild=True)
    assert not rebuilt.info["reused"] and rebuilt.model.fingerprint() == fourth.model.fingerprint()
    with pytest.raises(ValueError, match="until"):
        build_demo(quick, tmp_path, until="everything")
