"""``CompareView``: two methods side by side on the current query, with their rank agreement."""
from __future__ import annotations

import html

import ipywidgets as W

from ..results import CompareResult
from ..session import AttributionSession
from .controls import METHOD_HELP, _label
from .gallery import InfluenceGallery
from .plots import LazyRedraw

__all__ = ["CompareView"]


class CompareView(LazyRedraw, W.VBox):
    """Method A vs method B (each at its family's damping; A at the session's damping when it is the session's
    method): two galleries and Spearman / Kendall over all training scores plus the top-k overlap."""

    def __init__(self, session: AttributionSession, method_a: str | None = None, method_b: str | None = None,
                 active: bool = True, **kwargs):
        self.session = session
        ms = list(session.backend.methods)
        opts = [(_label(m, METHOD_HELP), m) for m in ms]
        self.method_a = W.Dropdown(options=opts, value=method_a or session.method, description="method A",
                                   layout=W.Layout(width="300px"))
        self.method_b = W.Dropdown(options=opts, value=method_b or next((m for m in ms if m != self.method_a.value), ms[0]),
                                   description="method B", layout=W.Layout(width="300px"))
        self.method_a.add_class("dinf-compare-a")
        self.method_b.add_class("dinf-compare-b")
        self.agreement = W.HTML()
        self.agreement.add_class("dinf-agreement")
        self.gallery_a = InfluenceGallery(None, page_size=8, show_query=False)
        self.gallery_b = InfluenceGallery(None, page_size=8, show_query=False)
        self.gallery_a.add_class("dinf-compare-gallery-a")
        self.gallery_b.add_class("dinf-compare-gallery-b")
        self.last: CompareResult | None = None
        super().__init__([W.HBox([self.method_a, self.method_b]), self.agreement,
                          W.HBox([self.gallery_a, self.gallery_b])], **kwargs)
        self.add_class("dinf-compare")
        self._active, self._dirty = active, True
        self.method_a.observe(lambda _: self.update(), "value")
        self.method_b.observe(lambda _: self.update(), "value")
        session.observe(self._on_change, ["result"])
        if active:
            self.update()

    def _on_change(self, change=None):
        if self._mark_changed():
            self.update()

    def update(self) -> None:
        self._dirty = False
        if self.session.result is None:
            return
        a, b = self.method_a.value, self.method_b.value
        self.agreement.value = "<i>comparing…</i>"
        self.session.run_async(f"compare-{id(self)}", lambda: self.session.compare(a, b), self._show, self._fail)

    def _fail(self, e: BaseException) -> None:
        self.agreement.value = f"<span class='dinf-error'>{html.escape(type(e).__name__)}: {html.escape(str(e))}</span>"

    def _show(self, c: CompareResult) -> None:
        self.last = c
        self.gallery_a.show(c.result_a, session=self.session)
        self.gallery_b.show(c.result_b, session=self.session)
        self.agreement.value = (
            f"<div class='dinf-agreement-text'><b>{html.escape(c.method_a)}</b> (λ = {c.result_a.damping:.3g}) vs "
            f"<b>{html.escape(c.method_b)}</b> (λ = {c.result_b.damping:.3g}) over all training images: "
            f"Spearman ρ = <b data-metric='spearman'>{c.spearman:.3f}</b>, "
            f"Kendall τ = <b data-metric='kendall'>{c.kendall:.3f}</b>, "
            f"top-{c.k} proponent overlap = <b data-metric='overlap'>{c.topk_overlap:.2f}</b></div>")
