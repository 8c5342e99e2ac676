"""Neighbour galleries: a self-contained HTML page and a PNG grid.

Each row is one query image followed by its nearest gallery images under one or more feature
sets (e.g. the NCA embedding, a softmax baseline, raw pixels), each neighbour framed green
when its label matches the query's and red when it does not, captioned with its similarity
and label. The HTML embeds every image as a base64 PNG data URI (one file to mail or
archive) and escapes every file name and label, so a label like ``<script>`` is shown, not
run.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .files import atomic_write, atomic_write_text

MATCH_COLOR = "#2e7d32"
MISMATCH_COLOR = "#c62828"
QUERY_COLOR = "#1565c0"


@dataclass
class Tile:
    """One image of the grid. ``match`` is None for the query itself."""

    image: Image.Image
    label: str
    id: str = ""
    similarity: float | None = None
    match: bool | None = None


@dataclass
class NeighborRow:
    """A query and, per feature set (in display order), its neighbours, most similar first."""

    query: Tile
    panels: list[tuple[str, list[Tile]]] = field(default_factory=list)


def _thumb(img: Image.Image, size: int) -> Image.Image:
    img = img.convert("RGB") if img.mode not in ("RGB", "L") else img
    if max(img.size) > size:
        img = img.copy()
        img.thumbnail((size, size), Image.Resampling.BILINEAR)
    return img


def png_data_uri(img: Image.Image, max_size: int = 128) -> str:
    """A ``data:image/png;base64,...`` URI of the image (downscaled to ``max_size`` px)."""
    buf = io.BytesIO()
    _thumb(img, max_size).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def precision(rows: Sequence[NeighborRow]) -> dict[str, float]:
    """Per feature set: the fraction of shown neighbours whose label matches their query's."""
    hits: dict[str, list[int]] = {}
    for row in rows:
        for name, tiles in row.panels:
            acc = hits.setdefault(name, [0, 0])
            acc[0] += sum(1 for t in tiles if t.match)
            acc[1] += len(tiles)
    return {name: (h / n if n else 0.0) for name, (h, n) in hits.items()}


# ----------------------------------------------------------------------------- HTML
_CSS = """
body { font-family: DejaVu Sans, Arial, sans-serif; margin: 16px; background: #fafafa; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px 0; }
p.meta { margin: 2px 0 12px 0; color: #555; font-size: 13px; }
table.summary { border-collapse: collapse; margin-bottom: 14px; font-size: 13px; }
table.summary td, table.summary th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
section.query { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; margin-bottom: 12px; }
section.query h2 { font-size: 14px; margin: 0 0 6px 0; font-weight: normal; }
div.panel { display: flex; align-items: flex-start; gap: 3px; margin: 4px 0; flex-wrap: nowrap; overflow-x: auto; }
div.method { width: 96px; min-width: 96px; font-size: 12px; font-weight: bold; padding-top: 20px; }
figure { margin: 0; display: flex; flex-direction: column; align-items: center; }
figure img { width: 46px; height: 46px; object-fit: contain; image-rendering: pixelated;
             border: 3px solid #999; background: #000; }
QUERY_RULES
figcaption { font-size: 9px; width: 54px; text-align: center; overflow: hidden; white-space: nowrap;
             text-overflow: ellipsis; }
""".replace(
    "QUERY_RULES",
    f"figure.query img {{ border-color: {QUERY_COLOR}; }}\n"
    f"figure.match img {{ border-color: {MATCH_COLOR}; }}\n"
    f"figure.mismatch img {{ border-color: {MISMATCH_COLOR}; }}",
)


def _figure(tile: Tile, kind: str) -> str:
    esc = html.escape
    sim = "" if tile.similarity is None else f"{tile.similarity:.3f} "
    title = f"{tile.id} | label: {tile.label}" + (f" | similarity {tile.similarity:.4f}" if tile.similarity is not None else "")
    return (
        f'<figure class="{kind}" title="{esc(title)}">'
        f'<img src="{png_data_uri(tile.image)}" alt="{esc(tile.label)}">'
        f"<figcaption>{esc(sim)}{esc(tile.label)}</figcaption></figure>"
    )


def render_html(rows: Sequence[NeighborRow], title: str = "Nearest neighbours", meta: str = "") -> str:
    """The page as a string: a summary table (neighbour label precision per feature set),
    then per query its neighbours under each feature set. Fully self-contained."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        # Nothing may be fetched: images are inline and scripts are not needed at all.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">",
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    if meta:
        parts.append(f'<p class="meta">{esc(meta)}</p>')
    prec = precision(rows)
    if prec:
        parts.append('<table class="summary"><tr><th>features</th><th>neighbours with the query\'s label</th></tr>')
        for name, value in prec.items():
            parts.append(f"<tr><td>{esc(name)}</td><td>{100 * value:.1f} %</td></tr>")
        parts.append("</table>")
    for n, row in enumerate(rows):
        q = row.query
        parts.append(
            f'<section class="query"><h2>query {n + 1}: <b>{esc(q.label)}</b> '
            f"<span style=\"color:#777\">{esc(q.id)}</span></h2>"
        )
        for name, tiles in row.panels:
            parts.append(f'<div class="panel"><div class="method">{esc(name)}</div>{_figure(q, "query")}')
            parts.extend(_figure(t, "match" if t.match else "mismatch") for t in tiles)
            parts.append("</div>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(rows: Sequence[NeighborRow], path: str | os.PathLike, **kwargs: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, render_html(rows, **kwargs))
    return path


# ----------------------------------------------------------------------------- PNG grid
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def render_grid(rows: Sequence[NeighborRow], tile: int = 56, label_width: int = 110) -> Image.Image:
    """The same content as the HTML page as one RGB image (one line per query and feature set)."""
    border, caption, gap = 3, 24, 4
    cell_w, cell_h = tile + 2 * border + gap, tile + 2 * border + caption
    n_cols = 1 + max((len(t) for r in rows for _, t in r.panels), default=0)
    n_lines = sum(max(1, len(r.panels)) for r in rows)
    width = label_width + n_cols * cell_w + gap
    height = n_lines * cell_h + len(rows) * gap + gap
    canvas = Image.new("RGB", (max(width, 1), max(height, 1)), "white")
    draw = ImageDraw.Draw(canvas)
    small, bold = _font(10), _font(12)

    def paste(t: Tile, x: int, y: int, color: str) -> None:
        draw.rectangle([x, y, x + tile + 2 * border - 1, y + tile + 2 * border - 1], fill=color)
        img = t.image.convert("RGB").resize((tile, tile), Image.Resampling.NEAREST if max(t.image.size) < tile else Image.Resampling.BILINEAR)
        canvas.paste(img, (x + border, y + border))
        line1 = f"{t.similarity:.3f}" if t.similarity is not None else "query"
        draw.text((x, y + tile + 2 * border), line1, fill="black", font=small)
        draw.text((x, y + tile + 2 * border + 11), t.label[:10], fill="black", font=small)

    y = gap
    for row in rows:
        for name, tiles in row.panels or [("", [])]:
            draw.text((gap, y + tile // 2), name[:16], fill="black", font=bold)
            x = label_width
            paste(row.query, x, y, QUERY_COLOR)
            for t in tiles:
                x += cell_w
                paste(t, x, y, MATCH_COLOR if t.match else MISMATCH_COLOR)
            y += cell_h
        y += gap
    return canvas


def write_grid(rows: Sequence[NeighborRow], path: str | os.PathLike, **kwargs: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = render_grid(rows, **kwargs)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", optimize=True))
    return path
