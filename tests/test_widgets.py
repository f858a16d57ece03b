"""Widget state logic and messages, pure Python (no kernel, no browser).

Outside a kernel widgets get a dummy comm: ``w.set_state({...})`` does what a front-end update does, and patching
``w.comm.send`` captures the messages (and binary buffers) that would go to the browser.
"""
import json
import math
import re
import threading
from html import unescape

import numpy as np
import pytest
from ipywidgets.widgets.widget import _remove_buffers

from diffinfluence_widgets.session import AttributionSession
from diffinfluence_widgets.widgets import (Controls, ExportPanel, GradientMap, InfluenceExplorer, InfluenceGallery,
                                           QueryPicker)
from diffinfluence_widgets.widgets._standin import StandInBackend
from diffinfluence_widgets.widgets import controls as controls_module


@pytest.fixture
def session():
    return AttributionSession(StandInBackend(num_train=300), threaded=False)


def capture(widget):
    sent = []
    widget.comm.send = lambda data=None, buffers=None, **kw: sent.append((data, buffers or []))
    return sent


def test_gallery_shows_session_result_with_binary_thumbnails(session):
    g = InfluenceGallery(session, page_size=4)
    r = session.result
    assert [d["id"] for d in g.proponents] == [i.id for i in r.proponents[:4]]
    assert [d["score"] for d in g.proponents] == [i.score for i in r.proponents[:4]]
    assert [float(d["score_text"]) for d in g.opponents] == [i.score for i in r.opponents[:4]]
    assert g.num_pages == math.ceil(session.k / 4) and g.request_id == r.request_id
    # the sign read once, in the measurement's words; the query large beside the lists; ids with class labels
    assert "Positive score" in g.sign_text and "helped the model make this" in g.sign_text
    assert "pulled the model away" in g.sign_text and "loss" in g.sign_text
    assert g.query_thumb.startswith(b"\x89PNG") and f"query {r.query_id}" in g.query_text
    labels = [d["label"] for d in g.proponents]
    pos = [session.train_position([d["id"]])[0] for d in g.proponents]
    assert labels == [str(session.backend.labels[p]) for p in pos]
    # predicted change if the listed images were removed: (1/N) Σ s, exactly
    n = len(session.backend.train_ids)
    assert g.deltas["proponents"] == pytest.approx(sum(i.score for i in r.proponents) / n, rel=1e-12)
    assert g.deltas["opponents"] == pytest.approx(sum(i.score for i in r.opponents) / n, rel=1e-12)
    assert g.deltas["proponents"] > 0 > g.deltas["opponents"] and "(1/N) Σ s" in g.readout
    state, paths, buffers = _remove_buffers(g.get_state())
    assert ["proponent_thumbs", 0] in paths and ["opponent_thumbs", 3] in paths
    thumbs = [bytes(b) for p, b in zip(paths, buffers) if p[0].endswith("_thumbs")]
    assert len(thumbs) == 8 and all(t.startswith(b"\x89PNG") for t in thumbs)
    data = {k: v for k, v in state.items() if k not in ("_esm", "_css")}  # the JS source mentions base64
    assert "base64" not in json.dumps(data) and "iVBOR" not in json.dumps(data)


def test_damping_change_sends_one_message_with_png_buffers(session):
    g = InfluenceGallery(session, page_size=6)
    sent = capture(g)
    v0 = g.version
    session.damping = 0.5
    assert g.version == v0 + 1
    # hold_sync: the page content, totals, caption and version travel in one update message
    updates = [d for d, _ in sent if d.get("method") == "update" and "version" in d["state"]]
    assert len(updates) == 1
    data, bufs = next((d, b) for d, b in sent if d.get("method") == "update" and "version" in d["state"])
    assert {"proponents", "opponents", "request_id", "caption"} <= set(data["state"])
    assert all(bytes(b).startswith(b"\x89PNG") for b in bufs) and len(bufs) >= 6
    assert "damping 0.5" in data["state"]["caption"]
    assert sum(len(b) for b in bufs) + len(json.dumps(data)) < 10_000_000


def test_gallery_pagination_from_front_end(session):
    session.k = 30
    g = InfluenceGallery(session, page_size=12)
    assert g.num_pages == 3
    sent = capture(g)
    g.set_state({"page": 2})  # what the "next" button does
    assert [d["id"] for d in g.proponents] == [i.id for i in session.result.proponents[24:30]]
    assert sent and sent[-1][0]["state"]["version"] == g.version
    assert [d["rank"] for d in g.proponents][0] == 25
    # a new result goes back to the first page
    session.damping = 2.0
    assert g.page == 0 and g.proponents[0]["rank"] == 1


def test_gallery_selection_and_map_link(session):
    g = InfluenceGallery(session)
    target = session.result.proponents[3].id
    g.set_state({"selected_id": target})  # a click in the gallery
    assert g.selected_thumb.startswith(b"\x89PNG") and "proponent #4" in g.selected_text
    # a click on the 2-D map selects an image that may not be listed at all
    m = GradientMap(session, on_select=g.select, on_hover=g.preview, on_lasso=g.choose)
    listed = {i.id for i in [*session.result.proponents, *session.result.opponents]}
    other = next(int(i) for i in session.backend.train_ids if int(i) not in listed)

    # what the front end sends for a click on a point: its trace, index and customdata (the training id)
    lab = str(session.backend.labels[session.train_position([other])[0]])
    curve = next(n for n, t in enumerate(m.fig.data) if t.name == f"class {lab}")
    index = list(m.fig.data[curve].customdata).index(other)
    m.view._on_custom_msg(m.view, {"type": "click", "curve": curve, "index": index, "customdata": other}, [])
    assert g.selected_id == other and "not in the top" in g.selected_text
    assert list(m._trace("selected").customdata) == [other]
    # the map is coloured by class: one trace per class, every training image in exactly one of them
    classes = [t for t in m.fig.data if t.name.startswith("class ")]
    assert sorted(int(i) for t in classes for i in t.customdata) == sorted(int(i) for i in session.backend.train_ids)
    assert "principal direction" in m.fig.layout.xaxis.title.text and m.fig.layout.yaxis.title.text
    # hover previews in the gallery's larger view (not pinned); a lasso lists the chosen images with their scores
    m.view._on_custom_msg(m.view, {"type": "hover", "customdata": int(listed.pop())}, [])
    assert g.preview_thumb.startswith(b"\x89PNG") and "training image" in g.preview_text
    lasso = [int(i) for i in session.backend.train_ids[:5]]
    m.view._on_custom_msg(m.view, {"type": "select", "customdata": lasso}, [])
    assert sorted(d["id"] for d in g.chosen) == sorted(lasso) and len(g.chosen_thumbs) == 5
    scores = [d["score"] for d in g.chosen]
    assert scores == sorted(scores, reverse=True)
    pos = session.train_position([g.chosen[0]["id"]])[0]
    assert scores[0] == session.result.all_scores[pos]
    m.view._on_custom_msg(m.view, {"type": "select", "customdata": []}, [])
    assert g.chosen == []
    # the query is marked where its own gradient falls on the same axes, and the mark follows a query change
    q = m._trace("query")
    assert np.allclose([q.x[0], q.y[0]], session.map_query()) and list(q.customdata) == [session.query_id]
    assert f"data-query='{session.query_id}'" in m.note.value
    before = (q.x[0], q.y[0])
    other_q = next(it.id for it in session.backend.queries() if it.id != session.query_id)
    session.query_id = other_q  # (threaded=False: the result and the map's redraw happen inline)
    q = m._trace("query")
    assert list(q.customdata) == [other_q] and np.allclose([q.x[0], q.y[0]], session.map_query(other_q))
    assert (q.x[0], q.y[0]) != before


def test_gallery_shows_errors():
    b = StandInBackend(num_train=200, fail_query=201)
    s = AttributionSession(b, threaded=False)
    g = InfluenceGallery(s)
    s.query_id = 201
    assert "stand-in failure" in g.error and not g.busy


def test_static_gallery_for_compare(session):
    g = InfluenceGallery(None)
    assert g.proponents == [] and g.num_pages == 0
    g.show(session.result, session=session)
    assert len(g.proponents) == session.k


def test_query_picker_select_and_generate(session):
    p = QueryPicker(session, page_size=5)
    qs = session.queries
    assert p.num_pages == math.ceil(len(qs) / 5)
    assert [d["id"] for d in p.items] == [q.id for q in qs[:5]] and len(p.thumbs) == 5
    assert all(t.startswith(b"\x89PNG") for t in p.thumbs)
    p.set_state({"selected": qs[2].id})
    assert session.query_id == qs[2].id and session.result.query_id == qs[2].id
    # "generate new" arrives as a custom message; the answer comes back through traits
    p._on_msg(p, {"type": "generate", "seed": 77, "request_id": 3}, [])
    assert session.query_id == 100_077 and session.result.query_id == 100_077
    assert p.selected == 100_077 and not p.generating and "seed 77" in p.message and p.seed == 78
    assert any(d["id"] == 100_077 for d in p.items)  # its page is shown
    p._on_msg(p, {"type": "generate", "seed": -1}, [])
    assert "≥ 0" in p.message


def test_controls_two_way(session):
    c = Controls(session)
    c.damping.value = 10 ** -2.5  # slider drag (continuous_update=True)
    assert session.damping == pytest.approx(10 ** -2.5) and session.result.damping == session.damping
    c.measurement.value = "square_norm"
    assert session.result.measurement == "square_norm"
    c.band.value = "250-500"
    assert session.band == (250, 500)
    c.band.value = "all"
    assert session.band is None
    c.k.value = 7
    assert len(session.result.proponents) == 7
    c.method.value = "trak"  # λ is not comparable across families: reset to trak's default and re-range
    assert session.damping == session.backend.default_damping["trak"]
    assert c.damping.min <= math.log10(session.damping) <= c.damping.max
    assert c.damping.value == pytest.approx(session.damping)
    # the front end snaps a value to its step grid (10^0.05) and echoes it back: that is not a user change
    d = session.damping
    c.damping.value = 10 ** (round(math.log10(d) / 0.05) * 0.05)
    assert session.damping == d
    # the λ shown beside the slider is the session's own, not the slider's grid point
    assert c.damping.readout is False and f">{d:.3g}<" in c.damping_value.value
    session.damping = 4.05e-6  # off the 0.05-decade grid (3.98e-6 is the nearest point)
    assert ">4.05e-06<" in c.damping_value.value
    session.damping = 3e-2  # session -> slider
    assert c.damping.value == pytest.approx(3e-2)
    session.update(method="ekfac", damping=1e-9)  # outside the slider's range: it widens
    assert c.damping.min <= -9 and c.method.value == "ekfac"


def test_controls_ignore_late_echo_of_an_earlier_damping(session, monkeypatch):
    """The front end answers every λ Python pushes with its grid point, sometimes after the session moved on (a
    held-out query switching Journey-TRAK's λ to EK-FAC's): that late echo must not become the session's λ."""
    clock = [1000.0]
    monkeypatch.setattr(controls_module.time, "monotonic", lambda: clock[0])
    c = Controls(session)
    c.method.value = "trak"
    old = session.damping
    session.update(method="ekfac", damping=4.05e-6)
    grid = lambda v: 10 ** (round(math.log10(v) / c.damping.step) * c.damping.step)  # noqa: E731
    clock[0] += 1.0
    c.damping.value = grid(old)  # the late echo of trak's λ
    assert session.damping == 4.05e-6 and c.damping.value == pytest.approx(4.05e-6)
    c.damping.value = grid(4.05e-6)  # the echo of the current λ
    assert session.damping == 4.05e-6
    c.damping.value = 1e-4  # a drag to a value Python never pushed
    assert session.damping == pytest.approx(1e-4)
    clock[0] += controls_module.ECHO_WINDOW_S + 1
    c.damping.value = grid(old)  # a drag, long after, to where trak's λ was
    assert session.damping == pytest.approx(grid(old))


def test_explorer_status_and_tabs(tmp_path):
    s = AttributionSession(StandInBackend(num_train=300), threaded=True)
    e = InfluenceExplorer(session=s, check_backend=True, plot_debounce_s=0)
    s.wait()
    for tab in range(5):
        e.tabs.selected_index = tab
        s.wait()
    assert e.sweep.renders >= 1 and e.map.renders >= 1 and e.bands.renders >= 1
    assert e.compare.last is not None and "Spearman" in e.compare.agreement.value
    s.damping = 0.02
    s.wait()
    m = re.search(r"data-json='([^']*)'", e.status.value)
    data = json.loads(unescape(m.group(1)))
    assert data["request_id"] == s.result.request_id == e.gallery.request_id
    assert float(data["damping"]) == 0.02
    bs = data["backend_search"]
    assert bs["proponent_ids"] == data["proponents"] == [d["id"] for d in e.gallery.proponents][: s.k]
    # the inactive plots do not recompute on every damping change; the visible one does
    e.tabs.selected_index = 0
    s.wait()
    r_dist, r_sweep = e.distribution.renders, e.sweep.renders
    s.damping = 0.03
    s.wait()
    assert e.distribution.renders == r_dist + 1 and e.sweep.renders == r_sweep
    sent = capture(e.export)
    for suffix in (".csv", ".json", ".html", ".png"):
        info = e.export.export(suffix)
        assert info is not None and info["name"].endswith(suffix), e.export.message
    files = [(d, b) for d, b in sent if d.get("method") == "custom" and d["content"]["type"] == "file"]
    assert [d["content"]["name"] for d, _ in files] == [i["name"] for i in e.export.sent]
    csv_bytes = bytes(files[0][1][0])
    assert csv_bytes.decode() == s.result.to_csv()  # the bytes the browser gets are the result's CSV
    assert bytes(files[3][1][0]).startswith(b"\x89PNG")
    assert "sent to your browser" in e.export.message and e.export.written == []  # nothing on the server
    assert list(tmp_path.iterdir()) == []
    s.close()


def test_export_panel_reports_errors(tmp_path):
    b = StandInBackend(num_train=200, num_heldout=0, num_generated=0)
    s = AttributionSession(b, threaded=False)
    x = ExportPanel(s, folder=tmp_path)
    assert x.export(".csv") is None and "no result yet" in x.message and x.error


def test_export_copies_stay_in_their_folder_and_stale_results_are_refused(tmp_path):
    b = StandInBackend(num_train=200, fail_query=203)
    s = AttributionSession(b, threaded=False)
    x = ExportPanel(s, folder=tmp_path / "exports")
    assert x.export(".bin") is None and "'.bin'" in x.message
    s.update(measurement="loss_at_t=500")  # '=' in the name: the file name is sanitised
    p = x.save(".json")
    assert p.parent == (tmp_path / "exports").resolve() and "=" not in p.name
    assert json.loads(p.read_text())["settings"]["measurement"] == "loss_at_t=500"
    with pytest.raises(RuntimeError, match="writes no files on the server"):
        ExportPanel(s).save(".csv")
    # the request for the current settings failed: the old result is not exported under the new settings
    s.query_id = 203
    assert s.error and s.result.query_id != 203
    assert x.export(".csv") is None and "not for the current settings" in x.message
    assert "stand-in failure" in x.message


def test_plot_redraws_are_debounced():
    import time
    s = AttributionSession(StandInBackend(num_train=200), threaded=True)
    e = InfluenceExplorer(session=s, plot_debounce_s=0.2)
    s.wait()
    time.sleep(0.4)
    s.wait()
    n = e.distribution.renders
    for lam in (1e-4, 2e-4, 3e-4, 4e-4):  # a dragged slider
        s.damping = lam
    s.wait()
    assert e.distribution.renders == n  # not yet: the gallery goes first
    time.sleep(0.5)
    s.wait()
    assert e.distribution.renders == n + 1  # one redraw for the whole burst
    s.close()


def test_plotly_view_sends_plotly_js_once_asked_and_the_figure_as_json(session):
    from diffinfluence_widgets.widgets.plots import PlotlyView, ScoreDistribution
    d = ScoreDistribution(session)
    fig = d.view.figure
    assert fig["data"][0]["type"] == "bar" and len(fig["data"][0]["y"]) == 60
    assert "Scores of all training images" in json.dumps(fig["layout"])
    v = PlotlyView()
    sent = capture(v)
    v._on_custom_msg(v, {"type": "need-plotly"}, [])
    (data, bufs), = [(d_, b) for d_, b in sent if d_.get("method") == "custom"]
    assert data["content"] == {"type": "plotly"} and bytes(bufs[0]).lstrip().startswith(b"/**")
    assert len(bufs[0]) < 10_000_000


def _with_journey_trak(b):
    """The stand-in with a Journey-TRAK method that, like the real backend's, only applies to generated queries."""
    b.methods = [*b.methods, "journey_trak"]
    b._fam["journey_trak"], b._meth_noise["journey_trak"] = 0.7, b._meth_noise["trak"]
    b.default_damping = {**b.default_damping, "journey_trak": 0.1}
    return b


def test_journey_trak_cannot_be_combined_with_a_heldout_query():
    s = AttributionSession(_with_journey_trak(StandInBackend(num_train=200)), threaded=False, query_id=100000)
    c, picker = Controls(s), QueryPicker(s)
    assert "journey_trak" in [v for _, v in c.method.options] and c.note.value == ""
    s.update(method="journey_trak", damping=0.1)
    assert s.result.method == "journey_trak"
    picker.set_state({"selected": 200})  # the user picks a held-out digit in the front end
    assert (s.query_id, s.method, s.damping) == (200, "ekfac", s.default_damping("ekfac"))
    assert (s.result.query_id, s.result.method) == (200, "ekfac") and s.error == ""
    assert "journey_trak" not in [v for _, v in c.method.options] and c.method.value == "ekfac"
    assert "Journey-TRAK" in c.note.value and "generated" in c.note.value
    assert "switched to ekfac" in picker.message
    picker.set_state({"selected": 100001})  # a generated query: offered again
    assert "journey_trak" in [v for _, v in c.method.options] and c.note.value == ""


def test_gallery_and_zoom_name_the_settings_of_what_they_show():
    s = AttributionSession(StandInBackend(num_train=200, fail_query=203), threaded=False)
    g = InfluenceGallery(s, page_size=4)
    c = Controls(s)
    first = g.proponents[0]["id"]
    g.set_state({"selected_id": first})  # pinned larger view
    assert f"for query {s.query_id}," in g.selected_text and "proponent #1" in g.selected_text
    q2 = [q.id for q in s.queries if q.id not in (s.query_id, 203)][0]
    s.query_id = q2
    # the pinned view follows the new query: its rank / score now come from the new result
    assert f"for query {q2}," in g.selected_text
    pos = s.train_position([first])[0]
    assert repr(float(s.result.all_scores[pos])) in g.selected_text
    # a failed request: the gallery shows no stale tiles, and names the failed settings like the controls do
    s.query_id = 203
    assert s.error and g.proponents == [] and g.error == s.error
    assert g.caption.startswith("no result for query 203 · loss · ekfac") and c.method.value == s.method == "ekfac"


def test_damping_range_per_method_with_the_noise_region_marked():
    b = StandInBackend(num_train=200)
    b.curvature_scale = {"ekfac": 1e-2, "kfac": 1e-2, "trak": 1.0, "dtrak": 1.0}
    s = AttributionSession(b, threaded=False)
    c = Controls(s)
    # the ekfac range reaches a decade below the noise boundary (1e-6 τ = 1e-8) and two above τ
    assert (c.damping.min, c.damping.max) == (-9, 0)
    assert "data-in-noise='0'" in c.scale.value and "1.00e-02" in c.scale.value
    s.damping = 3e-9  # the far left: the strip says so
    assert "data-in-noise='1'" in c.scale.value and "noise region" in c.scale.value
    c.method.value = "trak"  # another family: its own range and default
    assert s.damping == b.default_damping["trak"] and (c.damping.min, c.damping.max) == (-7, 2)
    assert c.damping.min <= math.log10(s.damping) <= c.damping.max and "data-in-noise='0'" in c.scale.value


def test_gallery_ends_on_the_latest_answer_when_answers_overtake():
    """An answer that arrives while an older one is still being shown (the shared backend answers within
    milliseconds, even while the explorer is being built) is the one the gallery ends on, never the older one."""
    entered, gate = threading.Event(), threading.Event()

    class SlowFirstImages(StandInBackend):
        slow = True

        def train_images(self, ids):
            if self.slow:  # the first thumbnails (those of the older answer) take a while
                self.slow = False
                entered.set()
                gate.wait(10)
            return super().train_images(ids)

    s = AttributionSession(SlowFirstImages(num_train=200), threaded=False)
    older = s.result
    built = {}
    t = threading.Thread(target=lambda: built.setdefault("g", InfluenceGallery(s)))
    t.start()  # the gallery is being built and shows the older answer (its thumbnails are slow)
    assert entered.wait(10)
    threading.Timer(0.3, gate.set).start()
    s.update(damping=s.damping * 1e4)  # a newer answer arrives meanwhile
    t.join(10)
    g = built["g"]
    assert s.result is not older and s.result.request_id > older.request_id
    assert g.request_id == s.result.request_id
    assert [x["id"] for x in g.proponents] == [i.id for i in s.result.proponents][:g.page_size]
