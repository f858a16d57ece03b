"""``InfluenceExplorer``: query picker + controls + gallery + plotly views + compare + export, over one session."""
from __future__ import annotations

import html
import json
import threading
import time

import ipywidgets as W

from ..backend import InfluenceBackend
from ..session import AttributionSession
from .compare import CompareView
from .controls import Controls
from .export import ExportPanel
from .gallery import InfluenceGallery
from .picker import QueryPicker
from .plots import BandProfile, GradientMap, RankStability, ScoreDistribution

__all__ = ["InfluenceExplorer"]


class InfluenceExplorer(W.VBox):
    """The whole explorer. ``InfluenceExplorer(backend)`` or ``InfluenceExplorer(session=...)``.

    ``export_folder``: where the Export tab also saves a copy on the server (default: nowhere; exports are
    browser downloads). ``plot_debounce_s``: the plots redraw that long after the last change (the gallery always updates at once).
    ``status=True`` adds a small line written by Python after each gallery update (request id, settings, shown
    ids); ``check_backend=True`` also writes ``backend.search`` (or ``backend.refine`` for a refined, exact answer)
    at the exact same settings, computed directly (not through the session), so a browser test can compare it with
    what the gallery shows. The "Check exact" button compares the shown top-k with the method's exact top-k.
    """

    TABS = ("Score distribution", "Damping sweep", "Timestep bands", "Gradient map", "Compare", "Export")

    def __init__(self, backend: InfluenceBackend | None = None, *, session: AttributionSession | None = None,
                 status: bool = True, check_backend: bool = False, page_size: int = 12,
                 plot_debounce_s: float = 0.15, export_folder=None, **session_kwargs):
        if session is None:
            if backend is None:
                raise TypeError("InfluenceExplorer needs a backend or a session")
            session = AttributionSession(backend, **session_kwargs)
        self.session = s = session
        self.check_backend = check_backend
        title = W.HTML("<div class='dinf-title'><b>Influence explorer</b> — which training images made the model "
                       "generate this? Pick a query, then the measurement, method and damping.</div>")
        self.picker = QueryPicker(s)
        self.controls = Controls(s)
        self.gallery = InfluenceGallery(s, page_size=page_size)
        self.progress = W.IntProgress(value=0, min=0, max=1, bar_style="info", description="",
                                      layout=W.Layout(width="360px", visibility="hidden"))
        self.progress.add_class("dinf-progress")
        self.progress_text = W.HTML()
        # "is the shown list right?": compare it with the method's exact top-k at the same settings
        self.check_button = W.Button(description="Check exact", icon="check",
                                     tooltip="Compare the shown top-k with the method's exact top-k (full gradients)",
                                     disabled=not callable(getattr(s.backend, "refine", None)),
                                     layout=W.Layout(width="130px"))
        self.check_button.add_class("dinf-check")
        self.check_text = W.HTML()
        self.check_text.add_class("dinf-check-text")
        self.check_button.on_click(self._on_check)
        db = plot_debounce_s
        self.distribution = ScoreDistribution(s, active=True, debounce_s=db)
        self.sweep = RankStability(s, active=False, debounce_s=db)
        self.bands = BandProfile(s, active=False, debounce_s=db)
        self.map = GradientMap(s, on_select=self.gallery.select, on_hover=self.gallery.preview,
                               on_lasso=self.gallery.choose, active=False, debounce_s=db)
        self.compare = CompareView(s, active=False)
        self.export = ExportPanel(s, folder=export_folder)
        self._views = [self.distribution, self.sweep, self.bands, self.map, self.compare, None]
        self.tabs = W.Tab(children=[self.distribution, self.sweep, self.bands, self.map, self.compare, self.export],
                          titles=self.TABS)
        self.tabs.add_class("dinf-tabs")
        self.tabs.observe(self._on_tab, "selected_index")
        self.status = W.HTML()
        self.status.add_class("dinf-status")
        self._status_lock = threading.Lock()
        self.status.layout.display = None if status else "none"
        self.gallery.observe(lambda ch: self.map.select(ch["new"]), "selected_id")
        self.gallery.observe(self._write_status, "version")
        s.observe(self._on_busy, ["busy", "progress"])
        left = W.VBox([self.picker], layout=W.Layout(flex="0 0 270px"))
        right = W.VBox([self.controls, W.HBox([self.progress, self.progress_text, self.check_button,
                                               self.check_text]), self.gallery],
                       layout=W.Layout(flex="1 1 auto"))
        super().__init__([title, W.HBox([left, right]), self.tabs, self.status])
        self.add_class("dinf-explorer")
        self._write_status()

    def _on_tab(self, change) -> None:
        for n, v in enumerate(self._views):
            if v is not None:
                v.active = n == change["new"]

    def _on_busy(self, change=None) -> None:
        long_work = self.session.busy and bool(self.session.progress)
        self.progress.layout.visibility = "visible" if long_work else "hidden"
        self.progress_text.value = html.escape(self.session.progress) if long_work else ""

    def _on_check(self, _button=None) -> None:
        self.check_text.value = "<span data-state='busy'>checking…</span>"

        def shown(rep: dict) -> None:
            k = rep["k"]
            over = "every training image" if rep["exact_over"] == "all" else "the index's candidates"
            text = (f"proponents {rep['proponents']['overlap']}/{rep['proponents']['of']}, opponents "
                    f"{rep['opponents']['overlap']}/{rep['opponents']['of']} of the exact top {k} (exact over {over})")
            state = "exact" if rep["proponents"]["identical"] and rep["opponents"]["identical"] else "differs"
            self.check_text.value = (f"<span data-state='{state}' data-json='{html.escape(json.dumps(rep), True)}'>"
                                     f"{html.escape(text)}</span>")

        def failed(e: BaseException) -> None:
            self.check_text.value = f"<span data-state='error'>{html.escape(f'{type(e).__name__}: {e}')}</span>"

        self.session.run_async("check", self.session.check_exact, shown, failed)

    def _write_status(self, change=None) -> None:
        # read and written under one lock: the gallery's observer (worker thread) and the end of __init__ may both
        # write; without it an answer that arrives within milliseconds (a prepared query of the shared backend) could
        # be overwritten by "no result yet" computed a moment earlier
        with self._status_lock:
            self.status.value = self._status_html()

    def _status_html(self) -> str:
        r = self.session.result
        if r is None or self.gallery.request_id != r.request_id:
            return "<span class='dinf-status-text' data-request='0'>no result yet</span>"
        data = {"request_id": r.request_id, "query_id": r.query_id, "measurement": r.measurement,
                "method": r.method, "band": list(r.band) if r.band else None, "damping": repr(r.damping),
                "k": r.k, "proponents": [i.id for i in r.proponents], "opponents": [i.id for i in r.opponents],
                "page": self.gallery.page, "elapsed_ms": round(r.elapsed_s * 1000, 3),
                "exact": r.exact, "exact_over": r.exact_over, "route": r.route, "badge": r.badge,
                "refining": self.session.refining,
                "requested_at": r.requested_at, "finished_at": r.finished_at, "status_at": time.time()}
        if self.check_backend:
            b = self.session.backend
            p = b.prepare(r.query_id, r.measurement, r.method, r.band)
            # what the shown stage must equal: the refined (exact) answer, or the instant one by the same route
            if r.exact and callable(getattr(b, "refine", None)):
                sr = b.refine(p, r.damping, r.k)
            else:
                sr = b.search(p, r.damping, r.k, *((r.route,) if r.route else ()))
            data["backend_search"] = {"proponent_ids": [int(i) for i in sr.proponent_ids],
                                      "proponent_scores": [repr(float(v)) for v in sr.proponent_scores],
                                      "opponent_ids": [int(i) for i in sr.opponent_ids],
                                      "opponent_scores": [repr(float(v)) for v in sr.opponent_scores]}
        text = (f"python: request {r.request_id} · query {r.query_id} · {r.measurement} · {r.method} · "
                f"λ={r.damping:.4g} · {r.elapsed_s * 1000:.1f} ms")
        return (f"<span class='dinf-status-text' data-request='{r.request_id}' "
                f"data-json='{html.escape(json.dumps(data), quote=True)}'>{html.escape(text)}</span>")
