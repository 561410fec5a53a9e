"""The napari plugin in a real napari window (Qt, OpenGL) on Xvfb: the reader places scans in world
mm, the widget reconstructs two painted slices in a worker thread as `Session` does, its layers lie
on the scan, a screenshot shows the surface, Save writes the predict writers' files; the manifest
validates and ``lora-sam3d view`` refuses a missing scan in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import write_dicom_series

from lora_sam3d.cli import main
from lora_sam3d.metrics import overlap
from lora_sam3d.predict.api import load_model
from lora_sam3d.predict.session import Session
from lora_sam3d.viewer.app import open_viewer
from lora_sam3d.viewer.reader import PATH_KEY, get_reader

HERE = Path(__file__).parent
ADAPTER = HERE / "data" / "previous_main" / "adapter"
LV = "heart_ventricle_left"


def _wait(qtbot: object, widget: object, seconds: float = 90) -> None:
    qtbot.waitUntil(lambda: not widget.busy, timeout=int(seconds * 1000))  # type: ignore[attr-defined]


def test_the_reader_places_a_scan_and_a_mask_in_world_mm(phantoms: Path, tmp_path: Path) -> None:
    case = phantoms / "s0001"
    scan = nib.load(case / "ct.nii.gz")
    reader = get_reader(str(case / "ct.nii.gz"))
    assert reader is not None
    ((values, meta, kind),) = reader(str(case / "ct.nii.gz"))
    assert kind == "image" and values.shape == scan.shape and np.allclose(meta["affine"], scan.affine)
    assert meta["metadata"][PATH_KEY] == str(case / "ct.nii.gz")
    assert meta["contrast_limits"] == (-160.0, 240.0), "a CT opens in a soft-tissue window"
    ((_, _, mask_kind),) = reader(str(case / "segmentations" / f"{LV}.nii.gz"))
    assert mask_kind == "labels"
    series = write_dicom_series(scan, tmp_path / "series")  # a DICOM folder: the same scan, same place
    ((dicom_values, dicom_meta, _),) = get_reader(str(series))(str(series))  # type: ignore[misc]
    canonical = nib.as_closest_canonical(scan)
    assert np.array_equal(dicom_values, np.asarray(canonical.dataobj).astype(np.int16))
    assert np.allclose(dicom_meta["affine"], canonical.affine, atol=1e-3)
    (tmp_path / "notes.txt").write_text("not a scan")
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path)) is None, "a folder without DICOM files is not ours"


def test_the_widget_reconstructs_two_painted_slices_as_the_session_does(
    phantoms: Path, qtbot: object, tmp_path: Path
) -> None:
    case = phantoms / "s0001"
    truth = np.asarray(nib.load(case / "segmentations" / f"{LV}.nii.gz").dataobj) > 0
    viewer, widget = open_viewer(case / "ct.nii.gz", str(ADAPTER))
    try:
        _wait(qtbot, widget)  # the model loads in a worker and offers its classes
        assert LV in widget.class_name.choices and "loaded" in widget.status.value
        z, x = 16, int(np.flatnonzero(truth.any(axis=(1, 2))).mean())
        drawing = viewer.layers["drawing"]
        painted = np.zeros(truth.shape, dtype=np.uint8)
        painted[:, :, z], painted[x] = truth[:, :, z], truth[x]
        drawing.data = painted  # as a brush leaves it: two slices of label 1
        widget.class_name.value = LV
        from qtpy.QtCore import Qt

        qtbot.mouseClick(widget.run_button.native, Qt.MouseButton.LeftButton)  # type: ignore[attr-defined]
        assert widget.busy and not widget.run_button.enabled, "the work runs in a thread"
        _wait(qtbot, widget)
        assert widget.result is not None, widget.status.value
        after = widget.result.next_slice
        assert f"draw {after['axis']} slice {after['index']} next" in widget.status.value
        shown = np.asarray(viewer.layers[f"{LV} 1 mask"].data) > 0
        assert overlap(shown, truth)[0] > 0.8
        with Session(load_model(ADAPTER), case / "ct.nii.gz") as session:
            alone = session.reconstruct(painted, LV)
        assert np.array_equal(shown, np.asarray(alone.mask.dataobj) > 0), "the widget answers as the session"
        assert sorted(widget.result.slices, key=str) == sorted(
            [{"axis": "axial", "index": z}, {"axis": "sagittal", "index": x}], key=str
        )
        vertices, _faces = viewer.layers[f"{LV} 1 surface"].data[:2]
        corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) * (
            np.array(truth.shape) - 1
        )
        box = nib.affines.apply_affine(viewer.layers["s0001"].affine.affine_matrix, corners)
        spacing = np.linalg.norm(nib.load(case / "ct.nii.gz").affine[:3, :3], axis=0).max()
        assert (vertices >= box.min(0) - spacing).all() and (vertices <= box.max(0) + spacing).all()

        session = widget._session
        qtbot.mouseClick(widget.run_button.native, Qt.MouseButton.LeftButton)  # type: ignore[attr-defined]
        _wait(qtbot, widget)
        assert widget._session is session, "the second drawing reuses the session"

        viewer.dims.ndisplay = 3
        viewer.layers["drawing"].visible = viewer.layers[f"{LV} 1 mask"].visible = False
        shot = viewer.screenshot(canvas_only=True, flash=False)
        red = (shot[..., 0] > 150) & (shot[..., 1] < 90) & (shot[..., 2] < 90)
        assert red.mean() > 0.002, "the surface is drawn in 3D"

        mesh, mask = widget.save(tmp_path / "saved")
        assert b"SPACE=RAS" in mesh.read_bytes()[:400]
        saved = nib.load(mask)
        assert np.allclose(saved.affine, nib.load(case / "ct.nii.gz").affine)
        assert np.array_equal(np.asarray(saved.dataobj) > 0, shown)

        viewer.add_labels(np.zeros((4, 4, 4), dtype=np.uint8), name="small")
        widget.drawing.value = viewer.layers["small"]
        assert widget.reconstruct() is None
        assert "the labels layer 'small' is (4, 4, 4)" in widget.status.value
    finally:
        widget.close_session()
        viewer.close()


def test_the_manifest_validates_the_core_imports_no_qt_and_view_refuses_a_missing_scan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    npe2 = Path(sys.executable).parent / "npe2"
    done = subprocess.run([str(npe2), "validate", "lora-sam3d"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "valid" in done.stdout, done.stdout + done.stderr
    core = (
        "import sys, lora_sam3d, lora_sam3d.viewer, lora_sam3d.predict.session, lora_sam3d.cli.command; "
        "lora_sam3d.Session; print(sorted(m for m in sys.modules if m.split('.')[0] in ('PyQt6', 'PyQt5', 'qtpy', 'napari')))"
    )
    done = subprocess.run([sys.executable, "-c", core], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", "the core and the reader import no Qt: " + done.stdout[:300]
    assert main(["view", str(tmp_path / "nothing.nii.gz")]) == 2
    assert "nothing.nii.gz does not exist" in capsys.readouterr().err
