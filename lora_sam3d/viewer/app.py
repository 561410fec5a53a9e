"""``lora-sam3d view SCAN [--model PATH]``: napari with the scan in world mm, an empty labels layer
of its shape to paint into, and the reconstruct widget docked.

The 2D view shows axial slices as radiologists read them: the slider runs inferior to superior,
anterior is up and the patient's right is on the viewer's left (napari's world axes are RAS here).
"""

from __future__ import annotations

from pathlib import Path

import napari
import numpy as np

from lora_sam3d.viewer.reader import layer_data
from lora_sam3d.viewer.widget import DEFAULT_MODEL, ReconstructWidget

__all__ = ["open_viewer"]


def open_viewer(
    scan: str | Path, model: str = DEFAULT_MODEL, show: bool = True
) -> tuple[napari.Viewer, ReconstructWidget]:
    """A viewer holding ``scan``, a ``drawing`` labels layer on its grid and the widget (not run)."""
    viewer = napari.Viewer(title=f"lora-sam3d: {Path(scan).name}", show=show)
    ((values, meta, kind),) = layer_data(str(scan))
    add = viewer.add_labels if kind == "labels" else viewer.add_image
    layer = add(values, **meta)
    viewer.add_labels(np.zeros(values.shape, dtype=np.uint8), name="drawing", affine=meta["affine"])
    viewer.dims.order = (2, 1, 0)  # world axes are RAS: slide along S, show A (rows) by R (columns)
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari >= 0.9: scene
    camera.orientation2d = ("up", "left")
    viewer.dims.set_point(2, float(np.mean(layer.extent.world[:, 2])))
    widget = ReconstructWidget(viewer, model)
    viewer.window.add_dock_widget(widget, name="lora-sam3d", area="right")
    return viewer, widget


def main(scan: str, model: str = DEFAULT_MODEL) -> int:
    _viewer, widget = open_viewer(scan, model)
    napari.run()
    widget.close_session()
    return 0
