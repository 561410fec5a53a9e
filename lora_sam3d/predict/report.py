"""`report.html`: one self-contained page per predict run that people look at instead of reading CSV.

On top, a summary table and, with ground truth, a per-class plot of Dice and HD95; below, one
viewer: the chosen sample's 3D surface (predicted, and the true one when known) in world
millimetres, its input slice with the mask outlined, and its metrics. Picking a sample (the list,
or a table row) redraws the same plot, so the page holds one WebGL context however many samples it
shows: browsers keep only about 16 alive and blank the oldest. Each sample is kept as a compact
entry (`ReportEntry`: vertices to 0.01 mm, faces, the slice as a small PNG), so a writer holds
little per sample. Built with plotly; its JavaScript is embedded once, so the page works offline.
Written atomically.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from lora_sam3d.geometry import Mesh
from lora_sam3d.io.atomic import atomic_write
from lora_sam3d.predict.records import SCAN_WORDS, Prediction

__all__ = [
    "SCRIPT",
    "SHOWN",
    "STYLE",
    "TILES_PER_ROW",
    "ReportEntry",
    "ReportSample",
    "entry",
    "slice_png",
    "unpacked",
    "write_report",
]

SHOWN = ("dice", "hd95_mm", "assd_mm", "nsd", "chamfer_mm")

TILES_PER_ROW = 3
"""Input slices a row in the viewer's picture of a several-slice sample."""


@dataclass
class ReportSample:
    """What the page shows of one sample (meshes as written: world mm, smoothed if the writer smooths).

    ``image``, ``mask``: the input slice (S, S), or every input view (K, S, S) of a several-view sample.
    ``scored_against``: ``truth`` (a split's label) or ``request mask`` (the 3D mask a request gave).
    """

    stem: str
    case_id: str
    class_name: str
    slice_name: str
    mesh: Mesh
    image: np.ndarray
    mask: np.ndarray
    truth: Mesh | None = None
    metrics: dict[str, float] | None = None
    scored_against: str = "truth"
    scan: str = "n/a"  # whether the scan was read: read, not read, or n/a (a model that reads none)
    drawn_dice: float | None = None  # the prediction against the drawing on the drawn planes


@dataclass
class ReportEntry:
    """A sample as the page stores it: plain JSON-ready values (see `entry`)."""

    stem: str
    case_id: str
    class_name: str
    slice_name: str
    metrics: dict[str, float] | None
    scored_against: str
    view: dict[str, Any] | None  # {"pred": mesh arrays, "truth": mesh arrays | None, "slice": PNG data URI}
    scan: str = "n/a"
    drawn_dice: float | None = None


def _mesh_arrays(mesh: Mesh | None) -> dict[str, np.ndarray] | None:
    """Flat vertices (float32) and faces (int32): what the page draws, held compactly (rounded to
    0.01 mm once, when the page is written)."""
    if mesh is None or mesh.is_empty:
        return None
    return {
        "v": mesh.vertices.astype(np.float32).ravel(),
        "f": mesh.faces.astype(np.int32).ravel(),
    }


def _packed(m: dict[str, np.ndarray] | None) -> dict[str, Any] | None:
    """A mesh as the page holds it: base64 of little-endian int32 vertices in 0.01 mm (``v``) and of
    uint16 or uint32 faces (``f``, ``fw`` bytes each): about a third of the JSON numbers' size."""
    if m is None:
        return None
    wide = m["f"].size and int(m["f"].max()) > 65535
    faces = m["f"].astype("<u4" if wide else "<u2")
    vertices = np.round(m["v"].astype(np.float64) * 100).astype("<i4")
    return {"v": base64.b64encode(vertices.tobytes()).decode("ascii"),
            "f": base64.b64encode(faces.tobytes()).decode("ascii"), "fw": faces.itemsize}  # fmt: skip


def unpacked(m: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(vertices (V, 3) mm, faces (F, 3)) of a mesh as `write_report` stores it in the page."""
    vertices = np.frombuffer(base64.b64decode(m["v"]), dtype="<i4").reshape(-1, 3) / 100.0
    faces = np.frombuffer(base64.b64decode(m["f"]), dtype="<u4" if m["fw"] == 4 else "<u2").reshape(-1, 3)
    return vertices, faces.astype(np.int64)


def _view_json(view: dict[str, Any]) -> dict[str, Any]:
    return {"pred": _packed(view["pred"]), "truth": _packed(view["truth"]), "slice": view["slice"]}


def slice_png(image: np.ndarray, mask: np.ndarray) -> str:
    """The input slice (grey) with its mask's outline in red, as a PNG data URI (rows = the slice's
    second axis, as the previews show it). A stack (K, S, S) of several views gives them in input
    order, left to right and row by row, at most `TILES_PER_ROW` a row, 2 pixels apart (so ten
    slices stay readable rather than shrinking to thumbnails)."""
    from PIL import Image
    from scipy.ndimage import binary_erosion

    images, masks = (image[None], mask[None]) if image.ndim == 2 else (image, mask)
    tiles = []
    for plane, plane_mask in zip(images, masks, strict=True):
        img = np.nan_to_num(np.asarray(plane, dtype=np.float64).T)
        lo, hi = float(img.min()), float(img.max())
        grey = ((img - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(img)).astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=-1)
        m = np.asarray(plane_mask, dtype=bool).T
        rgb[m & ~binary_erosion(m)] = (214, 39, 40)
        tiles.append(rgb)
    per_row = min(len(tiles), TILES_PER_ROW)
    h, w = tiles[0].shape[:2]
    n_rows = -(-len(tiles) // per_row)
    sheet = np.full((n_rows * (h + 2) - 2, per_row * (w + 2) - 2, 3), 255, dtype=np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, per_row)
        sheet[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = tile
    buf = io.BytesIO()
    Image.fromarray(sheet).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def entry(s: ReportSample, view: bool = True) -> ReportEntry:
    """The compact form of a sample; ``view=False`` keeps its table row only."""
    shown = {
        "pred": _mesh_arrays(s.mesh),
        "truth": _mesh_arrays(s.truth),
        "slice": slice_png(s.image, s.mask),
    }
    return ReportEntry(
        s.stem,
        s.case_id,
        s.class_name,
        s.slice_name,
        s.metrics,
        s.scored_against,
        shown if view else None,
        s.scan,
        s.drawn_dice,
    )


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return "failed" if math.isinf(value) else f"{value:.3f}"


def _breakable(text: str) -> str:
    """``text`` escaped, with line-break opportunities after its ``_`` and ``+`` (long sample and slice
    names wrap inside their cells instead of pushing the score columns off-screen)."""
    return html.escape(text).replace("_", "_<wbr>").replace("+", "+<wbr>")


def _table(entries: list[ReportEntry]) -> str:
    scored = any(e.metrics for e in entries)
    head = (
        "<tr><th>sample</th><th>case</th><th>class</th><th>slice</th><th>scan</th><th>drawn slices Dice</th>"
        + ("".join(f"<th>{m}</th>" for m in SHOWN) + "<th>scored against</th>" if scored else "")
        + "</tr>"
    )
    rows = []
    for e in entries:
        name = html.escape(e.stem)
        shown = _breakable(e.stem)
        first = f'<a href="#{name}">{shown}</a>' if e.view else shown
        cells = [
            first,
            *map(html.escape, (e.case_id, e.class_name)),
            _breakable(e.slice_name),
            html.escape(e.scan),
            _fmt(e.drawn_dice),
        ]
        if scored:
            cells += [_fmt((e.metrics or {}).get(m)) for m in SHOWN]
            cells.append(html.escape(e.scored_against) if e.metrics else "-")
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f'<div class="table"><table>{head}{"".join(rows)}</table></div>'


def _per_class(entries: list[ReportEntry]) -> str:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    groups = sorted({(e.class_name, e.scan) for e in entries if e.metrics})
    if not groups:
        return ""
    # runs with and without the scan are two results: a box each, named by the scan column
    split = len({scan for _, scan in groups}) > 1
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Dice per sample", "HD95 (mm) per sample"))
    for c, scan in groups:
        values = [e.metrics for e in entries if (e.class_name, e.scan) == (c, scan) and e.metrics]
        dice = [v["dice"] for v in values if math.isfinite(v.get("dice", math.nan))]
        hd95 = [v["hd95_mm"] for v in values if math.isfinite(v.get("hd95_mm", math.nan))]
        name = f"{c}, scan {scan}" if split else c
        fig.add_trace(go.Box(y=dice, name=name, boxpoints="all", showlegend=False), row=1, col=1)
        fig.add_trace(go.Box(y=hd95, name=name, boxpoints="all", showlegend=False), row=1, col=2)
    fig.update_yaxes(range=[0, 1.02], title_text="Dice", row=1, col=1)  # Dice lies in 0..1
    fig.update_yaxes(rangemode="tozero", title_text="mm", row=1, col=2)
    fig.update_layout(height=380, margin={"l": 50, "r": 10, "t": 40, "b": 80})
    return '<div id="per-class">' + fig.to_html(full_html=False, include_plotlyjs=False) + "</div>"


def _asset(name: str) -> str:
    """The page's own style sheet or script, shipped beside this module as package data."""
    return resources.files("lora_sam3d.predict").joinpath(name).read_text(encoding="utf-8")


STYLE = _asset("report.css")
SCRIPT = _asset("report.js")


def _metrics_text(e: ReportEntry) -> str:
    drawn = f"on the drawn slices Dice {_fmt(e.drawn_dice)} · " if e.drawn_dice is not None else ""
    if not e.metrics:
        return drawn + "no ground truth: not scored in 3D"
    return (
        drawn
        + " · ".join(f"{m} {_fmt(e.metrics.get(m))}" for m in SHOWN)
        + f" (against the {e.scored_against})"
    )


def write_report(path: str | Path, samples: list[ReportSample | ReportEntry], title: str) -> Path:
    """Write the page for ``samples`` (full samples, or entries already made compact by `entry`)."""
    from plotly.offline import get_plotlyjs

    entries = [s if isinstance(s, ReportEntry) else entry(s) for s in samples]
    viewed = [e for e in entries if e.view]
    payload = [
        {
            "stem": e.stem,
            "slice_name": e.slice_name,
            "metrics_text": _metrics_text(e),
            "view": _view_json(e.view),
        }
        for e in viewed
        if e.view
    ]
    data = json.dumps(payload, allow_nan=False).replace("</", "<\\/")  # no early end of the script element
    options = "".join(f'<option value="{html.escape(e.stem)}">{html.escape(e.stem)}</option>' for e in viewed)
    hidden = len(entries) - len(viewed)
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">{len(entries)} sample{"s" if len(entries) != 1 else ""}; meshes in world RAS '
        "millimetres; metrics on the scan's own grid, computed before any smoothing of the written "
        "meshes.</p>",
        _per_class(entries),
        '<div id="viewer"><p>sample <select id="pick">' + options + "</select> "
        '<span class="note">(or pick one in the table below)</span></p>'
        '<p class="note" id="metrics"></p><div class="row"><div id="surface"></div>'
        '<div><p class="note" id="slice-title"></p><img id="slice" alt="input slice"></div></div></div>',
        f'<p class="note">{hidden} more samples are in the table only.</p>' if hidden else "",
        _table(entries),
    ]
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style><script type='text/javascript'>{get_plotlyjs()}</script></head>"
        f"<body>{''.join(parts)}<script type='application/json' id='report-data'>{data}</script>"
        f"<script>{SCRIPT}</script></body></html>"
    )
    return atomic_write(Path(path), lambda tmp: tmp.write_text(page, encoding="utf-8"))


def report_sample(record: Prediction, mesh: Mesh) -> ReportSample:
    """What the report shows of a sample: its input slices, the written mesh, truth and scores."""
    return ReportSample(
        record.stem,
        record.case_id,
        record.class_name,
        record.slice_name or f"axis{record.axis} slice{record.index}",
        mesh,
        record.image if record.views_image is None else record.views_image,
        record.mask if record.views_mask is None else record.views_mask,
        record.gt_mesh,
        record.metrics,
        record.scored_against,
        SCAN_WORDS[record.scan_read],
        record.drawn_dice,
    )
