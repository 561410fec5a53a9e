"""The LightningModule's contract, the latent encoder and the metrics' empty-mask rules."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lora_sam3d.data import TSDataModule, collate, write_phantoms
from lora_sam3d.latent import SliceUnprojection
from lora_sam3d.lora import lora_layers, save_adapter
from lora_sam3d.metrics import MeshMetrics, chamfer_mm, overlap, surface_distances
from lora_sam3d.module import LoRAMeshDecoderModule
from lora_sam3d.writers import mesh_bytes

DECODER = dict(resolution=8, model_channels=64, num_blocks=2, num_heads=4, num_groups=8)
SHIPPED = dict(
    decoder=dict(DECODER, num_blocks=4), base_checkpoint="builtin:shapes"
)  # a base that has learned
CLASSES = ["heart_ventricle_left", "heart_myocardium"]


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory: pytest.TempPathFactory) -> TSDataModule:
    root = tmp_path_factory.mktemp("mod") / "data"
    write_phantoms(root, n_cases=4, shape=(48, 48, 32))
    dm = TSDataModule(str(root), CLASSES, resolution=8, spacing=2.0, batch_size=2, eval_sampling="central",
                      samples_per_class=2)  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    return dm


def trainer(tmp_path: Path, **kw) -> L.Trainer:
    args = dict(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")  # fmt: skip
    return L.Trainer(**(args | kw))


def test_optimizer_gets_only_lora_and_unfrozen(datamodule: TSDataModule, tmp_path: Path) -> None:
    module = LoRAMeshDecoderModule(decoder=DECODER, unfreeze=["out_layer"], classes=CLASSES)
    t = trainer(tmp_path)
    t.fit(module, datamodule=datamodule)
    params = {id(p) for group in t.optimizers[0].param_groups for p in group["params"]}
    names = sorted(n for n, p in module.named_parameters() if id(p) in params)
    expected = sorted(
        [f"decoder.{n}.lora_{ab}" for n in lora_layers(module.decoder) for ab in "AB"]
        + ["decoder.out_layer.weight", "decoder.out_layer.bias"]
    )
    assert names == expected
    # fit, then validate in the same process: LoRA is not injected twice.
    before = sorted(lora_layers(module.decoder))
    t.validate(module, datamodule=datamodule)
    assert sorted(lora_layers(module.decoder)) == before
    assert not any(
        "lora" in n for n, _ in lora_layers(module.decoder)["blocks.0.attn.to_qkv"].named_modules() if n
    )


def test_adapter_folder_reproduces_the_model(datamodule: TSDataModule, tmp_path: Path) -> None:
    module = LoRAMeshDecoderModule(decoder=DECODER, classes=CLASSES, unfreeze=["out_layer"])
    trainer(tmp_path).fit(module, datamodule=datamodule)
    save_adapter(module.decoder, tmp_path / "adapter", modules_to_save=["out_layer"])
    again = LoRAMeshDecoderModule(decoder=DECODER, classes=CLASSES, adapter=str(tmp_path / "adapter"))
    again.configure_adapters()
    batch = collate([datamodule.datasets["val"][i] for i in range(2)])
    with torch.no_grad():
        torch.testing.assert_close(again(batch), module(batch))


def test_slice_unprojection_features(datamodule: TSDataModule) -> None:
    batch = collate([datamodule.datasets["val"][i] for i in range(3)])
    dense = SliceUnprojection(8)(batch)
    assert dense.feats.shape == (3 * 512, 8) and dense.batch_size == 3
    coords = dense.coords.long()
    for b in range(3):
        rows = coords[:, 0] == b
        axis = int(batch["axis"][b])
        u = dense.feats[rows, 4:7]
        assert torch.allclose(u, (coords[rows, 1:].float() + 0.5) / 8 - 0.5)
        assert torch.allclose(dense.feats[rows, 3], u[:, axis]), "signed distance to the slice plane"
        inside = dense.feats[rows, 0] > 0.99
        assert (dense.feats[rows, 2][inside] < 0).all(), "2D distance negative inside the mask"
    band = SliceUnprojection(8, band=0.0)(batch)
    assert 0 < band.feats.shape[0] < dense.feats.shape[0]
    assert (band.feats[:, 2] <= 0).all()


def test_metric_empty_mask_rules_and_monai_values() -> None:
    gt = torch.zeros(20, 20, 20, dtype=torch.bool)
    gt[5:15, 5:15, 5:15] = True
    pred = torch.zeros_like(gt)
    pred[6:15, 5:15, 5:16] = True
    dice, iou = overlap(pred, gt)
    inter = 9 * 10 * 10
    assert dice == pytest.approx(2 * inter / (990 + 1000)) and iou == pytest.approx(
        inter / (990 + 1000 - inter)
    )
    hd95, assd, nsd = surface_distances(pred, gt, 2.0, 3.0)
    assert hd95 == pytest.approx(2.0) and 0 < assd < 2.0 and 0.5 < nsd <= 1.0
    assert all(
        math.isnan(v)
        for v in (*overlap(pred, ~torch.ones_like(gt)), *surface_distances(pred, ~torch.ones_like(gt), 1, 3))
    )
    assert surface_distances(torch.zeros_like(gt), gt, 1.0, 3.0) == (math.inf, math.inf, 0.0)

    metric = MeshMetrics(["a", "b"])
    empty = torch.zeros_like(gt)
    metric.update(torch.stack([pred, empty, pred]), torch.stack([gt, gt, empty]), torch.tensor([2.0, 2.0, 2.0]),
                  torch.tensor([0, 0, 1]))  # fmt: skip
    out = metric.compute()
    assert out["dice/a"] == pytest.approx(dice / 2), "empty prediction counts as Dice 0"
    assert out["hd95_mm/a"] == pytest.approx(hd95), "failures are not averaged as infinity"
    assert out["failures/a"] == 1 and out["failures/b"] == 0
    assert math.isnan(out["dice/b"]), "empty ground truth is left out"
    assert out["dice"] == pytest.approx(dice / 2), "mean over classes with values"


def test_chamfer() -> None:
    a = np.array([[0.0, 0, 0], [1, 0, 0]])
    b = np.array([[0.0, 0, 1]])
    assert chamfer_mm(a, b) == pytest.approx(0.5 * ((1 + math.sqrt(2)) / 2 + 1))
    assert chamfer_mm(np.zeros((0, 3)), b) == math.inf


def test_mesh_files_state_their_coordinate_system() -> None:
    from lora_sam3d.models import marching_cubes

    axis = torch.linspace(-0.5, 0.5, 17)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).norm(dim=-1) - 0.3
    mesh = marching_cubes(grid)
    assert b"comment SPACE=RAS" in mesh_bytes(mesh, "ply", "RAS")[:100]
    assert mesh_bytes(mesh, "stl", "LPS")[:9] == b"SPACE=LPS"
    assert mesh_bytes(mesh, "obj", "RAS").startswith(b"# SPACE=RAS")
    import io

    import trimesh

    lps = trimesh.load(io.BytesIO(mesh_bytes(mesh, "ply", "LPS")), file_type="ply", process=False)
    assert np.allclose(lps.vertices[:, :2], -mesh.vertices[:, :2], atol=1e-6)
    assert lps.is_winding_consistent and lps.volume > 0, "LPS flip keeps outward winding"


def test_shipped_base_decoder_loads() -> None:
    import json
    from importlib.resources import files

    meta = json.loads((files("lora_sam3d.assets") / "shapes.json").read_text())
    module = LoRAMeshDecoderModule(
        decoder=dict(resolution=8, model_channels=64, num_blocks=4, num_heads=4, num_groups=8),
        base_checkpoint="builtin:shapes", classes=CLASSES,
    )  # fmt: skip
    assert "lora-sam3d fit --config configs/pretrain_shapes.yaml" in meta["command"]
    assert module.decoder.out_layer.weight.abs().sum() > 0, "trained weights, not the zero-initialised head"
    with pytest.raises(
        FileNotFoundError, match=r"no shipped decoder 'builtin:nope'; available: \['builtin:shapes'\]"
    ):
        LoRAMeshDecoderModule(decoder=DECODER, base_checkpoint="builtin:nope")


class PoisonedModule(LoRAMeshDecoderModule):
    """A fault, not a stand-in: the real module whose loss turns NaN at chosen steps (as a corrupt
    sample or an overflow would make it)."""

    poison_steps: tuple[int, ...] = (1,)

    def losses(self, sdf: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        terms = super().losses(sdf, batch)
        if self.training and self.global_step in self.poison_steps:
            terms["loss"] = terms["loss"] * float("nan")
        return terms


def lora_state(module: LoRAMeshDecoderModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def test_nonfinite_loss_raises_or_skips_the_step(datamodule: TSDataModule, tmp_path: Path) -> None:
    raising = PoisonedModule(**SHIPPED, classes=CLASSES)
    with pytest.raises(
        FloatingPointError, match=r"non-finite training loss at step 1 \(cases \[.*on_nonfinite: skip"
    ):
        trainer(tmp_path, limit_train_batches=3).fit(raising, datamodule=datamodule)

    # skip: the poisoned step changes nothing, so the run equals one that never saw that batch's update
    skipping = PoisonedModule(**SHIPPED, classes=CLASSES, on_nonfinite="skip")
    seen: list[dict[str, torch.Tensor]] = []

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            seen.append(lora_state(pl_module))

    t = trainer(tmp_path, limit_train_batches=3, callbacks=[Snapshot()])
    with pytest.warns(UserWarning, match="step skipped"):
        t.fit(skipping, datamodule=datamodule)
    assert skipping.skipped_steps == 1 and len(seen) == 3
    for k in seen[0]:
        assert torch.equal(seen[1][k], seen[0][k]), f"{k} changed on the skipped step"
        assert torch.isfinite(seen[2][k]).all()
    assert any(not torch.equal(seen[2][k], seen[1][k]) for k in seen[0]), "training goes on after the skip"
    state = t.optimizers[0].state
    assert all(int(s["step"]) == 2 for s in state.values()), (
        "optimizer state not advanced by the skipped step"
    )


class PoisonedGradients(LoRAMeshDecoderModule):
    """The real module whose gradients overflow at step 1 while the loss stays finite."""

    def on_after_backward(self) -> None:
        if self.global_step == 1:
            next(p for p in self.parameters() if p.grad is not None).grad[0] = float("inf")


def test_nonfinite_gradients_raise_or_skip_the_step(datamodule: TSDataModule, tmp_path: Path) -> None:
    with pytest.raises(
        FloatingPointError, match=r"non-finite gradients at step 1 in 1 tensors: \['decoder\."
    ):
        trainer(tmp_path, limit_train_batches=2).fit(
            PoisonedGradients(**SHIPPED, classes=CLASSES), datamodule=datamodule
        )
    skipping = PoisonedGradients(**SHIPPED, classes=CLASSES, on_nonfinite="skip")
    t = trainer(tmp_path, limit_train_batches=3)
    with pytest.warns(UserWarning, match="non-finite gradients at step 1.*step skipped"):
        t.fit(skipping, datamodule=datamodule)
    assert skipping.skipped_steps == 1
    assert all(int(s["step"]) == 2 for s in t.optimizers[0].state.values())
    assert all(torch.isfinite(p).all() for p in skipping.parameters())
