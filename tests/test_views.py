"""Several views per sample: their planes in world mm, order invariance, view dropout, the max-pool
stage-1 target; checked against nibabel's geometry of the files and brute-force computations."""

from __future__ import annotations

import itertools
import warnings
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SHAPES, TEST_CLASSES, TEST_DECODER, data_settings

from lora_sam3d.data import DataError, DataSettings, TS_SAM3D_Dataset, collate
from lora_sam3d.data.settings import ViewSettings
from lora_sam3d.inputs import Evidence
from lora_sam3d.models import ModelConfig, Reconstructor
from lora_sam3d.models.latent import SliceUnprojection


def view_pixels_world(s: dict, k: int) -> np.ndarray:
    """(N, 3) world mm of view ``k``'s mask pixels: its square cross-section of the frame at its
    offset, mapped by the sample's frame (the independent reading of the view's geometry)."""
    size = s["view_mask"].shape[-1]
    u = (np.arange(size) + 0.5) / size - 0.5
    axis = int(s["view_axis"][k])
    p, q = (a for a in range(3) if a != axis)
    uvw = np.zeros((size, size, 3))
    uvw[..., p], uvw[..., q] = np.meshgrid(u, u, indexing="ij")
    uvw[..., axis] = float(s["view_offset"][k])
    return nib.affines.apply_affine(s["frame_to_world"].numpy(), uvw[s["view_mask"][k].numpy()])


def views_dataset(root: Path, split: str = "val", **settings: object) -> TS_SAM3D_Dataset:
    s = data_settings(resolution=16, spacing=2.0, **settings)
    return TS_SAM3D_Dataset(root, TEST_CLASSES, split=split, slice_sampling_method="central", settings=s)


@pytest.mark.parametrize("layout", ["orthogonal", "parallel"])
def test_each_view_lies_on_its_plane_in_world_mm(phantoms: Path, layout: str) -> None:
    """Every mask pixel of every view, mapped through the sample's frame to world mm and back into
    the source file with nibabel, lands on the structure in that file, on the view's own plane."""
    ds = views_dataset(phantoms, views=3, view_layout=layout, view_spacing_mm=6.0)
    checked = 0
    for i in range(len(ds)):
        s = ds[i]
        assert s["view_valid"].all() and s["slice_name"].startswith(f"axis{int(s['view_axis'][0])}_slice")
        case = next(c for c in ds.cases if c.case_id == s["case_id"])
        first = int(s["view_axis"][0])
        centre = nib.affines.apply_affine(np.linalg.inv(case.affine), s["frame_to_world"].numpy()[:3, 3])
        seen = []  # brute force: where the other views' masks reach along the first slice's normal
        for k in np.flatnonzero(s["view_valid"].numpy())[1:]:
            if int(s["view_axis"][k]) != first:
                bit = TEST_CLASSES.index(s["class_name"])
                take = [slice(None)] * 3
                take[int(s["view_axis"][k])] = int(s["view_index"][k])
                vol = np.zeros(case.labels.shape, bool)
                vol[tuple(take)] = (np.asarray(case.labels[tuple(take)]) >> bit) & 1 == 1
                seen += np.argwhere(vol)[:, first].tolist()
        expected = (min(seen) + max(seen)) / 2 if seen else float(s["view_index"][0])
        assert centre[first] == pytest.approx(expected, abs=1e-6), "the frame's centre along the first normal"
        label = nib.load(phantoms / s["case_id"] / "segmentations" / f"{s['class_name']}.nii.gz")
        to_file = np.linalg.inv(label.affine)
        truth = np.asarray(label.dataobj) > 0
        planes = set()
        for k in np.flatnonzero(s["view_valid"].numpy()):
            axis = int(s["view_axis"][k])
            world = view_pixels_world(s, k)
            # the plane is the canonical grid's slice view_index along the view's axis
            grid = next(c for c in ds.cases if c.case_id == s["case_id"]).affine
            voxel = nib.affines.apply_affine(np.linalg.inv(grid), world)
            assert np.allclose(voxel[:, axis], int(s["view_index"][k]), atol=1e-4), (
                "pixels on the view's plane"
            )
            inside = truth[tuple(np.rint(nib.affines.apply_affine(to_file, world)).astype(int).T)]
            assert inside.mean() > 0.8, (s["case_id"], s["class_name"], k, inside.mean())
            planes.add((axis, int(s["view_index"][k])))
            checked += 1
        assert len(planes) == int(s["view_valid"].sum()), "distinct planes"
        if layout == "parallel":
            assert set(s["view_axis"][s["view_valid"]].tolist()) == {first}
    assert checked > 2 * len(ds), "most samples have more than one view"


def test_view_order_does_not_matter(phantoms: Path) -> None:
    """Permuting the views of a sample changes neither the evidence nor the reconstruction (1e-5)."""
    ds = views_dataset(phantoms, views=3)
    batch = collate([ds[i] for i in range(2)])
    views = batch.evidence
    assert bool(views.valid.all()), "the test needs three views in each sample"
    model = Reconstructor(ModelConfig(TEST_DECODER, base=SHAPES)).eval()
    with torch.no_grad():
        expected = model(views).sdf
        evidence = SliceUnprojection(16)(views)
        for order in itertools.permutations(range(3)):
            permuted = views.permute_views(list(order))
            torch.testing.assert_close(SliceUnprojection(16)(permuted), evidence, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model(permuted).sdf, expected, rtol=1e-5, atol=1e-5)
        one = first_view_only(views)
        assert not torch.allclose(SliceUnprojection(16)(one), evidence), "the other views add evidence"


def first_view_only(views: Evidence) -> Evidence:
    """The evidence of each sample's first view alone, as one view (K = 1)."""
    return views.permute_views([0])


def test_one_view_is_exactly_the_single_slice_input(phantoms: Path) -> None:
    """``views: 1`` gives one view row (the same builder as any count) and, with the first view
    alone, the evidence of several views equals the single-slice evidence bit for bit."""
    one = views_dataset(phantoms)
    assert one[0]["view_valid"].shape == (1,) and one[0]["view_image"].shape[0] == 1
    three = views_dataset(phantoms, views=3)
    views = collate([three[i] for i in range(2)]).evidence
    first_only = replace(views, valid=torch.tensor([[True, False, False]] * 2))
    assert torch.equal(SliceUnprojection(16)(first_only), SliceUnprojection(16)(first_view_only(views)))
    plain = collate([one[i] for i in range(2)]).evidence
    assert plain.valid.shape == (2, 1)
    assert torch.equal(SliceUnprojection(16)(plain), SliceUnprojection(16)(first_view_only(views)))


def test_training_draws_one_to_views_and_evaluation_uses_views(phantoms: Path) -> None:
    train = views_dataset(phantoms, split="train", views=3)
    counts = [int(train[i]["view_valid"].sum()) for i in range(len(train))]
    assert set(counts) == {1, 2, 3}, counts
    again = [int(train[i]["view_valid"].sum()) for i in range(len(train))]
    assert again == counts, "seeded: the same draws every time"
    val = views_dataset(phantoms, views=3)
    for s in (val[i] for i in range(len(val))):
        assert int(s["view_valid"].sum()) == 3
        names = [
            f"axis{a}_slice{i}"
            for a, i in zip(s["view_axis"].tolist(), s["view_index"].tolist(), strict=True)
        ]
        assert s["slice_name"] == "+".join(names), "the name lists every view, the sampled one first"


def test_max_pool_target_equals_brute_force(phantoms: Path) -> None:
    """``coarse_target: any``: a coarse cell is occupied when any of its 4^3 fine cells is."""
    centre = views_dataset(phantoms, coarse_target="centre")
    anyfine = views_dataset(phantoms)  # the default
    thin = 0
    for i in range(len(anyfine)):
        fine = anyfine[i]["gt_occupancy"].numpy()
        coarse = anyfine[i]["gt_coarse_occupancy"].numpy()
        r = coarse.shape[0]
        for x, y, z in itertools.product(range(r), repeat=3):
            assert coarse[x, y, z] == fine[4 * x : 4 * x + 4, 4 * y : 4 * y + 4, 4 * z : 4 * z + 4].any()
        old = centre[i]["gt_coarse_occupancy"].numpy()
        assert (coarse | ~old).all(), "every cell whose centre is inside is kept"
        thin += int((coarse & ~old).sum())
    assert thin > 0, "the max-pool target adds the cells a thin structure crosses"


def test_view_settings_are_checked(phantoms: Path) -> None:
    with pytest.raises(
        DataError, match=r"data\.views\.spacing_mm is below one voxel of the resampled grid \(0\.50 voxels\)"
    ):
        views_dataset(phantoms, views=2, view_layout="parallel", view_spacing_mm=1.0)[0]
    with pytest.raises(
        DataError,
        match=r"data\.views\.count must be null or an integer 1\.\.32 \(at most 3 with views\.layout: orthogonal alone\), got 4",
    ):
        ViewSettings(count=4)
    ViewSettings(count=4, layout="parallel")
    shape = views_dataset(phantoms, views=1).cases[0].image.shape
    with pytest.raises(DataError, match=r"data\.views\.spacing_mm: 3 parallel views .* leave the scan"):
        views_dataset(phantoms, views=3, view_layout="parallel", view_spacing_mm=2.0 * max(shape))[0]
    with pytest.raises(DataError, match=r"data\.views\.spacing_mm must be a positive number \(mm\), got 0"):
        DataSettings(views={"count": 2, "layout": "parallel", "spacing_mm": 0})  # type: ignore[arg-type]
    with pytest.raises(
        DataError, match=r"data\.views\.layout must be orthogonal, parallel or stack, got 'radial'"
    ):
        ViewSettings(layout="radial")  # type: ignore[arg-type]


def test_a_request_of_three_slices(phantoms: Path, tmp_path: Path) -> None:
    """A request naming three slices of one scan (viewer numbering) gives three views; each view's mask
    pixels map, through the frame and nibabel's affine, back onto the file slice that was named."""
    from lora_sam3d.data import PredictionDataset, PredictItem, Preprocessing

    case = phantoms / "s0004"
    mask = case / "segmentations" / "heart_ventricle_left.nii.gz"
    img = nib.load(mask)
    lv = np.asarray(img.dataobj) > 0
    centre = np.argwhere(lv).mean(0).round().astype(int)
    slices = [{"axis": "axial", "index": int(centre[2])}, {"axis": "coronal", "index": int(centre[1])},
              {"axis": "sagittal", "index": int(centre[0])}]  # fmt: skip
    item = PredictItem(str(case / "ct.nii.gz"), str(mask), TEST_CLASSES[0], slices=slices)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # three cuts of one mask agree where they cross: no warning
        ds = PredictionDataset([item], Preprocessing(2.0), {TEST_CLASSES[0]: 60.0}, 2.0, 64)
    elsewhere = np.zeros(lv.shape[::2], np.uint8)  # a coronal 2D mask (x, z) drawn away from the ventricle
    elsewhere[:4, :4] = 1
    nib.save(nib.Nifti1Image(elsewhere, np.eye(4)), str(tmp_path / "wrong.nii.gz"))
    wrong = {**slices[1], "mask": str(tmp_path / "wrong.nii.gz")}
    with pytest.warns(
        UserWarning, match=r"the masks of slices 1 \(axial\d+\) and 2 \(coronal\d+\) do not overlap"
    ):
        PredictionDataset([PredictItem(item.image, item.mask, TEST_CLASSES[0], slices=[slices[0], wrong])],
                          Preprocessing(2.0), {TEST_CLASSES[0]: 60.0}, 2.0, 64)  # fmt: skip
    s = ds[0]
    assert s["view_valid"].tolist() == [True, True, True]
    assert s["slice_name"] == f"axial{centre[2]}+coronal{centre[1]}+sagittal{centre[0]}"
    file_axis = {2: 2, 1: 1, 0: 0}  # the phantoms are stored close to RAS: world axis k is file axis k
    for k, view in enumerate(slices):
        axis = int(s["view_axis"][k])
        world = view_pixels_world(s, k)
        voxel = nib.affines.apply_affine(np.linalg.inv(img.affine), world)
        assert np.abs(voxel[:, file_axis[axis]] - view["index"]).max() <= 0.5 + 2.0 / 2 / 1.6, (k, view)
        inside = lv[tuple(np.rint(voxel).astype(int).T)]
        assert inside.mean() > 0.8, (k, inside.mean())
    with pytest.raises(DataError, match=r"slice 2 \(axial\d+\) is a plane given before"):
        PredictionDataset([PredictItem(item.image, item.mask, TEST_CLASSES[0], slices=[slices[0], slices[0]])],
                          Preprocessing(2.0), {TEST_CLASSES[0]: 60.0}, 2.0, 64)  # fmt: skip
    with pytest.raises(DataError, match=r"slice 2 is of image .*other\.nii\.gz but the request's image is"):
        PredictionDataset([PredictItem(item.image, item.mask, TEST_CLASSES[0],
                                       slices=[slices[0], {**slices[1], "image": "other.nii.gz"}])],
                          Preprocessing(2.0), {TEST_CLASSES[0]: 60.0}, 2.0, 64)  # fmt: skip


@pytest.mark.e2e
def test_predict_with_one_two_and_three_slices_through_the_command(phantoms: Path, tmp_path: Path) -> None:
    """A model trained with views up to 3 predicts requests of 1, 2 and 3 slices in one run (each scored
    against the 3D mask); a model trained on one view refuses three, naming its maximum."""
    import csv

    import yaml
    from conftest import run_config, write_yaml

    from lora_sam3d.cli import main

    cfg = run_config(tmp_path / "v3", phantoms, quiet=True)
    cfg["data"]["views"] = {"count": 3}
    assert main(["fit", "--config", str(write_yaml(cfg, tmp_path / "v3.yaml"))]) == 0
    case = phantoms / "s0004"
    mask = str(case / "segmentations" / "heart_ventricle_left.nii.gz")
    centre = np.argwhere(np.asarray(nib.load(mask).dataobj) > 0).mean(0).round().astype(int)
    planes = [{"axis": "axial", "index": int(centre[2])}, {"axis": "coronal", "index": int(centre[1])},
              {"axis": "sagittal", "index": int(centre[0])}]  # fmt: skip
    items = [{"image": str(case / "ct.nii.gz"), "mask": mask, "class_name": TEST_CLASSES[0], "slices": planes[:n]}
             for n in (1, 2, 3)]  # fmt: skip
    writer = {"class_path": "lora_sam3d.callbacks.MeshPredictionWriter",
              "init_args": {"output_dir": str(tmp_path / "out"), "write_png": False}}  # fmt: skip
    request = {"trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "callbacks": [writer],
                           "default_root_dir": str(tmp_path / "out")}, "data": {"predict": {"items": items}}}  # fmt: skip
    (tmp_path / "request.yaml").write_text(yaml.safe_dump(request))
    ckpt = tmp_path / "v3" / "checkpoints" / "last.ckpt"
    assert main(["predict", "--config", str(tmp_path / "request.yaml"), "--ckpt_path", str(ckpt)]) == 0
    with (tmp_path / "out" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    names = sorted(p.name for p in (tmp_path / "out").glob("*.ply") if "_truth" not in p.name)
    assert len(names) == 3 and sum("+" in n for n in names) == 2, names
    from test_cli import check_report

    check_report(tmp_path / "out", {n[:-4]: "request mask" for n in names})
    one_view = run_config(tmp_path / "v1", phantoms, quiet=True)
    assert main(["fit", "--config", str(write_yaml(one_view, tmp_path / "v1.yaml"))]) == 0
    request["trainer"]["callbacks"][0]["init_args"]["output_dir"] = str(tmp_path / "out1")
    (tmp_path / "request1.yaml").write_text(yaml.safe_dump(request))
    with pytest.raises(
        ValueError,
        match=r"predict item 2 \(axial\d+\+coronal\d+\): 2 views asked \(its slices with mask voxels\) but the model was trained with at most 1 view: ask for 1 or fewer",
    ):
        import os

        os.environ["LORA_SAM3D_DEBUG"] = "1"
        try:
            main(["predict", "--config", str(tmp_path / "request1.yaml"), "--ckpt_path",
                  str(tmp_path / "v1" / "checkpoints" / "last.ckpt")])  # fmt: skip
        finally:
            del os.environ["LORA_SAM3D_DEBUG"]
