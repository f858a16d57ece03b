"""``QueryPicker``: a grid of generated samples and held-out images; "generate new" with a seed (anywidget)."""
from __future__ import annotations

import math
from pathlib import Path

import anywidget
import traitlets

from ..session import AttributionSession
from .reading import GENERATED_ONLY_REASON, compatible_settings

__all__ = ["QueryPicker"]

_STATIC = Path(__file__).parent / "static"


class QueryPicker(anywidget.AnyWidget):
    """Pick the session's query. Thumbnails travel as binary buffers, one page at a time."""

    _esm = _STATIC / "picker.js"
    _css = _STATIC / "picker.css"

    items = traitlets.List(traitlets.Dict()).tag(sync=True)  # {id, kind, label} of the current page
    thumbs = traitlets.List(traitlets.Bytes()).tag(sync=True)
    selected = traitlets.Int(-1).tag(sync=True)
    page = traitlets.Int(0).tag(sync=True)
    num_pages = traitlets.Int(0).tag(sync=True)
    page_size = traitlets.Int(24).tag(sync=True)
    seed = traitlets.Int(0).tag(sync=True)
    generating = traitlets.Bool(False).tag(sync=True)
    message = traitlets.Unicode("").tag(sync=True)
    version = traitlets.Int(0).tag(sync=True)

    def __init__(self, session: AttributionSession, *, page_size: int = 24, **kwargs):
        super().__init__(page_size=page_size, **kwargs)
        self.session = session
        self._pushing = False
        self.last_generate_request = 0
        session.observe(self._on_queries, "queries")
        session.observe(self._on_session_query, "query_id")
        self.on_msg(self._on_msg)
        seeds = [q.meta.get("seed") for q in session.queries if isinstance(q.meta.get("seed"), int)]
        self.seed = (max(seeds) + 1) if seeds else 0
        self._push(page=self._page_of(session.query_id))

    def _page_of(self, qid) -> int:
        ids = [q.id for q in self.session.queries]
        return ids.index(qid) // self.page_size if qid in ids else 0

    def _push(self, page: int | None = None) -> None:
        qs = self.session.queries
        pages = max(1, math.ceil(len(qs) / self.page_size))
        page = min(max(0, self.page if page is None else page), pages - 1)
        chunk = qs[page * self.page_size:(page + 1) * self.page_size]
        thumbs = [self.session.query_thumbnail(q.id) for q in chunk]
        self._pushing = True
        try:
            with self.hold_sync():
                self.items = [{"id": int(q.id), "kind": q.kind, "label": q.label} for q in chunk]
                self.thumbs = thumbs
                self.num_pages = pages
                self.page = page
                self.selected = -1 if self.session.query_id is None else int(self.session.query_id)
                self.version += 1
        finally:
            self._pushing = False

    def _on_queries(self, change) -> None:
        self._push()

    def _on_session_query(self, change) -> None:
        if change["new"] is not None and change["new"] != self.selected:
            self._push(page=self._page_of(change["new"]))

    @traitlets.observe("page")
    def _on_page(self, change) -> None:
        if not self._pushing and change["new"] != change["old"]:
            self._push(page=change["new"])

    @traitlets.observe("selected")
    def _on_selected(self, change) -> None:
        v = change["new"]
        if self._pushing or v < 0 or v == self.session.query_id:
            return
        try:
            fix = compatible_settings(self.session, v)  # e.g. Journey-TRAK cannot explain a held-out image
            self.session.update(query_id=v, **fix)
            self.message = ("" if not fix else
                            f"switched to {fix.get('method', self.session.method)} / "
                            f"{fix.get('measurement', self.session.measurement)}: the previous choice "
                            f"{GENERATED_ONLY_REASON}")
        except traitlets.TraitError as e:
            self.message = str(e)

    # ------------------------------------------------------------------ "generate new"
    def _on_msg(self, widget, content, buffers) -> None:
        if isinstance(content, dict) and content.get("type") == "generate":
            self.generate(int(content.get("seed", self.seed)), request_id=int(content.get("request_id", 0)))

    def generate(self, seed: int, request_id: int = 0) -> None:
        """Sample a new query with ``seed`` off the kernel thread, then select it."""
        if seed < 0:
            self.message = f"seed must be ≥ 0, got {seed}"
            return
        self.last_generate_request = request_id
        self.generating = True
        self.message = ""

        def ok(q):
            with self.hold_sync():
                self.generating = False
                self.message = f"new query {q.id} (seed {seed})"
                self.seed = seed + 1

        def fail(e):
            with self.hold_sync():
                self.generating = False
                self.message = f"could not generate with seed {seed}: {type(e).__name__}: {e}"

        self.session.run_async("generate", lambda: self.session.generate_query(seed, select=True), ok, fail)
