"""The per-sample table of a `predict` run: one row per sample (`metrics_row`), written as
``metrics.csv`` and ``metrics.json`` with the means over the scored rows."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import torch

from lora_sam3d.io.atomic import atomic_write
from lora_sam3d.predict.records import SCAN_WORDS, Prediction

__all__ = ["means", "metrics_row", "write_tables"]


def metrics_row(record: Prediction) -> dict[str, Any]:
    """A sample's row of ``metrics.csv``: which slice of which case, what it was scored against, the scores."""
    return {
        "case_id": record.case_id,
        "class_name": record.class_name,
        "axis": record.axis,
        "grid_index": record.index,
        "file_index": "" if record.file_index is None else record.file_index,
        "slice": record.slice_name or f"axis{record.axis}_slice{record.index}",
        "scan": SCAN_WORDS[record.scan_read],
        "modality": record.modality or "",
        "frame": record.frame or "",
        "mesh": "beyond scan" if record.mesh_beyond_scan else "cut at scan",
        "scored_against": record.scored_against if record.metrics is not None else "",
        "drawn_dice": record.drawn_dice,
        "pieces_removed": record.pieces_removed,
        "beyond_scan_mm": round(record.beyond_scan_mm, 1),
        **(record.metrics or {}),
    }


TEXT_COLUMNS = ("case_id", "class_name", "axis", "grid_index", "file_index", "slice", "scan", "modality", "frame",
                "mesh", "scored_against")  # fmt: skip
"""The columns that name a row; the others are averaged (`means`)."""


def means(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in TEXT_COLUMNS]
    out = {}
    for k in keys:
        given = [r[k] for r in rows if r.get(k) not in (None, "")]  # rows without truth lack its scores
        values = torch.tensor([float(v) for v in given], dtype=torch.float64)
        finite = values[torch.isfinite(values)]
        out[k] = float(finite.mean()) if len(finite) else math.nan
    return out


def write_tables(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """``metrics.csv`` (a row per sample, the union of the rows' columns) and ``metrics.json`` (the
    rows and their means) in ``out``, each written whole or not at all."""
    buf = io.StringIO()
    columns = list(dict.fromkeys(k for row in rows for k in row))  # scored rows have more
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    text = buf.getvalue()
    js = json.dumps({"samples": rows, "mean": means(rows)}, indent=2, allow_nan=True)
    return [
        atomic_write(out / "metrics.csv", lambda tmp: tmp.write_text(text)),
        atomic_write(out / "metrics.json", lambda tmp: tmp.write_text(js)),
    ]
