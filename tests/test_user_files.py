"""Defects found on users' own files, sessions and shells, each on real files through the code the
command runs: requests as sets, slices that collide on the model's grid, slice counts, a scan cut
inside the structure, intensities of another modality, mixed view counts in one batch, Ctrl-C and
SIGTERM during a cache build, a closed pipe."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SHAPES, TEST_DECODER

from lora_sam3d.data import DataError, PredictionDataset, Preprocessing, collate
from lora_sam3d.models import ModelConfig, Reconstructor

LV = "heart_ventricle_left"
EXTENTS = {LV: 60.0, "ball": 40.0}


def requests(items: list[dict], spacing: float = 1.5, **kw: object) -> PredictionDataset:
    return PredictionDataset(items, Preprocessing(spacing), EXTENTS, 2.0, 64, **kw)  # type: ignore[arg-type]


def lv_request(phantoms: Path, slices: list[dict]) -> dict:
    case = phantoms / "s0001"
    return {"image": str(case / "ct.nii.gz"), "mask": str(case / "segmentations" / f"{LV}.nii.gz"),
            "class_name": LV, "slices": slices}  # fmt: skip


def centre_slices(phantoms: Path) -> list[dict]:
    mask = np.asarray(nib.load(phantoms / "s0001" / "segmentations" / f"{LV}.nii.gz").dataobj) > 0
    c = np.argwhere(mask).mean(0).round().astype(int)
    return [{"axis": "axial", "index": int(c[2])}, {"axis": "coronal", "index": int(c[1])},
            {"axis": "sagittal", "index": int(c[0])}]  # fmt: skip


def test_slices_are_a_set_whatever_their_order(phantoms: Path) -> None:
    """Any order of a request's slices gives the same evidence, the same reconstruction (1e-5) and
    the same output name, so the duplicate-request check sees a reorder."""
    planes = centre_slices(phantoms)
    orders = ([0, 1, 2], [2, 0, 1], [1, 2, 0])
    data = requests([lv_request(phantoms, [planes[j] for j in order]) for order in orders])
    assert len(set(data.stems)) == 1, data.stems
    model = Reconstructor(ModelConfig(TEST_DECODER, base=SHAPES)).eval()
    batch = collate([data[k] for k in range(3)])
    with torch.no_grad():
        sdf = model(batch.evidence).sdf
    for k in (1, 2):
        torch.testing.assert_close(sdf[k], sdf[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch.evidence.frame_to_world[k], batch.evidence.frame_to_world[0])
    with pytest.raises(DataError, match=r"predict items 1 and 2 ask for the same reconstruction"):
        data.check_unique_outputs()


def test_two_file_slices_on_one_model_slice_are_refused(tmp_path: Path) -> None:
    """Coronal 30 and 31 of a 0.8 mm scan fall on one slice of a 1.5 mm model grid: refused, naming
    both, instead of reading one view twice under a name that claims two."""
    from test_data import sphere_case

    affine = np.diag([0.8, 0.8, 0.8, 1.0])
    sphere_case(tmp_path, "s0001", np.array([24.0, 24.0, 16.0]), 10.0, affine, (60, 60, 40))
    case = tmp_path / "s0001"
    item = {"image": str(case / "ct.nii.gz"), "mask": str(case / "segmentations" / "ball.nii.gz"),
            "class_name": "ball", "slices": [{"axis": "coronal", "index": 31}, {"axis": "coronal", "index": 32}]}  # fmt: skip
    with pytest.raises(
        DataError, match=r"slices coronal31 and coronal32 land on one slice of the model's grid"
    ):
        requests([item])
    item["slices"][1]["index"] = 33  # 1.6 mm apart: two slices of the model's grid
    assert [r.name for r in requests([item]).slices[0]] == ["coronal31", "coronal33"]


def test_empty_slices_are_dropped_before_the_count_is_checked(phantoms: Path) -> None:
    """A request of four slices, one of them empty, is three views: within a model trained with
    three. More slices than ``data.views`` asks for is an error naming both, not a silent choice."""
    planes = centre_slices(phantoms)
    empty = {"axis": "axial", "index": 31}  # the structure ends below the scan's last slices
    with pytest.warns(UserWarning, match=r"slice 4 \(axial31\) skipped"):
        data = requests([lv_request(phantoms, [*planes, empty])])
    assert len(data.slices[0]) == 3
    data.check_view_counts(trained=3, asked=None)
    with pytest.raises(DataError, match=r"has 3 slices with mask voxels but data\.views\.count is 1"):
        data.check_view_counts(trained=3, asked=1)
    with pytest.raises(DataError, match=r"3 views asked .* trained with at most 2 views"):
        data.check_view_counts(trained=2, asked=None)


def test_the_last_file_slice_of_a_scan_cut_inside_the_structure_reaches_the_model(tmp_path: Path) -> None:
    """A 0.8 mm scan whose last slices cut through the structure, along each axis: the last file
    slice, requested with the structure's 3D mask, gives the model that slice's mask."""
    from test_data import sphere_case

    # the 1.5 mm grid's last slice reads the file's slice 11 (of 0..13) at 0.8 mm, 20 (of 0..21) at 0.7 mm
    shape, spacing = (14, 22, 14), np.array([0.8, 0.7, 0.8])
    affine = np.diag([*spacing, 1.0])
    sphere_case(tmp_path, "s0001", (np.asarray(shape) - 1) * spacing - 2.0, 9.0, affine, shape)
    case = tmp_path / "s0001"
    for axis, name in enumerate(("sagittal", "coronal", "axial")):
        item = {"image": str(case / "ct.nii.gz"), "mask": str(case / "segmentations" / "ball.nii.gz"),
                "class_name": "ball", "axis": name, "index": shape[axis] - 1}  # fmt: skip
        sample = requests([item])[0]
        assert sample["view_mask"][0].any(), f"{name}: the last file slice's mask reached the model"
        assert sample["slice_name"] == f"{name}{shape[axis] - 1}"


def test_a_scan_unlike_the_model_s_modality_is_named(tmp_path: Path) -> None:
    """An MR-range scan (0..4000) read by a CT model: a warning naming the file and the share of
    voxels above the window; ``intensity_check: error`` refuses it. A CT-range scan passes."""
    from test_data import save, sphere_case

    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    sphere_case(tmp_path, "s0001", np.array([24.0, 24.0, 24.0]), 9.0, affine, (32, 32, 32))
    case = tmp_path / "s0001"
    ct = np.asarray(nib.load(case / "ct.nii.gz").dataobj)
    save((ct * 10 + 1000).astype(np.int16), affine, case / "mr.nii.gz")  # 1000..4000
    item = {"image": str(case / "mr.nii.gz"), "mask": str(case / "segmentations" / "ball.nii.gz"),
            "class_name": "ball", "axis": "axial", "index": 16}  # fmt: skip
    with pytest.warns(
        UserWarning,
        match=r"mr\.nii\.gz: read as CT \(data.preprocessing.modality: ct\); 100% of its voxels lie above the CT window.s top \(400 HU\)",
    ):
        requests([item])
    with pytest.raises(DataError, match=r"100% of its voxels .*intensity_check: error refuses it"):
        requests([item], intensity_check="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        requests([{**item, "image": str(case / "ct.nii.gz")}])


def test_samples_of_different_view_counts_collate_in_either_order(phantoms: Path) -> None:
    """A one-slice and a three-slice request in one batch, both orders: every sample keeps its
    views (padded rows are not valid) and reconstructs as it does alone."""
    planes = centre_slices(phantoms)
    one, three = requests([lv_request(phantoms, planes[:1])])[0], requests([lv_request(phantoms, planes)])[0]
    model = Reconstructor(ModelConfig(TEST_DECODER, base=SHAPES)).eval()
    with torch.no_grad():
        alone = [model(collate([s]).evidence).sdf[0] for s in (one, three)]
        for order in ((0, 1), (1, 0)):
            samples = [(one, three)[k] for k in order]
            batch = collate(samples)
            assert batch.evidence.valid.sum(1).tolist() == [[1, 3][k] for k in order]
            sdf = model(batch.evidence).sdf
            for row, k in enumerate(order):
                torch.testing.assert_close(sdf[row], alone[k], rtol=1e-5, atol=1e-5)


def test_a_checkpoint_loads_quietly(lora_run: Path) -> None:
    """``load_from_checkpoint`` rebuilds the frozen base from its file: no warning lists its keys as missing."""
    from lora_sam3d.training.module import LoRAMeshDecoderModule

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        LoRAMeshDecoderModule.load_from_checkpoint(lora_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert not [w for w in seen if "not in the checkpoint" in str(w.message)]


def test_a_plane_given_twice_is_named_as_given(phantoms: Path) -> None:
    planes = centre_slices(phantoms)
    z = planes[0]["index"]
    mm = float(nib.affines.apply_affine(nib.load(phantoms / "s0001" / "ct.nii.gz").affine, [0, 0, z])[2])
    twice = [planes[0], {"axis": "axial", "position_mm": mm}]
    with pytest.raises(
        DataError,
        match=rf"slices axial index {z}, axial position_mm {mm}\): slice 2 \(axial{z}\) is a plane given before",
    ):
        requests([lv_request(phantoms, twice)])


# ---------------------------------------------------------------------------------------------
# The cache command in a shell


def command(*args: str, **kw: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lora_sam3d.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, **kw,
    )  # fmt: skip


def finished_entries(cache: Path) -> int:
    return sum(1 for p in cache.glob("s*-*") if (p / "meta.json").is_file())


BIG = 5


@pytest.fixture(scope="module")
def big_phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five phantoms large enough that caching one takes a noticeable time (two build at once, so
    an interrupt after the first leaves some queued)."""
    from lora_sam3d.data import write_phantoms

    root = tmp_path_factory.mktemp("big") / "data"
    write_phantoms(root, n_cases=BIG, shape=(160, 160, 96))
    return root


@pytest.mark.e2e
@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_an_interrupted_cache_build_stops_and_keeps_what_it_finished(
    big_phantoms: Path, tmp_path: Path, stop: str
) -> None:
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) or SIGTERM (to the command
    alone, as ``kill`` or a scheduler sends it) during ``cache --build --workers 2``: the queued
    cases are not built, no temporary folder is left, one line says how many were cached and how
    to resume, exit 130; running the command again (after SIGTERM) builds the rest."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(big_phantoms, root, ignore=shutil.ignore_patterns(".cache"))
    cache = root / ".cache"
    args = ("cache", "--build", "--root", str(root), "--classes", LV, "--workers", "2")
    run = command(*args, start_new_session=True)
    deadline = time.time() + 240
    while finished_entries(cache) < 1 and run.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert run.poll() is None, "the build ended before it could be interrupted: " + run.stderr.read()[-2000:]
    if stop == "ctrl-c":
        os.killpg(run.pid, signal.SIGINT)
    else:
        os.kill(run.pid, signal.SIGTERM)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 130, err[-3000:]
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err and lines[-1].startswith("lora-sam3d: interrupted while "), err[-3000:]
    assert "run the same command again" in lines[-1]
    built = finished_entries(cache)
    assert 1 <= built < BIG, f"{built} entries: the queued cases were not built"
    assert f"{built} of {BIG} cases' labels cached, no image cut yet" in lines[-1], "it counts what is done"
    assert not [p for p in cache.rglob(".*") if p.name.endswith(".tmp")], "no temporary folder left"
    if stop == "ctrl-c":
        return  # resuming does not depend on the signal: checked once, after SIGTERM
    again = command(*args)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert finished_entries(cache) == BIG and f"{BIG} of {BIG} cases cached" in out


def test_a_closed_pipe_ends_quietly(phantoms: Path) -> None:
    """``lora-sam3d cache --root ... | head -1`` after ``head`` has gone: the pipe's reader is closed
    before the command writes, so every write fails as it does then; no error line, status 141."""
    build = command("cache", "--build", "--root", str(phantoms), "--classes", LV)
    assert build.wait(timeout=300) == 0, build.stderr.read()[-2000:]  # type: ignore[union-attr]
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "lora_sam3d.cli", "cache", "--root", str(phantoms)],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)  # fmt: skip
    finally:
        os.close(write_end)
    assert done.returncode == 141 and done.stderr == "", done.stderr
