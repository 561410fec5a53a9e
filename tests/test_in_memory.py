"""Scans and drawings as a notebook or a viewer holds them: `load_model`, `reconstruct` on images,
arrays and DICOM folders, masks reordered on the scan's voxels, 2D slice arrays, a 3D drawing whose
slices are found, any structure framed by its drawing, and a `Session` that reads its scan once."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import write_dicom_series

import lora_sam3d
from lora_sam3d.data import DataError
from lora_sam3d.data.requests.masks import DRAWN_FRAME_SHARE, ONE_SLICE_FRAME_SHARE
from lora_sam3d.metrics import overlap

HERE = Path(__file__).parent
ADAPTER = HERE / "data" / "previous_main" / "adapter"
LV = "heart_ventricle_left"


@pytest.fixture(scope="module")
def model() -> lora_sam3d.Reconstructor:
    return lora_sam3d.load_model(ADAPTER)


def case_of(phantoms: Path) -> tuple[nib.Nifti1Image, np.ndarray, Path]:
    case = phantoms / "s0001"
    truth = np.asarray(nib.load(case / "segmentations" / f"{LV}.nii.gz").dataobj) > 0
    return nib.load(case / "ct.nii.gz"), truth, case


def test_load_model_takes_a_checkpoint_an_adapter_folder_or_a_shipped_base() -> None:
    for path in (HERE / "data" / "previous_main" / "last.ckpt", ADAPTER, "builtin:relative_shapes"):
        model = lora_sam3d.load_model(path)
        assert isinstance(model, lora_sam3d.Reconstructor) and not model.training
        assert model.data_contract["context"] == "volume"
    assert lora_sam3d.load_model("builtin:relative_shapes").data_contract["classes"] == []
    with pytest.raises(
        ValueError, match=r"builtin:nothing is not a shipped base; known: builtin:relative_shapes"
    ):
        lora_sam3d.load_model("builtin:nothing")


def test_a_scan_as_a_path_an_image_or_an_array_gives_one_result(phantoms: Path, model: object) -> None:
    scan, truth, case = case_of(phantoms)
    mask = case / "segmentations" / f"{LV}.nii.gz"
    want = lora_sam3d.reconstruct(model, case / "ct.nii.gz", mask, LV, index=16)
    for given in (scan, (np.asarray(scan.dataobj), scan.affine)):
        got = lora_sam3d.reconstruct(model, given, mask, LV, index=16)
        assert np.array_equal(np.asarray(got.mask.dataobj), np.asarray(want.mask.dataobj))
        assert got.prediction.metrics["dice"] == pytest.approx(want.prediction.metrics["dice"])
    sliced = lora_sam3d.reconstruct(model, scan, truth[:, :, 16], LV, index=16)  # a 2D array of slice 16
    assert np.array_equal(np.asarray(sliced.mask.dataobj), np.asarray(want.mask.dataobj))
    assert sliced.prediction.metrics is None, "a 2D mask is not scored"


def test_a_mask_stored_with_its_axes_reordered_is_the_same_mask(
    phantoms: Path, model: object, tmp_path: Path
) -> None:
    """The label map of another tool: the same voxels stored (z, x, y) with x flipped."""
    scan, truth, _case = case_of(phantoms)
    data = np.flip(truth.astype(np.uint8), axis=0).transpose(2, 0, 1)
    order = np.eye(4)[[2, 0, 1, 3]].T  # new voxel (k, i', j) -> old voxel (i, j, k)
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, truth.shape[0] - 1
    affine = scan.affine @ flip @ order
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "other_tool.nii.gz")
    assert np.allclose(
        nib.affines.apply_affine(affine, [3, 5, 7]),
        nib.affines.apply_affine(scan.affine, [truth.shape[0] - 1 - 5, 7, 3]),
    )
    want = lora_sam3d.reconstruct(model, scan, truth, LV, index=16)
    got = lora_sam3d.reconstruct(model, scan, tmp_path / "other_tool.nii.gz", LV, index=16)
    assert np.array_equal(np.asarray(got.mask.dataobj), np.asarray(want.mask.dataobj))
    assert got.prediction.metrics["dice"] == pytest.approx(want.prediction.metrics["dice"])


def test_a_drawing_s_slices_are_found_and_its_frame_serves_any_structure(
    phantoms: Path, model: object
) -> None:
    """A labels layer painted on axial slice 16 and sagittal slice x: those two slices are found;
    with no class, the frame comes from the drawing and says so; a 3D blob is refused saying where."""
    scan, truth, _ = case_of(phantoms)
    x = int(np.flatnonzero(truth.any(axis=(1, 2))).mean())
    drawing = np.zeros(truth.shape, dtype=np.uint8)
    drawing[:, :, 16], drawing[x] = truth[:, :, 16], truth[x]
    result = lora_sam3d.reconstruct(model, scan, drawing, None, truth=truth)
    assert sorted(result.slices, key=str) == sorted(
        [{"axis": "sagittal", "index": x}, {"axis": "axial", "index": 16}], key=str
    )
    assert result.frame["from"] == "the drawing" and 10 < result.frame["extent_mm"] < 100
    assert result.prediction.metrics["dice"] > 0.7 and "structure" in result.name
    written = np.asarray(result.mask.dataobj) > 0
    assert np.array_equal(written[:, :, 16], truth[:, :, 16]), "the drawing is the result on its slices"
    known = lora_sam3d.reconstruct(model, scan, drawing, LV)  # several slices measure the structure
    assert known.frame == result.frame and known.prediction.metrics is None
    one = lora_sam3d.reconstruct(model, scan, truth[:, :, 16], LV, index=16)  # one slice: the class's extent
    assert one.frame["from"] == "the class's training extent"
    assert one.frame["extent_mm"] == model.data_contract["extent_mm"][LV]
    by_class = lora_sam3d.reconstruct(model, scan, drawing, LV, extent_mm={LV: 60.0})
    assert by_class.frame == {"from": "extent_mm given", "extent_mm": 60.0}, "an extent given holds"
    # a drawing bounds the structure itself: its frame keeps less margin than a class's extent
    scale = model.data_contract["frame_scale"]
    sides = {
        name: float(np.linalg.norm(r.prediction.frame_to_world[:3, 0]))
        for name, r in (("drawing", result), ("one slice", one), ("given", by_class))
    }
    assert sides["drawing"] == pytest.approx(DRAWN_FRAME_SHARE * scale * result.frame["extent_mm"])
    assert sides["one slice"] == pytest.approx(ONE_SLICE_FRAME_SHARE * scale * one.frame["extent_mm"])
    assert sides["given"] == pytest.approx(scale * 60.0)
    blob = np.zeros(truth.shape, dtype=np.uint8)
    blob[20:26, 20:26, 10:16] = 1
    with pytest.raises(
        DataError, match=r"the paint at voxels i 20..25, j 20..25, k 1[0-5]..1[0-5] spans neighbouring"
    ):
        lora_sam3d.reconstruct(model, scan, blob, None)


def test_a_dicom_series_folder_reads_as_the_nifti_it_came_from(
    phantoms: Path, model: object, tmp_path: Path
) -> None:
    """A series written slice by slice by SimpleITK (LPS, its own tags): the same scan in RAS mm."""
    scan, _truth, case = case_of(phantoms)
    canonical = nib.as_closest_canonical(scan)
    values = np.asarray(canonical.dataobj).astype(np.int16)
    series = write_dicom_series(canonical, tmp_path / "dicom")
    from lora_sam3d.predict.user_inputs import read_scan

    image, name = read_scan(series)
    assert name == "dicom" and image.shape == canonical.shape
    assert np.allclose(image.affine, canonical.affine, atol=1e-3), (image.affine, canonical.affine)
    assert np.array_equal(np.asarray(image.dataobj), values)
    mask = case / "segmentations" / f"{LV}.nii.gz"
    got = lora_sam3d.reconstruct(model, series, mask, LV, index=16)
    want = lora_sam3d.reconstruct(model, case / "ct.nii.gz", mask, LV, index=16)
    assert got.prediction.metrics["dice"] == pytest.approx(want.prediction.metrics["dice"], abs=0.01)
    with pytest.raises(DataError, match=r"holds no DICOM series"):
        read_scan(tmp_path)


def test_a_session_reads_its_scan_once_and_answers_as_reconstruct(phantoms: Path, model: object) -> None:
    scan, truth, _ = case_of(phantoms)
    x = int(np.flatnonzero(truth.any(axis=(1, 2))).mean())
    drawing = np.zeros(truth.shape, dtype=np.uint8)
    drawing[:, :, 16], drawing[x] = truth[:, :, 16], truth[x]
    with lora_sam3d.Session(model, (np.asarray(scan.dataobj), scan.affine)) as session:
        first = session.reconstruct(drawing, LV, truth=truth)
        assert first.next_slice is not None and first.next_slice["axis"] == "coronal", first.next_slice
        assert len(session.cache) == 1 and "image" in next(iter(session.cache.values()))
        kept = next(iter(session.cache.values()))["image"]
        again = session.reconstruct(drawing, LV, truth=truth)
        assert next(iter(session.cache.values()))["image"] is kept, "the scan was not read again"
        folder = Path(session.path).parent
    assert not folder.parent.exists(), "closing removes the session's copy"
    alone = lora_sam3d.reconstruct(model, scan, drawing, LV, truth=truth)
    for result in (first, again):
        assert np.array_equal(np.asarray(result.mask.dataobj), np.asarray(alone.mask.dataobj))
        assert result.prediction.metrics["dice"] == pytest.approx(alone.prediction.metrics["dice"])
    assert overlap(np.asarray(first.mask.dataobj) > 0, truth)[0] > 0.8


def test_a_slice_s_own_file_still_reads_and_frames_an_unknown_structure(
    phantoms: Path, model: object, tmp_path: Path
) -> None:
    """A PNG of slice 16 (as exported from a viewer) for a class the model has no extent for: the
    frame comes from that mask; the same slice as a 2D array gives the same result."""
    from PIL import Image

    _scan, truth, case = case_of(phantoms)
    Image.fromarray(truth[:, :, 16].astype(np.uint8) * 255).save(tmp_path / "slice16.png")
    from_png = lora_sam3d.reconstruct(
        model, case / "ct.nii.gz", tmp_path / "slice16.png", "kidney_left", index=16
    )
    from_array = lora_sam3d.reconstruct(model, case / "ct.nii.gz", truth[:, :, 16], "kidney_left", index=16)
    assert (
        from_png.frame["from"] == "the drawing"
        and from_png.frame["extent_mm"] == from_array.frame["extent_mm"]
    )
    assert np.array_equal(np.asarray(from_png.mask.dataobj), np.asarray(from_array.mask.dataobj))
    with pytest.raises(DataError, match=r"slice16.png is one slice's file: name its slice"):
        lora_sam3d.reconstruct(model, case / "ct.nii.gz", tmp_path / "slice16.png")
