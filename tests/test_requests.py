"""Reconstruction requests as users write them: viewer slice numbers, world positions, masks in any
form, case-id names; on real NIfTI files, in the file orientations scanners write."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from lora_sam3d.data import DataError, PredictionDataset, PredictItem, Preprocessing, write_phantoms
from lora_sam3d.data.requests import locate_slice, parse_axis
from lora_sam3d.data.requests.names import case_name

EXTENTS = {"heart_ventricle_left": 60.0, "heart_myocardium": 80.0}


def scan(affine: np.ndarray, shape: tuple[int, int, int] = (40, 30, 20)) -> nib.Nifti1Image:
    return nib.Nifti1Image(np.zeros(shape, np.int16), affine)


def test_axis_names_and_file_axes_as_viewers_number_them() -> None:
    assert [parse_axis(a) for a in ("sagittal", "Coronal", " axial", 0, 1, 2)] == [0, 1, 2, 0, 1, 2]
    for bad in ("transverse", 3, True, "2"):
        with pytest.raises(DataError, match="expected one of sagittal, coronal, axial"):
            parse_axis(bad)
    # LPS storage (x and y flipped) with 3 mm slices: axial = file axis 2, numbered as stored
    lps = scan(np.diag([-0.8, -0.8, 3.0, 1.0]))
    ref = locate_slice(lps, 2, 12, None)
    assert (ref.file_axis, ref.index, ref.name) == (2, 12, "axial12") and ref.position_mm == pytest.approx(
        36.0
    )
    assert locate_slice(lps, 0, 5, None).position_mm == pytest.approx(-0.8 * 5)
    for whole in (12.0, np.float64(12), np.int64(12)):  # a computed or YAML-written index
        assert locate_slice(lps, 2, whole, None).name == "axial12"
    for bad in (12.5, "12", True):
        with pytest.raises(DataError, match=r"index must be a whole slice number of the file, got "):
            locate_slice(lps, 2, bad, None)
    assert locate_slice(lps, 2, None, 37.4).index == 12, "position_mm -> the nearest file slice"
    # a scan stored slice-first (file axis 0 runs S-I, as some exports do): axial is file axis 0
    permuted = np.zeros((4, 4))
    permuted[2, 0], permuted[0, 1], permuted[1, 2], permuted[3, 3] = 2.5, 0.9, 0.9, 1.0
    ref = locate_slice(scan(permuted), 2, 7, None)
    assert (ref.file_axis, ref.position_mm) == (0, pytest.approx(17.5))
    with pytest.raises(
        DataError, match=r"index 40 is outside the file's axial axis \(file axis 0, slices 0\.\.39\)"
    ):
        locate_slice(scan(permuted), 2, 40, None)
    with pytest.raises(
        DataError, match=r"position_mm 200 is outside the scan: its axial planes run from 0\.0 to 97\.5 mm"
    ):
        locate_slice(scan(permuted), 2, None, 200)
    with pytest.raises(DataError, match=r"give either index .* or position_mm"):
        locate_slice(lps, 2, 3, 4.0)


def test_case_names() -> None:
    assert case_name("data/s0011/ct.nii.gz") == "s0011"
    assert case_name("/scans/patient7_arterial.nii.gz") == "patient7_arterial"
    assert case_name("cropped/s0002/s0002-image.nii.gz") == "s0002-image"


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A phantom scan stored as scanners do (x flipped, tilted, anisotropic), with its masks."""
    root = tmp_path_factory.mktemp("req")
    write_phantoms(root, n_cases=1, shape=(64, 64, 40), spacing=(1.2, 1.2, 3.0), seed=5)
    return root / "s0001"


def lv_slice(case: Path) -> tuple[int, np.ndarray]:
    """The file's axial slice through the left ventricle's middle, and the mask on it."""
    mask = np.asarray(nib.load(str(case / "segmentations" / "heart_ventricle_left.nii.gz")).dataobj) > 0
    z = int(np.flatnonzero(mask.any(axis=(0, 1))).mean())
    return z, mask[:, :, z]


def request_samples(items: list[PredictItem], spacing: float = 1.5) -> list[dict]:
    ds = PredictionDataset(items, Preprocessing(spacing_mm=spacing), EXTENTS, 2.0, 32)
    return [ds[i] for i in range(len(ds))]


def test_a_file_slice_and_its_plane_position_name_the_same_input(case: Path) -> None:
    z, _ = lv_slice(case)
    img = nib.load(str(case / "ct.nii.gz"))
    mask = str(case / "segmentations" / "heart_ventricle_left.nii.gz")
    ref = locate_slice(img, 2, z, None)
    by_index, by_position = request_samples([
        PredictItem(str(case / "ct.nii.gz"), mask, "heart_ventricle_left", "axial", index=z),
        PredictItem(str(case / "ct.nii.gz"), mask, "heart_ventricle_left", 2, position_mm=ref.position_mm + 1.0),
    ])  # fmt: skip
    for key in ("view_image", "view_mask", "frame_to_world"):
        assert torch.equal(by_index[key], by_position[key]), key
    assert by_index["case_id"] == "s0001" and by_index["slice_name"] == f"axial{z}"
    # the frame's centre lies on the file's slice z: back in file voxels, within half a slice plus half
    # a model voxel (1.5 mm of 3 mm slices)
    centre = by_index["frame_to_world"][:3, 3].numpy()
    k = nib.affines.apply_affine(np.linalg.inv(img.affine), centre)[2]
    assert abs(k - z) <= 0.5 + 0.25 + 1e-6, (k, z)
    # the input mask is the file slice's mask: same area (mm^2) within a few percent
    side_mm = 2.0 * EXTENTS["heart_ventricle_left"]
    pixel_mm2 = (side_mm / 32) ** 2
    _, truth = lv_slice(case)
    voxel_mm2 = 1.2 * 1.2
    assert by_index["view_mask"][0].sum().item() * pixel_mm2 == pytest.approx(
        truth.sum() * voxel_mm2, rel=0.15
    )


def test_masks_as_users_have_them(case: Path, tmp_path: Path) -> None:
    """A 3D mask, a label map with its value, a 2D NIfTI of the slice and a PNG of it: one input."""
    z, mask2d = lv_slice(case)
    img = nib.load(str(case / "ct.nii.gz"))
    label_map = np.asarray(img.dataobj) * 0
    label_map[
        np.asarray(nib.load(str(case / "segmentations" / "heart_ventricle_left.nii.gz")).dataobj) > 0
    ] = 3
    nib.save(nib.Nifti1Image(label_map.astype(np.int16), img.affine), str(tmp_path / "labels.nii.gz"))
    nib.save(nib.Nifti1Image(mask2d.astype(np.uint8), np.eye(4)), str(tmp_path / "slice.nii.gz"))
    Image.fromarray(mask2d.astype(np.uint8) * 255).save(tmp_path / "slice.png")
    image = str(case / "ct.nii.gz")
    samples = request_samples([
        PredictItem(image, str(case / "segmentations" / "heart_ventricle_left.nii.gz"), "heart_ventricle_left", index=z),
        PredictItem(image, str(tmp_path / "labels.nii.gz"), "heart_ventricle_left", index=z, label_value=3),
        PredictItem(image, str(tmp_path / "slice.nii.gz"), "heart_ventricle_left", index=z),
        PredictItem(image, str(tmp_path / "slice.png"), "heart_ventricle_left", index=z),
    ])  # fmt: skip
    for other in samples[1:]:
        for key in ("view_image", "view_mask", "frame_to_world"):
            assert torch.equal(samples[0][key].nan_to_num(), other[key].nan_to_num()), key
    # a 3D mask or label map is the structure's truth on the scan's grid, to score against; a 2D mask is not
    assert [s["native"] is not None for s in samples] == [True, True, False, False]
    assert samples[1]["native"]["gt"].sum() == samples[0]["native"]["gt"].sum() > 0
    nib.save(nib.Nifti1Image(mask2d[:-4].astype(np.uint8), np.eye(4)), str(tmp_path / "small.nii.gz"))
    with pytest.raises(
        DataError, match=r"2D mask .*small\.nii\.gz has shape \(60, 64\) but axial\d+ .* has shape \(64, 64\)"
    ):
        request_samples([PredictItem(image, str(tmp_path / "small.nii.gz"), "heart_ventricle_left", index=z)])
    with pytest.raises(DataError, match=r"has no voxels on axial0"):
        request_samples([PredictItem(image, str(tmp_path / "labels.nii.gz"), "heart_ventricle_left", index=0,
                                     label_value=3)])  # fmt: skip


def test_masks_are_read_as_training_labels_are(case: Path, tmp_path: Path) -> None:
    """Float masks with tool noise, a one-slice (X, Y, 1) NIfTI and a palette PNG whose index 0 is
    the structure give the integer mask's input; fractional values, NaN, JPEG and anti-aliased PNGs
    are refused with one line naming the file and why."""
    z, mask2d = lv_slice(case)
    image = str(case / "ct.nii.gz")
    img = nib.load(image)
    lv = np.asarray(nib.load(str(case / "segmentations" / "heart_ventricle_left.nii.gz")).dataobj) > 0
    noisy = lv.astype(np.float64) + np.random.default_rng(0).uniform(-1e-6, 1e-6, lv.shape)
    nib.save(nib.Nifti1Image(noisy, img.affine), str(tmp_path / "noisy.nii.gz"))
    labels = np.where(lv, 3.0, 0.0) + 1e-7  # a float label map, as some tools write it
    nib.save(nib.Nifti1Image(labels, img.affine), str(tmp_path / "float_labels.nii.gz"))
    nib.save(nib.Nifti1Image(mask2d[:, :, None].astype(np.uint8), np.eye(4)), str(tmp_path / "one.nii.gz"))
    palette = Image.fromarray(np.where(mask2d, 0, 1).astype(np.uint8), mode="P")
    palette.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)  # index 0 (the structure) drawn white
    palette.save(tmp_path / "palette.png")
    item = PredictItem(
        image, str(case / "segmentations" / "heart_ventricle_left.nii.gz"), "heart_ventricle_left", index=z
    )
    forms = [
        item,
        PredictItem(image, str(tmp_path / "noisy.nii.gz"), "heart_ventricle_left", index=z),
        PredictItem(
            image, str(tmp_path / "float_labels.nii.gz"), "heart_ventricle_left", index=z, label_value=3
        ),
        PredictItem(image, str(tmp_path / "one.nii.gz"), "heart_ventricle_left", index=z),
        PredictItem(image, str(tmp_path / "palette.png"), "heart_ventricle_left", index=z),
    ]
    samples = request_samples(forms)
    for form, other in zip(forms[1:], samples[1:], strict=True):
        assert torch.equal(samples[0]["view_mask"], other["view_mask"]), form.mask

    def refused(mask: np.ndarray | Image.Image, name: str, pattern: str) -> None:
        path = tmp_path / name
        if isinstance(mask, Image.Image):
            mask.save(path)
        else:
            nib.save(nib.Nifti1Image(mask, img.affine), str(path))
        with pytest.raises(DataError, match=pattern):
            request_samples([PredictItem(image, str(path), "heart_ventricle_left", index=z)])

    half = lv.astype(np.float32) * 0.5
    refused(half, "half.nii.gz", r"half\.nii\.gz has \d+ voxels that are not integers \(e\.g\. \[0\.5\]\)")
    with_nan = lv.astype(np.float32)
    with_nan[0, 0, z] = np.nan
    refused(with_nan, "nan.nii.gz", r"mask .*nan\.nii\.gz has 1 NaN/inf voxels")
    refused(
        Image.fromarray(mask2d.astype(np.uint8) * 255),
        "slice.jpg",
        r"slice\.jpg is a JPEG: its lossy compression",
    )
    soft = (mask2d.astype(np.float32) * 255).astype(np.uint8)
    soft[1:-1][mask2d[:-2] != mask2d[1:-1]] = 128  # an anti-aliased edge
    refused(
        Image.fromarray(soft),
        "soft.png",
        r"soft\.png has 3 grey levels \(e\.g\. \[0, 128, 255\]\): expected a binary mask",
    )


def test_every_request_is_checked_before_anything_runs(case: Path, tmp_path: Path) -> None:
    """The last file slice builds (the resampled grid's nearest slice); NaN intensities fail when the
    dataset is built, naming the item, the file and the file's own slice; files that share a name in
    different folders get distinct case ids."""
    img = nib.load(str(case / "ct.nii.gz"))
    last = img.shape[2] - 1
    band = np.zeros(img.shape, np.uint8)
    band[20:40, 20:40, last] = 1
    nib.save(nib.Nifti1Image(band, img.affine), str(tmp_path / "last.nii.gz"))
    (sample,) = request_samples([PredictItem(str(case / "ct.nii.gz"), str(tmp_path / "last.nii.gz"),
                                             "heart_ventricle_left", index=last)])  # fmt: skip
    assert sample["slice_name"] == f"axial{last}" and sample["view_mask"][0].any()
    data = np.asarray(img.dataobj).astype(np.float32)
    data[3, 3, 3] = np.nan
    for patient in ("p1", "p2"):
        (tmp_path / patient / "CT").mkdir(parents=True)
        nib.save(nib.Nifti1Image(data if patient == "p2" else np.asarray(img.dataobj), img.affine),
                 str(tmp_path / patient / "CT" / "ct.nii.gz"))  # fmt: skip
    z, _ = lv_slice(case)
    mask = str(case / "segmentations" / "heart_ventricle_left.nii.gz")
    items = [
        PredictItem(str(tmp_path / p / "CT" / "ct.nii.gz"), mask, "heart_ventricle_left", index=z)
        for p in ("p1", "p2")
    ]
    with pytest.raises(DataError, match=rf"^predict item 2 \(heart_ventricle_left in .*p2/CT/ct\.nii\.gz, axial index {z}\): "
                       r"image .* has 1 NaN/inf voxels"):  # fmt: skip
        PredictionDataset(items, Preprocessing(spacing_mm=1.5), EXTENTS, 2.0, 32)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine), str(tmp_path / "p2" / "CT" / "ct.nii.gz"))
    ds = PredictionDataset(items, Preprocessing(spacing_mm=1.5), EXTENTS, 2.0, 32)
    assert ds.case_ids == ["p1-CT", "p2-CT"]
    with pytest.raises(DataError, match=r"predict items 1 and 2 ask for the same reconstruction"):
        PredictionDataset(
            [items[0], items[0]], Preprocessing(spacing_mm=1.5), EXTENTS, 2.0, 32
        ).check_unique_outputs()
    with pytest.raises(
        DataError, match=r"predict item 1 .*: class_name: class names \['\.\./up'\] are not safe"
    ):
        PredictionDataset(
            [PredictItem(items[0].image, mask, "../up", index=z)],
            Preprocessing(1.5),
            {"../up": 60.0},
            2.0,
            32,
        )
