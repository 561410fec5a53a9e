"""The two-stage model as plain PyTorch, checked against independent references.

`surface_band` and `vertex_fill` against brute-force loops; the decoder's band in each
``train_active`` mode; `reconstruction_losses` against values computed by hand; the adapter bank's
routing; old checkpoints; and docs/api.md's example run with Lightning made unimportable.
"""

from __future__ import annotations

import itertools
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHAPES, TEST_CLASSES, TEST_DECODER, data_settings

from lora_sam3d.data import TS_SAM3D_Dataset, collate
from lora_sam3d.inputs import Batch, Targets
from lora_sam3d.lora import LoRAConfig, lora_layers
from lora_sam3d.models import ModelConfig, Reconstruction, Reconstructor
from lora_sam3d.models.adapters.bank import AdapterBank
from lora_sam3d.models.adapters.files import save_model_adapter
from lora_sam3d.models.adapters.manifest import Manifest
from lora_sam3d.models.structure import surface_band, vertex_fill
from lora_sam3d.training.losses import LossWeights, reconstruction_losses

DOCS = Path(__file__).parents[1] / "docs" / "api.md"


def brute_band(occ: np.ndarray, margin: int) -> np.ndarray:
    """Cells with an inside and an outside cell (in the grid) within ``margin`` cells (Chebyshev)."""
    out = np.zeros_like(occ)
    for b, x, y, z in itertools.product(*map(range, occ.shape)):
        lo = [max(v - margin, 0) for v in (x, y, z)]
        hood = occ[b, lo[0] : x + margin + 1, lo[1] : y + margin + 1, lo[2] : z + margin + 1]
        out[b, x, y, z] = hood.any() and not hood.all()
    return out


@pytest.mark.parametrize("margin", [1, 2])
def test_surface_band_equals_brute_force(margin: int) -> None:
    gen = torch.Generator().manual_seed(margin)
    for density in (0.05, 0.5, 0.95):
        occ = torch.rand(2, 6, 7, 5, generator=gen) < density
        expected = brute_band(occ.numpy(), margin)
        np.testing.assert_array_equal(surface_band(occ, margin).numpy(), expected)


def test_vertex_fill_equals_brute_force() -> None:
    occ = torch.rand(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    fine = 16
    fill = vertex_fill(occ, fine).numpy()
    assert fill.shape == (2, fine + 1, fine + 1, fine + 1)
    for b, i, j, k in itertools.product(range(2), *[range(fine + 1)] * 3):
        cell = [min(v * 4 // fine, 3) for v in (i, j, k)]  # the vertex's position in coarse cells
        assert fill[b, i, j, k] == (-1.0 if occ[b, cell[0], cell[1], cell[2]] else 1.0)


def test_reconstruction_losses_by_hand() -> None:
    """One fine cell (n = 1) and one coarse cell: every term written out with `math`."""
    corners = [-0.2, 0.3, 0.1, -0.05, 0.0, 0.2, -0.3, 0.4]
    truth = [0.05, -0.15, 0.05, 0.05, 0.5, 0.05, 0.05, -0.02]
    rec = Reconstruction(torch.tensor(corners).view(1, 2, 2, 2), coarse_logits=torch.tensor([[[[0.7]]]]))
    targets = Targets(
        sdf=torch.tensor(truth).view(1, 2, 2, 2),
        occupancy=torch.ones(1, 1, 1, 1, dtype=torch.bool),
        coarse_occupancy=torch.zeros(1, 1, 1, 1, dtype=torch.bool),
    )
    w = LossWeights(sdf=1.0, occupancy=2.0, dice=0.5, structure=3.0, sdf_truncation=0.1)
    got = {k: float(v) for k, v in reconstruction_losses(rec, targets, w, 1).items()}

    def clamp(v: float) -> float:
        return min(max(v, -0.1), 0.1)

    sdf_l1 = sum(abs(clamp(a) - clamp(b)) for a, b in zip(corners, truth, strict=True)) / 8
    logit = -sum(corners) / 8  # cell logit: minus the mean corner SDF, in voxel units (n = 1)
    p = 1 / (1 + math.exp(-logit))
    bce, dice = math.log(1 + math.exp(-logit)), 1 - (2 * p + 1) / (p + 1 + 1)  # target 1
    q = 1 / (1 + math.exp(-0.7))
    s_bce, s_dice = math.log(1 + math.exp(0.7)), 1 - 1 / (q + 1)  # target 0
    expected = {"sdf_l1": sdf_l1, "occupancy_bce": bce, "soft_dice": dice, "structure_bce": s_bce,
                "structure_dice": s_dice, "loss": sdf_l1 + 2 * bce + 0.5 * dice + 3 * (s_bce + s_dice)}  # fmt: skip
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.fixture(scope="module")
def batch(phantoms: Path) -> Batch:
    """One validation sample of each test class (left ventricle first)."""
    ds = TS_SAM3D_Dataset(
        phantoms,
        TEST_CLASSES,
        split="val",
        slice_sampling_method="central",
        settings=data_settings(resolution=16, spacing=2.0),
    )
    samples = [ds[i] for i in range(len(ds))]
    return collate([next(s for s in samples if s["class_name"] == c) for c in TEST_CLASSES])


def test_each_train_active_mode_runs_the_decoder_on_its_band(batch: Batch) -> None:
    predicted_model = Reconstructor(ModelConfig(TEST_DECODER, base=SHAPES)).eval()
    with torch.no_grad():
        logits, _ = predicted_model.structure(predicted_model.encoder(batch.evidence))
    predicted = surface_band(logits > 0, 1)
    truth = surface_band(batch.targets.coarse_occupancy.bool(), 1)
    assert not torch.equal(predicted, truth), "the test needs stage 1 to differ from the truth"
    expected = {"predicted": predicted, "truth": truth, "union": predicted | truth}
    for mode, band in expected.items():
        model = Reconstructor(ModelConfig(TEST_DECODER, base=SHAPES, band={"train_on": mode}))
        seen: list[int] = []
        model.decoder.register_forward_hook(
            lambda _m, args, _o, seen=seen: seen.append(args[0].feats.shape[0])
        )
        with torch.no_grad():
            rec = model.train()(batch.evidence, batch.targets.coarse_occupancy)
            assert rec.active is not None and torch.equal(rec.active, band), mode
            assert seen == [int(band.sum())], f"{mode}: the decoder ran on the band's cells only"
            assert torch.equal(
                model.eval()(batch.evidence, batch.targets.coarse_occupancy).active, predicted
            ), f"{mode}: inference uses stage 1's band"


def test_a_wider_training_band_reaches_where_stage_one_errs_and_inference_keeps_its_margin(
    batch: Batch,
) -> None:
    """``band.train_margin: 2``: training runs the decoder on the band two cells around stage 1's
    surface and the true one, which covers more of the true surface than the one-cell band does;
    inference keeps ``band.margin``; a margin that is not a whole number of cells is refused."""
    model = Reconstructor(ModelConfig(TEST_DECODER, base=SHAPES, band={"train_margin": 2}))
    truth = batch.targets.coarse_occupancy.bool()
    with torch.no_grad():
        logits, _ = model.structure(model.encoder(batch.evidence))
        wide = model.train()(batch.evidence, truth).active
        narrow = model.eval()(batch.evidence, truth).active
    occupied = logits > 0
    assert torch.equal(wide, surface_band(occupied, 2) | surface_band(truth, 2))
    assert torch.equal(narrow, surface_band(occupied, 1))
    true_surface = surface_band(truth, 1) & (truth != occupied)  # true surface cells stage 1 gets wrong
    assert true_surface.any(), "the test needs stage 1 to err somewhere"
    assert (wide & true_surface).sum() == true_surface.sum() > (narrow & true_surface).sum()
    with pytest.raises(
        ValueError, match=r"model\.band\.train_margin must be an integer >= 1 \(cells\) or null, got 1\.5"
    ):
        ModelConfig(band={"train_margin": 1.5})


def random_adapter(folder: Path, seed: int, extent_mm: dict[str, float]) -> Path:
    """A LoRA adapter of the shipped base with random (non-zero) B matrices, written as fit writes one."""
    model = Reconstructor(ModelConfig(TEST_DECODER, base=SHAPES))
    model.add_lora(
        LoRAConfig(4, 8.0), LoRAConfig(2, 4.0, target_modules=r"(enc|dec)\d\.[03]|head"), seed=seed
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in [*lora_layers(model.decoder).values(), *lora_layers(model.structure).values()]:
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)
    data = {"classes": list(extent_mm), "extent_mm": extent_mm, "spacing": 2.0, "modality": "ct",
            "ct_window_hu": [-200, 400], "slice_size": 64, "frame_scale": 2.0, "resolution": 16}  # fmt: skip
    return save_model_adapter(model, folder, Manifest.describe(model, list(extent_mm), data))


def test_adapter_bank_routes_by_exact_name_then_one_pattern(batch: Batch, tmp_path: Path) -> None:
    lv, heart = TEST_CLASSES[0], TEST_CLASSES[1]
    a = random_adapter(tmp_path / "a", 1, {lv: 60.0})
    b = random_adapter(tmp_path / "b", 2, {lv: 90.0, heart: 95.0})
    model = Reconstructor(ModelConfig(TEST_DECODER, base=SHAPES)).eval()
    model.add_lora(LoRAConfig(4, 8.0), LoRAConfig(2, 4.0, target_modules=r"(enc|dec)\d\.[03]|head"))
    names = [n for n, _ in model.named_parameters() if "lora_" in n]
    bank = AdapterBank(model, {"heart_*": b, lv: a}, names)
    assert bank.key_for(lv) == lv, "an exact name wins over a pattern listed before it"
    assert bank.key_for(heart) == "heart_*"
    contract = bank.data_contract()
    assert contract is not None and contract["extent_mm"] == {lv: 60.0, heart: 95.0}, (
        "each class its own extent"
    )
    with torch.no_grad():
        routed = bank(batch)
        alone = {folder: Reconstructor.from_adapter(folder)(batch.evidence) for folder in (a, b)}
    for i, cls in enumerate(batch.info.class_name):
        own, other = (a, b) if cls == lv else (b, a)
        torch.testing.assert_close(routed.sdf[i], alone[own].sdf[i])
        assert not torch.allclose(routed.sdf[i], alone[other].sdf[i], atol=1e-3), "the two adapters differ"
    with pytest.raises(
        ValueError,
        match=r"'heart_myocardium' matches 2 patterns of model.finetune.adapters \(\['heart_\*', 'heart_m\*'\]\)",
    ):
        AdapterBank(model, {"heart_*": a, "heart_m*": b}, names).key_for(heart)
    with pytest.raises(ValueError, match=r"class 'spleen' is covered by no adapter"):
        bank.key_for("spleen")


def run_example(code: str, lora_run: Path, phantoms: Path, tmp_path: Path) -> str:
    """Run a documented example in a process where ``import lightning`` fails, from a folder laid out
    as after the demo (its checkpoints and data); returns stdout, ending with the mesh's centre."""
    (tmp_path / "outputs" / "demo").mkdir(parents=True)
    (tmp_path / "outputs" / "demo" / "checkpoints").symlink_to(lora_run / "checkpoints")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "heart").symlink_to(phantoms)
    script = "import sys\nsys.modules['lightning'] = None\nsys.modules['lightning.pytorch'] = None\n"
    script += code + "\nnp = __import__('numpy')\nprint('centre', *np.round(mesh.vertices.mean(0), 2))\n"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.e2e
def test_the_readme_example_runs_as_written(lora_run: Path, phantoms: Path, tmp_path: Path) -> None:
    text = (DOCS.parents[1] / "README.md").read_text()
    code = re.search(r"## Python API\n.*?```python\n(.*?)```", text, re.S)
    assert code is not None, "the README lost its Python example"
    out = run_example(code.group(1), lora_run, phantoms, tmp_path)
    assert "centre" in out and len(out.split("centre")[1].split()) == 3


@pytest.mark.e2e
def test_the_api_example_runs_without_lightning(lora_run: Path, phantoms: Path, tmp_path: Path) -> None:
    """docs/api.md's example, as written, in a process where ``import lightning`` fails; its mesh's
    centre lies within the left ventricle's box in the scan."""
    text = DOCS.read_text()
    code = re.search(r"<!-- example: reconstructor -->\n```python\n(.*?)```", text, re.S)
    assert code is not None, "docs/api.md lost its example block"
    stdout = run_example(code.group(1), lora_run, phantoms, tmp_path)
    assert re.search(r"^\d+ vertices, \d+ active cells, axial16$", stdout, re.M), stdout
    import nibabel as nib

    lv = nib.load(phantoms / "s0001" / "segmentations" / f"{TEST_CLASSES[0]}.nii.gz")
    voxels = np.argwhere(np.asarray(lv.dataobj) > 0)
    world = nib.affines.apply_affine(lv.affine, voxels)
    centre = np.array([float(v) for v in stdout.split("centre")[1].split()])
    low, high = world.min(0), world.max(0)  # the LV's box in world mm (a one-slice guess of its depth)
    assert np.all(centre > low) and np.all(centre < high), (centre, low, high)


def test_checkpoints_of_the_module_holding_both_stages_itself_load(
    lora_run: Path, batch: Batch, tmp_path: Path
) -> None:
    """Checkpoints written before the model moved under ``model.`` (keys ``decoder.*``/``structure.*``)
    load and give the same reconstruction as today's."""
    from lora_sam3d.training.module import LoRAMeshDecoderModule

    ckpt = torch.load(lora_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and all(k.startswith("model.") for k in ckpt["state_dict"])
    ckpt["state_dict"] = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, tmp_path / "old.ckpt")
    new = LoRAMeshDecoderModule.load_from_checkpoint(
        lora_run / "checkpoints" / "last.ckpt", weights_only=True
    )
    old = LoRAMeshDecoderModule.load_from_checkpoint(tmp_path / "old.ckpt", weights_only=True)
    with torch.no_grad():
        expected = new.eval()(batch).sdf
        torch.testing.assert_close(old.eval()(batch).sdf, expected, rtol=0, atol=0)
    base = LoRAMeshDecoderModule(TEST_CLASSES, decoder=TEST_DECODER, base={"checkpoint": "builtin:shapes"})
    base.configure_adapters()
    with torch.no_grad():
        assert not torch.allclose(base.eval()(batch).sdf, expected, atol=1e-4), (
            "the checkpoint's adapters count"
        )


def test_peft_loads_our_adapter_folder_and_computes_our_output(lora_run: Path) -> None:
    """`PeftModel.from_pretrained` reads a trained adapter folder as it is, and the decoder it builds
    computes what ours computes with that adapter (and not what the bare base computes)."""
    from peft import PeftModel

    from lora_sam3d.sparse import SparseTensor

    folder = lora_run / "checkpoints" / "adapter-last"
    ours = Reconstructor.from_adapter(folder).decoder
    peft = PeftModel.from_pretrained(
        Reconstructor(ModelConfig(TEST_DECODER, base=SHAPES)).decoder, str(folder)
    ).eval()
    bare = Reconstructor(ModelConfig(TEST_DECODER, base=SHAPES)).decoder.eval()
    gen = torch.Generator().manual_seed(0)
    cells = torch.unique(torch.randint(0, 16, (300, 3), generator=gen), dim=0)
    x = SparseTensor(
        torch.randn(len(cells), 8, generator=gen), torch.cat([torch.zeros_like(cells[:, :1]), cells], 1).int()
    )
    with torch.no_grad():
        expected = ours(x).feats
        torch.testing.assert_close(peft(x).feats, expected, rtol=1e-5, atol=1e-6)
        assert (bare(x).feats - expected).abs().max() > 1e-3, "the adapter changes the output"
