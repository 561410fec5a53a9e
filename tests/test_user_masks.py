"""Masks and requests as a new user gives them, on real files and real runs: a label map is not a
mask, a request is named by whether the scan was read, a model setting the checkpoint contradicts
is refused, a drawn mask at the frame's edge or over unfamiliar tissue is named, and ``predict`` into
a closed pipe ends as a closed pipe does."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from lora_sam3d.cli import main
from lora_sam3d.data import DataError, PredictionDataset, Preprocessing
from lora_sam3d.data.settings import DataContract
from lora_sam3d.models.adapters.manifest import Manifest

OLD = Path(__file__).parent / "data" / "previous_main" / "last.ckpt"
"""A checkpoint of a model that reads the scan (see tests/data/previous_main/README.md)."""
LV = "heart_ventricle_left"
EXTENTS = {LV: 60.0, "heart_myocardium": 80.0}


def request(case: Path, mask: Path | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "image": str(case / "ct.nii.gz"),
        "mask": str(mask or case / "segmentations" / f"{LV}.nii.gz"),
        "class_name": LV,
        "index": 16,
        **extra,
    }


def label_map(case: Path, path: Path) -> Path:
    """The case's two heart structures in one file, 1 myocardium and 2 left ventricle (as
    TotalSegmentator's multi-label outputs are written)."""
    seg = nib.load(case / "segmentations" / "heart_myocardium.nii.gz")
    labels = (np.asarray(seg.dataobj) > 0).astype(np.uint8)
    labels[np.asarray(nib.load(case / "segmentations" / f"{LV}.nii.gz").dataobj) > 0] = 2
    nib.save(nib.Nifti1Image(labels, seg.affine), path)
    return path


def test_a_label_map_without_its_value_is_refused_naming_the_values(phantoms: Path, tmp_path: Path) -> None:
    case = phantoms / "s0001"
    labels = label_map(case, tmp_path / "labels.nii.gz")
    prep = Preprocessing(2.0)
    with pytest.raises(DataError, match=r"labels\.nii\.gz holds 2 label values \[1, 2\]: a label map"):
        PredictionDataset([request(case, labels)], prep, EXTENTS, 1.5, 64)
    with pytest.raises(DataError, match=r"holds no voxel of label value 7; values present: \[1, 2\]"):
        PredictionDataset([request(case, labels, label_value=7)], prep, EXTENTS, 1.5, 64)
    with_value = PredictionDataset([request(case, labels, label_value=2)], prep, EXTENTS, 1.5, 64)[0]
    plain = PredictionDataset([request(case)], prep, EXTENTS, 1.5, 64)[0]
    assert torch.equal(with_value["view_mask"], plain["view_mask"]), (
        "label value 2 is the ventricle's own mask"
    )
    assert with_value["native"]["gt"].sum() == plain["native"]["gt"].sum()
    # a training label file that is a label map: the case is refused naming the file and its values
    data = tmp_path / "data"
    shutil.copytree(phantoms, data, ignore=shutil.ignore_patterns(".cache"))
    label_map(data / "s0002", data / "s0002" / "segmentations" / f"{LV}.nii.gz")
    from lora_sam3d.data.volume import load_labels

    with pytest.raises(DataError, match=rf"label .*s0002/segmentations/{LV}\.nii\.gz holds 2 label values"):
        load_labels(
            data / "s0002" / "ct.nii.gz", {0: (data / "s0002" / "segmentations" / f"{LV}.nii.gz", None)}, prep
        )


def test_a_mask_reaching_the_frame_edge_is_named_with_the_sizes(phantoms: Path) -> None:
    case = phantoms / "s0001"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the class's own frame: not a word
        PredictionDataset([request(case)], Preprocessing(2.0), EXTENTS, 1.5, 64)[0]
    small = PredictionDataset([request(case)], Preprocessing(2.0), {LV: 16.0}, 1.5, 64)
    with pytest.warns(UserWarning, match=r"predict item 1 \(heart_ventricle_left in .*\): the mask of axial16 "
                      r"reaches the edge of the 24 mm frame .* larger than the frame"):  # fmt: skip
        small[0]


def test_one_run_reads_a_request_with_and_without_the_scan(phantoms: Path, tmp_path: Path) -> None:
    """The same slices twice, once with the scan and once without, through ``predict`` with a model
    that reads the scan: two outputs, told apart by their names and by every row's ``scan`` column."""
    case = phantoms / "s0001"
    out = tmp_path / "out"
    mask = nib.load(case / "segmentations" / f"{LV}.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(mask.dataobj)[:, :, 16], np.eye(4)), tmp_path / "slice16.nii.gz")
    items = [
        request(case),
        request(case, context="none"),
        request(case, tmp_path / "slice16.nii.gz", index=16),
    ]
    items[2]["slices"], items[2]["index"] = (
        [{"axis": "axial", "index": 16}, {"axis": "axial", "index": 18}],
        None,
    )
    items[2]["slices"][1]["mask"] = str(case / "segmentations" / f"{LV}.nii.gz")
    config = {
        "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path / "run"),
                    "callbacks": [{"class_path": "lora_sam3d.callbacks.MeshPredictionWriter",
                                   "init_args": {"output_dir": str(out), "write_png": False}}]},
        "data": {"predict": {"items": items}, "context": {"source": "volume"}},
    }  # fmt: skip
    path = tmp_path / "predict.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["predict", "--config", str(path), "--ckpt_path", str(OLD)]) == 0
    stem = f"s0001_{LV}_axial16"
    assert (out / f"{stem}.ply").is_file() and (out / f"{stem}_noscan.ply").is_file()
    with (out / "metrics.csv").open() as f:
        listed = list(csv.DictReader(f))
    rows = {r["scan"]: r for r in listed if r["slice"] == "axial16"}
    assert set(rows) == {"read", "not read"}
    assert rows["read"]["dice"] != rows["not read"]["dice"], "two reconstructions, not one written twice"
    # a request whose masks are slices only (no 3D truth): a row all the same, its drawn-slice Dice
    (unscored,) = [r for r in listed if r["slice"] == "axial16+axial18"]
    assert unscored["dice"] == "" and unscored["scored_against"] == ""
    assert float(unscored["drawn_dice"]) > 0.97 and all(float(r["drawn_dice"]) > 0.97 for r in listed)
    assert "<td>not read</td>" in (out / "report.html").read_text()


def test_a_model_setting_the_checkpoint_contradicts_is_refused_naming_both(
    phantoms: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = {"trainer": {"accelerator": "cpu", "logger": False},
              "data": {"predict": {"items": [request(phantoms / "s0001")]}}}  # fmt: skip
    path = tmp_path / "predict.yaml"
    path.write_text(yaml.safe_dump(config))
    for flag in (["--model.reads_context", "false"], ["--model.finetune.lora.rank", "8"]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the flat key's own rename warning
            code = main(["predict", "--config", str(path), "--ckpt_path", str(OLD), *flag])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and "but the checkpoint" in err and "was trained with" in err, err
    assert "model.finetune.lora.rank: 8" in err and "trained with 2" in err


def test_marked_tissue_unlike_the_training_scans_is_named(
    lora_run: Path, phantoms: Path, tmp_path: Path
) -> None:
    """A model stores what its classes looked like in training; a request whose drawn tissue is
    darker or brighter than that (inverted contrast, a 0..1 image) is named, a plain one is not."""
    ckpt = torch.load(lora_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    contract = DataContract.from_dict(Manifest.of_checkpoint(ckpt).data)
    assert contract.tissue and set(contract.tissue) == {LV, "heart_myocardium"}
    lo, hi, _, _ = contract.tissue[LV]
    assert 0.0 < lo <= hi < 1.0
    case = phantoms / "s0001"
    image = nib.load(case / "ct.nii.gz")
    values = np.asarray(image.dataobj, dtype=np.float32)
    variants = {"inverted": -values, "unit": (values - values.min()) / np.ptp(values)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PredictionDataset.from_settings([request(case)], contract)[0]
    for name, data in variants.items():
        path = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, image.affine), path)
        item = {**request(case), "image": str(path)}
        with pytest.warns(
            UserWarning, match=rf"predict item 1 \({LV} in .*{name}\.nii\.gz\): the marked tissue"
        ):
            PredictionDataset.from_settings([item], contract)[0]
        with pytest.raises(DataError, match=r"data\.predict\.intensity_check: error refuses it"):
            # a 0..1 image is refused as a scan (its values span no Hounsfield units) before its tissue
            PredictionDataset.from_settings([item], contract, intensity_check="error")[0]


@pytest.mark.e2e
def test_predict_into_a_closed_pipe_writes_everything_and_exits_141(phantoms: Path, tmp_path: Path) -> None:
    """``lora-sam3d predict ... | head -1``: the progress bar meets the closed pipe; every output is
    written and the status is a closed pipe's (141), not an error."""
    out = tmp_path / "out"
    config = {
        "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": True,
                    "default_root_dir": str(tmp_path / "run"),
                    "callbacks": [{"class_path": "lora_sam3d.callbacks.MeshPredictionWriter",
                                   "init_args": {"output_dir": str(out), "write_png": False}}]},
        "data": {"predict": {"items": [request(phantoms / "s0001")]}, "context": {"source": "volume"}},
    }  # fmt: skip
    path = tmp_path / "predict.yaml"
    path.write_text(yaml.safe_dump(config))
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "lora_sam3d.cli", "predict", "--config", str(path), "--ckpt_path", str(OLD)],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr[-2000:]
    assert (out / "metrics.csv").is_file() and (out / "report.html").is_file()
    assert "Traceback" not in done.stderr


def test_reconstruct_takes_the_yaml_spellings_of_context(phantoms: Path) -> None:
    """``context="none"`` is the slices alone (as ``False``), ``"volume"`` the scan (as ``True``), on
    a model that reads the scan; any other value is refused naming the accepted ones."""
    from lora_sam3d.models import Reconstructor
    from lora_sam3d.predict.api import reconstruct

    model = Reconstructor.from_adapter(OLD.parent / "adapter")
    case = phantoms / "s0001"
    args = (model, case / "ct.nii.gz", case / "segmentations" / f"{LV}.nii.gz", LV)
    sdf = {c: reconstruct(*args, index=16, context=c).prediction.sdf for c in ("none", False, "volume", True)}
    assert np.array_equal(sdf["none"], sdf[False]) and np.array_equal(sdf["volume"], sdf[True])
    assert not np.array_equal(sdf["none"], sdf["volume"]), "'none' does not read the scan"
    assert reconstruct(*args, index=16, context="none").name.endswith("_noscan")
    with pytest.raises(ValueError, match=r"context must be True, False, None, 'volume' or 'none'"):
        reconstruct(*args, index=16, context="scan")
