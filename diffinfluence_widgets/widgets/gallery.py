"""``InfluenceGallery``: proponents and opponents of the current query (anywidget, thumbnails as binary buffers).

Used alone (``InfluenceGallery(session)``) it follows ``session.result``; with ``session=None`` it shows whatever
:meth:`show` is given (compare mode uses two of these). The front end receives one page at a time
(``page_size`` tiles per list), so a large k never makes a large message.
"""
from __future__ import annotations

import math
import threading
from pathlib import Path

import anywidget
import traitlets

from ..backend import SIGN_CONVENTION
from ..results import InfluenceResult
from ..session import AttributionSession
from .reading import predicted_change, predicted_change_text, section_titles, sign_reading, train_labels

__all__ = ["InfluenceGallery", "SIGN_TEXT"]

_STATIC = Path(__file__).parent / "static"

#: the sign convention in words (the general form; a gallery shows :func:`~.reading.sign_reading` of its result)
SIGN_TEXT = SIGN_CONVENTION
#: edge of the large query image beside the lists (pixels)
QUERY_SIZE = 160


class InfluenceGallery(anywidget.AnyWidget):
    """Top-k proponents and opponents with scores; larger view on hover / click; keyboard navigation."""

    _esm = _STATIC / "gallery.js"
    _css = _STATIC / "gallery.css"

    proponents = traitlets.List(traitlets.Dict()).tag(sync=True)
    opponents = traitlets.List(traitlets.Dict()).tag(sync=True)
    proponent_thumbs = traitlets.List(traitlets.Bytes()).tag(sync=True)
    opponent_thumbs = traitlets.List(traitlets.Bytes()).tag(sync=True)
    proponent_total = traitlets.Int(0).tag(sync=True)
    opponent_total = traitlets.Int(0).tag(sync=True)
    page = traitlets.Int(0).tag(sync=True)
    num_pages = traitlets.Int(0).tag(sync=True)
    page_size = traitlets.Int(12).tag(sync=True)
    #: request id of the session result shown (0: none yet)
    request_id = traitlets.Int(0).tag(sync=True)
    #: bumped after every content change; the front end redraws on it
    version = traitlets.Int(0).tag(sync=True)
    caption = traitlets.Unicode("").tag(sync=True)
    #: "exact ✓" / "approximate (est. recall …)" (+ " · refining…" while the exact answer is computed)
    badge = traitlets.Unicode("").tag(sync=True)
    sign_text = traitlets.Unicode(SIGN_TEXT).tag(sync=True)
    #: titles of the highest-score and lowest-score lists, in the words of the measurement
    titles = traitlets.List(traitlets.Unicode(), default_value=["Proponents", "Opponents"]).tag(sync=True)
    #: "predicted change if the listed images were removed" readout (plain text) and its numbers
    readout = traitlets.Unicode("").tag(sync=True)
    deltas = traitlets.Dict().tag(sync=True)
    #: the query, shown large beside the lists
    query_thumb = traitlets.Bytes(b"").tag(sync=True)
    query_text = traitlets.Unicode("").tag(sync=True)
    busy = traitlets.Bool(False).tag(sync=True)
    progress = traitlets.Unicode("").tag(sync=True)
    error = traitlets.Unicode("").tag(sync=True)
    #: training id selected in the gallery or elsewhere (the 2-D map); -1 for none
    selected_id = traitlets.Int(-1).tag(sync=True)
    selected_thumb = traitlets.Bytes(b"").tag(sync=True)
    selected_text = traitlets.Unicode("").tag(sync=True)
    #: a training image previewed (hovered in the 2-D map): shown in the larger view unless one is pinned
    preview_thumb = traitlets.Bytes(b"").tag(sync=True)
    preview_text = traitlets.Unicode("").tag(sync=True)
    #: training images chosen elsewhere (a lasso in the 2-D map), listed under the proponents and opponents
    chosen = traitlets.List(traitlets.Dict()).tag(sync=True)
    chosen_thumbs = traitlets.List(traitlets.Bytes()).tag(sync=True)
    #: the most images a lasso lists (their thumbnails travel in one message)
    MAX_CHOSEN = 48
    #: set by the served app (``app.free_kernel_on_leave``): when the page is left or reloaded, the browser asks
    #: Voila to shut this kernel down, with the XSRF token Voila's own unload request lacks (voila#1458)
    voila_kernel_id = traitlets.Unicode("").tag(sync=True)

    def __init__(self, session: AttributionSession | None = None, *, page_size: int = 12, show_query: bool = True,
                 **kwargs):
        super().__init__(page_size=page_size, **kwargs)
        self.session = session
        #: show the query large beside the lists and the sign reading above them (the compare view's galleries
        #: do not: the explorer states both once)
        self.show_query = show_query
        if not show_query:
            self.sign_text = ""
        self._result: InfluenceResult | None = None
        self._pushing = False
        self._thumb_source = session
        # one show at a time, each reading the session's latest result under the lock: an answer that arrives while
        # an older one is being shown (the shared backend answers within milliseconds, even during __init__) is
        # never overwritten by it
        self._show_lock = threading.RLock()
        if session is not None:
            session.observe(self._on_result, "result")
            session.observe(self._on_status, ["busy", "error", "progress", "refining"])
            self._on_status()
            with self._show_lock:
                if session.result is not None:
                    self.show(session.result)

    # ------------------------------------------------------------------ session → front end
    def _on_result(self, change) -> None:
        with self._show_lock:
            self.show(self.session.result)  # the latest (``change["new"]`` may already be superseded)

    def _on_status(self, change=None) -> None:
        s = self.session
        with self.hold_sync():
            self.busy = s.busy
            self.progress = s.progress
            self.error = s.error
            self.badge = _badge(self._result, s)
        r = self._result
        if s.error and not s.busy and r is not None and _settings_of(r) != _settings_of(s):
            # the request for the settings the controls show failed: never leave the old result on screen
            self.show(None)
            self.caption = f"no result for {_caption_of(s)}"

    def show(self, result: InfluenceResult | None, session: AttributionSession | None = None,
             keep_page: bool = False) -> None:
        """Display ``result`` (thumbnails come from ``session``, default the gallery's own)."""
        with self._show_lock:
            self._show(result, session, keep_page)

    def _show(self, result, session, keep_page) -> None:
        if session is not None:
            self._thumb_source = session
        self._result = result
        n = 0 if result is None else max(len(result.proponents), len(result.opponents))
        pages = max(1, math.ceil(n / self.page_size)) if n else 0
        page = min(self.page, pages - 1) if keep_page and pages else 0
        self._push(page, pages)
        if self.selected_id >= 0:  # a pinned larger view follows the new result (its rank and score)
            self._on_selected({"new": self.selected_id})

    def _push(self, page: int, pages: int) -> None:
        r = self._result
        src = self._thumb_source
        if r is None or src is None:
            pro, opp, tp, to = [], [], [], []
        else:
            lo, hi = page * self.page_size, (page + 1) * self.page_size
            pro, opp = r.proponents[lo:hi], r.opponents[lo:hi]
            tp = src.thumbnails([i.id for i in pro])
            to = src.thumbnails([i.id for i in opp])
            labels = train_labels(src.backend, [i.id for i in [*pro, *opp]])
            pro = [_item(i, lab) for i, lab in zip(pro, labels[:len(pro)])]
            opp = [_item(i, lab) for i, lab in zip(opp, labels[len(pro):])]
        self._pushing = True
        try:
            self._sync_page(r, page, pages, pro, opp, tp, to)
        finally:
            self._pushing = False

    def _sync_page(self, r, page, pages, pro, opp, tp, to) -> None:
        with self.hold_sync():
            self.proponents = pro
            self.opponents = opp
            self.proponent_thumbs = tp
            self.opponent_thumbs = to
            self.proponent_total = 0 if r is None else len(r.proponents)
            self.opponent_total = 0 if r is None else len(r.opponents)
            self.num_pages = pages
            self.page = max(page, 0)
            self.caption = "" if r is None else _caption(r)
            self.badge = _badge(r, self.session)
            self.request_id = 0 if r is None else r.request_id
            self._sync_reading(r)
            self.version += 1

    def _sync_reading(self, r: InfluenceResult | None) -> None:
        """Sign reading, list titles, the predicted-change readout and the large query image of ``r``."""
        src = self._thumb_source
        if r is None or src is None:
            self.readout, self.query_thumb, self.query_text, self.deltas = "", b"", "", {}
            return
        self.sign_text = sign_reading(r.measurement) if self.show_query else ""
        self.titles = list(section_titles(r.measurement))
        self.readout = predicted_change_text(r, len(src.backend.train_ids))
        self.deltas = predicted_change(r, len(src.backend.train_ids))
        if not self.show_query:
            return
        try:
            q = src.query(r.query_id)
            self.query_thumb = src.query_thumbnail(q.id, size=QUERY_SIZE)
            self.query_text = f"query {q.id} · {q.label or q.kind}"
        except KeyError:
            self.query_thumb, self.query_text = b"", f"query {r.query_id}"

    @traitlets.observe("page")
    def _on_page(self, change) -> None:
        # a page change from the front end (or Python): send that page's tiles
        if change["new"] != change["old"] and self._result is not None:
            pages = self.num_pages
            p = min(max(0, change["new"]), max(pages - 1, 0))
            if not self._pushing:
                self._push(p, pages)

    @traitlets.observe("selected_id")
    def _on_selected(self, change) -> None:
        sid = change["new"]
        src = self._thumb_source
        if sid < 0 or src is None:
            with self.hold_sync():
                self.selected_thumb = b""
                self.selected_text = ""
            return
        text = self._describe(sid)
        try:
            thumb = src.thumbnails([sid])[0]
        except Exception as e:  # an id the backend does not know: say so in the widget
            self.error = f"cannot show training image {sid}: {e}"
            return
        with self.hold_sync():
            self.selected_thumb = thumb
            self.selected_text = text

    def _describe(self, sid: int) -> str:
        """``training image <id> (class c) · score … · for query …`` for the result shown."""
        src = self._thumb_source
        lab = train_labels(src.backend, [sid])[0] if hasattr(src, "backend") else None
        name = f"training image {sid}" + ("" if lab is None else f" (class {lab})")
        r = self._result
        if r is None:
            return name
        for inf in [*r.proponents, *r.opponents]:
            if inf.id == sid:
                return f"{inf.role} #{inf.rank} · {name} · score {inf.score!r} · for query {r.query_id}, " \
                       f"{r.method}, λ = {r.damping:.3g}"
        text = f"{name} · not in the top {r.k}"
        if r.all_scores is not None and hasattr(src, "train_position"):
            try:
                pos = int(src.train_position([sid])[0])
                text = f"{name} · score {float(r.all_scores[pos])!r} (not in the top {r.k})"
            except KeyError:
                pass
        return text + f" · for query {r.query_id}, {r.method}, λ = {r.damping:.3g}"

    def preview(self, train_id: int) -> None:
        """Show a training image in the larger view without pinning it (hover in the 2-D map)."""
        src = self._thumb_source
        if src is None:
            return
        try:
            thumb = src.thumbnails([int(train_id)])[0]
        except Exception:  # an unknown id: nothing to preview
            return
        with self.hold_sync():
            self.preview_thumb = thumb
            self.preview_text = self._describe(int(train_id))

    def choose(self, train_ids) -> None:
        """List these training images (a lasso in the 2-D map) under the proponents and opponents, with their
        scores for the result shown; an empty list clears the list."""
        src = self._thumb_source
        ids = [int(i) for i in train_ids][: self.MAX_CHOSEN]
        if src is None or not ids:
            with self.hold_sync():
                self.chosen, self.chosen_thumbs = [], []
            return
        r = self._result
        scores = {}
        if r is not None and r.all_scores is not None and hasattr(src, "train_position"):
            pos = src.train_position(ids)
            scores = {i: float(r.all_scores[p]) for i, p in zip(ids, pos)}
        ids.sort(key=lambda i: -scores.get(i, 0.0))
        labels = train_labels(src.backend, ids) if hasattr(src, "backend") else [None] * len(ids)
        items = [{"id": i, "score": scores.get(i, float("nan")), "score_text": repr(scores.get(i, float("nan"))),
                  "rank": n + 1, "label": "" if lab is None else str(lab)} for n, (i, lab) in enumerate(zip(ids, labels))]
        with self.hold_sync():
            self.chosen_thumbs = src.thumbnails(ids)
            self.chosen = items

    def select(self, train_id: int) -> None:
        """Select a training image (e.g. from the 2-D map); jumps to its page when it is listed."""
        r = self._result
        if r is not None:
            for lst in (r.proponents, r.opponents):
                for n, inf in enumerate(lst):
                    if inf.id == train_id:
                        self.page = n // self.page_size
                        break
        self.selected_id = int(train_id)

    @property
    def shown_ids(self) -> dict[str, list[int]]:
        return {"proponents": [d["id"] for d in self.proponents], "opponents": [d["id"] for d in self.opponents]}


def _item(inf, label=None) -> dict:
    return {"id": int(inf.id), "score": float(inf.score), "score_text": repr(float(inf.score)), "rank": int(inf.rank),
            "label": "" if label is None else str(label)}


def _settings_of(x) -> tuple:
    band = tuple(x.band) if x.band else None
    return (x.query_id, x.measurement, x.method, band, float(x.damping))


def _caption_of(x) -> str:
    band = "all timesteps" if not x.band else f"t ∈ [{x.band[0]}, {x.band[1]})"
    return f"query {x.query_id} · {x.measurement} · {x.method} · damping {x.damping:.3g} · {band}"


def _badge(r: InfluenceResult | None, session) -> str:
    if r is None:
        return ""
    refining = bool(getattr(session, "refining", False)) and not r.exact
    return r.badge + (" · refining…" if refining else "")


def _caption(r: InfluenceResult) -> str:
    return f"{_caption_of(r)} · top {r.k}"
