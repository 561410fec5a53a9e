"""The LightningModule's contract: what trains, adapters, the two stages and the slice evidence."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import data_groups

from lora_sam3d.callbacks import save_adapter_of
from lora_sam3d.data import TSDataModule, collate
from lora_sam3d.inputs import Batch
from lora_sam3d.lora import lora_layers
from lora_sam3d.models import Reconstruction
from lora_sam3d.models.latent import SliceUnprojection
from lora_sam3d.models.structure import active_latent, surface_band
from lora_sam3d.training.module import LoRAMeshDecoderModule

DECODER = dict(resolution=8, model_channels=64, num_blocks=2, num_heads=4, num_groups=8)
TRAINS = dict(
    decoder=DECODER, finetune={"unfreeze": ["out_layer"]}
)  # LoRA gets gradients from the first step on
CLASSES = ["heart_ventricle_left", "heart_myocardium"]


@pytest.fixture(scope="module")
def datamodule(phantoms: Path) -> TSDataModule:
    dm = TSDataModule(str(phantoms), CLASSES, **data_groups(resolution=8, spacing=2.0, batch_size=2,
                      eval_sampling="central", samples_per_class=2))  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    return dm


def trainer(tmp_path: Path, **kw) -> L.Trainer:
    args = dict(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")  # fmt: skip
    return L.Trainer(**(args | kw))


def test_optimizer_gets_only_lora_and_unfrozen(datamodule: TSDataModule, tmp_path: Path) -> None:
    module = LoRAMeshDecoderModule(decoder=DECODER, finetune={"unfreeze": ["out_layer"]}, classes=CLASSES)
    t = trainer(tmp_path)
    t.fit(module, datamodule=datamodule)
    params = {id(p) for group in t.optimizers[0].param_groups for p in group["params"]}
    names = sorted(n for n, p in module.named_parameters() if id(p) in params)
    expected = sorted(
        [f"model.decoder.{n}.lora_{ab}" for n in lora_layers(module.decoder) for ab in "AB"]
        + [f"model.structure.{n}.lora_{ab}" for n in lora_layers(module.structure) for ab in "AB"]
        + ["model.decoder.out_layer.weight", "model.decoder.out_layer.bias"]
    )
    assert names == expected
    assert len(lora_layers(module.structure)) == 11, "every convolution of stage 1 has an adapter"
    # fit, then validate in the same process: LoRA is not injected twice.
    before = sorted(lora_layers(module.decoder))
    t.validate(module, datamodule=datamodule)
    assert sorted(lora_layers(module.decoder)) == before
    layer = lora_layers(module.decoder)["blocks.0.attn.to_qkv"]
    assert sorted(n for n, _ in layer.named_parameters()) == ["bias", "lora_A", "lora_B", "weight"]
    assert type(layer.unload()) is torch.nn.Linear, "the adapted layer wraps the base layer, not another LoRA"


def test_adapter_folder_reproduces_the_model(datamodule: TSDataModule, tmp_path: Path) -> None:
    module = LoRAMeshDecoderModule(decoder=DECODER, classes=CLASSES, finetune={"unfreeze": ["out_layer"]})
    trainer(tmp_path).fit(module, datamodule=datamodule)
    save_adapter_of(module, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "structure" / "adapter_model.safetensors").is_file()
    again = LoRAMeshDecoderModule(
        decoder=DECODER, classes=CLASSES, finetune={"adapter": str(tmp_path / "adapter")}
    )
    again.configure_adapters()
    again.eval()
    batch = collate([datamodule.datasets["val"][i] for i in range(2)])
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(batch).sdf, module(batch).sdf)


def test_slice_unprojection_features(datamodule: TSDataModule) -> None:
    batch = collate([datamodule.datasets["val"][i] for i in range(3)])
    dense = SliceUnprojection(8)(batch.evidence)
    assert dense.shape == (3, 8, 8, 8, 8)
    centres = (torch.arange(8).float() + 0.5) / 8 - 0.5
    for b in range(3):
        axis = int(batch.evidence.axis[b, 0])
        u = dense[b, 4:7]
        assert torch.allclose(u[0], centres[:, None, None].expand(8, 8, 8))
        assert torch.allclose(dense[b, 3], u[axis]), "signed distance to the slice plane"
        inside = dense[b, 0] > 0.99
        assert inside.any() and (dense[b, 2][inside] < 0).all(), "2D distance negative inside the mask"


def test_stage_one_band_and_fill() -> None:
    from lora_sam3d.models.structure import surface_band, vertex_fill

    occ = torch.zeros(1, 8, 8, 8, dtype=torch.bool)
    occ[0, 2:6, 2:6, 2:6] = True
    band = surface_band(occ, margin=1)
    assert band[0, 2, 3, 3] and band[0, 1, 3, 3], "both sides of the surface are active"
    assert not band[0, 3:5, 3:5, 3:5].any() and not band[0, 0].any(), "deep inside and far outside are not"
    assert surface_band(occ, margin=2).sum() > band.sum()
    fill = vertex_fill(occ, 32)
    assert fill.shape == (1, 33, 33, 33)
    assert fill[0, 16, 16, 16] == -1 and fill[0, 0, 0, 0] == 1 and fill[0, 32, 32, 32] == 1


def test_decoder_runs_on_the_active_band_only(datamodule: TSDataModule) -> None:
    module = LoRAMeshDecoderModule(decoder=DECODER, classes=CLASSES).eval()
    batch = collate([datamodule.datasets["val"][i] for i in range(2)])
    seen: list[int] = []
    module.decoder.register_forward_hook(lambda _m, args, _o: seen.append(args[0].feats.shape[0]))
    with torch.no_grad():
        rec = module(batch)
    assert isinstance(rec, Reconstruction) and rec.sdf.shape == (2, 33, 33, 33)
    assert rec.active is not None and rec.coarse_logits is not None
    assert seen == [int(rec.active.sum())] and 0 < seen[0] < 2 * 8**3


def test_active_cap_and_empty_stage_one(datamodule: TSDataModule, tmp_path: Path) -> None:
    batch = collate([datamodule.datasets["val"][i] for i in range(2)])
    capped = LoRAMeshDecoderModule(decoder=DECODER, classes=CLASSES, band={"max_voxels": 3}).eval()
    with pytest.raises(ValueError, match=r"active voxels in this batch exceed model.band.max_voxels=3"):
        capped(batch)

    class Blind(LoRAMeshDecoderModule):
        """The real module whose stage 1 sees nothing (all logits negative), as on a hopeless slice."""

        def forward(self, batch: Batch) -> Reconstruction:
            with torch.no_grad():
                self.structure.head.bias.fill_(-1e4)
            return super().forward(batch)

    blind = Blind(decoder=DECODER, classes=CLASSES)
    blind.setup("validate")
    blind.eval()
    blind.model.drawing_width = 0.0  # the network's own (empty) surface
    with (
        pytest.warns(UserWarning, match=r"stage 1 found no surface for .*scored as a failure"),
        torch.no_grad(),
    ):
        blind.validation_step(batch, 0)
    out = blind.val_metrics.compute()
    assert sum(float(out[f"failures/{c}"]) for c in CLASSES) == 2 and float(out["dice"]) == 0.0
    # the drawing given back: the slab of the drawn slices alone, scored for what it is
    blind.val_metrics.reset()
    blind.model.drawing_width = 1.0
    with pytest.warns(UserWarning, match=r"stage 1 found no surface"), torch.no_grad():
        blind.validation_step(batch, 0)
    out = blind.val_metrics.compute()
    assert sum(float(out[f"failures/{c}"]) for c in CLASSES) == 0
    assert float(out["dice"]) < 0.7 < float(out["drawn_dice"])


def test_shipped_base_decoder_loads() -> None:
    import json
    from importlib.resources import files

    meta = json.loads((files("lora_sam3d.assets") / "shapes.json").read_text())
    module = LoRAMeshDecoderModule(
        decoder=dict(resolution=16, model_channels=64, num_blocks=4, num_heads=4, num_groups=8),
        base={"checkpoint": "builtin:shapes"}, classes=CLASSES,
    )  # fmt: skip
    assert "lora-sam3d fit --config configs/pretrain_shapes.yaml" in meta["command"]
    assert module.decoder.out_layer.weight.abs().sum() > 0, "trained weights, not the zero-initialised head"
    assert module.model.structure_in_base, "stage 1 ships with the base"
    random = LoRAMeshDecoderModule(decoder=dict(resolution=16, model_channels=64, num_blocks=4, num_heads=4,
                                                num_groups=8), classes=CLASSES)  # fmt: skip
    assert not torch.equal(module.structure.head.weight, random.structure.head.weight)
    with pytest.raises(
        FileNotFoundError,
        match=r"no shipped decoder 'builtin:nope'; available: \['builtin:relative_shapes', 'builtin:scan_shapes', 'builtin:shapes'\]",
    ):
        LoRAMeshDecoderModule(CLASSES, decoder=DECODER, base={"checkpoint": "builtin:nope"})


class PoisonedModule(LoRAMeshDecoderModule):
    """A fault, not a stand-in: the real module whose loss turns NaN at chosen steps (as a corrupt
    sample or an overflow would make it)."""

    poison_steps: tuple[int, ...] = (1,)

    def forward(self, batch: Batch) -> Reconstruction:
        rec = super().forward(batch)
        if self.training and self.global_step in self.poison_steps:
            rec.sdf = rec.sdf * float("nan")
        return rec


def lora_state(module: LoRAMeshDecoderModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def test_nonfinite_loss_raises_or_skips_the_step(datamodule: TSDataModule, tmp_path: Path) -> None:
    raising = PoisonedModule(**TRAINS, classes=CLASSES)
    with pytest.raises(
        FloatingPointError, match=r"non-finite training loss at step 1 \(cases \[.*steps.on_nonfinite: skip"
    ):
        trainer(tmp_path, limit_train_batches=3).fit(raising, datamodule=datamodule)

    # skip: the poisoned step changes nothing, so the run equals one that never saw that batch's update
    skipping = PoisonedModule(**TRAINS, classes=CLASSES, steps={"on_nonfinite": "skip"})
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
        FloatingPointError, match=r"non-finite gradients at step 1 in 1 tensors: \['model\.decoder\."
    ):
        trainer(tmp_path, limit_train_batches=2).fit(
            PoisonedGradients(**TRAINS, classes=CLASSES), datamodule=datamodule
        )
    skipping = PoisonedGradients(**TRAINS, classes=CLASSES, steps={"on_nonfinite": "skip"})
    t = trainer(tmp_path, limit_train_batches=3)
    with pytest.warns(UserWarning, match="non-finite gradients at step 1.*step skipped"):
        t.fit(skipping, datamodule=datamodule)
    assert skipping.skipped_steps == 1
    assert all(int(s["step"]) == 2 for s in t.optimizers[0].state.values())
    assert all(torch.isfinite(p).all() for p in skipping.parameters())


class FirstValidationNaN(LoRAMeshDecoderModule):
    """The real module whose first validation score is NaN (as when every sample of it failed)."""

    def _log_metrics(self, stage: str) -> None:
        if stage == "val" and self.current_epoch == 0:
            self.val_metrics.reset()
            self.val_diagnostics.reset()
            self.log("val/dice", float("nan"))
            return
        super()._log_metrics(stage)


def test_callbacks_pick_finite_scores_and_merge_at_the_end(datamodule: TSDataModule, tmp_path: Path) -> None:
    """`AdapterCheckpoint` never takes a NaN score as its best (a NaN best would block every later one);
    `MergeOnEnd` writes a decoder Meta's class loads that computes what the LoRA model computes."""
    from safetensors.torch import load_file

    from lora_sam3d.callbacks import AdapterCheckpoint, MergeOnEnd
    from lora_sam3d.models import SLatMeshDecoder

    module = FirstValidationNaN(**TRAINS, classes=CLASSES)
    best = AdapterCheckpoint()
    t = trainer(tmp_path, max_epochs=2, callbacks=[best, MergeOnEnd()], num_sanity_val_steps=0)
    t.fit(module, datamodule=datamodule)
    assert best.best is not None and math.isfinite(best.best)
    assert best.best == pytest.approx(float(t.callback_metrics["val/dice"])), "the epoch-1 score is the best"
    assert (tmp_path / "adapter-best" / "adapter_model.safetensors").is_file()

    merged_file = tmp_path / "decoder-merged.safetensors"
    tensors = load_file(str(merged_file))
    decoder = SLatMeshDecoder(**module.model.decoder_config)
    decoder.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("structure.")})
    batch = collate([datamodule.datasets["val"][i] for i in range(2)])
    module.eval()
    with torch.no_grad():
        latent = module.encoder(batch.evidence)
        logits, features = module.structure(latent)
        x = active_latent(surface_band(logits > 0, 1), features)
        torch.testing.assert_close(decoder(x).feats, module.decoder(x).feats, rtol=1e-4, atol=1e-5)


def test_writer_formats_and_coordinate_systems(datamodule: TSDataModule, tmp_path: Path) -> None:
    """One predict, three writers: the STL in LPS is the PLY in RAS with x and y negated, the OBJ the
    same surface in RAS; each file says its coordinate system."""
    import trimesh

    from lora_sam3d.callbacks import MeshPredictionWriter

    writers = [
        MeshPredictionWriter(str(tmp_path / "ply"), write_nifti=False, write_png=False),
        MeshPredictionWriter(str(tmp_path / "stl"), "stl", "LPS", write_nifti=False, write_png=False),
        MeshPredictionWriter(str(tmp_path / "obj"), "obj", write_nifti=False, write_png=False),
    ]
    datamodule.setup("predict")
    t = trainer(tmp_path, callbacks=writers, limit_predict_batches=1)
    t.predict(LoRAMeshDecoderModule(decoder=DECODER, classes=CLASSES), datamodule=datamodule)
    plys = sorted((tmp_path / "ply").glob("*.ply"))
    assert plys
    for ply in plys:
        stl, obj = (
            tmp_path / "stl" / ply.with_suffix(".stl").name,
            tmp_path / "obj" / ply.with_suffix(".obj").name,
        )
        assert stl.read_bytes()[:9] == b"SPACE=LPS" and obj.read_bytes().startswith(b"# SPACE=RAS")
        ras = trimesh.load(ply, process=False)
        lps = trimesh.load(stl, file_type="stl", process=False)
        flipped = np.unique(np.round(lps.vertices * [-1, -1, 1], 3), axis=0)
        assert np.array_equal(flipped, np.unique(np.round(ras.vertices, 3), axis=0))
        again = trimesh.load(obj, file_type="obj", process=False)
        np.testing.assert_allclose(again.vertices, ras.vertices, atol=1e-4)


def test_stage_one_trained_fully_and_its_adapter_form(datamodule: TSDataModule, tmp_path: Path) -> None:
    """``finetune.structure_mode: full``: the optimizer gets all of stage 1 (no adapters there) beside the
    decoder's LoRA; the adapter folder carries stage 1 as full weights, and loading it switches a new
    module to that mode and reproduces the model."""
    module = LoRAMeshDecoderModule(
        decoder=DECODER, classes=CLASSES, finetune={"structure_mode": "full", "unfreeze": ["out_layer"]}
    )
    before = {k: v.clone() for k, v in module.model.structure.state_dict().items()}
    t = trainer(tmp_path)
    t.fit(module, datamodule=datamodule)
    params = {id(p) for group in t.optimizers[0].param_groups for p in group["params"]}
    trained = {n for n, p in module.named_parameters() if id(p) in params}
    stage1 = {f"model.structure.{n}" for n, _ in module.model.structure.named_parameters()}
    assert not lora_layers(module.model.structure) and stage1 <= trained
    assert trained - stage1 == {
        n for n in trained if n.startswith("model.decoder.") and ("lora_" in n or "out_layer" in n)
    }
    assert any(not torch.equal(v, before[k]) for k, v in module.model.structure.state_dict().items())
    save_adapter_of(module, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "structure.safetensors").is_file()
    assert not (tmp_path / "adapter" / "structure").exists()
    again = LoRAMeshDecoderModule(
        decoder=DECODER, classes=CLASSES, finetune={"adapter": str(tmp_path / "adapter")}
    )
    assert again.finetune.structure_mode == "full", "the adapter folder says how stage 1 was trained"
    again.configure_adapters()
    batch = collate([datamodule.datasets["val"][i] for i in range(2)])
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(batch).sdf, module.eval()(batch).sdf)


def test_precomputed_latents_replace_stage_one(datamodule: TSDataModule, tmp_path: Path) -> None:
    """``latent_encoder: precomputed``: the decoder runs on exactly the exported cells of each sample,
    validation scores it end to end, and a training step reaches the decoder's adapters only."""
    from safetensors.torch import save_file

    folder = tmp_path / "latents"
    folder.mkdir()
    val = datamodule.datasets["val"]
    cells = 0
    gen = torch.Generator().manual_seed(0)
    for i in range(len(val)):
        s = val[i]
        band = torch.nonzero(surface_band(s["gt_coarse_occupancy"][None].bool(), 1)[0]).int().contiguous()
        sid = collate([s]).evidence.sample_ids[0]
        save_file(
            {"coords": band, "feats": torch.randn(len(band), 8, generator=gen)},
            str(folder / f"{sid}.safetensors"),
        )
        cells += len(band) if i < 2 else 0
    module = LoRAMeshDecoderModule(CLASSES, decoder=DECODER, latents={"encoder": "precomputed", "dir": str(folder)},
                                   finetune={"structure_mode": "full", "unfreeze": ["out_layer"]})  # fmt: skip
    module.configure_adapters()
    seen: list[int] = []
    module.decoder.register_forward_hook(lambda _m, args, _o: seen.append(args[0].feats.shape[0]))
    batch = collate([val[i] for i in range(2)])
    rec = module.train()(batch)
    assert rec.coarse_logits is None and rec.active is None and seen == [cells]
    from lora_sam3d.training.losses import reconstruction_losses

    reconstruction_losses(rec, batch.targets, module.loss_weights, 32)["loss"].backward()
    grads = {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(n.startswith("model.decoder.") for n in grads), "stage 1 is not used"
    out = trainer(tmp_path).validate(module, datamodule=datamodule)[0]
    assert 0.0 <= out["val/dice"] <= 1.0 and math.isfinite(out["val/sdf_l1"]), out
