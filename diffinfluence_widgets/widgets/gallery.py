"""``InfluenceGallery``: proponents and opponents of the current query (anywidget, thumbnails as binary buffers).

Used alone (``InfluenceGallery(session)``) it follows ``session.result``; with ``session=None`` it shows whatever
:meth:`show` is given (compare mode uses two of these). The front end receives one page at a time
(``page_size`` tiles per list), so a large k never makes a large message.
"""
from __future__ import annotations

import math
from pathlib import Path

import anywidget
import traitlets

from ..backend import SIGN_CONVENTION
from ..results import InfluenceResult
from ..session import AttributionSession

__all__ = ["InfluenceGallery", "SIGN_TEXT"]

_STATIC = Path(__file__).parent / "static"

#: the sign convention in words, shown in every gallery
SIGN_TEXT = SIGN_CONVENTION


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
    sign_text = traitlets.Unicode(SIGN_TEXT).tag(sync=True)
    busy = traitlets.Bool(False).tag(sync=True)
    progress = traitlets.Unicode("").tag(sync=True)
    error = traitlets.Unicode("").tag(sync=True)
    #: training id selected in the gallery or elsewhere (the 2-D map); -1 for none
    selected_id = traitlets.Int(-1).tag(sync=True)
    selected_thumb = traitlets.Bytes(b"").tag(sync=True)
    selected_text = traitlets.Unicode("").tag(sync=True)

    def __init__(self, session: AttributionSession | None = None, *, page_size: int = 12, **kwargs):
        super().__init__(page_size=page_size, **kwargs)
        self.session = session
        self._result: InfluenceResult | None = None
        self._pushing = False
        self._thumb_source = session
        if session is not None:
            session.observe(self._on_result, "result")
            session.observe(self._on_status, ["busy", "error", "progress"])
            self._on_status()
            if session.result is not None:
                self.show(session.result)

    # ------------------------------------------------------------------ session → front end
    def _on_result(self, change) -> None:
        self.show(change["new"])

    def _on_status(self, change=None) -> None:
        s = self.session
        with self.hold_sync():
            self.busy = s.busy
            self.progress = s.progress
            self.error = s.error

    def show(self, result: InfluenceResult | None, session: AttributionSession | None = None,
             keep_page: bool = False) -> None:
        """Display ``result`` (thumbnails come from ``session``, default the gallery's own)."""
        if session is not None:
            self._thumb_source = session
        self._result = result
        n = 0 if result is None else max(len(result.proponents), len(result.opponents))
        pages = max(1, math.ceil(n / self.page_size)) if n else 0
        page = min(self.page, pages - 1) if keep_page and pages else 0
        self._push(page, pages)

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
        self._pushing = True
        try:
            self._sync_page(r, page, pages, pro, opp, tp, to)
        finally:
            self._pushing = False

    def _sync_page(self, r, page, pages, pro, opp, tp, to) -> None:
        with self.hold_sync():
            self.proponents = [_item(i) for i in pro]
            self.opponents = [_item(i) for i in opp]
            self.proponent_thumbs = tp
            self.opponent_thumbs = to
            self.proponent_total = 0 if r is None else len(r.proponents)
            self.opponent_total = 0 if r is None else len(r.opponents)
            self.num_pages = pages
            self.page = max(page, 0)
            self.caption = "" if r is None else _caption(r)
            self.request_id = 0 if r is None else r.request_id
            self.version += 1

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
        text = f"training image {sid}"
        r = self._result
        if r is not None:
            for inf in [*r.proponents, *r.opponents]:
                if inf.id == sid:
                    text = f"{inf.role} #{inf.rank} · training image {sid} · score {inf.score!r}"
                    break
            else:
                if r.all_scores is not None and hasattr(src, "train_position"):
                    try:
                        pos = int(src.train_position([sid])[0])
                        text = f"training image {sid} · score {float(r.all_scores[pos])!r} (not in the top {r.k})"
                    except KeyError:
                        pass
        try:
            thumb = src.thumbnails([sid])[0]
        except Exception as e:  # an id the backend does not know: say so in the widget
            self.error = f"cannot show training image {sid}: {e}"
            return
        with self.hold_sync():
            self.selected_thumb = thumb
            self.selected_text = text

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


def _item(inf) -> dict:
    return {"id": int(inf.id), "score": float(inf.score), "score_text": repr(float(inf.score)), "rank": int(inf.rank)}


def _caption(r: InfluenceResult) -> str:
    band = "all timesteps" if r.band is None else f"t ∈ [{r.band[0]}, {r.band[1]})"
    return (f"query {r.query_id} · {r.measurement} · {r.method} · damping {r.damping:.3g} · {band} · "
            f"top {r.k}{' (exact)' if r.exact else ''}")
