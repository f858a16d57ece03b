"""``ExportPanel``: write the current result as CSV, JSON, an HTML card or a PNG card."""
from __future__ import annotations

import html
import time
from pathlib import Path

import ipywidgets as W

from ..session import AttributionSession

__all__ = ["ExportPanel"]


class ExportPanel(W.VBox):
    """Buttons that export the session's current result into ``folder`` (named after query, method, damping)."""

    FORMATS = (("CSV", ".csv"), ("JSON", ".json"), ("HTML card", ".html"), ("PNG card", ".png"))

    def __init__(self, session: AttributionSession, folder: str | Path = "dinf-exports", **kwargs):
        self.session = session
        self.folder = W.Text(value=str(folder), description="folder", layout=W.Layout(width="360px"))
        self.buttons = []
        for label, suffix in self.FORMATS:
            b = W.Button(description=label, tooltip=f"Write the current result as {label} ({suffix})",
                         layout=W.Layout(width="110px"))
            b.add_class(f"dinf-export-{suffix[1:]}")
            b.on_click(lambda _b, s=suffix: self.export(s))
            self.buttons.append(b)
        self.message = W.HTML()
        self.message.add_class("dinf-export-message")
        self.written: list[Path] = []
        super().__init__([self.folder, W.HBox(self.buttons), self.message], **kwargs)
        self.add_class("dinf-export")

    def path_for(self, suffix: str) -> Path:
        r = self.session.result
        stem = "result" if r is None else f"query{r.query_id}_{r.measurement}_{r.method}_lambda{r.damping:.3g}"
        return Path(self.folder.value) / f"{stem.replace('=', '-')}{suffix}"

    def export(self, suffix: str) -> Path | None:
        try:
            t0 = time.perf_counter()
            p = self.session.export(self.path_for(suffix))
            self.written.append(p)
            self.message.value = (f"wrote <code>{html.escape(str(p))}</code> "
                                  f"({p.stat().st_size} bytes, {1000 * (time.perf_counter() - t0):.0f} ms)")
            return p
        except Exception as e:  # shown in the widget, not as a traceback in the log
            self.message.value = f"<span class='dinf-error'>{html.escape(type(e).__name__)}: {html.escape(str(e))}</span>"
            return None
