"""docs/viewer.png: the napari widget after two drawings, in 3D, the surfaces over an axial plane of
the scan. Paints two slices of each structure from a phantom's truth, presses Reconstruct, waits for
the worker, takes the window's screenshot. Run under a display (xvfb-run -a ...).

    xvfb-run -a -s "-screen 0 1500x900x24" .venv/bin/python scripts/viewer_screenshot.py \
        --case data/heart/s0017 --model outputs/demo/checkpoints/adapter-best
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from qtpy.QtWidgets import QApplication

from lora_sam3d.viewer.app import open_viewer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", default="data/heart/s0017")
    parser.add_argument("--model", default="outputs/demo/checkpoints/adapter-best")
    parser.add_argument("--classes", nargs="+", default=["heart_ventricle_left", "heart_myocardium"])
    parser.add_argument("--out", default="docs/viewer.png")
    args = parser.parse_args()
    case = Path(args.case)
    viewer, widget = open_viewer(case / "ct.nii.gz", args.model)
    viewer.window.resize(1500, 900)
    app = QApplication.instance()

    def settle() -> None:
        while widget.busy:
            app.processEvents()
            time.sleep(0.02)
        for _ in range(10):
            app.processEvents()

    settle()
    drawing = viewer.layers["drawing"]
    for value, name in enumerate(args.classes, start=1):
        truth = np.asarray(nib.load(case / "segmentations" / f"{name}.nii.gz").dataobj) > 0
        z = int(np.flatnonzero(truth.any(axis=(0, 1))).mean())
        x = int(np.flatnonzero(truth.any(axis=(1, 2))).mean())
        paint = np.zeros(truth.shape, dtype=bool)
        paint[:, :, z], paint[x] = truth[:, :, z], truth[x]
        data = np.asarray(drawing.data)
        data[paint] = value
        drawing.data = data
        widget.label_value.value, widget.class_name.value = value, name
        widget.reconstruct()
        settle()
        surface = viewer.layers[f"{name} {value} surface"]
        surface.colormap, surface.opacity = ["red", "yellow"][value % 2], [0.6, 0.9][value % 2]
        print(widget.status.value)
    image = viewer.layers[0]
    viewer.dims.ndisplay = 3
    image.depiction = "plane"
    image.plane.position = tuple(np.array(image.data.shape) / 2)
    image.plane.normal = (0, 0, 1)
    for layer in viewer.layers:
        if layer.name == "drawing" or layer.name.endswith("mask"):
            layer.visible = False
    viewer.scene.camera.angles = (-20, 35, 120) if hasattr(viewer, "scene") else None
    viewer.scene.camera.zoom *= 1.1
    settle()
    Image.fromarray(viewer.screenshot(canvas_only=False, flash=False)).save(args.out)
    print("wrote", args.out)
    widget.close_session()
    viewer.close()


if __name__ == "__main__":
    main()
