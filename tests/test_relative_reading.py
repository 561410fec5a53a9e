"""The scan read relative to what the user drew, and MR as an input: MR-like phantoms in TotalSegmentator
MRI's layout, the relative evidence unchanged by a global change of contrast (either sign), and
neutral, never NaN, where the drawn masks are too small for statistics."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lora_sam3d.cli import main
from lora_sam3d.data import (
    DataError,
    DataSettings,
    PredictionDataset,
    Preprocessing,
    TS_SAM3D_Dataset,
    write_phantoms,
)
from lora_sam3d.data.cases import discover_cases
from lora_sam3d.data.tissue import MIN_SPREAD, marked_tissue, relative_intensity

LV = "heart_ventricle_left"
CLASSES = [LV, "heart_myocardium"]


@pytest.fixture(scope="module")
def mr_phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mr") / "data"
    assert (
        main(
            [
                "phantoms",
                "--root",
                str(root),
                "--n-cases",
                "4",
                "--shape",
                "48",
                "48",
                "32",
                "--modality",
                "mr",
            ]
        )
        == 0
    )
    return root


def test_mr_phantoms_are_the_ct_anatomy_in_the_mri_layout(
    mr_phantoms: Path, phantoms: Path, tmp_path: Path
) -> None:
    """`phantoms --modality mr`: ``mri.nii.gz`` beside the same masks the CT phantoms of that seed
    have; each case draws its own tissue intensities (a tissue's rank among others changes between
    cases, as between sequences); the case reader takes the MRI layout, and refuses a case holding both."""
    cases = discover_cases(mr_phantoms, CLASSES)
    assert [c.image.name for c in cases] == ["mri.nii.gz"] * 4
    ratios = []
    for case in ("s0001", "s0002", "s0003", "s0004"):
        for name in CLASSES:
            mr_mask = nib.load(mr_phantoms / case / "segmentations" / f"{name}.nii.gz")
            ct_mask = nib.load(phantoms / case / "segmentations" / f"{name}.nii.gz")
            assert np.array_equal(np.asarray(mr_mask.dataobj), np.asarray(ct_mask.dataobj)), (
                "the same anatomy"
            )
        image = np.asarray(nib.load(mr_phantoms / case / "mri.nii.gz").dataobj)
        assert image.min() >= 0, "MR magnitudes are not negative"
        inside = [np.median(image[np.asarray(nib.load(mr_phantoms / case / "segmentations" / f"{n}.nii.gz").dataobj) > 0])
                  for n in CLASSES]  # fmt: skip
        ratios.append(inside[0] / inside[1])
    assert max(ratios) / min(ratios) > 1.3, f"tissue contrast drawn per case: {ratios}"
    both = tmp_path / "both"
    shutil.copytree(mr_phantoms / "s0001", both / "s0001")
    shutil.copy(phantoms / "s0001" / "ct.nii.gz", both / "s0001" / "ct.nii.gz")
    with pytest.raises(DataError, match=r"case s0001 holds both ct\.nii\.gz and mri\.nii\.gz"):
        discover_cases(both, CLASSES)


def test_relative_intensity_is_unchanged_by_a_global_change_of_contrast() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(0.4, 0.05, (3, 32, 32)).astype(np.float32)
    masks = np.zeros(image.shape, dtype=bool)
    masks[:, 10:20, 10:20] = True
    image[masks] += 0.3
    base = relative_intensity(image, marked_tissue(image, masks, 1.0))
    for a, b in ((2.0, 0.1), (0.5, -0.2), (-1.0, 1.0), (-3.0, 0.5)):
        other = a * image + b
        np.testing.assert_allclose(
            relative_intensity(other, marked_tissue(other, masks, 1.0)), base, atol=1e-5
        )
    assert base[masks].mean() > 0.8 and base[~masks].mean() < 0.5, "the marked tissue reads as itself"
    flat = np.full(image.shape, 0.3, dtype=np.float32)
    tissue = marked_tissue(flat, masks, 1.0)
    assert tissue is not None and tissue.inside_spread == MIN_SPREAD
    np.testing.assert_array_equal(relative_intensity(flat, tissue), 0.5)
    assert marked_tissue(image, np.zeros_like(masks), 1.0) is None
    np.testing.assert_array_equal(relative_intensity(image, None), 0.5)


def mr_dataset(root: Path, reading: str) -> TS_SAM3D_Dataset:
    settings = DataSettings(
        preprocessing={"spacing_mm": 2.0, "modality": "mr"},
        views={"count": 3},
        context={"source": "volume", "reading": reading},  # type: ignore[arg-type]
    )
    return TS_SAM3D_Dataset(root, CLASSES, split="val", slice_sampling_method="central", settings=settings)


def test_a_sample_read_relative_is_the_same_under_another_contrast(mr_phantoms: Path, tmp_path: Path) -> None:
    """Every intensity of a sample (slice, views, context) read relative to its drawn tissue: the
    same MR phantoms rescaled (``2.5 I + 300``) or inverted give the same sample; read absolute, the
    inverted one does not."""
    changed = {}
    for name, (a, b) in {"rescaled": (2.5, 300.0), "inverted": (-1.0, 5000.0)}.items():
        root = tmp_path / name
        shutil.copytree(mr_phantoms, root, ignore=shutil.ignore_patterns(".cache"))
        for case in root.glob("s*"):
            img = nib.load(case / "mri.nii.gz")
            data = a * np.asarray(img.dataobj, dtype=np.float32) + b
            nib.save(nib.Nifti1Image(data, img.affine), case / "mri.nii.gz")
        changed[name] = root
    for reading, inverted_equal in (("relative", True), ("absolute", False)):
        base = mr_dataset(mr_phantoms, reading)[0]
        for name, root in changed.items():
            other = mr_dataset(root, reading)[0]
            same = all(torch.allclose(base[k], other[k], atol=2e-2) for k in ("view_image", "context"))
            assert same == (inverted_equal or name == "rescaled"), (reading, name)
    relative = mr_dataset(mr_phantoms, "relative")[0]
    assert torch.isfinite(relative["context"]).all() and float(relative["context"].min()) >= 0


def test_a_request_whose_mask_is_too_small_reads_neutral_with_a_warning(
    phantoms: Path, tmp_path: Path
) -> None:
    case = phantoms / "s0001"
    img = nib.load(case / "ct.nii.gz")
    tiny = np.zeros(img.shape, np.uint8)
    tiny[24, 24, 16] = tiny[25, 24, 16] = 1
    nib.save(nib.Nifti1Image(tiny, img.affine), tmp_path / "tiny.nii.gz")
    item = {
        "image": str(case / "ct.nii.gz"),
        "mask": str(tmp_path / "tiny.nii.gz"),
        "class_name": LV,
        "index": 16,
    }
    requests = PredictionDataset(
        [item], Preprocessing(2.0), {LV: 60.0}, 1.5, 64, context="volume", reading="relative"
    )
    with pytest.warns(
        UserWarning,
        match=r"predict item 1 \(heart_ventricle_left in .*, axial16\): its drawn masks are too small",
    ):
        sample = requests[0]
    inside = sample["context"][1] > 0
    assert torch.allclose(sample["context"][0][inside], torch.tensor(0.5)), "neutral evidence"
    absolute = PredictionDataset([item], Preprocessing(2.0), {LV: 60.0}, 1.5, 64, context="volume")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shown = absolute[0]["view_image"][0]
    assert torch.equal(sample["shown_image"][0], shown), "people are shown the scan, not the evidence"
    assert torch.isfinite(sample["context"]).all() and torch.isfinite(sample["view_image"]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_phantoms(tmp_path / "w", n_cases=1, shape=(16, 16, 8), modality="mr")
    with pytest.raises(ValueError, match=r"phantom modality 'pet': expected 'ct', 'mr' or 'mixed'"):
        write_phantoms(tmp_path / "x", n_cases=1, modality="pet")  # type: ignore[arg-type]


def test_a_mixed_data_set_reads_each_scan_as_its_file_says(
    mr_phantoms: Path, phantoms: Path, tmp_path: Path
) -> None:
    """`phantoms --modality mixed` writes CT and MR cases in one root; ``modality: auto`` reads the
    CT through the CT window and the MR by its percentiles, so each case's absolute sample is the
    one its own modality gives; a file not named for its modality is read by its voxels."""
    root = tmp_path / "mixed"
    write_phantoms(root, n_cases=4, shape=(48, 48, 32), modality="mixed")
    assert sorted(p.name for p in root.glob("s*/*.nii.gz")) == [
        "ct.nii.gz",
        "ct.nii.gz",
        "mri.nii.gz",
        "mri.nii.gz",
    ]
    assert (root / "s0002" / "mri.nii.gz").is_file() and (root / "s0001" / "ct.nii.gz").is_file()
    auto = Preprocessing(2.0, "auto")
    ct = np.asarray(nib.load(phantoms / "s0001" / "ct.nii.gz").dataobj, dtype=np.float32)
    mr = np.asarray(nib.load(mr_phantoms / "s0001" / "mri.nii.gz").dataobj, dtype=np.float32)
    assert auto.modality_of(phantoms / "s0001" / "ct.nii.gz", ct) == "ct"
    assert auto.modality_of(mr_phantoms / "s0001" / "mri.nii.gz", mr) == "mr"
    assert auto.modality_of(tmp_path / "scan.nii.gz", ct) == "ct", "air in HU"
    assert auto.modality_of(tmp_path / "scan.nii.gz", mr) == "mr"
    with pytest.raises(DataError, match=r"modality must be ct, mr or auto, got 'pet'"):
        Preprocessing(2.0, "pet")  # type: ignore[arg-type]

    def first_image(data: Path, modality: str) -> torch.Tensor:
        settings = DataSettings(preprocessing={"spacing_mm": 2.0, "modality": modality}, views={"count": 1})
        ds = TS_SAM3D_Dataset(
            data, CLASSES, split="train", slice_sampling_method="central", settings=settings
        )
        return ds[0]["view_image"]

    # s0001 (train) is the CT case of the mixed root, the same anatomy and seed as the CT phantoms
    torch.testing.assert_close(first_image(root, "auto"), first_image(phantoms, "ct"))
    mixed_mr = tmp_path / "mr_only"
    mixed_mr.mkdir()
    shutil.copytree(root / "s0002", mixed_mr / "s0002")
    (mixed_mr / "meta.csv").write_text("image_id;split\ns0002;train\n", encoding="utf-8")
    as_mr, as_ct = first_image(mixed_mr, "auto"), first_image(mixed_mr, "ct")
    torch.testing.assert_close(as_mr, first_image(mixed_mr, "mr"))
    assert float(as_ct.mean()) > float(as_mr.mean()) + 0.2, "an MR read as CT is white"


def test_abdomen_phantoms_hold_close_neighbours_and_a_vessel_the_length_of_the_scan(tmp_path: Path) -> None:
    """``phantoms --kind abdomen``: the eight TotalSegmentator-named structures, disjoint, the aorta
    and the vertebrae running from the scan's first axial slice to its last (cut by both ends), the
    liver touching a neighbour, air around the body (a CT by its values), MR-like cases of the
    same anatomy; two seeds give two anatomies."""
    from scipy import ndimage

    from lora_sam3d.data import write_phantoms
    from lora_sam3d.data.abdomen import ABDOMEN_CLASSES

    write_phantoms(
        tmp_path / "a",
        n_cases=2,
        kind="abdomen",
        shape=(48, 48, 32),
        spacing=(6.4, 5.6, 8.0),
        modality="mixed",
    )
    case = tmp_path / "a" / "s0001"
    masks = {
        c: np.asarray(nib.load(case / "segmentations" / f"{c}.nii.gz").dataobj) > 0 for c in ABDOMEN_CLASSES
    }
    assert all(m.any() for m in masks.values()), [c for c, m in masks.items() if not m.any()]
    assert sum(m.astype(int) for m in masks.values()).max() == 1, "each voxel belongs to one structure"
    for long, gap in (("aorta", 0), ("vertebrae", 2)):  # the column may end in a disc
        z = np.flatnonzero(masks[long].any(axis=(0, 1)))
        assert z[0] <= gap and z[-1] >= 31 - gap, (long, z[0], z[-1])
    others = sum(m for c, m in masks.items() if c != "liver")
    assert (ndimage.binary_dilation(masks["liver"], iterations=2) & others).any(), "the liver has a neighbour"
    ct = np.asarray(nib.load(case / "ct.nii.gz").dataobj)
    assert (ct <= -500).mean() > 0.01 and (tmp_path / "a" / "s0002" / "mri.nii.gz").is_file()
    write_phantoms(
        tmp_path / "b", n_cases=1, kind="abdomen", shape=(48, 48, 32), spacing=(6.4, 5.6, 8.0), seed=5
    )
    other = np.asarray(nib.load(tmp_path / "b" / "s0001" / "segmentations" / "liver.nii.gz").dataobj) > 0
    assert not np.array_equal(other, masks["liver"])


def test_arterial_phase_abdomen_phantoms_make_the_aorta_as_bright_as_bone() -> None:
    """Some abdomen phantoms are arterial-phase, as a contrast CT: the aorta reads within the
    vertebrae's range of intensities, above any soft tissue (only its shape tells it from bone); the
    others keep it soft tissue."""
    from lora_sam3d.data.abdomen import abdomen_case

    phases = []
    for seed in range(10):
        hu, masks, _ = abdomen_case((48, 48, 32), (6.4, 5.6, 8.0), np.random.default_rng(seed))
        aorta, bone = np.median(hu[masks["aorta"]]), np.percentile(hu[masks["vertebrae"]], [5, 95])
        phases.append(bool(aorta > 230 and bone[0] <= aorta <= bone[1]))
    assert any(phases) and not all(phases), phases
