"""The scan as context, evidence at every decoder level, and any number of slices (stacks).

Real phantom NIfTI files, the real cache, the real model and real `lora-sam3d` runs: the context is
checked against nibabel's own reading of the file at the frame's points in world mm, the
conditioning layers against Meta's computation, and the stack layout against the file's slices.
"""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SCAN, TEST_CLASSES, TEST_DECODER, data_settings, run_config, write_yaml
from scipy import ndimage
from test_cli import here

from lora_sam3d.data import DataError, write_phantoms
from lora_sam3d.data.dataset import TS_SAM3D_Dataset
from lora_sam3d.inputs import collate
from lora_sam3d.models import ModelConfig, Reconstructor
from lora_sam3d.models.decoder import SLatMeshDecoder


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("context") / "data"
    write_phantoms(root, n_cases=4, shape=(48, 48, 32))
    return root


def dataset(data: Path, split: str = "test", **settings: object) -> TS_SAM3D_Dataset:
    kw = {"resolution": 16, "spacing": 2.0, "cache_dir": str(data / ".cache"), **settings}
    return TS_SAM3D_Dataset(data, TEST_CLASSES, split, "central", settings=data_settings(**kw))


def cell_world_points(frame_to_world: np.ndarray, n: int) -> np.ndarray:
    u = (np.arange(n) + 0.5) / n - 0.5
    grid = np.stack(np.meshgrid(u, u, u, indexing="ij"), -1).reshape(-1, 3)
    return nib.affines.apply_affine(frame_to_world, grid)


def test_context_is_the_file_read_at_the_frames_points_and_outside_reads_no_scan(data: Path) -> None:
    ds = dataset(data, context="volume")
    outside_seen = False
    for k in range(len(ds)):
        sample = ds[k]
        context = sample["context"].numpy()
        n = context.shape[-1]
        img = nib.load(sample["source_image"])
        hu = np.asarray(img.dataobj, dtype=np.float32)
        vox = nib.affines.apply_affine(
            np.linalg.inv(img.affine), cell_world_points(sample["frame_to_world"].numpy(), n)
        )
        inside = np.all((vox >= -0.5) & (vox <= np.asarray(hu.shape) - 0.5), axis=1).reshape(n, n, n)
        assert np.array_equal(context[1] > 0.5, inside), "the indicator is the file's own voxel box"
        assert np.all(context[0][~inside] == 0), "outside the scan reads as no scan (0, 0)"
        outside_seen |= bool((~inside).any())
        # nibabel's reading of the file at the same world points, normalised as CT is (window -200..400)
        interior = np.all((vox >= 1) & (vox <= np.asarray(hu.shape) - 2), axis=1).reshape(n, n, n)
        want = ndimage.map_coordinates(hu, vox.T, order=1).reshape(n, n, n)
        want = np.clip((want + 200) / 600, 0, 1)
        got = context[0]
        assert np.abs(got[interior] - want[interior]).mean() < 0.03
        assert np.corrcoef(got[interior], want[interior])[0, 1] > 0.97
    assert outside_seen, "some frame reaches past the scan's edge (frames are twice the structure)"


def test_training_blanks_the_context_of_some_samples(data: Path) -> None:
    ds = TS_SAM3D_Dataset(data, TEST_CLASSES, "train", "random_axis", settings=data_settings(resolution=16, spacing=2.0, cache_dir=str(data / ".cache"), samples_per_class=8, context="volume", context_dropout=0.5))  # fmt: skip
    blank = [not ds[k]["context"].any() for k in range(len(ds))]
    assert 0 < sum(blank) < len(blank)


META_LAYOUT = {**TEST_DECODER, "latent_channels": 8}


def meta_layout_decoder(tmp: Path) -> Path:
    """A decoder file in Meta's key layout (no ``structure.`` or ``conditioning.`` keys), trained-looking
    (its zero output layer filled), as a ``slat_decoder_mesh`` checkpoint is."""
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        decoder = SLatMeshDecoder(**META_LAYOUT)
        torch.nn.init.normal_(decoder.out_layer.weight, std=0.05)
    path = tmp / "slat_decoder_mesh.safetensors"
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, str(path))
    return path


def test_conditioning_starts_as_metas_computation_and_metas_weights_load_strictly(
    data: Path, tmp_path: Path
) -> None:
    meta = meta_layout_decoder(tmp_path)
    batch = collate([dataset(data, views=3)[k] for k in range(2)])
    plain = Reconstructor(ModelConfig(TEST_DECODER, base={"checkpoint": str(meta)})).eval()
    conditioned = Reconstructor(
        ModelConfig(TEST_DECODER, base={"checkpoint": str(meta)}, context={"conditioning": True})
    ).eval()
    assert conditioned.conditioning is not None
    assert all(not level[2].weight.any() for level in conditioned.conditioning.levels)
    with torch.no_grad():
        a, b = plain(batch.evidence), conditioned(batch.evidence)
    assert int(a.active.sum()) > 0
    assert torch.equal(a.sdf, b.sdf), "zero-initialised conditioning leaves the output unchanged"
    # once trained (moved off zero) the levels do change the output
    with torch.no_grad():
        for level in conditioned.conditioning.levels:
            level[2].weight.copy_(torch.linspace(-0.5, 0.5, level[2].weight.numel()).view_as(level[2].weight))
        assert not torch.allclose(conditioned(batch.evidence).sdf, a.sdf)
    # the merged export keeps Meta's names for the decoder: Meta-style strict loading reads it
    exported = conditioned.save_merged(tmp_path / "merged.safetensors")
    SLatMeshDecoder.from_pretrained(exported, strict=True, **META_LAYOUT)
    again = Reconstructor(
        ModelConfig(TEST_DECODER, base={"checkpoint": str(exported)}, context={"conditioning": True})
    ).eval()
    with torch.no_grad():
        assert torch.allclose(again(batch.evidence).sdf, conditioned(batch.evidence).sdf, atol=1e-6)
    with pytest.raises(ValueError, match=r"model\.context\.conditioning: true"):
        Reconstructor(ModelConfig(TEST_DECODER, base={"checkpoint": str(exported)}))


def test_sixteen_slices_are_a_set_with_context_and_conditioning(data: Path) -> None:
    ds = dataset(data, views=16, view_layout="stack", view_spacing_mm=2.0, context="volume")
    batch = collate([ds[0], ds[1]])
    assert batch.evidence.valid.sum(1).tolist() == [16, 16]
    model = Reconstructor(
        ModelConfig(TEST_DECODER, base={"checkpoint": "builtin:scan_shapes"}, context=SCAN)
    ).eval()
    order = list(np.random.default_rng(0).permutation(16))
    with torch.no_grad():
        a = model(batch.evidence).sdf
        b = model(batch.evidence.permute_views(order)).sdf
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_a_stack_is_every_nth_slice_of_the_file_that_holds_the_structure(data: Path) -> None:
    ds = dataset(data, views=32, view_layout="stack", view_spacing_mm=6.0)
    step = 3  # 6 mm on the 2 mm grid
    for k in range(len(ds)):
        sample = ds[k]
        case, bit = ds.cases[ds.items[k][0]], ds.items[k][1]
        axis, first = int(sample["view_axis"][0]), int(sample["view_index"][0])
        planes = sample["view_index"][sample["view_valid"]].tolist()
        assert set(sample["view_axis"][sample["view_valid"]].tolist()) == {axis}
        areas = np.asarray(case.class_info(bit)["slice_areas"][axis])
        expected = [i for i in range(first % step, len(areas), step) if areas[i] > 0]
        assert sorted(planes) == expected, "every 3rd slice where the structure is, no other"
        # the views are the file's slices: each view's mask is the cached label's mask at that plane
        for j in range(len(planes)):
            assert sample["view_mask"][j].any()
        centre = np.linalg.inv(case.affine) @ sample["frame_to_world"].numpy() @ np.array([0, 0, 0, 1.0])
        assert centre[axis] == pytest.approx((min(planes) + max(planes)) / 2, abs=1e-6)
    with pytest.raises(DataError, match=r"data\.views\.spacing_mm"):
        dataset(data, views=8, view_layout="stack", view_spacing_mm=400.0)[0]


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short LoRA fit on the shipped context base, with the scan as context and the view mix."""
    tmp = tmp_path_factory.mktemp("context-run")
    cfg = run_config(tmp / "run", data, quiet=True)
    cfg["model"] |= {"base": {"checkpoint": "builtin:scan_shapes"}, "context": SCAN}
    cfg["data"] |= {"views": {"count": 16, "layouts": ["orthogonal", "stack"]}, "context": {"source": "volume"},
                    "cache_dir": str(data / ".cache")}  # fmt: skip
    result = here("fit", "--config", str(write_yaml(cfg, tmp / "run.yaml")))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp


@pytest.mark.e2e
def test_predict_from_1_3_and_16_slices_with_and_without_context(data: Path, trained: Path) -> None:
    case = data / "s0004"
    image, mask = case / "ct.nii.gz", case / "segmentations" / "heart_ventricle_left.nii.gz"
    lv = np.asarray(nib.load(mask).dataobj) > 0
    z = np.flatnonzero(lv.any(axis=(0, 1)))
    x, y = (int(np.flatnonzero(lv.any(axis=axes)).mean()) for axes in ((1, 2), (0, 2)))
    mid = int(z.mean())
    stack = [{"axis": "axial", "index": int(i)} for i in z[:16]]
    assert len(stack) == 16
    base = {"image": str(image), "mask": str(mask), "class_name": "heart_ventricle_left"}
    three = [
        {"axis": "axial", "index": mid},
        {"axis": "sagittal", "index": x},
        {"axis": "coronal", "index": y},
    ]
    items = [
        base | {"axis": "axial", "index": mid},
        base | {"slices": three},
        base | {"slices": stack},
        base | {"axis": "axial", "index": mid + 1, "context": "none"},
    ]
    out = trained / "predict"
    writer = {"class_path": "lora_sam3d.callbacks.MeshPredictionWriter",
              "init_args": {"output_dir": str(out), "write_png": False}}  # fmt: skip
    cfg = {"trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "callbacks": [writer],
                       "default_root_dir": str(out)},
           "data": {"predict": {"items": items}, "context": "volume"}}  # fmt: skip
    ckpt = trained / "run" / "checkpoints" / "last.ckpt"
    result = here(
        "predict", "--config", str(write_yaml(cfg, trained / "predict.yaml")), "--ckpt_path", str(ckpt)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert [len(r["slice"].split("+")) for r in rows] == [1, 3, 16, 1]
    assert [r["scan"] for r in rows] == ["read", "read", "read", "not read"], "every row says it"
    assert all(float(r["dice"]) > 0.3 for r in rows), [r["dice"] for r in rows]
    # the same slice with and without the scan: the context changes the surface
    cfg["data"]["context"] = {"source": "none"}
    cfg["data"]["predict"] = {"items": [items[0]]}
    cfg["trainer"]["callbacks"][0]["init_args"]["output_dir"] = str(trained / "none")
    result = here(
        "predict", "--config", str(write_yaml(cfg, trained / "none.yaml")), "--ckpt_path", str(ckpt)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stem = f"s0004_heart_ventricle_left_axial{mid}"
    with_scan = nib.load(out / f"{stem}_mask.nii.gz").get_fdata()
    without = nib.load(trained / "none" / f"{stem}_noscan_mask.nii.gz").get_fdata()  # named by the reading
    assert not np.array_equal(with_scan, without)


def test_context_for_a_model_that_does_not_read_it_is_refused(data: Path, tmp_path: Path) -> None:
    cfg = run_config(tmp_path / "run", data, quiet=True)
    cfg["data"] |= {"context": {"source": "volume"}, "cache_dir": str(data / ".cache")}
    result = here("validate", "--config", str(write_yaml(cfg, tmp_path / "run.yaml")))
    assert result.returncode != 0
    assert "does not read context" in result.stderr and "data.context.source: none" in result.stderr
