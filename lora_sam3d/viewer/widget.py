"""The dock widget: choose the scan, the labels layer painted into and its value, the model and the
class; Reconstruct runs `lora_sam3d.Session.reconstruct` in a worker thread and shows the mask (a
Labels layer on the scan's grid) and the surface (a Surface layer in world mm) over the scan.

One session is kept while the scan layer and the model stay the same, so only the first drawing
pays for reading the scan. Save writes the mesh (PLY/STL/OBJ, ``SPACE=RAS``) and the mask (NIfTI on
the scan's grid) with the writers ``predict`` uses.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import napari
import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
    create_widget,
)
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error
from napari.utils.transforms import Affine

from lora_sam3d.predict.api import Reconstructed, load_model
from lora_sam3d.predict.files import write_nifti
from lora_sam3d.predict.session import Session
from lora_sam3d.viewer.reader import PATH_KEY

__all__ = ["ANY", "DEFAULT_MODEL", "ReconstructWidget", "world_affine"]

ANY = "any structure"
"""The class choice that frames the structure by its drawing (``class_name=None``)."""
DEFAULT_MODEL = "builtin:relative_shapes"
"""The shipped base: generic shapes, every class framed by its drawing."""


def world_affine(layer: Any) -> np.ndarray:
    """A layer's voxel-to-world matrix (4x4): its affine after its scale, rotation, shear and translation."""
    inner = Affine(scale=layer.scale, translate=layer.translate, rotate=layer.rotate, shear=layer.shear)
    return np.asarray(layer.affine.affine_matrix) @ inner.affine_matrix


class ReconstructWidget(Container):
    """Paint a few slices of a structure into a labels layer, press Reconstruct, get it in 3D."""

    def __init__(self, napari_viewer: napari.Viewer, model: str = DEFAULT_MODEL) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self._network: Any = None
        self._network_of: str | None = None
        self._session: Session | None = None
        self._session_of: tuple[int, int, str] | None = None
        self.result: Reconstructed | None = None
        self.worker: Any = None
        self.busy = False  # from a worker's start until its end (its own flag is set only once it runs)
        self.scan = create_widget(annotation=napari.layers.Image, label="scan")
        self.drawing = create_widget(annotation=napari.layers.Labels, label="drawing")
        self.label_value = SpinBox(label="label value", value=1, min=1, max=2**31 - 1)
        self.model = LineEdit(label="model", value=model)
        self.model.tooltip = "builtin:relative_shapes, an adapter folder or a .ckpt checkpoint"
        self.class_name = ComboBox(label="class", choices=self._class_choices)
        self.run_button = PushButton(text="Reconstruct")
        self.progress = ProgressBar(min=0, max=0, visible=False)  # max 0: busy, no percentage
        self.status = Label(value="paint a few slices of one structure, then Reconstruct")
        self.status.native.setWordWrap(True)
        self.mesh_format = ComboBox(label="mesh format", choices=["ply", "stl", "obj"])
        self.save_button = PushButton(text="Save mesh and mask...", enabled=False)
        self.extend([
            self.scan, self.drawing, self.label_value, self.model, self.class_name, self.run_button,
            self.progress, self.status, self.mesh_format, self.save_button,
        ])  # fmt: skip
        self.run_button.changed.connect(self.reconstruct)
        self.save_button.changed.connect(self._ask_and_save)
        self.model.native.editingFinished.connect(self._load_model)
        self._load_model()

    # -- the model ---------------------------------------------------------------------------------
    def _class_choices(self, _widget: Any = None) -> list[str]:
        classes = self._network.data_contract["classes"] if self._network is not None else []
        return [ANY, *classes]

    def _load_model(self) -> None:
        """Load the model named (in a worker) and offer its classes."""
        if self.model.value == self._network_of or self.busy:
            return
        self._start(self._loading(), "loading the model", self._loaded)

    def _loaded(self, _: Any = None) -> None:
        self.class_name.reset_choices()
        self._say(f"{self._network_of} loaded: paint a few slices of one structure, then Reconstruct")

    def _loading(self) -> Generator[str, None, None]:
        text = self.model.value.strip()
        if text != self._network_of:
            yield f"loading {text}"
            self._network, self._network_of = load_model(text), text
            self.close_session()

    # -- reconstructing ----------------------------------------------------------------------------
    def reconstruct(self) -> Any:
        """Reconstruct the drawing of the chosen label value; returns the worker (None when refused)."""
        scan, drawing = self.scan.value, self.drawing.value
        if scan is None or drawing is None:
            return self._refuse("choose a scan (an Image layer) and the Labels layer you painted into")
        if drawing.data.shape != scan.data.shape:
            return self._refuse(
                f"the labels layer {drawing.name!r} is {drawing.data.shape}, the scan {scan.name!r} "
                f"{scan.data.shape}: paint into a labels layer of the scan's shape"
            )
        painted = np.asarray(drawing.data).copy()
        given = str(scan.metadata.get(PATH_KEY, ""))
        source: Any = given if given and Path(given).exists() else (np.asarray(scan.data), world_affine(scan))
        chosen = None if self.class_name.value == ANY else self.class_name.value
        work = self._reconstructing(scan, source, painted, chosen, int(self.label_value.value))
        return self._start(work, "reconstructing", self._show)

    def _reconstructing(
        self, scan: Any, source: Any, painted: np.ndarray, class_name: str | None, value: int
    ) -> Generator[str, None, tuple[Reconstructed, np.ndarray, float, str]]:
        start = time.perf_counter()
        yield from self._loading()
        key = (id(scan), id(scan.data), self._network_of or "")  # a layer given new voxels is a new scan
        if self._session is None or self._session_of != key:
            yield f"reading {scan.name}"
            self.close_session()
            self._session, self._session_of = Session(self._network, source), key
        yield "reconstructing"
        result = self._session.reconstruct(painted, class_name, label_value=value)
        # layer names from the request as asked, whatever the fields say by the time it answers
        return result, world_affine(scan), time.perf_counter() - start, f"{class_name or 'structure'} {value}"

    def _show(self, answer: tuple[Reconstructed, np.ndarray, float, str]) -> None:
        """The mask as a Labels layer on the scan's grid, the surface in world mm; both replaced on a new answer."""
        result, affine, seconds, what = answer
        self.result = result
        mask = np.asarray(result.mask.dataobj)
        surface = (result.mesh.vertices.astype(np.float32), result.mesh.faces.astype(np.int64))
        for name, data, add in (
            (f"{what} mask", mask, lambda d, n: self.viewer.add_labels(d, name=n, affine=affine, opacity=0.45)),
            (f"{what} surface", surface, lambda d, n: self.viewer.add_surface(d, name=n, colormap="red", opacity=0.8)),
        ):  # fmt: skip
            if name in self.viewer.layers:
                self.viewer.layers[name].data = data
                if name.endswith("mask"):
                    self.viewer.layers[name].affine = affine  # the scan layer may be another one now
            else:
                add(data, name)
        where = ", ".join(f"{s['axis']} {s['index']}" for s in result.slices)
        after = result.next_slice
        self.status.value = (
            f"{result.name}: from {where}; frame from {result.frame['from']} "
            f"({result.frame.get('extent_mm', 0):.0f} mm); {seconds:.1f} s"
            + (f"; to improve it, draw {after['axis']} slice {after['index']} next" if after else "")
        )
        self.save_button.enabled = True

    # -- saving ------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> list[Path]:
        """Write the last result: ``<name>.<format>`` (RAS) and ``<name>_mask.nii.gz`` into ``folder``."""
        if self.result is None:
            raise ValueError("nothing to save yet: reconstruct first")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        mesh = self.result.mesh.save(folder / f"{self.result.name}.{self.mesh_format.value}", "RAS")
        return [mesh, write_nifti(self.result.mask, folder / f"{self.result.name}_mask.nii.gz")]

    def _ask_and_save(self) -> None:
        from qtpy.QtWidgets import QFileDialog

        folder = QFileDialog.getExistingDirectory(self.native, "Save the mesh and the mask into")
        if folder:
            try:
                written = self.save(folder)
            except (OSError, ValueError) as err:
                show_error(f"lora-sam3d: {err}")
            else:
                self.status.value = "saved " + ", ".join(p.name for p in written)

    # -- the worker --------------------------------------------------------------------------------
    def _start(self, work: Generator[str, None, Any], what: str, done: Any) -> Any:
        """Run ``work`` in a thread: its yields as the status, its return to ``done``, errors as one line."""
        if self.busy:
            return self._refuse("still working on the last request")
        self.worker = create_worker(lambda: (yield from work), _start_thread=False)
        self.worker.yielded.connect(self._say)
        self.worker.returned.connect(done)
        self.worker.errored.connect(self._failed)
        self.worker.finished.connect(self._idle)
        self.run_button.enabled, self.progress.visible, self.busy = False, True, True
        self._say(what)
        self.worker.start()
        return self.worker

    def _say(self, message: str) -> None:
        self.status.value = message

    def _refuse(self, line: str) -> None:
        """One line in the status and as napari's error notification."""
        self.status.value = f"failed: {line}"
        show_error(f"lora-sam3d: {line}")

    def _failed(self, err: BaseException) -> None:
        self._refuse(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)

    def _idle(self) -> None:
        self.run_button.enabled, self.progress.visible, self.busy = True, False, False

    def close_session(self) -> None:
        """Drop the kept session (and its copy of an in-memory scan)."""
        if self._session is not None:
            self._session.close()
        self._session, self._session_of = None, None
