"""Any number of classes: the label array's type follows the class count (bits up to 64, a label map
beyond), read back exactly; overlaps a label map cannot hold are named; 40 and 70 classes train and
predict through the command."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import TEST_CLASSES, run_config, write_yaml

from lora_sam3d.data import DataError
from lora_sam3d.data.cases import discover_cases
from lora_sam3d.data.labels import add_class, class_mask, label_dtype
from lora_sam3d.data.volume import Preprocessing, load_volume


@pytest.mark.parametrize(
    ("n", "dtype"),
    [(1, "uint8"), (8, "uint8"), (9, "uint16"), (16, "uint16"), (17, "uint32"), (33, "uint64"), (64, "uint64"),
     (65, "int8"), (127, "int8"), (128, "int16"), (32767, "int16")],
)  # fmt: skip
def test_label_type_follows_the_class_count(n: int, dtype: str) -> None:
    assert label_dtype(n) == np.dtype(dtype)


def test_too_many_classes_is_an_error() -> None:
    with pytest.raises(DataError, match=r"32768 classes given; at most 32767 are supported"):
        label_dtype(32768)


@pytest.mark.parametrize("n", [5, 40, 64, 70, 200])
def test_classes_read_back_exactly(n: int) -> None:
    """Random masks (overlapping ones only where bits hold them) written with `add_class` and read
    with `class_mask` equal the masks, for every class, on the whole array and on a slice."""
    rng = np.random.default_rng(n)
    shape = (7, 6, 5)
    if n <= 64:
        masks = rng.random((n, *shape)) < 0.3
    else:  # a label map: disjoint classes
        owner = rng.integers(-1, n, shape)
        masks = np.stack([owner == c for c in range(n)])
    labels = np.zeros(shape, label_dtype(n))
    for c in range(n):
        add_class(labels, c, masks[c], {})
    for c in range(n):
        np.testing.assert_array_equal(class_mask(labels, c), masks[c])
        np.testing.assert_array_equal(class_mask(labels[:, 2], c), masks[c][:, 2])


def test_overlap_in_a_label_map_names_both_classes(tmp_path: Path) -> None:
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), affine), tmp_path / "ct.nii.gz")
    a, b = np.zeros((8, 8, 8), np.uint8), np.zeros((8, 8, 8), np.uint8)
    a[1:5, 1:5, 1:5], b[3:7, 3:7, 3:7] = 1, 1  # 2 x 2 x 2 voxels in common
    nib.save(nib.Nifti1Image(a, affine), tmp_path / "a.nii.gz")
    nib.save(nib.Nifti1Image(b, affine), tmp_path / "b.nii.gz")
    masks = {0: (tmp_path / "a.nii.gz", None), 69: (tmp_path / "b.nii.gz", None)}
    with pytest.raises(
        DataError, match=r"organ_a \(.*a\.nii\.gz\) and organ_b \(.*b\.nii\.gz\) overlap in 8 voxels"
    ):
        load_volume(
            tmp_path / "ct.nii.gz", masks, Preprocessing(2.0), class_names={0: "organ_a", 69: "organ_b"}
        )
    bits = load_volume(tmp_path / "ct.nii.gz", {0: masks[0], 63: masks[69]}, Preprocessing(2.0))
    assert (
        bits.labels.dtype == np.uint64
        and int((class_mask(bits.labels, 0) & class_mask(bits.labels, 63)).sum()) == 8
    )


def add_structures(root: Path, count: int) -> list[str]:
    """``count`` small boxes per case, away from every existing structure and from each other, each
    written as its own mask file beside the case's others (as TotalSegmentator's release does)."""
    names = [f"extra_{k:02d}" for k in range(count)]
    for case in sorted(p for p in root.iterdir() if (p / "segmentations").is_dir()):
        ref = nib.load(case / "ct.nii.gz")
        taken = np.zeros(ref.shape, bool)
        for f in (case / "segmentations").glob("*.nii.gz"):
            taken |= np.asarray(nib.load(f).dataobj) > 0
        corners = [(i, j, k) for i in range(0, ref.shape[0] - 4, 5) for j in range(0, ref.shape[1] - 4, 5)
                   for k in range(0, ref.shape[2] - 3, 4)
                   if not taken[i : i + 5, j : j + 5, k : k + 4].any()]  # fmt: skip
        assert len(corners) >= count, "room for the extra structures"
        for name, (i, j, k) in zip(names, corners, strict=False):
            mask = np.zeros(ref.shape, np.uint8)
            mask[i : i + 4, j : j + 4, k : k + 3] = 1
            nib.save(nib.Nifti1Image(mask, ref.affine), case / "segmentations" / f"{name}.nii.gz")
    return names


@pytest.mark.e2e
@pytest.mark.parametrize("n_classes", [40, 70])
def test_many_classes_train_and_predict(phantoms: Path, tmp_path: Path, n_classes: int) -> None:
    """The heart structures plus small extra ones: a LoRA fit and a predict through the command; the
    cached labels take the type the class count needs, and each class reads back its own file."""
    from lora_sam3d.cli import main

    root = tmp_path / "data"
    shutil.copytree(phantoms, root, ignore=shutil.ignore_patterns(".cache"))
    classes = TEST_CLASSES + add_structures(root, n_classes - len(TEST_CLASSES))
    cfg = run_config(tmp_path / "run", root, quiet=True)
    cfg["data"]["classes"] = classes
    assert main(["fit", "--config", str(write_yaml(cfg, tmp_path / "fit.yaml"))]) == 0
    entries = sorted((root / ".cache").glob("*/labels.npy"))
    assert entries, "the fit built cache entries"
    for path in entries:
        labels = np.load(path, mmap_mode="r")
        assert labels.dtype == label_dtype(n_classes)
    case = next(p for p in sorted(root.iterdir()) if (p / "segmentations").is_dir())
    found = next(c for c in discover_cases(root, classes) if c.case_id == case.name)
    volume = load_volume(found.image, found.class_masks, Preprocessing(2.0))
    for c in (0, n_classes - 1):  # each class is its own file, resampled as a mask alone would be
        alone = load_volume(found.image, {0: found.class_masks[c]}, Preprocessing(2.0))
        np.testing.assert_array_equal(class_mask(volume.labels, c), class_mask(alone.labels, 0))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = tmp_path / "run" / "predictions"
    assert main(["predict", "--config", str(tmp_path / "fit.yaml"), "--ckpt_path", str(ckpt),
                 "--trainer.limit_predict_batches", "2"]) == 0  # fmt: skip
    assert len(list(out.glob("*_mask.nii.gz"))) == 4, "two batches of two samples predicted"
