"""Report cards of one session result: a self-contained HTML page and a PNG drawn with Pillow (no browser).

Both take the result, its query, the query's thumbnail and a ``thumbnails(ids) -> [png bytes]`` callable (the
session's cached thumbnails), so they need no session and no backend.
"""
from __future__ import annotations

import base64
import html
import io
from typing import Callable, Sequence

from PIL import Image, ImageDraw

from .backend import SIGN_CONVENTION, QueryItem
from .results import Influence, InfluenceResult

__all__ = ["html_card", "png_card"]

Thumbnails = Callable[[Sequence[int]], list]


def html_card(r: InfluenceResult, q: QueryItem, query_png: bytes, thumbnails: Thumbnails) -> str:
    """The HTML card: query, settings, sign convention, proponents and opponents with their scores."""
    def img(png: bytes, alt: str) -> str:
        return (f'<img alt="{html.escape(alt)}" width="64" height="64" style="image-rendering:pixelated" '
                f'src="data:image/png;base64,{base64.b64encode(png).decode()}">')

    def row(title: str, items: list[Influence]) -> str:
        thumbs = thumbnails([i.id for i in items])
        cells = "".join(f'<figure style="margin:4px;text-align:center">{img(t, f"{title} {i.rank}: train {i.id}")}'
                        f'<figcaption style="font:11px monospace">#{i.id}<br>{i.score:+.3e}</figcaption></figure>'
                        for i, t in zip(items, thumbs))
        return f'<h3>{html.escape(title)}</h3><div style="display:flex;flex-wrap:wrap">{cells}</div>'

    s = r.settings
    head = (f"query {q.id} ({html.escape(q.kind)}{', ' + html.escape(q.label) if q.label else ''}) · "
            f"measurement {html.escape(s['measurement'])} · method {html.escape(s['method'])} · "
            f"damping {s['damping']:.3g} · band {s['band'] or 'all timesteps'}")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Influence card</title></head>"
            "<body style='font-family:sans-serif;max-width:900px'>"
            f"<h2>Which training images made the model generate this?</h2>"
            f"<div style='display:flex;gap:12px;align-items:center'>"
            f"{img(query_png, f'query {q.id}')}<p>{head}</p></div>"
            f"<p><em>{html.escape(SIGN_CONVENTION)}</em></p>"
            f"{row('Proponents', r.proponents)}{row('Opponents', r.opponents)}</body></html>")


def png_card(r: InfluenceResult, q: QueryItem, query_png: bytes, thumbnails: Thumbnails, *,
             columns: int | None = None, thumb_size: int = 64) -> bytes:
    """The PNG card (``thumb_size``: the edge of the thumbnails ``thumbnails`` returns)."""
    t = thumb_size
    cols = columns or max(len(r.proponents), len(r.opponents), 1)
    cell_w, cell_h = t + 16, t + 30
    width = max(16 + cols * cell_w, 520)
    height = 100 + 2 * (cell_h + 22) + 10
    card = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(card)
    card.paste(Image.open(io.BytesIO(query_png)).convert("RGB"), (8, 8))
    s = r.settings
    d.text((t + 20, 10), f"query {q.id} ({q.kind})  measurement {s['measurement']}  method {s['method']}",
           fill="black")
    d.text((t + 20, 26), f"damping {s['damping']:.3g}  band {s['band'] or 'all'}  k {s['k']}", fill="black")
    d.text((t + 20, 42), "positive score: removing it is predicted to increase the query's", fill="#444")
    d.text((t + 20, 56), "measurement (a proponent); negative: an opponent", fill="#444")
    y = 90
    for title, items, colour in (("proponents", r.proponents, "#b2182b"), ("opponents", r.opponents, "#2166ac")):
        d.text((8, y), title, fill=colour)
        y += 16
        for n, (inf, png) in enumerate(zip(items[:cols], thumbnails([i.id for i in items[:cols]]))):
            x = 8 + n * cell_w
            card.paste(Image.open(io.BytesIO(png)).convert("RGB"), (x, y))
            d.text((x, y + t + 2), f"#{inf.id}", fill="black")
            d.text((x, y + t + 14), f"{inf.score:+.2e}", fill=colour)
        y += cell_h + 6
    buf = io.BytesIO()
    card.save(buf, format="PNG")
    return buf.getvalue()
