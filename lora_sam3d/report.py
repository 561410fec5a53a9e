"""`report.html`: one self-contained page per predict run that people look at instead of reading CSV.

Per sample: an interactive 3D view of the predicted surface (and the true one when known) in world
millimetres, the input slice with its mask, and the sample's metrics; on top, a summary table and,
with ground truth, a per-class plot of Dice and HD95. Built with plotly; its JavaScript is
embedded once, so the page works offline (no network at view time). Written atomically.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_sam3d.atomic import atomic_write
from lora_sam3d.models.mesh import Mesh

SHOWN = ("dice", "hd95_mm", "assd_mm", "nsd", "chamfer_mm")


@dataclass
class ReportSample:
    """What the page shows of one sample (meshes as written: world mm, smoothed if the writer smooths)."""

    stem: str
    case_id: str
    class_name: str
    slice_name: str
    mesh: Mesh
    image: np.ndarray
    mask: np.ndarray
    truth: Mesh | None = None
    metrics: dict[str, float] | None = None


def _mesh_trace(mesh: Mesh, name: str, color: str, opacity: float):  # -> go.Mesh3d
    import plotly.graph_objects as go

    v, f = mesh.vertices, mesh.faces
    return go.Mesh3d(x=v[:, 0], y=v[:, 1], z=v[:, 2], i=f[:, 0], j=f[:, 1], k=f[:, 2], name=name,
                     color=color, opacity=opacity, showlegend=True, flatshading=False)  # fmt: skip


def _sample_figures(s: ReportSample) -> tuple[str, str]:
    import plotly.graph_objects as go

    surface = go.Figure()
    if not s.mesh.is_empty:
        surface.add_trace(_mesh_trace(s.mesh, "prediction", "#d62728", 1.0 if s.truth is None else 0.75))
    if s.truth is not None and not s.truth.is_empty:
        surface.add_trace(_mesh_trace(s.truth, "truth", "#2ca02c", 0.35))
    surface.update_layout(
        scene={"aspectmode": "data", "xaxis_title": "R (mm)", "yaxis_title": "A (mm)", "zaxis_title": "S (mm)"},
        margin={"l": 0, "r": 0, "t": 30, "b": 0},
        title="surface, world RAS mm" + (" (red: predicted, green: true)" if s.truth is not None else ""),
    )  # fmt: skip
    image = np.asarray(s.image, dtype=float)
    plane = go.Figure(go.Heatmap(z=image.T, colorscale="gray", showscale=False))
    plane.add_trace(go.Contour(z=np.asarray(s.mask, dtype=float).T, contours={"start": 0.5, "end": 0.5,
                    "coloring": "lines"}, colorscale=[[0, "#d62728"], [1, "#d62728"]], line={"width": 2},
                    showscale=False))  # fmt: skip
    plane.update_layout(
        title=f"input slice {s.slice_name} and its mask", margin={"l": 0, "r": 0, "t": 30, "b": 0},
        yaxis={"scaleanchor": "x", "autorange": "reversed"},
    )  # fmt: skip
    size = {"full_html": False, "include_plotlyjs": False, "default_width": "100%", "default_height": "420px",
            "config": {"responsive": True}}  # fmt: skip
    return surface.to_html(**size), plane.to_html(**size)


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return "failed" if math.isinf(value) else f"{value:.3f}"


def _table(samples: list[ReportSample]) -> str:
    scored = any(s.metrics for s in samples)
    head = (
        "<tr><th>sample</th><th>case</th><th>class</th><th>slice</th>"
        + ("".join(f"<th>{m}</th>" for m in SHOWN) if scored else "")
        + "</tr>"
    )
    rows = []
    for s in samples:
        cells = [
            f'<a href="#{html.escape(s.stem)}">{html.escape(s.stem)}</a>',
            s.case_id,
            s.class_name,
            s.slice_name,
        ]
        cells = [cells[0], *map(html.escape, cells[1:])]
        if scored:
            cells += [_fmt((s.metrics or {}).get(m)) for m in SHOWN]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _per_class(samples: list[ReportSample]) -> str:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    classes = sorted({s.class_name for s in samples if s.metrics})
    if not classes:
        return ""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Dice per sample", "HD95 (mm) per sample"))
    for c in classes:
        values = [s.metrics for s in samples if s.class_name == c and s.metrics]
        dice = [v["dice"] for v in values if math.isfinite(v.get("dice", math.nan))]
        hd95 = [v["hd95_mm"] for v in values if math.isfinite(v.get("hd95_mm", math.nan))]
        fig.add_trace(go.Box(y=dice, name=c, boxpoints="all", showlegend=False), row=1, col=1)
        fig.add_trace(go.Box(y=hd95, name=c, boxpoints="all", showlegend=False), row=1, col=2)
    fig.update_layout(height=380, margin={"l": 40, "r": 10, "t": 40, "b": 80})
    return fig.to_html(full_html=False, include_plotlyjs=False)


STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:nth-child(-n+4),th:nth-child(-n+4){text-align:left}
.sample{border-top:2px solid #888;margin-top:28px;padding-top:8px}
.row{display:grid;grid-template-columns:1fr 1fr;gap:16px}.row>div{min-width:0;overflow:hidden}
.note{color:#666;font-size:13px}
"""


def write_report(path: str | Path, samples: list[ReportSample], title: str, max_views: int = 40) -> Path:
    """Write the page; samples beyond ``max_views`` are listed in the table only (keeps the file small)."""
    from plotly.offline import get_plotlyjs

    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="note">{len(samples)} sample{"s" if len(samples) != 1 else ""}; meshes in world RAS '
             "millimetres; metrics on the scan's own grid, computed before any smoothing of the written "
             "meshes.</p>",
             _per_class(samples), _table(samples)]  # fmt: skip
    for s in samples[:max_views]:
        surface, plane = _sample_figures(s)
        metrics = (
            " &middot; ".join(f"{m} {_fmt(s.metrics.get(m))}" for m in SHOWN)
            if s.metrics
            else "no ground truth"
        )
        parts.append(
            f'<div class="sample" id="{html.escape(s.stem)}"><h3>{html.escape(s.stem)}</h3>'
            f'<p class="note">{metrics}</p><div class="row"><div>{surface}</div><div>{plane}</div></div></div>'
        )
    if len(samples) > max_views:
        parts.append(f'<p class="note">{len(samples) - max_views} more samples are in the table only.</p>')
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style><script type='text/javascript'>{get_plotlyjs()}</script></head>"
        f"<body>{''.join(parts)}</body></html>"
    )
    return atomic_write(Path(path), lambda tmp: tmp.write_text(page, encoding="utf-8"))
