"""Data flow steps 1-4 on real NIfTI files: volumes, cache, splits, frames, targets, phantoms, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import data_groups, data_settings
from torch.utils.data import DataLoader

from lora_sam3d.data import (
    HEART_CLASSES,
    DataError,
    PhantomSpec,
    PredictItem,
    Preprocessing,
    TS_SAM3D_Dataset,
    TSDataModule,
    collate,
    discover_cases,
    load_volume,
    phantom_label_values,
    write_phantoms,
)
from lora_sam3d.data.dataset import EpochOffsetDistributedSampler, EpochShuffleSampler
from lora_sam3d.data.phantoms import grid_affine
from lora_sam3d.data.settings import DataSettings
from lora_sam3d.inputs import Sample

SMALL = dict(shape=(56, 56, 40), spacing=(1.8, 1.8, 2.6))


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    write_phantoms(root, n_cases=5, **SMALL)
    return root


DATASET_ARGS = ("classes", "split", "slice_sampling_method", "augment", "score_targets")


def dataset(root: Path, **kw) -> TS_SAM3D_Dataset:
    """A dataset of ``root``: `TS_SAM3D_Dataset`'s own arguments from ``kw``, the rest settings by
    their flat names (`data_settings`) over R = 8, 2 mm and a cache beside ``root``."""
    own = {"classes": HEART_CLASSES} | {k: kw.pop(k) for k in DATASET_ARGS if k in kw}
    flat = {"resolution": 8, "spacing": 2.0, "cache_dir": root.parent / f"{root.name}-cache"} | kw
    return TS_SAM3D_Dataset(root, **own, settings=data_settings(**flat))


def save(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def sphere_case(
    root: Path, case_id: str, centre_mm: np.ndarray, radius_mm: float, affine: np.ndarray, shape
) -> None:
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    inside = np.linalg.norm(world - centre_mm, axis=-1) < radius_mm
    save(np.where(inside, 300, 0).astype(np.int16), affine, root / case_id / "ct.nii.gz")
    save(inside.astype(np.uint8), affine, root / case_id / "segmentations" / "ball.nii.gz")


# ---------------------------------------------------------------------------------------------
# Volumes


def test_reorient_and_resample_keep_world_positions(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    shape = (40, 44, 30)
    affine = grid_affine(shape, (1.3, 1.1, 2.2), rng)  # flipped x, oblique, anisotropic
    centre = affine[:3, :3] @ np.array([17.0, 25.0, 12.0]) + affine[:3, 3]
    sphere_case(tmp_path, "s0001", centre, 6.0, affine, shape)
    vol = load_volume(
        tmp_path / "s0001" / "ct.nii.gz",
        {0: (tmp_path / "s0001" / "segmentations" / "ball.nii.gz", None)},
        Preprocessing(1.0),
    )
    assert np.allclose(np.linalg.norm(vol.affine[:3, :3], axis=0), 1.0), "isotropic 1 mm"
    assert np.all(np.diag(vol.affine[:3, :3]) > 0), "closest canonical orientation is RAS"
    got = vol.affine[:3, :3] @ np.argwhere(vol.labels > 0).mean(0) + vol.affine[:3, 3]
    assert np.linalg.norm(got - centre) < 0.5, "the structure stays at its world position (mm)"
    assert vol.image.min() >= 0 and vol.image.max() <= 1


def test_canonical_grid_from_the_header_is_nibabels() -> None:
    """The labels pass reads only the image's header: its canonical shape and affine equal what
    nibabel's reorientation gives, for every axis order and flip."""
    from itertools import permutations

    from lora_sam3d.data.nifti import canonical_grid

    data = np.zeros((5, 6, 7), np.float32)
    for order in permutations(range(3)):
        for flips in range(8):
            affine = np.eye(4)
            signs = [-1.0 if flips >> k & 1 else 1.0 for k in range(3)]
            affine[:3, :3] = np.diag([0.8, 0.9, 1.5])[:, list(order)] * signs
            affine[:3, 3] = [10.0, -20.0, 30.0]
            img = nib.Nifti1Image(data, affine)
            shape, grid = canonical_grid(img)
            expected = nib.as_closest_canonical(img)
            assert shape == expected.shape and np.allclose(grid, expected.affine), (order, flips)


def test_sdf_of_a_sphere_is_within_half_a_voxel(tmp_path: Path) -> None:
    shape = (48, 48, 48)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = -24
    centre, radius = np.array([1.3, -2.1, 0.7]), 11.0
    sphere_case(tmp_path, "s0001", centre, radius, affine, shape)
    ds = TS_SAM3D_Dataset(tmp_path, ["ball"], slice_sampling_method="central", settings=data_settings(resolution=8, spacing=1.0, cache_dir=tmp_path / "c", extent_mm={"ball": 24.0}, sdf_truncation_mm=6.0))  # fmt: skip
    sample = ds[0]
    side = 2 * 24.0
    n = 33
    axis = np.arange(n) / (n - 1) - 0.5
    u = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1)
    f2w = sample["frame_to_world"].numpy()
    world = u @ f2w[:3, :3].T + f2w[:3, 3]
    analytic = np.linalg.norm(world - centre, axis=-1) - radius
    got = sample["gt_sdf"].numpy() * side
    near = np.abs(analytic) < 6.0 - 1.0
    assert near.sum() > 1000
    err = np.abs(got[near] - analytic[near])
    assert err.max() <= 0.5 + 1e-6, f"max SDF error {err.max():.3f} mm (voxel 1 mm)"
    assert np.allclose(got[analytic > 8.0], 6.0, atol=1e-4), "truncated outside"
    occ = sample["gt_occupancy"].numpy()
    cells = (np.arange(32) + 0.5) / 32 - 0.5
    uc = np.stack(np.meshgrid(cells, cells, cells, indexing="ij"), -1)
    d = np.linalg.norm(uc @ f2w[:3, :3].T + f2w[:3, 3] - centre, axis=-1) - radius
    assert np.all(occ[d < -1.0]) and not np.any(occ[d > 1.0])


# ---------------------------------------------------------------------------------------------
# Samples


def test_sample_keys_and_shapes(phantom_root: Path) -> None:
    ds = dataset(phantom_root, split="train")
    s = ds[0]
    k = len(s["view_valid"])
    assert (
        s["view_image"].shape == (k, 32, 32) and s["view_mask"].shape == (k, 32, 32) and s["view_valid"].all()
    )
    assert set(s) <= set(Sample.__annotations__), "one typed sample: no key nothing reads"
    assert s["gt_sdf"].shape == (33, 33, 33) and s["gt_occupancy"].shape == (32, 32, 32)
    assert s["frame_to_world"].shape == (4, 4) and s["class_name"] in HEART_CLASSES
    # the slice lies on its plane: the frame's centre along the axis plus the offset is the slice index
    to_grid = np.linalg.inv(ds.cases[0].affine) @ s["frame_to_world"].numpy()
    axis, index, offset = int(s["view_axis"][0]), int(s["view_index"][0]), float(s["view_offset"][0])
    side = np.linalg.norm(to_grid[:3, axis])
    assert np.isclose((to_grid @ np.array([0, 0, 0, 1.0]))[axis] + offset * side, index, atol=1e-4)
    batch = collate([ds[i] for i in range(3)])
    assert batch.targets.sdf is not None and batch.targets.sdf.shape == (3, 33, 33, 33) and len(batch) == 3
    assert s["gt_coarse_occupancy"].shape == (8, 8, 8) and s["gt_coarse_occupancy"].any()
    native = s["native"]
    bit = HEART_CLASSES.index(s["class_name"])
    assert native["gt"].sum() == ds.cases[0].class_info(bit)["native_voxels"], (
        "the whole structure is in the box"
    )
    assert np.allclose(native["spacing_mm"], [1.8, 1.8, 2.6]), "scored at the source file's own spacing"


def test_float_masks_read_as_the_integers_they_mean(phantom_root: Path, tmp_path: Path) -> None:
    """Masks written as float64 by other tools, with values 1 +- 1e-6: the same voxels as the integer mask."""
    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    reference = dataset(phantom_root, split=None, cache_dir=tmp_path / "c1")
    for case in root.iterdir():
        if not case.is_dir():
            continue
        for label in (case / "segmentations").iterdir():
            img = nib.load(str(label))
            data = np.asarray(img.dataobj).astype(np.float64)
            noise = np.random.default_rng(0).uniform(-1e-6, 1e-6, data.shape)
            nib.save(nib.Nifti1Image(data + noise * (data > 0), img.affine), str(label))
    assert nib.load(str(next(root.glob("*/segmentations/*.nii.gz")))).get_data_dtype() == np.float64
    floated = dataset(root, split=None, cache_dir=tmp_path / "c2")
    for a, b in zip(reference.cases, floated.cases, strict=True):
        for bit in range(len(HEART_CLASSES)):
            assert a.class_info(bit)["native_voxels"] == b.class_info(bit)["native_voxels"] > 0
            assert a.class_info(bit)["voxels"] == b.class_info(bit)["voxels"]


def test_frame_ignores_3d_label_away_from_slice(phantom_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    ds = dataset(root, split="val", slice_sampling_method="central")
    before = ds[0]
    case_id, axis, index, bit = (
        before["case_id"],
        int(before["view_axis"][0]),
        int(before["view_index"][0]),
        int(before["class_index"]),
    )
    label_path = root / case_id / "segmentations" / f"{before['class_name']}.nii.gz"
    img = nib.load(str(label_path))
    data = np.asarray(img.dataobj).copy()
    # Grow the structure everywhere more than 4 voxels (of the resampled grid) away from the slice.
    vox = np.stack(np.meshgrid(*[np.arange(n) for n in data.shape], indexing="ij"), -1)
    world = vox @ img.affine[:3, :3].T + img.affine[:3, 3]
    to_grid = np.linalg.inv(ds.cases[0].affine)
    along = (world @ to_grid[:3, :3].T + to_grid[:3, 3])[..., axis]
    data[(np.abs(along - index) > 4) & (np.roll(data, 3, axis=0) > 0)] = 1
    nib.save(nib.Nifti1Image(data, img.affine), str(label_path))
    rebuilt = dataset(root, split="val", slice_sampling_method="central")
    assert rebuilt.extent_mm == ds.extent_mm, "extents come from the training split only"
    after = rebuilt.make_sample(rebuilt.cases[0], bit, axis, index)
    assert torch.equal(after["frame_to_world"], before["frame_to_world"])
    assert torch.equal(after["view_image"], before["view_image"]) and torch.equal(
        after["view_mask"], before["view_mask"]
    )
    assert not torch.equal(after["gt_occupancy"], before["gt_occupancy"]), "the 3D target did change"


def test_sampling_methods(phantom_root: Path) -> None:
    central = dataset(phantom_root, split="train", slice_sampling_method="central")
    assert len(central) == 3 * 5 * 3  # cases x classes x axes
    uniform = dataset(phantom_root, split="train", slice_sampling_method="uniform", slices_per_axis=4)
    everything = dataset(phantom_root, split="train", slice_sampling_method="all", axes=(2,))
    assert len(central) < len(uniform) <= 4 * len(central) < len(everything) * 3
    for ci, case in enumerate(everything.cases):  # "all": every slice with >= min_occupancy of the peak area
        labels = np.asarray(case.labels)
        for bit in range(len(HEART_CLASSES)):
            areas = ((labels >> np.uint32(bit)) & 1).sum(axis=(0, 1))
            expected = np.flatnonzero(areas >= max(1.0, 0.2 * areas.max())).tolist()
            got = [index for c, b, axis, index in everything.items if (c, b) == (ci, bit) and axis == 2]
            assert got == expected, (case.case_id, bit)
    rand = dataset(phantom_root, split="train", samples_per_class=2)
    assert len(rand) == 3 * 5 * 2
    loose = dataset(phantom_root, split="train", slice_sampling_method="all", min_occupancy=0.0)
    strict = dataset(phantom_root, split="train", slice_sampling_method="all", min_occupancy=0.5)
    assert len(strict) < len(loose)


def test_deterministic_with_workers(phantom_root: Path) -> None:
    ds = dataset(phantom_root, split="train", samples_per_class=1, augment=True)
    batches = []
    for workers in (0, 2):
        loader = DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate)
        batches.append([b for _, b in zip(range(2), loader, strict=False)])
    for a, b in zip(*batches, strict=True):
        assert a.info.case_id == b.info.case_id
        assert torch.equal(a.evidence.axis, b.evidence.axis) and torch.equal(
            a.evidence.index, b.evidence.index
        )
        assert torch.equal(a.evidence.image, b.evidence.image) and torch.equal(a.targets.sdf, b.targets.sdf)
    epoch0 = [(int(ds[i]["view_axis"][0]), int(ds[i]["view_index"][0])) for i in range(6)]
    epoch1 = [(int(ds[len(ds) + i]["view_axis"][0]), int(ds[len(ds) + i]["view_index"][0])) for i in range(6)]
    assert epoch0 != epoch1, "random_axis draws vary by epoch"
    sampler = EpochShuffleSampler(len(ds), seed=3)
    sampler.set_epoch(2)
    order = list(sampler)
    assert sorted(order) == list(range(2 * len(ds), 3 * len(ds)))
    again = EpochShuffleSampler(len(ds), seed=3)
    again.set_epoch(2)
    assert list(again) == order, "the order depends on (seed, epoch) only: a resumed run sees the same"
    shards = []
    for rank in (0, 1):
        dist = EpochOffsetDistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        dist.set_epoch(2)
        shards.append(list(dist))
    overlap = set(shards[0]) & set(shards[1])
    assert len(overlap) == len(ds) % 2, "DDP shards are disjoint but for DistributedSampler's padding"
    assert set(shards[0]) | set(shards[1]) == set(range(2 * len(ds), 3 * len(ds))), "and carry the epoch"


# ---------------------------------------------------------------------------------------------
# Splits, layouts, cache


def test_splits_are_by_case_from_meta_csv(phantom_root: Path, tmp_path: Path) -> None:
    splits = {s: {c.case_id for c in dataset(phantom_root, split=s).cases} for s in ("train", "val", "test")}
    assert splits == {"train": {"s0001", "s0002", "s0003"}, "val": {"s0004"}, "test": {"s0005"}}
    assert (phantom_root / "meta.csv").read_bytes().startswith(b"\xef\xbb\xbf"), (
        "phantoms write a BOM like the release"
    )
    root = tmp_path / "nometa"
    shutil.copytree(phantom_root, root)
    (root / "meta.csv").unlink()
    seeded = {s: {c.case_id for c in dataset(root, split=s).cases} for s in ("train", "val", "test")}
    assert set().union(*seeded.values()) == {f"s000{i}" for i in range(1, 6)}
    assert sum(len(v) for v in seeded.values()) == 5, "each case in exactly one split"
    assert seeded == {s: {c.case_id for c in dataset(root, split=s).cases} for s in ("train", "val", "test")}


def test_cropped_layout_matches_release_layout(tmp_path: Path) -> None:
    write_phantoms(tmp_path / "ts", n_cases=2, **SMALL)
    write_phantoms(tmp_path / "crop", n_cases=2, layout="cropped", **SMALL)
    a = dataset(tmp_path / "ts", slice_sampling_method="central")
    b = dataset(tmp_path / "crop", slice_sampling_method="central", label_values=phantom_label_values())
    assert np.array_equal(np.asarray(a.cases[0].labels), np.asarray(b.cases[0].labels))
    assert torch.equal(a[4]["gt_sdf"], b[4]["gt_sdf"])
    with pytest.raises(DataError, match="cropped layout needs label_values"):
        dataset(tmp_path / "crop")


def test_cache_rebuilds_only_what_changed_and_removes_nothing(
    phantom_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Runs sharing a cache keep each other's entries; stale ones go only when asked (`lora-sam3d cache`)."""
    from lora_sam3d.cli import main
    from lora_sam3d.data.cache import cache_entries

    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    cache = tmp_path / "cache"
    fit = TS_SAM3D_Dataset(
        root, HEART_CLASSES, settings=data_settings(resolution=8, spacing=2.0, cache_dir=cache)
    )
    first = set(folders(cache))
    assert len(first) == 5 + 5 and not [p for p in cache.rglob(".*") if p.is_dir()], "labels and images"
    # another class list shares the images; only its labels are new
    TS_SAM3D_Dataset(
        root, ["heart_myocardium"], settings=data_settings(resolution=8, spacing=2.0, cache_dir=cache)
    )
    assert len(set(folders(cache)) - first) == 5 and all("/" not in n for n in set(folders(cache)) - first)
    # a colleague's run with another spacing, on the same cache, while `fit` reads it
    TS_SAM3D_Dataset(
        root, ["heart_myocardium"], settings=data_settings(resolution=8, spacing=2.5, cache_dir=cache)
    )
    assert first <= set(folders(cache)), "another run's entries are never deleted"
    assert all(np.isfinite(fit[i]["gt_sdf"].numpy()).all() for i in range(0, len(fit), 7))
    before = set(folders(cache))
    img = nib.load(str(root / "s0002" / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) + 5, img.affine), str(root / "s0002" / "ct.nii.gz"))
    TS_SAM3D_Dataset(root, HEART_CLASSES, settings=data_settings(resolution=8, spacing=2.0, cache_dir=cache))
    entries = {e.name: e for e in cache_entries(cache)}
    assert set(entries) == before | (set(folders(cache)) - before) and len(entries) == len(before) + 2, (
        "the rebuilt case has a new labels and a new image entry beside the old ones"
    )
    stale = {name: e.stale for name, e in entries.items() if e.stale}
    assert sorted(stale) == sorted(n for n in before if "s0002" in n), (
        "every entry of s0002 read the old image"
    )
    assert len(stale) == 5 and all("s0002/ct.nii.gz changed" in why for why in stale.values())

    backdate(cache, days=0.01)  # no run is reading them now
    assert main(["cache", "--cache-dir", str(cache), "--stale", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("would remove") == 5 and len(cache_entries(cache)) == len(entries), out
    assert re.search(
        r"^would remove +images/s0002-\w+-[\d.]+-[\d.]+ .*\(image, shared\) +source .*changed$", out, re.M
    ), out
    assert main(["cache", "--cache-dir", str(cache), "--stale"]) == 0
    assert set(entries) - set(folders(cache)) == set(stale), "exactly the stale entries went"
    assert main(["cache", "--root", str(root)]) == 2, "no <root>/.cache here: an error, not an empty list"


def folders(cache: Path) -> list[str]:
    """The cache's entry folders by name (image entries as ``images/<name>``), temporary ones left out."""
    found = [
        p for p in [*cache.iterdir(), *(cache / "images").glob("*")] if p.is_dir() and p.name != "images"
    ]
    return sorted(p.relative_to(cache).as_posix() for p in found if not p.name.startswith("."))


def backdate(cache: Path, days: float, names: set[str] | None = None) -> None:
    """Set the last use of cache entries (all, or ``names``) ``days`` ago, as if no run had read them since."""
    when = time.time() - days * 86400
    for name in folders(cache):
        if names is None or name in names:
            os.utime(cache / name / "meta.json", (when, when))


def test_cache_listing_unused_days_and_every_stale_reason(
    phantom_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`lora-sam3d cache` lists every entry with its size, last use and classes; ``--unused-days N``
    removes the entries unused for N days and no other; each stale reason is named; an entry a run
    is reading (its stamp kept fresh by `CachedCase.in_use`) is never removed."""
    from lora_sam3d.cli import main
    from lora_sam3d.data.cache import STALE_BUILD_S, CachedCase, cache_entries

    root = tmp_path / "data"
    shutil.copytree(phantom_root, root, ignore=shutil.ignore_patterns("s0004", "s0005", ".cache"))
    cache = tmp_path / "cache"
    TS_SAM3D_Dataset(
        root, ["heart_myocardium"], settings=data_settings(resolution=8, spacing=2.0, cache_dir=cache)
    )
    names = [n for n in folders(cache) if "/" not in n]
    images = [n for n in folders(cache) if n.startswith("images/")]
    assert [n.split("-")[0] for n in names] == ["s0001", "s0002", "s0003"]
    assert [n.split("/")[1].split("-")[0] for n in images] == ["s0001", "s0002", "s0003"]
    assert main(["cache", "--cache-dir", str(cache)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 7 and all(line.startswith("kept") for line in lines[:6])
    assert sum("heart_myocardium" in line for line in lines) == 3
    assert sum("(image, shared)" in line for line in lines) == 3
    assert re.search(r"^6 entries, [\d.]+ MiB in .*; freed 0\.0 MiB$", lines[6]), lines[6]

    for days, name, image in zip((5.0, 1.0, 9.0), names, images, strict=True):
        backdate(cache, days, {name, image})
    CachedCase(cache / names[2], cache / images[2]).sdf(0)  # a running fit reads it and its image: fresh
    assert main(["cache", "--cache-dir", str(cache), "--unused-days", "3"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^removed +{names[0]} .*unused for 3\+ days$", out, re.M), out
    assert re.search(rf"^removed +{images[0]} .*unused for 3\+ days$", out, re.M), out
    assert folders(cache) == sorted(names[1:] + images[1:]), "1 day unused and in use: kept"

    (root / "s0002" / "segmentations" / "heart_myocardium.nii.gz").unlink()  # gone
    meta = json.loads((cache / names[2] / "meta.json").read_text())
    meta["version"] = -1  # written by an older version
    (cache / names[2] / "meta.json").write_text(json.dumps(meta))
    killed = cache / ".s0003-killed-build"
    killed.mkdir()
    (killed / "image.npy").write_bytes(b"half")
    old = time.time() - STALE_BUILD_S - 60
    os.utime(killed, (old, old))
    backdate(cache, 0.5)
    reasons = {e.path.name: e.stale for e in cache_entries(cache)}
    assert reasons[names[1]].startswith("source ") and reasons[names[1]].endswith(
        "heart_myocardium.nii.gz is gone"
    )
    assert reasons[names[2]] == f"cache format -1 (this version reads {meta_version()})"
    assert reasons[killed.name] == "interrupted build"
    assert main(["cache", "--cache-dir", str(cache), "--stale"]) == 0
    assert folders(cache) == images[1:], capsys.readouterr().out  # the images are still good


def meta_version() -> int:
    from lora_sam3d.data.cache import CACHE_VERSION

    return CACHE_VERSION


def test_concurrent_builders_of_one_cache_both_succeed(phantom_root: Path, tmp_path: Path) -> None:
    """Two real processes build the same entries at the same moment: both succeed, one entry per case."""
    import subprocess
    import sys

    go = tmp_path / "go"
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from lora_sam3d.data import HEART_CLASSES, TS_SAM3D_Dataset\n"
        f"Path({str(tmp_path)!r}, 'ready-' + sys.argv[1]).touch()\n"
        f"while not Path({str(go)!r}).exists(): time.sleep(0.01)\n"
        f"ds = TS_SAM3D_Dataset({str(phantom_root)!r}, HEART_CLASSES, frame={{'resolution': 8}},"
        f" preprocessing={{'spacing_mm': 1.7}}, cache_dir={str(tmp_path / 'cache')!r})\n"
        "print(len(ds))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(k)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in range(2)]  # fmt: skip
    deadline = time.time() + 120
    while not all((tmp_path / f"ready-{k}").exists() for k in range(2)):  # a barrier: both imported, waiting
        assert time.time() < deadline and all(p.poll() is None for p in procs), (
            "a builder died before the start"
        )
        time.sleep(0.01)
    go.touch()
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-800:] for _, err in results]
    assert results[0][0] == results[1][0]
    names = folders(tmp_path / "cache")
    cases = [f"s000{i}" for i in range(1, 6)]
    assert [n.split("-")[0] for n in names] == [f"images/{c}" for c in cases] + cases, names


def test_a_finished_entry_wins_over_a_late_builder(tmp_path: Path) -> None:
    from lora_sam3d.io.atomic import atomic_dir

    final = tmp_path / "entry"
    atomic_dir(final, lambda d: (d / "meta.json").write_text("first"))
    assert atomic_dir(final, lambda d: (d / "meta.json").write_text("second"), exist_ok=True) == final
    assert (final / "meta.json").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"], "the late builder's folder is gone"
    with pytest.raises(OSError, match="entry"):
        atomic_dir(final, lambda d: (d / "meta.json").write_text("third"))


def test_meta_csv_by_its_header(tmp_path: Path) -> None:
    from lora_sam3d.data.cases import read_meta_splits

    (tmp_path / "meta.csv").write_text(
        '\ufeffimage_id;age;institute;split\ns0001;61;"Basel, Uni; radiology";train\n\ns0002;70;x;test\n',
        encoding="utf-8",
    )
    assert read_meta_splits(tmp_path) == {"s0001": "train", "s0002": "test"}
    (tmp_path / "meta.csv").write_text('image_id,note,split\ns0001,"a; b, c",val\ns0001,again,val\n')
    assert read_meta_splits(tmp_path) == {"s0001": "val"}, "a repeated id with the same split is fine"
    (tmp_path / "meta.csv").write_text("id;fold\ns0001;1\n")
    with pytest.raises(DataError, match=r"meta\.csv must have columns 'image_id' and 'split'.*'id;fold'"):
        read_meta_splits(tmp_path)


def test_a_structure_lost_in_resampling_is_named(phantom_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    path = root / "s0001" / "segmentations" / "heart_myocardium.nii.gz"
    img = nib.load(str(path))
    tiny = np.zeros(img.shape, np.uint8)
    tiny[20, 20, 15] = 1  # one 1.8 x 1.8 x 2.6 mm voxel: gone on a 4 mm grid
    nib.save(nib.Nifti1Image(tiny, img.affine), str(path))
    with pytest.warns(
        UserWarning, match=r"s0001/heart_myocardium \(1 voxels in the source, 0 after resampling to 4\.0 mm\)"
    ):
        dataset(root, spacing=4.0, cache_dir=tmp_path / "cache")


def test_ct_window_and_mr_percentiles(tmp_path: Path) -> None:
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    ramp = np.arange(-400, 600, 1.0).reshape(10, 10, 10).astype(np.float32)  # -400 .. 599 HU
    path = save(ramp, affine, tmp_path / "ct.nii.gz")
    label = save((ramp > 0).astype(np.uint8), affine, tmp_path / "label.nii.gz")
    ct = load_volume(path, {0: (label, None)}, Preprocessing(spacing_mm=2.0))
    expected = np.clip((ramp + 200.0) / 600.0, 0, 1)  # window (-200, 400) -> [0, 1]
    np.testing.assert_allclose(ct.image, expected, atol=1e-6)
    mr = load_volume(path, {0: (label, None)}, Preprocessing(spacing_mm=2.0, modality="mr"))
    low, high = np.percentile(ramp, [0.5, 99.5])
    np.testing.assert_allclose(mr.image, np.clip((ramp - low) / (high - low), 0, 1), atol=1e-6)
    assert mr.image.min() == 0 and mr.image.max() == 1


# ---------------------------------------------------------------------------------------------
# DataModule


def test_datamodule_writes_phantoms_and_splits(tmp_path: Path) -> None:
    dm = TSDataModule(
        str(tmp_path / "empty"), list(HEART_CLASSES), **data_groups(resolution=8, spacing=2.0, batch_size=2,
        eval_sampling="central"), cases={"phantoms": PhantomSpec(n_cases=4, shape=(48, 48, 32))},
    )  # fmt: skip
    dm.prepare_data()
    assert (tmp_path / "empty" / "meta.csv").is_file()
    dm.setup("fit")
    dm.setup("test")
    ids = {s: {c.case_id for c in dm.datasets[s].cases} for s in ("train", "val", "test")}
    assert (
        not (ids["train"] & ids["val"])
        and not (ids["train"] & ids["test"])
        and not (ids["val"] & ids["test"])
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch.evidence.image.shape == (2, 1, 32, 32), "one view of 32 x 32 pixels per sample"
    assert set(dm.extent_mm) == set(HEART_CLASSES)


def test_predict_items_reproduce_dataset_inputs(tmp_path: Path) -> None:
    """On a scan stored LPS (x, y flipped) at the model's spacing, the request for the file's axial
    slice k is the dataset's sample on that slice, exactly; the sagittal one counts from the other end."""
    root = tmp_path / "data"
    affine = np.diag([-2.0, -2.0, 2.0, 1.0])
    affine[:3, 3] = [40.0, 30.0, -20.0]
    sphere_case(root, "s0001", np.array([20.0, 10.0, 0.0]), 9.0, affine, (24, 20, 22))
    ds = TS_SAM3D_Dataset(root, ["ball"], slice_sampling_method="central", settings=data_settings(resolution=8, spacing=2.0, cache_dir=tmp_path / "cache"))  # fmt: skip
    samples = {int(ds[i]["view_axis"][0]): ds[i] for i in range(len(ds))}
    image, mask = str(root / "s0001" / "ct.nii.gz"), str(root / "s0001" / "segmentations" / "ball.nii.gz")
    file_index = {
        2: int(samples[2]["view_index"][0]),
        0: 23 - int(samples[0]["view_index"][0]),
    }  # x is stored flipped
    items = [PredictItem(image, mask, "ball", axis="axial", index=file_index[2]),
             PredictItem(image, mask, "ball", axis="sagittal", index=file_index[0])]  # fmt: skip
    dm = TSDataModule(str(root), ["ball"], cache_dir=str(tmp_path / "cache"),
                      **data_groups(resolution=8, spacing=2.0, predict_items=items))  # fmt: skip
    dm.setup("predict")
    p = next(iter(dm.predict_dataloader()))
    assert p.targets.sdf is None and p.info.slice_name == [
        f"axial{file_index[2]}",
        f"sagittal{file_index[0]}",
    ]
    for i, axis in enumerate((2, 0)):
        s = samples[axis]
        assert torch.equal(p.evidence.frame_to_world[i], s["frame_to_world"])
        torch.testing.assert_close(
            p.evidence.image[i, 0], s["view_image"][0], atol=1e-3, rtol=0
        )  # cache: float16
        assert torch.equal(p.evidence.mask[i, 0], s["view_mask"][0])


# ---------------------------------------------------------------------------------------------
# Bad input


def test_class_empty_in_one_case_is_left_out_with_a_warning(phantom_root: Path, tmp_path: Path) -> None:
    # Bad data that stops a run: tests/test_bad_inputs.py. Empty in one case only is not an error:
    # that (case, class) pair is left out with a warning.
    root = tmp_path / "data"
    shutil.copytree(phantom_root, root, ignore=shutil.ignore_patterns("s0003", "s0004", "s0005"))
    lab = root / "s0001" / "segmentations" / "heart_atrium_left.nii.gz"
    img = nib.load(str(lab))
    save(np.zeros(img.shape, np.uint8), img.affine, lab)
    with pytest.warns(UserWarning, match=r"1 \(case, class\) pairs have no voxels.*s0001/heart_atrium_left"):
        ds = dataset(root, split="train", slice_sampling_method="central")
    assert ("s0001", "heart_atrium_left") not in {
        (ds.cases[c].case_id, HEART_CLASSES[b]) for c, b, _, _ in ds.items
    }


def test_bad_cases_can_be_skipped(phantom_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    (root / "s0003" / "ct.nii.gz").unlink()
    with pytest.warns(UserWarning, match="skipping case s0003"):
        cases = discover_cases(root, HEART_CLASSES, on_bad_case="skip")
    assert [c.case_id for c in cases] == ["s0001", "s0002", "s0004", "s0005"]


def test_cropped_array_reads_as_the_whole_array() -> None:
    """`CroppedArray` against numpy on the whole array: every integer / slice key, inside, across and
    outside the crop, including negative indices."""
    from lora_sam3d.data.cache import CroppedArray, nonzero_box

    rng = np.random.default_rng(0)
    whole = np.zeros((9, 8, 7), np.uint16)
    whole[2:6, 3:8, 1:4] = rng.integers(1, 100, (4, 5, 3))
    lo, hi = nonzero_box(whole)
    assert (lo, hi) == ([2, 3, 1], [6, 8, 4])
    view = CroppedArray(whole[2:6, 3:8, 1:4].copy(), lo, whole.shape)
    keys = [
        np.s_[:, :, 2],
        np.s_[4],
        np.s_[0],
        np.s_[:, -1],
        np.s_[1:5, 2:4, :],
        np.s_[7:9, :, 5],
        np.s_[-3, 2:, 0:2],
    ]
    for key in keys:
        np.testing.assert_array_equal(view[key], whole[key], err_msg=str(key))
    np.testing.assert_array_equal(np.asarray(view), whole)
    with pytest.raises(IndexError):
        view[9]


@pytest.mark.parametrize(
    ("classes", "frame_scale"), [(HEART_CLASSES, 2.0), (["heart_atrium_left"], 1.0)], ids=["heart", "atrium"]
)
def test_cropped_cache_gives_the_samples_of_whole_volumes(
    phantom_root: Path, tmp_path: Path, classes: list[str], frame_scale: float
) -> None:
    """The cache stores the labels cropped to the classes' box in the smallest type and the image
    cut to the frames' reach (`image_reach`; for one small structure, a box inside the scan); samples
    read through those crops equal samples built from the whole preprocessed volumes (1e-6), for
    every view of a three-view sample."""
    from lora_sam3d.data.cache import nonzero_box
    from lora_sam3d.data.cases import discover_cases
    from lora_sam3d.data.volume import load_volume

    ds = TS_SAM3D_Dataset(phantom_root, classes, split="val", slice_sampling_method="central", settings=data_settings(resolution=8, spacing=2.0, views=3, frame_scale=frame_scale, cache_dir=tmp_path))  # fmt: skip
    case = ds.cases[0]
    source = next(c for c in discover_cases(phantom_root, classes) if c.case_id == case.case_id)
    whole = load_volume(source.image, source.class_masks, ds.prep)
    labels = np.load(case.path / "labels.npy")
    lo, hi = nonzero_box(whole.labels)
    assert (
        labels.dtype == np.uint8
        and labels.shape == tuple(np.subtract(hi, lo))
        and labels.size < whole.labels.size
    )
    np.testing.assert_array_equal(np.asarray(case.labels), whole.labels)
    image = json.loads((case.image_dir / "meta.json").read_text())
    box = tuple(slice(a, b) for a, b in zip(image["box_min"], image["box_max"], strict=True))
    np.testing.assert_array_equal(np.asarray(case.image)[box], whole.image[box].astype(np.float16))
    if len(classes) == 1:
        assert np.prod(np.subtract(image["box_max"], image["box_min"])) < 0.5 * whole.image.size, image
    picked = [i for i in range(len(ds)) if ds.items[i][0] == 0]
    cropped = [ds[i] for i in picked]
    case.__dict__["image"] = whole.image.astype(np.float16)  # the whole arrays in place of the crops
    case.__dict__["labels"] = whole.labels
    for i, sample in zip(picked, cropped, strict=True):
        again = ds[i]
        assert sample.keys() == again.keys() and int(sample["view_valid"].sum()) == 3
        for key, value in sample.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, again[key], rtol=0, atol=1e-6, equal_nan=True, msg=key)
            elif isinstance(value, np.ndarray):
                np.testing.assert_allclose(value, again[key], rtol=0, atol=1e-6, err_msg=key)


def test_image_entries_are_reused_when_they_hold_the_reach(phantom_root: Path, tmp_path: Path) -> None:
    """A run whose frames reach further cuts an image entry of its own; a run whose reach lies inside
    an existing entry reads the smallest such entry and cuts none."""

    def settings(scale: float) -> DataSettings:
        return data_settings(resolution=8, spacing=2.0, cache_dir=tmp_path, frame_scale=scale)

    small = TS_SAM3D_Dataset(phantom_root, ["heart_atrium_left"], "val", settings=settings(1.0))
    first = set((tmp_path / "images").iterdir())
    wide = TS_SAM3D_Dataset(phantom_root, HEART_CLASSES, "val", settings=settings(2.0))
    assert len(set((tmp_path / "images").iterdir()) - first) == len(wide.cases), "a larger box each"
    again = TS_SAM3D_Dataset(phantom_root, ["heart_atrium_left"], "val", settings=settings(0.8))
    assert [c.image_dir for c in again.cases] == [c.image_dir for c in small.cases], (
        "the smallest that holds it"
    )
    assert len(list((tmp_path / "images").iterdir())) == len(first) + len(wide.cases)


def test_cache_build_command_names_failures_and_sums_up(
    phantom_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``lora-sam3d cache --build --config`` with two worker processes: a progress bar, one line naming
    the case that failed and its file, the others built, a summary, exit status 1; a second run
    builds only what is missing; a dataset on that split refuses to start unless told to skip, and
    then says which case it left out."""
    import yaml

    from lora_sam3d.cli import main

    root = tmp_path / "data"
    shutil.copytree(phantom_root, root, ignore=shutil.ignore_patterns(".cache"))
    (root / "s0003" / "ct.nii.gz").write_bytes(b"not a NIfTI file")
    config = tmp_path / "fit.yaml"
    config.write_text(
        yaml.safe_dump(
            {"data": {"root": str(root), "classes": HEART_CLASSES, "preprocessing": {"spacing_mm": 2.0}}}
        )
    )
    assert main(["cache", "--build", "--config", str(config), "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert "caching 5 of 5 cases" in out and "5/5" in out, out
    assert re.search(
        r"^failed s0003: image file .*s0003/ct\.nii\.gz is not a readable NIfTI file", out, re.M
    ), out
    assert re.search(r"^4 of 5 cases cached in .*\.cache \([\d.]+ MiB\); 1 failed: s0003$", out, re.M), out
    assert len(folders(root / ".cache")) == 8, "4 labels and 4 image entries"
    assert main(["cache", "--build", "--root", str(root), "--classes", *HEART_CLASSES]) == 1
    assert "caching 5 of 5 cases" in capsys.readouterr().out, "spacing 1.5 by default: entries of its own"
    assert main(["cache", "--build", "--config", str(config)]) == 1
    assert "caching 1 of 5 cases" in capsys.readouterr().out, "only the failed case is tried again"
    refused_then_skipped(root, "s0003", r"image file .* \(set data\.cases\.on_bad_case: skip", spacing=2.0)


def refused_then_skipped(root: Path, bad: str, why: str, **settings: Any) -> None:
    """A dataset on ``root`` refuses to start with the one bad case (the error matching ``why``), and
    with ``on_bad_case: skip`` warns which case it left out and uses the other four."""
    with pytest.raises(DataError, match=rf"1 of \d cases could not be cached: {bad}: {why}"):
        TS_SAM3D_Dataset(root, HEART_CLASSES, split=None, settings=data_settings(resolution=8, **settings))
    with pytest.warns(UserWarning, match=rf"1 of \d cases could not be cached and are left out: {bad}: "):
        ds = TS_SAM3D_Dataset(
            root,
            HEART_CLASSES,
            split=None,
            settings=data_settings(resolution=8, on_bad_case="skip", **settings),
        )
    assert sorted(c.case_id for c in ds.cases) == sorted(
        {"s0001", "s0002", "s0003", "s0004", "s0005"} - {bad}
    )


def test_an_image_truncated_after_its_header_fails_in_the_image_pass(
    phantom_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The labels pass reads only the image's header, so a file cut after it fails when its image is
    cut: the build command names it and goes on; a dataset refuses it unless told to skip it."""
    from lora_sam3d.cli import main

    root = tmp_path / "data"
    shutil.copytree(phantom_root, root, ignore=shutil.ignore_patterns(".cache"))
    image = root / "s0002" / "ct.nii.gz"
    image.write_bytes(image.read_bytes()[:2000])
    assert main(["cache", "--build", "--root", str(root), "--classes", *HEART_CLASSES]) == 1
    out = capsys.readouterr().out
    assert "caching 5 of 5 cases" in out and "cutting 5 of 5 images" in out, out
    assert re.search(
        r"^failed s0002: image file .*s0002/ct\.nii\.gz cannot be read \(truncated or corrupt\?\)", out, re.M
    ), out
    assert re.search(r"^4 of 5 cases cached in .*; 1 failed: s0002$", out, re.M), out
    refused_then_skipped(root, "s0002", r"image file .*truncated")
