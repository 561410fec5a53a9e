"""What a user's scan and settings say is obeyed or named: how each scan is read and why, tissue the
scan cannot tell apart, classes the model never learned, parallel slices that cannot be joined, the
result cut at the scan, pieces away from the drawing, the drawing itself on the scan's grid, and
the small print of the outputs (real files, real runs, the shipped models)."""

from __future__ import annotations

import csv
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from jsonargparse import dict_to_namespace
from PIL import Image

from lora_sam3d import reconstruct
from lora_sam3d.cli.trainer import adopt_data_settings
from lora_sam3d.data import PredictionDataset, Preprocessing
from lora_sam3d.data.requests.masks import drawn_extent_mm
from lora_sam3d.data.settings import DataContract, DataSettings
from lora_sam3d.data.volume import read_modality
from lora_sam3d.geometry import mask_signed_distance
from lora_sam3d.inputs import Evidence
from lora_sam3d.models import Reconstructor
from lora_sam3d.models.drawing import drawn_dice
from lora_sam3d.predict.outputs import PreviewFile
from lora_sam3d.predict.report import ReportEntry, write_report
from lora_sam3d.predict.surface import keep_drawn_pieces

HERE = Path(__file__).parent
ADAPTER = HERE / "data" / "previous_main" / "adapter"
"""A stored adapter of a model that reads the scan (3 views, heart_ventricle_left and heart_myocardium)."""
CKPT = HERE / "data" / "previous_main" / "last.ckpt"
LV = "heart_ventricle_left"


@pytest.fixture(scope="module")
def model() -> Reconstructor:
    return Reconstructor.from_adapter(ADAPTER)


def contract(**changes: object) -> DataContract:
    from dataclasses import replace

    return replace(DataContract.from_dict(Reconstructor.from_adapter(ADAPTER).data_contract), **changes)


def item(case: Path, image: Path | None = None, mask: Path | None = None, **extra: object) -> dict:
    if "slices" in extra:
        extra.setdefault("index", None)
    return {"image": str(image or case / "ct.nii.gz"), "mask": str(mask or case / "segmentations" / f"{LV}.nii.gz"),
            "class_name": LV, "axis": "axial", "index": 16} | extra  # fmt: skip


def messages(record: list[warnings.WarningMessage]) -> str:
    return "\n".join(str(w.message) for w in record)


# -- 1 and 8: how each scan is read, and a doubt named -------------------------------------------
def test_each_scan_s_reading_is_said_and_doubts_are_named(tmp_path: Path) -> None:
    """`read_modality` on the cases users meet: a CT cropped to the abdomen (0.86% air), an MR saved
    as ``ct.nii.gz``, a z-scored MR under ``auto`` and under ``mr``, a 0..1-normalised CT."""
    rng = np.random.default_rng(0)
    auto, mr = Preprocessing(modality="auto"), Preprocessing(modality="mr")
    soft = rng.normal(40, 30, 100_000).astype(np.float32)
    cropped = soft.copy()
    cropped[:860] = -900  # 0.86% air: an abdomen crop
    reading = read_modality(auto, "scan.nii.gz", cropped)
    assert reading.modality == "mr" and "0.86%" in reading.why
    assert "close to the 1% the rule reads CT from" in (reading.doubt or "")
    magnitude = rng.uniform(0, 700, 100_000).astype(
        np.float32
    )  # an MR whose values stay mostly in the window
    reading = read_modality(auto, "ct.nii.gz", magnitude)
    assert reading.modality == "ct" and "by its file name ct.nii.gz" in reading.why
    assert "no voxel lies at or below -500 HU (air): is it an MR?" in (reading.doubt or "")
    zscored = rng.normal(0, 1, 100_000).astype(np.float32)
    assert "negative (a z-scored MR?)" in (read_modality(auto, "scan.nii.gz", zscored).doubt or "")
    assert read_modality(mr, "scan.nii.gz", zscored).doubt is None, "a z-scored MR read as MR, as asked"
    unit = (soft - soft.min()) / np.ptp(soft)
    assert "not the hundreds of Hounsfield units" in (read_modality(auto, "ct.nii.gz", unit).doubt or "")
    assert read_modality(auto, "ct.nii.gz", np.concatenate([cropped, -1000 + 0 * soft[:3000]])).doubt is None


def test_a_relative_reader_names_a_rescaled_scan_and_tissue_it_cannot_tell_apart(
    phantoms: Path, tmp_path: Path
) -> None:
    """The demo's kind of model (relative reading, ``modality: auto``) given a 0..1-normalised CT
    named ``ct.nii.gz``: the scan's range and the marked tissue (read flat) are both named; with
    ``intensity_check: error`` refused. The scan as it is passes silently."""
    case = phantoms / "s0001"
    scan = nib.load(case / "ct.nii.gz")
    values = np.asarray(scan.dataobj, dtype=np.float32)
    unit = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image((values - values.min()) / np.ptp(values), scan.affine), unit)
    relative = contract(context_reading="relative", modality="auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PredictionDataset.from_settings([item(case)], relative)[0]
    with pytest.warns(UserWarning) as record:
        PredictionDataset.from_settings([item(case, unit)], relative)[0]
    said = messages(record)
    assert f"image {unit}: read as CT (modality: auto, by its file name ct.nii.gz); its values span" in said
    assert "the marked tissue reads like the tissue around it" in said
    with pytest.raises(Exception, match=r"intensity_check: error refuses it"):
        PredictionDataset.from_settings([item(case, unit)], relative, intensity_check="error")


# -- 3: a class the model never learned ----------------------------------------------------------
def test_a_class_the_model_was_not_trained_on_is_named(phantoms: Path) -> None:
    case = phantoms / "s0001"
    request = item(case, class_name="kidney_left")
    with pytest.warns(UserWarning, match=r"the model was not trained on kidney_left \(it was on "
                      r"heart_ventricle_left, heart_myocardium\).*the frame comes from the extent given \(70 mm; a request of several slices by its drawing\)"):  # fmt: skip
        PredictionDataset.from_settings([request], contract(), {"kidney_left": 70.0})


# -- 4: the scan's units asked for on the command line are obeyed --------------------------------
def test_the_modality_asked_of_a_relative_reader_is_obeyed_and_of_others_refused() -> None:
    """``--data.preprocessing.modality ct`` (the setting's default value) with a checkpoint that
    stored ``auto``: kept for a model reading relative to the drawing, refused for one reading
    absolute units, and the stored value taken when nobody asked."""
    stored = contract(context_reading="relative", modality="auto").to_dict()

    def data(modality: str) -> object:
        return dict_to_namespace(DataSettings.from_dict({"preprocessing": {"modality": modality}}).to_dict())

    asked = frozenset({"preprocessing.modality"})
    cfg = data("ct")
    adopt_data_settings(cfg, stored, "the checkpoint", asked)
    assert cfg.get("preprocessing.modality") == "ct"
    cfg = data("ct")
    adopt_data_settings(cfg, stored, "the checkpoint")
    assert cfg.get("preprocessing.modality") == "auto", "nobody asked: as trained"
    with pytest.raises(
        ValueError, match=r"data\.preprocessing\.modality is 'ct' but the checkpoint was trained with 'auto'"
    ):
        adopt_data_settings(data("ct"), {**stored, "context_reading": "absolute"}, "the checkpoint", asked)


# -- 2 and 8: predict reads the scan as the model was trained, and says so ----------------------
@pytest.mark.e2e
def test_predict_reads_the_scan_as_trained_and_logs_each_scan_s_reading(
    phantoms: Path, tmp_path: Path
) -> None:
    """A predict config that leaves out ``data.context.source`` with a checkpoint trained with the
    scan: the scan is read (as `reconstruct` reads it), the log says so and how the scan was read,
    and ``metrics.csv`` carries the modality and what the outputs kept."""
    out = tmp_path / "out"
    truth = nib.load(phantoms / "s0001" / "segmentations" / f"{LV}.nii.gz")
    values = np.asarray(truth.dataobj) > 0
    x, y = (int(np.flatnonzero(values.any(axis=tuple(b for b in range(3) if b != a))).mean()) for a in (0, 1))
    three = [
        {"axis": "axial", "index": 16},
        {"axis": "coronal", "index": y},
        {"axis": "sagittal", "index": x},
    ]
    config = {"trainer": {"accelerator": "cpu", "logger": False, "default_root_dir": str(out),
                          "callbacks": [{"class_path": "lora_sam3d.callbacks.MeshPredictionWriter",
                                         "init_args": {"output_dir": str(out), "write_png": False}}]},
              "data": {"predict": {"items": [item(phantoms / "s0001"), item(phantoms / "s0001", slices=three)]}}}  # fmt: skip
    path = tmp_path / "predict.yaml"
    path.write_text(yaml.safe_dump(config))
    run = subprocess.run([sys.executable, "-m", "lora_sam3d.cli", "predict", "--config", str(path), "--ckpt_path", str(CKPT)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "requests read with the scan around the slices (as the model was trained)" in run.stderr
    assert (
        f"image {phantoms / 's0001' / 'ct.nii.gz'}: read as CT (data.preprocessing.modality: ct)"
        in run.stderr
    )
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [(r["slice"], r["scan"], r["modality"], r["mesh"]) for r in rows] == [
        ("axial16", "read", "ct", "cut at scan"),
        (f"axial16+coronal{y}+sagittal{x}", "read", "ct", "cut at scan"),
    ]
    assert not list(out.glob("*_noscan*"))
    # one slice is framed by its class, several by their drawing: the box of the drawn masks, in mm
    extent = contract().extent_mm[LV]
    planes = [(2, 16, values[:, :, 16]), (1, y, values[:, y]), (0, x, values[x])]
    drawn = drawn_extent_mm(planes, np.linalg.norm(truth.affine[:3, :3], axis=0))
    assert drawn > 0
    assert [r["frame"] for r in rows] == [
        f"the class's extent ({extent:.0f} mm)",
        f"the drawing ({drawn:.0f} mm)",
    ]
    asked = PredictionDataset.from_settings(
        [item(phantoms / "s0001", slices=three)], contract(), frame_from="class"
    )
    assert asked.frames == [("the class's extent", extent)]


# -- 5: the result ends where the scan ends -------------------------------------------------------
def test_a_structure_cut_by_the_scan_is_cut_and_closed_there(
    phantoms: Path, tmp_path: Path, model: Reconstructor
) -> None:
    """A scan that ends inside the ventricle: the mesh stays in the scan's box and is closed (every
    edge in two faces), its volume is the mask's; asked to, the surface past the scan is kept and
    named ``_beyond_scan``, and how far it reached is in the record."""
    import trimesh

    case = phantoms / "s0001"
    scan, truth = nib.load(case / "ct.nii.gz"), nib.load(case / "segmentations" / f"{LV}.nii.gz")
    z = np.flatnonzero(np.asarray(truth.dataobj).any(axis=(0, 1)))
    top = int(z.mean()) + 2  # the scan's last slice runs through the ventricle
    for img, name in ((scan, "ct.nii.gz"), (truth, "lv.nii.gz")):
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, : top + 1], img.affine), tmp_path / name)
    args = (model, tmp_path / "ct.nii.gz", tmp_path / "lv.nii.gz", LV)
    cut = reconstruct(*args, index=top - 4, context="none")  # from the slice alone: it extrapolates
    spacing = np.abs(np.diag(scan.affine)[:3])
    vox = (np.linalg.inv(scan.affine) @ np.c_[cut.mesh.vertices, np.ones(len(cut.mesh.vertices))].T)[:3].T
    assert vox[:, 2].max() <= top + 0.5 + 0.25, (
        "the mesh ends at the scan's last voxel (smoothed: within a quarter voxel)"
    )
    mesh = trimesh.Trimesh(cut.mesh.vertices, cut.mesh.faces, process=True)
    assert mesh.is_watertight
    mask_ml = float(np.asarray(cut.mask.dataobj).sum() * np.prod(spacing)) / 1000
    assert abs(mesh.volume / 1000 - mask_ml) < 0.15 * mask_ml, (mesh.volume / 1000, mask_ml)
    assert cut.prediction.beyond_scan_mm > spacing[2], "the network's surface did reach past the scan"
    kept = reconstruct(*args, index=top - 4, context="none", beyond_scan=True)
    vox = (np.linalg.inv(scan.affine) @ np.c_[kept.mesh.vertices, np.ones(len(kept.mesh.vertices))].T)[:3].T
    assert vox[:, 2].max() > top + 1 and kept.prediction.mesh_beyond_scan
    from lora_sam3d.predict.outputs import MeshFiles

    written = MeshFiles().write(kept.prediction, kept.mesh, tmp_path)
    assert [p.name for p in written] == [
        f"{kept.prediction.stem}_beyond_scan.ply",
        f"{kept.prediction.stem}_truth.ply",
    ]


# -- 6: a piece away from the drawing ------------------------------------------------------------
def evidence_of(drawn: np.ndarray, axis: int = 2, offset: float = 0.0) -> Evidence:
    s = drawn.shape[0]
    one = lambda v, dtype=None: torch.as_tensor(np.asarray(v), dtype=dtype)[None, None]  # noqa: E731
    return Evidence(
        image=torch.zeros(1, 1, s, s), mask=one(drawn, torch.bool), distance=one(mask_signed_distance(drawn)),
        axis=one(axis, torch.long), index=one(0, torch.long), offset=one(offset, torch.float32),
        valid=torch.ones(1, 1, dtype=torch.bool), frame_to_world=torch.eye(4, dtype=torch.float64)[None],
        sample_ids=["s"],
    )  # fmt: skip


def test_pieces_that_touch_no_drawing_are_removed_and_counted() -> None:
    """Two balls, the drawing through one: the other is removed (one piece counted); a prediction
    none of whose pieces meets the drawing is left whole."""
    n = 32
    u = np.arange(n + 1) / n - 0.5
    x, y, z = np.meshgrid(u, u, u, indexing="ij")
    ball = lambda c: np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) - 0.12  # noqa: E731
    sdf = torch.as_tensor(np.minimum(ball((0, 0, 0)), ball((0.2, 0.2, 0.32))), dtype=torch.float32)[None]
    px = (np.arange(64) + 0.5) / 64 - 0.5
    disk = (px[:, None] ** 2 + px[None, :] ** 2) < 0.1**2
    kept, removed = keep_drawn_pieces(sdf, evidence_of(disk))
    assert removed == [1]
    assert (kept[0] < 0).sum() < (sdf[0] < 0).sum() and bool(kept[0][16, 16, 16] < 0)
    assert not bool(kept[0][22, 22, 26] < 0), "the ball past the drawing is gone"
    away = np.roll(disk, 28, axis=0)
    _, removed = keep_drawn_pieces(sdf, evidence_of(away & ~disk))
    assert removed == [0]


# -- 7: an empty result does not agree with its drawing ------------------------------------------
def test_an_empty_prediction_scores_zero_on_the_drawn_slices() -> None:
    empty = torch.ones(1, 17, 17, 17)
    assert drawn_dice(empty, evidence_of(np.zeros((64, 64), dtype=bool))) == [0.0]
    tiny = np.zeros((64, 64), dtype=bool)
    tiny[31:33, 32] = True
    assert drawn_dice(empty, evidence_of(tiny)) == [0.0]


# -- 9: parallel slices that cannot be joined ----------------------------------------------------
def test_parallel_slices_whose_masks_share_no_pixel_are_named(phantoms: Path, tmp_path: Path) -> None:
    case = phantoms / "s0001"
    truth = nib.load(case / "segmentations" / f"{LV}.nii.gz")
    labels = np.asarray(truth.dataobj).copy()
    labels[:, :, 18] = 0
    labels[38:46, 38:46, 18] = 1  # slice 18 drawn away from slice 14's mask (shifted, or on a neighbour)
    assert not (labels[:, :, 14] & labels[:, :, 18]).any()
    shifted = tmp_path / "shifted.nii.gz"
    nib.save(nib.Nifti1Image(labels, truth.affine), shifted)
    stack = [{"axis": "axial", "index": 14}, {"axis": "axial", "index": 18}]
    with pytest.warns(
        UserWarning, match=r"the masks of the parallel slices axial14 and axial18 share no pixel in-plane"
    ):
        PredictionDataset.from_settings([item(case, mask=shifted, slices=stack)], contract())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PredictionDataset.from_settings([item(case, slices=stack)], contract())


# -- 10: the drawing itself on the scan's grid ---------------------------------------------------
def test_the_mask_written_on_every_drawn_slice_is_the_drawing(tmp_path: Path, model: Reconstructor) -> None:
    """A 0.8 x 0.8 x 3 mm scan, one and three slices: on every drawn file slice the mask on the
    scan's grid is the user's mask, voxel for voxel, with or without truth to score against."""
    from lora_sam3d.data import write_phantoms

    root = tmp_path / "aniso"
    write_phantoms(root, n_cases=1, shape=(80, 80, 24), spacing=(0.8, 0.8, 3.0), seed=11)
    case = root / "s0001"
    truth = np.asarray(nib.load(case / "segmentations" / f"{LV}.nii.gz").dataobj) > 0
    cx, cy, cz = (int(np.flatnonzero(truth.any(axis=a)).mean()) for a in ((1, 2), (0, 2), (0, 1)))
    slice_mask = tmp_path / "slice.nii.gz"
    only = np.zeros_like(truth)
    only[:, :, cz] = truth[:, :, cz]
    nib.save(nib.Nifti1Image(only.astype(np.uint8), nib.load(case / "ct.nii.gz").affine), slice_mask)
    three = [
        {"axis": "axial", "index": cz},
        {"axis": "sagittal", "index": cx},
        {"axis": "coronal", "index": cy},
    ]
    for mask, kw in (
        (case / "segmentations" / f"{LV}.nii.gz", {"slices": three}),
        (slice_mask, {"index": cz}),
    ):
        result = reconstruct(model, case / "ct.nii.gz", mask, LV, **kw)
        written = np.asarray(result.mask.dataobj) > 0
        for axis, index in ((2, cz), (0, cx), (1, cy))[: 3 if "slices" in kw else 1]:
            got, want = np.take(written, index, axis=axis), np.take(truth, index, axis=axis)
            assert np.array_equal(got, want), (axis, index, int((got != want).sum()))


# -- 11: the small print -------------------------------------------------------------------------
def test_previews_draw_the_truth_they_name_and_the_mask_keeps_the_scan_s_codes(
    phantoms: Path, tmp_path: Path, model: Reconstructor
) -> None:
    """A request scored against its 3D mask: the preview shows that truth in green, as its caption
    says; the mask written keeps the scan's sform code (2, aligned) and qform code."""
    case = phantoms / "s0001"
    scan = nib.load(case / "ct.nii.gz")
    coded = nib.Nifti1Image(np.asarray(scan.dataobj), scan.affine)
    coded.set_sform(scan.affine, code=2)
    coded.set_qform(scan.affine, code=1)
    nib.save(coded, tmp_path / "ct.nii.gz")
    result = reconstruct(model, tmp_path / "ct.nii.gz", case / "segmentations" / f"{LV}.nii.gz", LV, index=16)
    assert int(result.mask.header["sform_code"]) == 2 and int(result.mask.header["qform_code"]) == 1
    (png,) = PreviewFile().write(result.prediction, result.mesh, tmp_path)
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    green = (rgb[..., 1] > 150) & (rgb[..., 0] < 80)
    yellow = (rgb[..., 1] > 150) & (rgb[..., 0] > 150) & (rgb[..., 2] < 80)
    assert green.sum() + yellow.sum() > 200, "the truth is drawn"


def test_the_report_s_dice_box_keeps_runs_with_and_without_the_scan_apart(tmp_path: Path) -> None:
    metrics = {"dice": 0.9, "hd95_mm": 2.0, "assd_mm": 1.0, "nsd": 0.9}
    entries = [ReportEntry(stem=f"s{k}", case_id="c", class_name=LV, slice_name="axial16", scan=scan,
                           metrics=metrics, scored_against="request mask", view=None, drawn_dice=1.0)
               for k, scan in enumerate(("read", "not read"))]  # fmt: skip
    page = write_report(tmp_path / "report.html", entries, "t").read_text()
    assert f"{LV}, scan read" in page and f"{LV}, scan not read" in page


def test_predicting_requests_caches_no_training_case(phantoms: Path, tmp_path: Path) -> None:
    """``predict`` of requests with a data root configured (the demo's config and the shipped base):
    the root's cases are not cached when every request's class has its extent."""
    import shutil

    from lora_sam3d.training.datamodule import TSDataModule

    root = tmp_path / "data"
    shutil.copytree(phantoms, root, ignore=shutil.ignore_patterns(".cache"))
    dm = TSDataModule(root=str(root), classes=[LV], frame={"extent_mm": {LV: 64.0}},
                      predict={"items": [item(phantoms / "s0001")]})  # fmt: skip
    dm.prepare_data()
    dm._request_dataset()
    assert not (root / ".cache").exists() and not any(root.rglob("*.npy"))
