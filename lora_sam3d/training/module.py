"""`LoRAMeshDecoderModule`: the Lightning hooks, steps and metric wiring around the two-stage model.

The model itself (stage 1, the active band, the decoder, the fill) is `lora_sam3d.models.Reconstructor`,
plain PyTorch; losses and per-sample records are plain functions (`lora_sam3d.training.losses`,
`lora_sam3d.predict.records`); what trains (`lora_sam3d.models.finetuning`) and adapter folders
(`lora_sam3d.models.adapters.files`) are the model's; the per-class adapter bank is
`lora_sam3d.models.adapters.bank`; batches are `lora_sam3d.inputs.Batch` records. What stays here is
Lightning's contract: LoRA is injected once (in `setup`, or when a checkpoint is loaded), so fit
followed by validate/test/predict in one process never wraps twice; the optimizer sees the trainable tensors only; checkpoints keep only those tensors
plus their manifest (`lora_sam3d.models.adapters.manifest.Manifest`, also an adapter folder's ``model.json``),
and loading checks every key and the base and fails loudly on a mismatch. The data module is never
read from here: `lora_sam3d.training.data_link.DataLink` hands over what crosses.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn

from lora_sam3d.data.settings import PREPROCESSING_SETTINGS
from lora_sam3d.inputs import Batch
from lora_sam3d.lora import has_lora
from lora_sam3d.metrics import MeshMetrics, WeightedMeans
from lora_sam3d.models import BandConfig, BaseConfig, ContextConfig, LatentConfig, ModelConfig, StepConfig
from lora_sam3d.models.adapters.bank import AdapterBank
from lora_sam3d.models.adapters.manifest import Manifest
from lora_sam3d.models.finetuning import (
    FinetuneConfig,
    adopt_adapter,
    check_stage_one_adaptable,
    check_trainable_state,
    output_layer_blocks_lora,
    set_trainable,
)
from lora_sam3d.models.reconstructor import Reconstruction, Reconstructor
from lora_sam3d.predict.records import Prediction, prediction_records, score_batch, warn_empty
from lora_sam3d.settings.old_keys import upgrade_state_dict, upgraded_checkpoint
from lora_sam3d.settings.tree import coerce
from lora_sam3d.training.checkpoint_io import check_checkpoint
from lora_sam3d.training.data_link import DataLink
from lora_sam3d.training.losses import DIAGNOSTICS, LossWeights, frame_diagnostics, reconstruction_losses

__all__ = ["LoRAMeshDecoderModule"]


BASE, CONTEXT, BAND, LATENTS = BaseConfig(), ContextConfig(), BandConfig(), LatentConfig()
FINETUNE, LOSS, STEPS = FinetuneConfig(), LossWeights(), StepConfig()
"""The groups' defaults (frozen: one instance is shared safely)."""


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)


def check_classes(classes: list[str]) -> None:
    """A one-line error for a module without classes (the CLI checks it too; Python does not)."""
    if not classes:
        raise ValueError("model.classes is empty: name the structures (the command links data.classes)")


class LoRAMeshDecoderModule(L.LightningModule):
    """Fine-tune the two stages (sparse structure + SAM 3D's mesh decoder) with LoRA, or fully.

    Args:
        classes: class names, in the data's order (per-class metrics; the CLI links ``data.classes``).
        decoder: `SLatMeshDecoder` arguments (default: the tiny CPU config, `TINY_DECODER`).
        structure: `SparseStructureNet` arguments (``channels``, ``num_groups``).
        base, context, band, latents: the model's groups (`lora_sam3d.models.config`: the base weights
            and their seed, whether the scan is read and the decoder's levels conditioned, the band the
            decoder runs on, where the latents come from).
        finetune: what trains and from which adapters (`FinetuneConfig`: mode, both stages' LoRA,
            ``unfreeze``, the adapters' seed, ``adapter`` to start from or ``adapters``, one per
            structure for prediction, see `lora_sam3d.models.adapters.bank.AdapterBank`).
        loss: the loss terms' weights (`LossWeights`).
        steps: the NSD tolerance steps score with and what a non-finite step does (`StepConfig`).
        optimizer, scheduler: LightningCLI callables, given the trainable parameters only.

    Every group also takes a dict of its fields; hyper-parameters store them as plain dicts.
    """

    def __init__(
        self,
        classes: list[str],
        decoder: dict[str, Any] | None = None,
        structure: dict[str, Any] | None = None,
        base: BaseConfig = BASE,
        context: ContextConfig = CONTEXT,
        band: BandConfig = BAND,
        latents: LatentConfig = LATENTS,
        finetune: FinetuneConfig = FINETUNE,
        loss: LossWeights = LOSS,
        steps: StepConfig = STEPS,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        check_classes(classes)
        groups = {"base": base, "context": context, "band": band, "latents": latents}
        groups |= {"finetune": finetune, "loss": loss, "steps": steps}
        config = ModelConfig(
            decoder or {}, structure or {}, *(groups[k] for k in ("base", "context", "band", "latents"))
        )
        # an adapter folder's own LoRA settings replace the configured ones
        self.finetune = adopt_adapter(coerce(FinetuneConfig, groups["finetune"], "model.finetune"))
        self.loss_weights = coerce(LossWeights, groups["loss"], "model.loss")
        self.steps = coerce(StepConfig, groups["steps"], "model.steps")
        self.save_hyperparameters(ignore=["optimizer", "scheduler", *groups])
        self.hparams.update(
            {
                **config.to_dict(),
                "finetune": self.finetune.to_dict(),
                "loss": asdict(self.loss_weights),
                "steps": asdict(self.steps),
            }
        )
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.model = Reconstructor(config)
        check_stage_one_adaptable(self.model, self.finetune)
        self.classes = list(classes)
        self.strict_loading = False  # partial checkpoints: on_load_checkpoint checks every key itself
        self.val_metrics, self.test_metrics = (
            MeshMetrics(self.classes, self.steps.nsd_tolerance_mm) for _ in "vt"
        )
        self.val_diagnostics, self.test_diagnostics = (WeightedMeans(DIAGNOSTICS) for _ in "vt")
        self.data_contract: dict[str, Any] | None = None  # see TSDataModule.contract; set by fit, stored
        self.bank: AdapterBank | None = None  # model.finetune.adapters, read once
        self.skipped_steps = 0

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: str | Path | IO, *args: Any, **kwargs: Any
    ) -> LoRAMeshDecoderModule:
        """Lightning's loader; a checkpoint of the flat layout has its hyper-parameters moved to the
        tree first (`lora_sam3d.settings.old_keys.upgraded_checkpoint`), then loads as any other."""
        checkpoint_path = upgraded_checkpoint(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)  # type: ignore[return-value]

    # The model's parts, as the callbacks, export and benchmarks reach them.
    decoder = property(lambda self: self.model.decoder)
    structure = property(lambda self: self.model.structure)
    encoder = property(lambda self: self.model.encoder)
    resolution = property(lambda self: self.model.resolution)

    # -- adapters -------------------------------------------------------------------------------
    def configure_adapters(self) -> None:
        """Inject LoRA and set what trains; idempotent.

        Called from `setup` and from `on_load_checkpoint`: ``load_from_checkpoint`` restores the
        state before any ``setup`` runs, so the LoRA tensors must exist by then.
        """
        m, ft = self.model, self.finetune
        if ft.mode == "lora" and not has_lora(m.decoder) and output_layer_blocks_lora(m, ft.unfreeze):
            rank_zero_warn(
                "the base decoder's out_layer is all zeros (as freshly initialised), so every LoRA "
                "gradient is zero: give model.base.checkpoint or add 'out_layer' to model.finetune.unfreeze"
            )
        injected = set_trainable(m, ft)
        if ft.mode == "full":
            return
        if injected and ft.adapter:
            self.data_contract = m.attach_adapter(ft.adapter).get("data") or self.data_contract
        if ft.adapters and self.bank is None:
            names = [n for n, p in m.named_parameters() if p.requires_grad]
            self.bank = AdapterBank(m, ft.adapters, names, agree_on=PREPROCESSING_SETTINGS)
            self.data_contract = self.bank.data_contract()

    def setup(self, stage: str) -> None:
        self.configure_adapters()
        if stage == "fit" and self.finetune.adapters:
            raise ValueError(
                "model.finetune.adapters routes prediction to one adapter per structure; train one adapter per run"
            )

    def configure_callbacks(self) -> list[L.Callback]:
        """`DataLink`: the one place the data module and this module meet (see its docstring)."""
        return [DataLink()]

    def manifest(self, trainable: list[str] | None = None) -> Manifest:
        """What a checkpoint or adapter folder of this module says of it (one writer for both)."""
        return Manifest.describe(
            self.model, self.classes, self.data_contract, self.finetune.to_dict(), trainable
        )

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: no parameter requires grad")
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    # -- steps ------------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> Reconstruction:
        """The model on a batch; with ``model.finetune.adapters``, each sample with its class's adapter."""
        if self.bank is not None:
            return self.bank(batch)
        return self.model(batch.evidence, batch.targets.coarse_occupancy)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        terms = reconstruction_losses(self(batch), batch.targets, self.loss_weights, 4 * self.resolution)
        n = len(batch)
        finite = bool(torch.isfinite(terms["loss"]))
        if self._trainer is not None:  # every process must take the same branch under DDP
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            values = {k: float(v.detach()) for k, v in terms.items()}
            where = f"at step {self.global_step} (cases {sorted(set(batch.info.case_id))})"
            self._nonfinite(f"non-finite training loss {where}: {values}")
            return None  # Lightning then skips backward and the optimizer step
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, prog_bar=False, batch_size=n)
        self.log("loss", terms["loss"], prog_bar=True, logger=False, batch_size=n)
        return terms["loss"]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """A finite loss can still give inf/NaN gradients (overflow): same rule as the loss."""
        grads = {n: p.grad for n, p in self.named_parameters() if p.grad is not None}
        if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads.values()]).all()):
            return  # one device sync per step, not one per tensor
        bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
        self._nonfinite(f"non-finite gradients at step {self.global_step} in {len(bad)} tensors: {bad[:5]}")
        optimizer.zero_grad(set_to_none=True)  # parameters without a gradient are not updated

    def _nonfinite(self, message: str) -> None:
        if self.steps.on_nonfinite == "raise":
            raise FloatingPointError(f"{message}; set model.steps.on_nonfinite: skip to skip such steps")
        self.skipped_steps += 1
        rank_zero_warn(f"{message}; step skipped ({self.skipped_steps} so far)")
        self.log("train/skipped_steps", float(self.skipped_steps), reduce_fx="max")

    def _evaluate(self, batch: Batch, stage: str) -> None:
        rec = self(batch)
        diagnostics = frame_diagnostics(rec, batch.targets, self.loss_weights, 4 * self.resolution)
        getattr(self, f"{stage}_diagnostics").update(diagnostics, len(batch))
        warn_empty(rec, batch)
        scored = score_batch(rec, batch, self.steps.nsd_tolerance_mm)
        classes = batch.info.class_index
        if classes is None:
            raise ValueError("validation and test batches need class indices (a split's samples)")
        getattr(self, f"{stage}_metrics").update([s.metrics for s in scored if s], classes.cpu())

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _log_metrics(self, stage: str) -> None:
        """Log the epoch's scores and diagnostics; both are synchronised by their torchmetrics states."""
        metrics, diagnostics = getattr(self, f"{stage}_metrics"), getattr(self, f"{stage}_diagnostics")
        values = {f"{stage}/{k}": v.float() for k, v in metrics.compute().items()}
        values |= {f"{stage}/{k}": v.float() for k, v in diagnostics.compute().items() if not torch.isnan(v)}
        self.log_dict(values, prog_bar=False, sync_dist=False)
        self.log(f"{stage}_dice", values[f"{stage}/dice"], prog_bar=True, logger=False)
        metrics.reset()
        diagnostics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def predict_step(self, batch: Batch, batch_idx: int) -> list[Prediction]:
        """Per sample: the mesh in world RAS mm, the SDF grid, the frame, and metrics when ground truth exists."""
        return prediction_records(
            self(batch), batch, self.steps.nsd_tolerance_mm, self.model.config.context.read
        )

    # -- checkpoints ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = set(self.trainable_names())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        self.manifest(sorted(trainable)).write_to(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        manifest = check_checkpoint(checkpoint, self.finetune, self.model.base_fingerprint)
        upgrade_state_dict(checkpoint["state_dict"])
        self.data_contract = manifest.data or self.data_contract
        self.configure_adapters()
        check_trainable_state(self.model, checkpoint["state_dict"], prefix="model.")
        # The frozen base is rebuilt from model.base.checkpoint, not stored: hand the loader its own
        # tensors so it does not list ~100 "missing" keys that are not missing.
        checkpoint["state_dict"] = {**self.state_dict(), **checkpoint["state_dict"]}
