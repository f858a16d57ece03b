"""``ExportPanel``: the current result as CSV, JSON, an HTML card or a PNG card, **downloaded by the browser**.

A click sends the file's bytes to the front end (one widget message with a binary buffer), which hands them to
the browser as a download (a ``Blob`` behind an ``<a download>`` link) — so a Binder or remote user gets the file
on their own machine. Nothing is written on the server unless the panel was given a ``folder``; then a copy goes
there and only there (plain file names, never a path from the front end).

A result whose settings differ from the session's (the last request failed or is still running) is refused
rather than exported under the wrong name.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import anywidget
import traitlets

from .._io import atomic_write_bytes
from ..session import AttributionSession

__all__ = ["ExportPanel"]

_STATIC = Path(__file__).parent / "static"
_MIME = {".csv": "text/csv", ".json": "application/json", ".html": "text/html", ".png": "image/png"}


class ExportPanel(anywidget.AnyWidget):
    """Buttons that download the session's current result (named after query, measurement, method, damping)."""

    _esm = _STATIC / "export.js"
    _css = _STATIC / "export.css"

    FORMATS = (("CSV", ".csv"), ("JSON", ".json"), ("HTML card", ".html"), ("PNG card", ".png"))

    formats = traitlets.List(traitlets.List()).tag(sync=True)
    #: the last outcome, in words (written by Python; "" at first)
    message = traitlets.Unicode("").tag(sync=True)
    error = traitlets.Bool(False).tag(sync=True)
    #: server-side folder of the copies ("" when nothing is written on the server)
    folder_text = traitlets.Unicode("").tag(sync=True)

    def __init__(self, session: AttributionSession, folder: str | Path | None = None, **kwargs):
        super().__init__(formats=[[label, suffix] for label, suffix in self.FORMATS], **kwargs)
        self.session = session
        self.folder = None if folder is None else Path(folder).expanduser().resolve()
        self.folder_text = "" if self.folder is None else str(self.folder)
        self.written: list[Path] = []
        self.sent: list[dict] = []
        self.on_msg(self._on_msg)

    # ------------------------------------------------------------------ files
    def file_name(self, suffix: str) -> str:
        r = self.session.result
        stem = "result" if r is None else f"query{r.query_id}_{r.measurement}_{r.method}_lambda{r.damping:.3g}"
        return re.sub(r"[^A-Za-z0-9_.+-]", "-", stem) + suffix

    def payload(self, suffix: str) -> tuple[str, str, bytes]:
        """``(file name, MIME type, bytes)`` of the current result in the format of ``suffix``."""
        suffix = suffix.lower()
        if suffix not in _MIME:
            raise ValueError(f"cannot export as {suffix!r}: choose one of {sorted(_MIME)}")
        s = self.session
        r = s.result
        if r is None:
            raise RuntimeError("no result yet: pick a query (and wait for the session) before exporting")
        current = (s.query_id, s.measurement, s.method, tuple(s.band) if s.band else None, float(s.damping))
        shown = (r.query_id, r.measurement, r.method, tuple(r.band) if r.band else None, float(r.damping))
        if current != shown:
            why = s.error or "the result for the current settings is still being computed"
            raise RuntimeError(f"the result on screen is not for the current settings ({why}); nothing exported")
        if suffix == ".csv":
            data = r.to_csv().encode()
        elif suffix == ".json":
            data = r.to_json().encode()
        elif suffix == ".html":
            data = s.html_card().encode()
        else:
            data = s.png_card()
        return self.file_name(suffix), _MIME[suffix], data

    def save(self, suffix: str) -> Path:
        """Write the export into :attr:`folder` (which must be set) and return its path."""
        if self.folder is None:
            raise RuntimeError("this panel writes no files on the server (ExportPanel(session, folder=...) to allow)")
        name, _, data = self.payload(suffix)
        path = (self.folder / name).resolve()
        if path.parent != self.folder:  # cannot happen with the names above; a guard, not a feature
            raise ValueError(f"refusing to write outside {self.folder}: {path}")
        atomic_write_bytes(path, data)
        self.written.append(path)
        return path

    def export(self, suffix: str) -> dict | None:
        """Send the export to the browser as a download (and save a copy when a folder is set). Errors are shown
        in the panel, not raised; returns what was sent (``name``, ``mime``, ``size``) or ``None``."""
        t0 = time.perf_counter()
        try:
            name, mime, data = self.payload(suffix)
            path = self.save(suffix) if self.folder is not None else None
        except Exception as e:  # shown in the widget, not as a traceback in the log
            with self.hold_sync():
                self.error = True
                self.message = f"{type(e).__name__}: {e}"
            return None
        info = {"name": name, "mime": mime, "size": len(data)}
        self.send({"type": "file", **info}, buffers=[data])
        self.sent.append(info)
        ms = 1000 * (time.perf_counter() - t0)
        with self.hold_sync():
            self.error = False
            self.message = (f"{name} ({len(data):,} bytes) sent to your browser as a download ({ms:.0f} ms)"
                            + (f"; a copy is in {path}" if path is not None else ""))
        return info

    def _on_msg(self, widget, content, buffers) -> None:
        if isinstance(content, dict) and content.get("type") == "export":
            self.export(str(content.get("suffix", "")))
