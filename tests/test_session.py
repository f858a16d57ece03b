"""AttributionSession against the deterministic stand-in backend (no widgets, no browser)."""
import csv
import io
import json
import threading
import time

import numpy as np
import pytest
import traitlets

from diffinfluence_widgets.backend import InfluenceBackend
from diffinfluence_widgets.data import to_png
from diffinfluence_widgets.results import rank_agreement
from diffinfluence_widgets.session import AttributionSession
from diffinfluence_widgets.widgets._standin import StandInBackend


@pytest.fixture(scope="module")
def backend():
    return StandInBackend(num_train=300)


def _expected(b, s, **over):
    st = {**s.settings, **over}
    p = b.prepare(st["query_id"], st["measurement"], st["method"], st["band"])
    return b.search(p, st["damping"], st["k"]), b.scores(p, st["damping"])


def test_standin_implements_protocol(backend):
    assert isinstance(backend, InfluenceBackend)


def test_defaults_and_result_match_backend(backend):
    s = AttributionSession(backend, threaded=False)
    assert s.query_id == backend.queries()[0].id
    assert (s.measurement, s.method) == (backend.measurements[0], backend.methods[0])
    assert s.damping == backend.default_damping[s.method]
    r = s.result
    exp, scores = _expected(backend, s)
    assert [i.id for i in r.proponents] == exp.proponent_ids.tolist()
    assert [i.score for i in r.proponents] == exp.proponent_scores.tolist()
    assert [i.id for i in r.opponents] == exp.opponent_ids.tolist()
    assert [i.rank for i in r.proponents] == list(range(1, s.k + 1))
    np.testing.assert_array_equal(r.all_scores, scores)
    # sign convention: proponents have the highest scores, opponents the lowest
    assert r.proponents[0].score == scores.max() and r.opponents[0].score == scores.min()


def test_damping_changes_ranking_as_backend_says(backend):
    s = AttributionSession(backend, threaded=False)
    seen = set()
    for lam in np.logspace(-6, 2, 9):
        s.damping = float(lam)
        exp, _ = _expected(backend, s)
        assert [i.id for i in s.result.proponents] == exp.proponent_ids.tolist()
        assert s.result.damping == float(lam)
        seen.add(tuple(exp.proponent_ids.tolist()))
    assert len(seen) > 1, "the stand-in must make damping matter"


def test_prepare_cached_per_query_measurement_method_band():
    b = StandInBackend(num_train=200)
    s = AttributionSession(b, threaded=False)
    assert b.calls["prepare"] == 1
    for lam in (1e-4, 1e-2, 1.0):
        s.damping = lam
    s.k = 5
    assert b.calls["prepare"] == 1, "damping and k must not redo the query-side work"
    s.method = "kfac"
    s.measurement = "square_norm"
    s.band = b.bands[1]
    assert b.calls["prepare"] == 4
    s.update(method="ekfac", measurement="loss", band=None)
    assert b.calls["prepare"] == 4 and s.stats["prepare_hits"] > 0


def test_hold_updates_makes_one_request():
    b = StandInBackend(num_train=200)
    s = AttributionSession(b, threaded=False)
    n0 = b.calls["search"]
    s.update(method="trak", damping=0.5, k=7)
    assert b.calls["search"] == n0 + 1
    assert s.result.method == "trak" and s.result.damping == 0.5 and s.result.k == 7


def test_validation_errors_name_the_value(backend):
    s = AttributionSession(backend, threaded=False)
    with pytest.raises(traitlets.TraitError, match="'nope'"):
        s.method = "nope"
    with pytest.raises(traitlets.TraitError, match="positive"):
        s.damping = -1.0
    with pytest.raises(traitlets.TraitError, match="between 1"):
        s.k = 0
    with pytest.raises(traitlets.TraitError, match="band"):
        s.band = (1, 2)
    with pytest.raises(traitlets.TraitError, match="query id 12345"):
        s.query_id = 12345
    with pytest.raises(TypeError, match="InfluenceBackend"):
        AttributionSession(object())


def test_threaded_stale_answers_are_dropped():
    b = StandInBackend(num_train=200, prepare_delay=0.3)
    s = AttributionSession(b, threaded=True)
    s.wait()
    shown = []
    s.observe(lambda ch: shown.append((ch["new"].query_id, ch["new"].damping)), "result")
    qids = [q.id for q in b.queries()]
    # a slow request (new query: prepare takes 0.3 s) followed by newer ones before it finishes
    s.query_id = qids[1]
    time.sleep(0.05)
    for lam in (1e-4, 1e-3, 1e-2):
        s.damping = lam
    s.query_id = qids[2]
    t0 = time.perf_counter()
    assert s.busy
    s.wait(10)
    assert not s.busy and s.progress == ""
    # the kernel thread was never blocked by the slow work
    assert time.perf_counter() - t0 > 0.2
    assert shown[-1] == (qids[2], 1e-2)
    assert (qids[1], 1e-4) not in shown and (qids[1], 1e-3) not in shown, "replaced requests must not show"
    assert s.result.request_id == s.request_id
    assert s._worker.replaced + s._worker.dropped >= 2


def test_work_runs_off_the_calling_thread():
    b = StandInBackend(num_train=200)
    threads = []
    orig = b.search
    b.search = lambda *a, **k: (threads.append(threading.current_thread().name), orig(*a, **k))[1]
    s = AttributionSession(b)
    s.wait()
    assert threads and all(t != threading.current_thread().name for t in threads)


def test_errors_are_reported_not_raised():
    b = StandInBackend(num_train=200, fail_query=201)
    s = AttributionSession(b, threaded=True)
    s.wait()
    good = s.result
    s.query_id = 201
    s.wait()
    assert "stand-in failure for query 201" in s.error and not s.busy
    assert s.result is good
    s.query_id = 202
    s.wait()
    assert s.error == "" and s.result.query_id == 202


def test_thumbnails_are_png_and_cached():
    b = StandInBackend(num_train=200)
    s = AttributionSession(b, threaded=False)
    calls = []
    orig = b.train_images
    b.train_images = lambda ids: (calls.append(list(ids)), orig(ids))[1]
    ids = [i.id for i in s.result.proponents]
    t1 = s.thumbnails(ids)
    t2 = s.thumbnails(ids)
    assert t1 == t2 and all(t.startswith(b"\x89PNG") for t in t1)
    assert len(calls) == 1
    from PIL import Image
    im = Image.open(io.BytesIO(t1[0]))
    assert im.size == (64, 64)
    # pixel values follow [-1, 1] -> [0, 255]
    arr = np.asarray(Image.open(io.BytesIO(to_png(np.array([[[-1.0, 1.0]]]), size=None))))
    assert arr.tolist() == [[0, 255]]


def test_band_profile_sums_to_scores(backend):
    s = AttributionSession(backend, threaded=False)
    bands, ids, prof = s.band_profile()
    assert prof.shape == (len(backend.bands), 2 * s.k)
    listed = [i.score for i in [*s.result.proponents, *s.result.opponents]]
    np.testing.assert_allclose(prof.sum(0), listed, rtol=1e-10)


def test_band_setting_restricts_measurement(backend):
    s = AttributionSession(backend, threaded=False)
    full = s.result.all_scores
    parts = []
    for band in backend.bands:
        s.band = band
        parts.append(s.result.all_scores)
    np.testing.assert_allclose(np.sum(parts, 0), full, rtol=1e-9, atol=1e-9)


def test_damping_sweep_reference_ranks(backend):
    s = AttributionSession(backend, threaded=False)
    sw = s.damping_sweep()
    ref = int(np.argmin(np.abs(sw.dampings - s.damping)))
    assert sw.ranks[ref].tolist() == list(range(1, s.k + 1))
    assert sw.overlap[ref] == 1.0 and sw.spearman[ref] == pytest.approx(1.0)
    assert sw.ids.tolist() == [i.id for i in s.result.proponents]
    assert sw.overlap.min() < 1.0


def test_rank_agreement_and_compare(backend):
    a = np.arange(20.0)
    assert rank_agreement(a, a, 5) == (pytest.approx(1.0), pytest.approx(1.0), 1.0)
    rho, tau, ov = rank_agreement(a, -a, 5)
    assert rho == pytest.approx(-1.0) and tau == pytest.approx(-1.0) and ov == 0.0
    s = AttributionSession(backend, threaded=False)
    c = s.compare("ekfac", "ekfac")
    assert c.spearman == pytest.approx(1.0) and c.topk_overlap == 1.0
    c = s.compare("ekfac", "trak")
    assert c.result_b.damping == backend.default_damping["trak"]
    assert -1 <= c.spearman < 1 and 0 <= c.topk_overlap <= 1


def test_generate_query_adds_and_selects():
    b = StandInBackend(num_train=200)
    s = AttributionSession(b, threaded=False)
    n = len(s.queries)
    q = s.generate_query(41)
    assert len(s.queries) == n + 1 and s.query_id == q.id and s.result.query_id == q.id
    assert q.kind == "generated" and q.meta["seed"] == 41


def test_exports(tmp_path, backend):
    s = AttributionSession(backend, threaded=False)
    r = s.result
    rows = list(csv.DictReader(io.StringIO(s.result.to_csv())))
    assert len(rows) == 2 * s.k
    assert [int(x["train_id"]) for x in rows[: s.k]] == [i.id for i in r.proponents]
    assert float(rows[0]["score"]) == r.proponents[0].score  # exact round trip (repr)
    js = json.loads(r.to_json())
    assert js["settings"]["damping"] == s.damping and "Positive score" in js["sign_convention"]
    for suffix in (".csv", ".json", ".html", ".png"):
        p = s.export(tmp_path / f"out{suffix}")
        assert p.stat().st_size > 100
    assert (tmp_path / "out.png").read_bytes().startswith(b"\x89PNG")
    assert "data:image/png;base64," in (tmp_path / "out.html").read_text()
    with pytest.raises(ValueError, match=r"\.txt"):
        s.export(tmp_path / "out.txt")
