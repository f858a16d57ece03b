"""Plotly views of the session's current result.

Each view builds a ``plotly.graph_objects.Figure`` in Python and shows it in a :class:`PlotlyView`, a small anywidget
that draws the figure's JSON with ``Plotly.react``. plotly.js comes from the installed plotly package and travels
once per page through the widget channel (not once per figure, as ``go.FigureWidget`` would: ~5 MB each, slow enough
on a busy 2-core machine to hit anywidget's model-initialisation timeout; and its one-shot edit deltas are lost when
a view is created after them).

- :class:`ScoreDistribution` — histogram of the scores of every training image with the top-k marked;
- :class:`RankStability` — where the current top-k rank across a damping sweep, and the top-k overlap;
- :class:`BandProfile` — per-timestep-band contributions of the top influences (they sum to the score);
- :class:`GradientMap` — 2-D map of the projected training gradients with the top-k highlighted; clicking a point
  selects that training image in the gallery (linked selection).

Each view recomputes off the kernel thread (``session.run_async``, latest request wins) and only while
``active`` (the explorer activates the visible tab); an inactive view recomputes when it becomes active. With
``debounce_s`` > 0 a view redraws that long after the last change, so a dragged slider updates the gallery first.
"""
from __future__ import annotations

import base64
import threading
from pathlib import Path
from typing import Callable

import anywidget
import ipywidgets as W
import numpy as np
import plotly.graph_objects as go
import traitlets

from ..session import AttributionSession

__all__ = ["ScoreDistribution", "RankStability", "BandProfile", "GradientMap", "PlotlyView"]

PRO, OPP, GREY = "#b2182b", "#2166ac", "#bbbbbb"
_LAYOUT = dict(height=330, margin=dict(l=55, r=20, t=40, b=45), template="plotly_white",
               legend=dict(orientation="h", y=-0.2))


_PLOTLY_JS = Path(go.__file__).resolve().parents[1] / "package_data" / "plotly.min.js"
_plotly_source: bytes | None = None


def _plotly_bytes() -> bytes:
    global _plotly_source
    if _plotly_source is None:
        if not _PLOTLY_JS.is_file():
            raise FileNotFoundError(f"plotly.js not found at {_PLOTLY_JS} (is the plotly package complete?)")
        _plotly_source = _PLOTLY_JS.read_bytes()
    return _plotly_source


def _plain(obj):
    """JSON-ready copy with numpy arrays and scalars as plain lists and numbers (no base64 typed arrays)."""
    if isinstance(obj, dict):
        if "bdata" in obj and "dtype" in obj:  # plotly ≥ 6 stores numpy arrays as base64 typed arrays
            arr = np.frombuffer(base64.b64decode(obj["bdata"]), dtype=np.dtype(obj["dtype"]))
            if "shape" in obj:
                arr = arr.reshape([int(n) for n in str(obj["shape"]).split(",")])
            return _plain(arr)
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


class PlotlyView(anywidget.AnyWidget):
    """A plotly figure (its JSON in ``figure``) drawn by plotly.js; clicks come back to :attr:`on_click`."""

    _esm = Path(__file__).parent / "static" / "plotly_view.js"
    _css = ".dinf-plotly { width: 100%; min-height: 120px; } .dinf-plotly-msg { color: #777; font-size: 12px; }"
    figure = traitlets.Dict().tag(sync=True)
    version = traitlets.Int(0).tag(sync=True)
    #: offer plotly's lasso and box selection
    selectable = traitlets.Bool(False).tag(sync=True)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        #: ``callback(curve, index, customdata)`` for a click on a point
        self.on_click: Callable[[int, int, object], None] | None = None
        #: ``callback(customdata)`` when the pointer rests on a point; ``callback(list of customdata)`` for a
        #: lasso / box selection (empty list: selection cleared)
        self.on_hover: Callable[[object], None] | None = None
        self.on_select_points: Callable[[list], None] | None = None
        self.on_msg(self._on_custom_msg)

    def show(self, fig: go.Figure) -> None:
        spec = _plain(fig.to_plotly_json())
        with self.hold_sync():
            self.figure = {"data": spec.get("data", []), "layout": spec.get("layout", {})}
            self.version += 1

    def _on_custom_msg(self, widget, content, buffers) -> None:
        if not isinstance(content, dict):
            return
        if content.get("type") == "need-plotly":
            self.send({"type": "plotly"}, buffers=[_plotly_bytes()])
        elif content.get("type") == "click" and self.on_click is not None:
            self.on_click(int(content.get("curve", -1)), int(content.get("index", -1)), content.get("customdata"))
        elif content.get("type") == "hover" and self.on_hover is not None:
            self.on_hover(content.get("customdata"))
        elif content.get("type") == "select" and self.on_select_points is not None:
            self.on_select_points(list(content.get("customdata") or []))


class LazyRedraw:
    """Redraw only while shown: a change made while hidden marks the view dirty, and showing it redraws once.

    Subclasses set ``_active`` / ``_dirty`` in ``__init__`` and define ``update()`` (which clears ``_dirty``).
    """

    _active: bool = True
    _dirty: bool = True

    @property
    def active(self) -> bool:
        return self._active

    @active.setter
    def active(self, value: bool) -> None:
        self._active = bool(value)
        if self._active and self._dirty:
            self.update()

    def _mark_changed(self) -> bool:
        """Record a change; True when the view is shown and should redraw now."""
        self._dirty = True
        return self._active


class _View(LazyRedraw, W.VBox):
    channel = "view"
    triggers: tuple[str, ...] = ("result",)

    def __init__(self, session: AttributionSession, active: bool = True, debounce_s: float = 0.0, **kwargs):
        self.session = session
        #: wait this long after the last change before redrawing (the gallery gets the browser first)
        self.debounce_s = float(debounce_s)
        self._timer: threading.Timer | None = None
        self.note = W.HTML()
        self.note.add_class("dinf-plot-note")
        self.fig = go.Figure(layout=go.Layout(**_LAYOUT))
        self.view = PlotlyView()
        self._setup()
        super().__init__([self.view, self.note], **kwargs)
        self.add_class("dinf-plot")
        self.add_class(f"dinf-plot-{self.channel}")
        self._active = active
        self._dirty = True
        self.renders = 0
        session.observe(self._on_change, list(self.triggers))
        if active:
            self.update()

    def _on_change(self, change=None) -> None:
        if not self._mark_changed():
            return
        if self.debounce_s <= 0:
            self.update()
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(self.debounce_s, self.update)
        self._timer.daemon = True
        self._timer.start()

    def update(self) -> None:
        """Recompute off the kernel thread and redraw (the newest request wins)."""
        self._dirty = False
        if self.session.result is None:
            return
        self.session.run_async(f"{self.channel}-{id(self)}", self._compute, self._draw_safe, self._error)

    def _draw_safe(self, data) -> None:
        with self.fig.batch_update():
            self._draw(data)
        self.view.show(self.fig)
        self.renders += 1
        self.note.value = self._note(data)

    def _error(self, e: BaseException) -> None:
        self.note.value = f"<span class='dinf-error'>{type(e).__name__}: {e}</span>"

    def _note(self, data) -> str:
        return ""

    def _setup(self) -> None: ...
    def _compute(self): ...
    def _draw(self, data) -> None: ...


class ScoreDistribution(_View):
    """Histogram of all training scores; the top-k proponents and opponents marked below it."""

    channel = "dist"

    def _setup(self):
        self.fig.add_bar(name="all training images", marker_color=GREY, hoverinfo="x+y")
        self.fig.add_scatter(name="top-k proponents", mode="markers", marker=dict(color=PRO, symbol="triangle-up", size=9))
        self.fig.add_scatter(name="top-k opponents", mode="markers", marker=dict(color=OPP, symbol="triangle-up", size=9))
        self.fig.update_layout(title="Scores of all training images (the listed top-k marked)",
                               xaxis_title="score", yaxis_title="training images", bargap=0.02)

    def _compute(self):
        r = self.session.result
        s = r.all_scores if r.all_scores is not None else self.session.scores()
        counts, edges = np.histogram(s, bins=60)
        return r, counts, edges

    def _draw(self, data):
        r, counts, edges = data
        centres = (edges[:-1] + edges[1:]) / 2
        self.fig.data[0].update(x=centres, y=counts, width=np.diff(edges))
        self.fig.data[1].update(x=[i.score for i in r.proponents], y=[0] * len(r.proponents),
                                text=[f"#{i.id}" for i in r.proponents])
        self.fig.data[2].update(x=[i.score for i in r.opponents], y=[0] * len(r.opponents),
                                text=[f"#{i.id}" for i in r.opponents])

    def _note(self, data):
        r, counts, _ = data
        return f"<small>{int(counts.sum())} training images · damping {r.damping:.3g} · {r.method}</small>"


class RankStability(_View):
    """Ranks of the current top-k across a damping sweep (8 decades), with the top-k overlap."""

    channel = "sweep"
    max_lines = 10

    def _setup(self):
        self.fig.update_layout(title="Rank stability across damping (current top proponents)",
                               xaxis=dict(type="log", title="damping λ"),
                               yaxis=dict(title="rank (1 = strongest proponent)", type="log", autorange="reversed"),
                               yaxis2=dict(title="top-k overlap", overlaying="y", side="right", range=[0, 1.05],
                                           tickvals=[0, 0.25, 0.5, 0.75, 1.0], showgrid=False))

    def _compute(self):
        return self.session.damping_sweep()

    def _draw(self, sw):
        traces = []
        for n, tid in enumerate(sw.ids[: self.max_lines]):
            traces.append(go.Scatter(x=sw.dampings, y=sw.ranks[:, n], mode="lines+markers", name=f"#{int(tid)}",
                                     line=dict(width=1.5), marker=dict(size=4)))
        traces.append(go.Scatter(x=sw.dampings, y=sw.overlap, mode="lines", name="top-k overlap", yaxis="y2",
                                 line=dict(color="black", dash="dash")))
        self.fig.data = []
        self.fig.add_traces(traces)
        self.fig.layout.shapes = [dict(type="line", xref="x", yref="paper", x0=sw.reference_damping,
                                       x1=sw.reference_damping, y0=0, y1=1, line=dict(color="#f0a202", width=2))]

    def _note(self, sw):
        return (f"<small>orange line: current damping {sw.reference_damping:.3g}; "
                f"min top-{len(sw.ids)} overlap over the sweep {sw.overlap.min():.2f}</small>")


class BandProfile(_View):
    """Per-timestep-band contributions of the top influences (stacked; the stack sums to the score)."""

    channel = "bands"

    def _setup(self):
        self.fig.update_layout(title="Timestep-band profile of the top influences", barmode="relative",
                               xaxis_title="training image (P = proponent, O = opponent)", yaxis_title="score",
                               height=380, margin=dict(l=55, r=20, t=40, b=110), legend=dict(orientation="h", y=-0.45))

    def _compute(self):
        r = self.session.result
        top = [*r.proponents[:10], *r.opponents[:10]]
        bands, ids, prof = self.session.band_profile([i.id for i in top])
        return r, top, bands, prof

    def _draw(self, data):
        r, top, bands, prof = data
        x = [f"{'P' if i.role == 'proponent' else 'O'}{i.rank} #{i.id}" for i in top]
        traces = [go.Bar(x=x, y=prof[b], name=f"t ∈ [{lo}, {hi})") for b, (lo, hi) in enumerate(bands)]
        traces.append(go.Scatter(x=x, y=[i.score for i in top], mode="markers", name="total score",
                                 marker=dict(color="black", symbol="diamond", size=7)))
        self.fig.data = []
        self.fig.add_traces(traces)

    def _note(self, data):
        r, top, bands, prof = data
        if not bands:
            return "<small>this backend has no timestep bands</small>"
        return "<small>contributions computed over all timesteps; each stack sums to the score (black diamond)</small>"


class GradientMap(_View):
    """2-D map of the projected training gradients (their first two principal directions), points coloured by
    class; the query marked (its loss gradient through the same projection and axes) and its top-k highlighted.
    Click selects a training image in the gallery, hovering previews it there (plotly tooltips cannot show images),
    and a lasso / box selection lists the chosen images in the gallery."""

    channel = "map"
    #: one colour per class (categorical, colour-blind safe first)
    CLASS_COLOURS = ("#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377", "#bbbbbb", "#000000",
                     "#ee8866", "#44bb99")

    def __init__(self, session: AttributionSession, on_select: Callable[[int], None] | None = None,
                 on_hover: Callable[[int], None] | None = None, on_lasso: Callable[[list[int]], None] | None = None,
                 **kwargs):
        self.on_select = on_select
        self.on_hover_id = on_hover
        self.on_lasso = on_lasso
        self.selected: int | None = None
        self._base_ready = False
        self._base: list[int] = []  # trace indices of the per-class base traces
        super().__init__(session, **kwargs)

    def _setup(self):
        self.fig.update_layout(title="Training gradients in 2-D — click: show in the gallery · lasso: list them",
                               xaxis_title="1st principal direction of the projected training gradients",
                               yaxis_title="2nd principal direction", clickmode="event", hovermode="closest",
                               dragmode="lasso", legend=dict(orientation="v", x=1.02, y=1), height=420,
                               margin=dict(l=60, r=20, t=40, b=50))
        self._base_ready = False
        self.view.selectable = True
        self.view.on_click = self._clicked
        self.view.on_hover = self._hovered
        self.view.on_select_points = self._lassoed

    def _compute(self):
        xy = self.session.map_2d()
        r = self.session.result
        try:  # the query's own gradient (cached per query by the backend); no marker if it cannot be placed
            q = None if r is None else self.session.map_query(r.query_id)
        except Exception:
            q = None
        return xy, r, q

    def _build_base(self, xy) -> None:
        from .reading import train_labels

        ids = np.asarray(self.session.backend.train_ids)
        labels = train_labels(self.session.backend, ids)
        groups: dict = {}
        for n, lab in enumerate(labels):
            groups.setdefault(lab, []).append(n)
        traces = []
        for k, lab in enumerate(sorted(groups, key=lambda v: (v is None, v))):
            pos = groups[lab]
            colour = GREY if lab is None else self.CLASS_COLOURS[int(lab) % len(self.CLASS_COLOURS)]
            traces.append(go.Scatter(x=xy[pos, 0], y=xy[pos, 1], customdata=ids[pos], mode="markers",
                                     name="training images" if lab is None else f"class {lab}",
                                     marker=dict(color=colour, size=6, opacity=0.55),
                                     hovertemplate="training image %{customdata}<extra>%{fullData.name}</extra>"))
        traces.append(go.Scatter(x=[], y=[], customdata=[], mode="markers", name="query", hoverinfo="skip",
                                 marker=dict(color="#111111", size=16, symbol="x-thin", line=dict(width=3))))
        for name, colour, size, sym in (("top-k proponents", PRO, 12, "circle-open"),
                                        ("top-k opponents", OPP, 12, "circle-open"),
                                        ("selected", "#f0a202", 18, "star")):
            traces.append(go.Scatter(x=[], y=[], customdata=[], mode="markers", name=name,
                                     marker=dict(color=colour, size=size, symbol=sym, line=dict(width=2.5)),
                                     hovertemplate="training image %{customdata}<extra>" + name + "</extra>"))
        self.fig.data = []
        self.fig.add_traces(traces)
        self._base = list(range(len(traces) - 4))
        self._base_ready = True

    def _trace(self, name: str):
        return next(t for t in self.fig.data if t.name == name)

    def _draw(self, data):
        xy, r, q = data
        if not self._base_ready:
            self._build_base(xy)
        self._trace("query").update(x=[] if q is None else [float(q[0])], y=[] if q is None else [float(q[1])],
                                    customdata=[] if q is None else [r.query_id])
        for name, lst in (("top-k proponents", r.proponents), ("top-k opponents", r.opponents)):
            pos = self.session.train_position([i.id for i in lst])
            self._trace(name).update(x=xy[pos, 0], y=xy[pos, 1], customdata=[i.id for i in lst])
        self._draw_selected(xy)

    def _note(self, data):
        xy, r, q = data
        mark = ("" if q is None else f"<span class='dinf-map-query' data-query='{r.query_id}' "
                f"data-xy='{float(q[0]):.6g},{float(q[1]):.6g}'>✕ query {r.query_id} (its loss gradient, "
                "projected the same way)</span>; ")
        return (f"<small>{len(xy)} training images coloured by class; {mark}rings: the top {r.k} proponents (red) "
                f"and opponents (blue) of query {r.query_id} ({r.method}, λ = {r.damping:.3g})</small>")

    def _draw_selected(self, xy=None):
        xy = self.session.map_2d() if xy is None else xy
        tr = self._trace("selected")
        if self.selected is None:
            tr.update(x=[], y=[], customdata=[])
        else:
            p = self.session.train_position([self.selected])
            tr.update(x=xy[p, 0], y=xy[p, 1], customdata=[self.selected])

    def select(self, train_id: int | None) -> None:
        """Highlight a training image (called when the gallery selection changes)."""
        self.selected = None if train_id is None or train_id < 0 else int(train_id)
        if self._base_ready:
            self._draw_selected()
            self.view.show(self.fig)

    def _clicked(self, curve: int, index: int, customdata=None) -> None:
        """A click on point ``index`` of trace ``curve`` (from the front end); the point's own id wins."""
        try:
            tid = int(customdata) if customdata is not None else int(self.fig.data[curve].customdata[index])
        except (IndexError, TypeError, ValueError):
            return
        self.select(tid)
        if self.on_select is not None:
            self.on_select(tid)

    def _hovered(self, customdata) -> None:
        try:
            tid = int(customdata)
        except (TypeError, ValueError):
            return
        if self.on_hover_id is not None:
            self.on_hover_id(tid)

    def _lassoed(self, ids: list) -> None:
        try:
            chosen = [int(i) for i in ids]
        except (TypeError, ValueError):
            return
        if self.on_lasso is not None:
            self.on_lasso(chosen)
