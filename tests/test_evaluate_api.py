"""`evaluate` end to end on a tiny image folder: resumable, per-query results, paired differences with two-way
bootstrap intervals, tables and results.json written; the same protocol as bench/digits_benchmark.py."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffinfluence_widgets import attribute, evaluate
from diffinfluence_widgets.data import from_image_folder, load_digits, to_uint8
from diffinfluence_widgets.diffusion import tiny_unet_config
from diffinfluence_widgets.diffusion.train import TrainConfig
from diffinfluence_widgets.evaluation import (AttributionSettings, EvaluationSettings, tables, train_ensemble,
                                              write_report)

TINY = EvaluationSettings(num_subsets=3, num_seeds=2, num_queries=4, target_draws=8,
                          attribution=AttributionSettings(grad_draws=4, curvature_draws=2, trak_dim=16),
                          kfac_methods=("K-FAC", "K-FAC reduce"), trak_methods=("TRAK",),
                          kfac_dampings=(1e-8, 1.0), trak_dampings=(1.0,), cf_queries=2, cf_fractions=(0.25,),
                          cf_seeds=(0,), cf_random_sets=1, cf_methods=("K-FAC (λ=1e-8)", "TRAK"), bootstrap=50,
                          num_workers=1, ensemble=2)
RECIPE = TrainConfig(steps=4, batch_size=8, lr=2e-3, warmup=1, ema_decay=0.9, checkpoint_every=50)


def _folder(path, n=12):
    digits = load_digits(size=8, split="train", limit=n)
    for i, (img, lab) in enumerate(zip(digits.images, digits.labels.tolist())):
        (path / f"class{lab}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(to_uint8(img)[0].numpy()).save(path / f"class{lab}" / f"d{i:03d}.png")
    return path


@pytest.mark.slow
def test_evaluate_on_an_image_folder_end_to_end(tmp_path):
    torch.set_num_threads(1)
    train = from_image_folder(_folder(tmp_path / "images"))
    cfg = tiny_unet_config(8, 1)
    ev = evaluate(cfg, train, RECIPE, tmp_path / "cache", settings=TINY, progress=False)
    assert ev.targets.shape == (4, 3, 2) and ev.oracle.per_query.shape == (4,)
    assert set(ev.results) == {"K-FAC", "K-FAC reduce", "TRAK", "pixel", "pixel (centred)", "default"}
    # the recommended default's row is EK-FAC averaged over 2 full-data models (seeds 0, 1) of the same cache
    jobs_before = sorted(p.name for p in (tmp_path / "cache" / "jobs").iterdir())
    models = train_ensemble(cfg, train, RECIPE, tmp_path / "cache", num_models=2)
    assert sorted(p.name for p in (tmp_path / "cache" / "jobs").iterdir()) == jobs_before  # trained by evaluate
    ref = attribute(models, train, ev.query_images, ev.query_ids, methods=["EK-FAC"],
                    dampings=TINY.default_dampings, settings=TINY.attribution)
    for lam in TINY.default_dampings:
        np.testing.assert_allclose(ev.attribution.matrix("default", lam), ref.matrix("EK-FAC", lam), rtol=1e-9,
                                   atol=1e-12 * np.abs(ref.matrix("EK-FAC", lam)).max())
    assert ev.at("default", "default") == pytest.approx(TINY.default_damping)
    r = ev.results["K-FAC"][1e-8]
    assert r.per_query.shape == (4,) and r.interval is not None and r.interval.num_resamples == 50
    assert [p["finding"] for p in ev.paired][:1] == ["K-FAC > TRAK"]
    for p in ev.paired:
        iv = p["bootstrap"]
        assert iv["low"] <= iv["high"] and iv["over"] == ["queries", "subsets"]
    assert {row["method"] for row in ev.counterfactual} == {"K-FAC (λ=1e-8)", "TRAK", "random"}
    res = write_report(ev, tmp_path / "out", figures=False)
    text = (tmp_path / "out" / "table.md").read_text()
    assert "two-way bootstrap 95% interval" in text and "exact retraining (oracle)" in text
    assert "recommended default" in text and "default (λ=default) − D-TRAK" not in text  # D-TRAK not scored
    assert "default (λ=default) − pixel" in text
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["sweeps"]["K-FAC"]["points"][0]["per_query"] == pytest.approx(r.per_query.tolist())
    assert res["paired"] == saved["paired"]
    default_lds = ev.results["default"][TINY.default_damping].mean
    assert saved["default_over_oracle"] == (None if ev.oracle.mean == 0 else pytest.approx(default_lds / ev.oracle.mean))
    # resumable: a second run trains nothing new and gives the same numbers
    jobs = sorted(p.name for p in (tmp_path / "cache" / "jobs").iterdir())
    again = evaluate(cfg, train, RECIPE, tmp_path / "cache", settings=TINY, progress=False)
    assert sorted(p.name for p in (tmp_path / "cache" / "jobs").iterdir()) == jobs
    assert np.array_equal(again.targets, ev.targets) and tables(again) == tables(ev)
    # a fresh query set (e.g. for choosing λ without the evaluation's queries): same models and subsets, nothing
    # retrained, other queries and targets
    val = evaluate(cfg, train, RECIPE, tmp_path / "cache", progress=False,
                   settings=dataclasses.replace(TINY, query_sample_seed=7, cf_queries=0))
    assert sorted(p.name for p in (tmp_path / "cache" / "jobs").iterdir()) == jobs
    assert np.array_equal(val.subsets.kept, ev.subsets.kept) and not torch.equal(val.query_images, ev.query_images)
    assert val.targets.shape == ev.targets.shape and not np.array_equal(val.targets, ev.targets)


def test_evaluate_refuses_mismatched_model_and_data(tmp_path):
    train = from_image_folder(_folder(tmp_path / "images", n=4))
    with pytest.raises(ValueError, match=r"model makes images of shape \(1, 16, 16\).*\(1, 8, 8\)"):
        evaluate(tiny_unet_config(16, 1), train, RECIPE, tmp_path / "cache", settings=TINY, progress=False)
    with pytest.raises(TypeError, match="train must be an ImageDataset"):
        evaluate(tiny_unet_config(8, 1), train.images, RECIPE, tmp_path / "cache", settings=TINY)
    with pytest.raises(ValueError, match="unknown methods"):
        EvaluationSettings(trak_methods=("TRAK2",))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=f"query_sample_seed must be a non-negative integer or None, got {bad!r}"):
            EvaluationSettings(query_sample_seed=bad)


@pytest.mark.slow
def test_evaluate_cli_on_a_tiny_image_folder_end_to_end(tmp_path, capsys):
    from diffinfluence_widgets.cli import main

    folder = _folder(tmp_path / "images")
    argv = ["evaluate", "--data", str(folder), "--image-size", "8", "--unet-channels", "8,16", "--train-steps", "4",
            "--batch-size", "8", "--num-subsets", "3", "--seeds", "2", "--num-queries", "4", "--measure-draws", "8",
            "--query-draws", "4", "--train-draws", "3", "--ensemble", "2", "--curvature-draws", "2", "--trak-dim", "16", "--cf-queries", "1",
            "--cf-fractions", "0.25",
            "--bootstrap", "50", "--methods", "kfac,dtrak,pixel", "--cache-dir", str(tmp_path / "cache"),
            "--quiet", "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "### Paired comparisons" in out and "two-way bootstrap 95% interval" in out
    report = tmp_path / "cache" / "report"
    saved = json.loads((report / "results.json").read_text())
    assert set(saved["sweeps"]) == {"K-FAC", "D-TRAK", "pixel", "default"} and saved["image_size"] == 8
    assert saved["settings"]["ensemble"] == 2 and saved["settings"]["attribution"]["query_draws"] == 4
    assert saved["settings"]["attribution"]["train_draws"] == 3
    assert any(p["a"].startswith("default") and p["b"].startswith("D-TRAK") for p in saved["paired"])
    assert saved["settings"]["num_subsets"] == 3 and saved["settings"]["attribution"]["trak_dim"] == 16
    assert all(p["bootstrap"]["num_resamples"] == 50 for p in saved["paired"]) and saved["paired"]
    assert {r["method"] for r in saved["counterfactual"]} == {"K-FAC (λ=1e-8)", "D-TRAK", "random"}
    assert (report / "damping_sweep.html").is_file()
    bad = list(argv)
    bad[bad.index("--methods") + 1] = "kfac,nope"
    with pytest.raises(SystemExit, match="unknown methods"):
        main(bad)


def test_counterfactual_fractions_too_small_for_the_data_are_refused_before_training(tmp_path):
    train = from_image_folder(_folder(tmp_path / "images", n=12))
    s = EvaluationSettings.quick()  # removes 2% = 0 of 12 images
    with pytest.raises(ValueError, match="removing 0.02 of 12 training images removes 0"):
        evaluate(tiny_unet_config(8, 1), train, RECIPE, tmp_path / "cache", settings=s, progress=False)
    assert not (tmp_path / "cache").exists()
