"""`LoRAMeshDecoderModule`: the decoder, its adapters and the step logic, as a LightningModule.

It holds the model and the losses and nothing else: data come from `TSDataModule`, files are
written by callbacks. LoRA is injected once (in `setup`, or when a checkpoint is loaded), so fit
followed by validate/test/predict in one process never wraps twice. Checkpoints keep only the
trainable tensors plus a description of themselves (fine-tuning mode, LoRA config, the base
weights' fingerprint); loading checks every key and the base, and fails loudly on a mismatch.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch.nn import functional as F

from lora_sam3d.latent import make_encoder
from lora_sam3d.lora import (
    LoRAConfig,
    base_fingerprint,
    freeze_base_params,
    has_lora,
    inject_lora,
    load_adapter,
    merge_lora_weights,
    read_adapter_config,
)
from lora_sam3d.metrics import MeshMetrics
from lora_sam3d.models import SLatMeshDecoder, marching_cubes, vertex_sdf_grid
from lora_sam3d.models.mesh import Mesh

TINY_DECODER: dict[str, Any] = {
    "resolution": 16,
    "model_channels": 128,
    "latent_channels": 8,
    "num_blocks": 4,
    "num_heads": 4,
    "num_groups": 16,
}


def resolve_checkpoint(path: str) -> str:
    """``builtin:<name>`` -> the shipped ``lora_sam3d/assets/<name>.safetensors``; other paths unchanged."""
    if not path.startswith("builtin:"):
        return path
    from importlib.resources import files

    name = path.removeprefix("builtin:")
    found = files("lora_sam3d.assets") / f"{name}.safetensors"
    if not found.is_file():
        available = sorted(
            p.name.removesuffix(".safetensors")
            for p in files("lora_sam3d.assets").iterdir()
            if p.name.endswith(".safetensors")
        )
        raise FileNotFoundError(
            f"no shipped decoder {path!r}; available: {['builtin:' + a for a in available]}"
        )
    return str(found)


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)


class LoRAMeshDecoderModule(L.LightningModule):
    """Fine-tune SAM 3D's mesh decoder with LoRA (or fully) on slice samples.

    Args:
        decoder: `SLatMeshDecoder` arguments (default: the tiny CPU config).
        base_checkpoint: base weights (our safetensors or Meta's ``slat_decoder_mesh`` file);
            ``builtin:<name>`` names a decoder shipped in ``lora_sam3d/assets`` (``builtin:shapes``).
        base_seed: without ``base_checkpoint``, the decoder is initialised from this seed, so a
            checkpoint or adapter of it can be loaded again in another process.
        adapter_seed: the LoRA A matrices are initialised from this seed, in a forked RNG, so
            adapters start the same whatever ran before them: one process or several under DDP,
            the CLI or a notebook.
        finetune: ``lora`` (base frozen, adapters trained) or ``full`` (every decoder weight).
        lora: the adapters (default `LoRAConfig()`: r=4, alpha=8 on ``to_qkv`` and ``to_out``).
        unfreeze: module names trained as well in ``lora`` mode (e.g. ``["out_layer"]``).
        adapter: an adapter folder (``adapter_model.safetensors`` + ``adapter_config.json``) to
            start from, e.g. for ``predict`` without a checkpoint; its LoRA config and trained
            heads replace ``lora`` and ``unfreeze``, and its base fingerprint is checked.
        latent_encoder: ``slice`` (`SliceUnprojection`) or ``precomputed`` (Meta's SAM 3D latents
            in ``latents_dir``); ``latent_band`` limits the slice unprojection to a prism around
            the mask (frame units), None = dense.
        sdf_weight, occupancy_weight, dice_weight: loss terms: truncated L1 on the vertex SDF,
            occupancy BCE and soft Dice on the cells.
        sdf_truncation: SDF clamp for the L1 term, frame units.
        classes: class names for per-class metrics (linked from the data module by the CLI).
        nsd_tolerance_mm: tolerance of the normalised surface Dice.
        on_nonfinite: what a non-finite training loss or gradient does: ``raise`` (default) stops
            the run with a `FloatingPointError` naming the step, the loss terms and the cases;
            ``skip`` leaves that step's weights and optimizer state unchanged, warns, and counts
            it in ``train/skipped_steps``. Under DDP the processes decide together.
        optimizer, scheduler: LightningCLI callables, given the trainable parameters only.
    """

    def __init__(
        self,
        decoder: dict[str, Any] | None = None,
        base_checkpoint: str | None = None,
        base_seed: int = 0,
        adapter_seed: int = 0,
        finetune: Literal["lora", "full"] = "lora",
        lora: LoRAConfig | None = None,
        unfreeze: list[str] | None = None,
        adapter: str | None = None,
        latent_encoder: Literal["slice", "precomputed"] = "slice",
        latent_band: float | None = None,
        latents_dir: str | None = None,
        sdf_weight: float = 1.0,
        occupancy_weight: float = 1.0,
        dice_weight: float = 0.5,
        sdf_truncation: float = 0.1,
        classes: list[str] | None = None,
        nsd_tolerance_mm: float = 3.0,
        on_nonfinite: Literal["raise", "skip"] = "raise",
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if finetune not in ("lora", "full"):
            raise ValueError(f"finetune must be 'lora' or 'full', got {finetune!r}")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "lora"])
        if isinstance(lora, dict):  # from a checkpoint's hyper-parameters
            lora = LoRAConfig.from_dict(lora)
        self.lora_config = lora if lora is not None else LoRAConfig()
        if adapter:
            meta = read_adapter_config(adapter)
            self.lora_config = LoRAConfig.from_dict(meta["lora_sam3d"]["config"])
            self.hparams["unfreeze"] = list(meta.get("modules_to_save") or [])
        self.hparams["lora"] = asdict(self.lora_config)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.decoder_config = {**TINY_DECODER, **(decoder or {})}
        if base_checkpoint:
            self.decoder = SLatMeshDecoder.from_pretrained(
                resolve_checkpoint(base_checkpoint), **self.decoder_config
            )
        else:  # a random base must be the same in every process that loads an adapter for it
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(base_seed)
                self.decoder = SLatMeshDecoder(**self.decoder_config)
        self.base_fingerprint = base_fingerprint(self.decoder)
        self.resolution = self.decoder.resolution
        self.encoder = make_encoder(latent_encoder, self.resolution, latent_band, latents_dir)
        self.classes = list(classes) if classes else None
        self.strict_loading = False  # partial checkpoints: on_load_checkpoint checks every key itself
        self.val_metrics: MeshMetrics | None = None
        self.test_metrics: MeshMetrics | None = None
        self.skipped_steps = 0

    # -- adapters -------------------------------------------------------------------------------
    def configure_adapters(self) -> None:
        """Inject LoRA and set what trains; idempotent."""
        if self.hparams.finetune == "full":
            self.decoder.requires_grad_(True)
            return
        if not has_lora(self.decoder):
            unfrozen = self.hparams.unfreeze or []
            if not self.decoder.out_layer.weight.any() and not any(
                n.startswith("out_layer") for n in unfrozen
            ):
                rank_zero_warn(
                    "the base decoder's out_layer is all zeros (as freshly initialised), so every LoRA "
                    "gradient is zero: give model.base_checkpoint or add 'out_layer' to model.unfreeze"
                )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.hparams.adapter_seed)
                inject_lora(self.decoder, self.lora_config)
            if self.hparams.adapter:
                load_adapter(self.decoder, self.hparams.adapter)
        freeze_base_params(self.decoder)
        for name in self.hparams.unfreeze or []:
            try:
                self.decoder.get_submodule(name).requires_grad_(True)
            except AttributeError as err:
                raise ValueError(f"unfreeze: the decoder has no module {name!r}") from err

    def setup(self, stage: str) -> None:
        self.configure_adapters()
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        hparams = getattr(datamodule, "hparams", {})
        data_resolution = hparams.get("resolution") if hparams else None
        if data_resolution is not None and data_resolution != self.resolution:
            raise ValueError(
                f"data resolution {data_resolution} differs from the decoder's resolution {self.resolution}: "
                "set data.resolution and model.decoder.resolution to the same value"
            )
        if self.classes is None:
            self.classes = list(hparams.get("classes") or []) or None
        if self.classes is None:
            raise ValueError("model.classes is not set and the data module names none")
        self.val_metrics = MeshMetrics(self.classes, self.hparams.nsd_tolerance_mm)
        self.test_metrics = MeshMetrics(self.classes, self.hparams.nsd_tolerance_mm)

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

    # -- forward and losses ---------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, 4R+1, 4R+1, 4R+1) vertex SDF grid (frame units, negative inside, +1 where no voxel reaches)."""
        latent = self.encoder(batch)
        return vertex_sdf_grid(self.decoder(latent), 4 * self.resolution)

    def losses(self, sdf: torch.Tensor, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        h = self.hparams
        tau = h.sdf_truncation
        gt = batch["gt_sdf"].to(sdf.dtype)
        sdf_l1 = (sdf.clamp(-tau, tau) - gt.clamp(-tau, tau)).abs().mean()
        logits = occupancy_logits(sdf, 4 * self.resolution)
        target = batch["gt_occupancy"].to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, target)
        prob = torch.sigmoid(logits).flatten(1)
        inter = (prob * target.flatten(1)).sum(1)
        dice = 1 - ((2 * inter + 1) / (prob.sum(1) + target.flatten(1).sum(1) + 1)).mean()
        total = h.sdf_weight * sdf_l1 + h.occupancy_weight * bce + h.dice_weight * dice
        return {"loss": total, "sdf_l1": sdf_l1, "occupancy_bce": bce, "soft_dice": dice}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        terms = self.losses(self(batch), batch)
        n = len(batch["case_id"])
        finite = bool(torch.isfinite(terms["loss"]))
        if self._trainer is not None:  # every process must take the same branch under DDP
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            values = {k: float(v.detach()) for k, v in terms.items()}
            where = f"at step {self.global_step} (cases {sorted(set(batch['case_id']))})"
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
        if self.hparams.on_nonfinite == "raise":
            raise FloatingPointError(f"{message}; set model.on_nonfinite: skip to skip such steps")
        self.skipped_steps += 1
        rank_zero_warn(f"{message}; step skipped ({self.skipped_steps} so far)")
        self.log("train/skipped_steps", float(self.skipped_steps), reduce_fx="max")

    def _compare(self, sdf: torch.Tensor, batch: dict[str, Any]) -> dict[str, Any]:
        """Everything the metrics compare, for a batch with ground truth: cell occupancies (CPU), the
        cell spacing in mm, and both surfaces as world-space meshes."""
        n = 4 * self.resolution
        return {
            "pred": (occupancy_logits(sdf, n) > 0).cpu(),
            "gt": batch["gt_occupancy"].bool().cpu(),
            "spacing_mm": (frame_side_mm(batch["frame_to_world"]) / n).cpu(),
            "pred_meshes": meshes_in_world(sdf, batch["frame_to_world"]),
            "gt_meshes": meshes_in_world(batch["gt_sdf"], batch["frame_to_world"]),
        }

    def _evaluate(self, batch: dict[str, Any], stage: str, metrics: MeshMetrics) -> None:
        sdf = self(batch)
        terms = self.losses(sdf, batch)
        self.log_dict(
            {f"{stage}/{k}": v for k, v in terms.items()}, batch_size=len(batch["case_id"]), sync_dist=True
        )
        c = self._compare(sdf, batch)
        metrics.update(
            c["pred"], c["gt"], c["spacing_mm"], batch["class_index"].cpu(),
            [m.vertices for m in c["pred_meshes"]], [m.vertices for m in c["gt_meshes"]],
        )  # fmt: skip

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        assert self.val_metrics is not None
        self._evaluate(batch, "val", self.val_metrics)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        assert self.test_metrics is not None
        self._evaluate(batch, "test", self.test_metrics)

    def _log_metrics(self, stage: str, metrics: MeshMetrics) -> None:
        values = {f"{stage}/{k}": v.float() for k, v in metrics.compute().items()}
        self.log_dict(values, prog_bar=False, sync_dist=False)
        self.log(f"{stage}_dice", values[f"{stage}/dice"], prog_bar=True, logger=False)
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        assert self.val_metrics is not None
        self._log_metrics("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        assert self.test_metrics is not None
        self._log_metrics("test", self.test_metrics)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Per sample: the mesh in world RAS mm, the SDF grid, the frame, and metrics when ground truth exists."""
        sdf = self(batch)
        has_gt = "gt_sdf" in batch
        c = self._compare(sdf, batch) if has_gt else None
        meshes = c["pred_meshes"] if c is not None else meshes_in_world(sdf, batch["frame_to_world"])
        out = []
        for i, mesh in enumerate(meshes):
            record: dict[str, Any] = {
                "case_id": batch["case_id"][i],
                "class_name": batch["class_name"][i],
                "axis": int(batch["axis"][i]),
                "index": int(batch["index"][i]),
                "source_image": batch["source_image"][i] if "source_image" in batch else None,
                "frame_to_world": batch["frame_to_world"][i].cpu().numpy(),
                "sdf": sdf[i].detach().float().cpu().numpy(),
                "image": batch["image"][i, 0].cpu().numpy(),
                "mask": batch["mask"][i].cpu().numpy(),
                "mesh": mesh,
            }
            if c is not None:
                record["gt_sdf"] = batch["gt_sdf"][i].cpu().numpy()
                record["gt_mesh"] = c["gt_meshes"][i]
                # this sample's own values: no averaging with what other DDP processes predicted
                metric = MeshMetrics(
                    [record["class_name"]], self.hparams.nsd_tolerance_mm, sync_on_compute=False
                )
                one = slice(i, i + 1)
                metric.update(
                    c["pred"][one], c["gt"][one], c["spacing_mm"][one], torch.zeros(1, dtype=torch.long),
                    [mesh.vertices], [c["gt_meshes"][i].vertices],
                )  # fmt: skip
                values = metric.compute()
                record["metrics"] = {k: float(v) for k, v in values.items() if "/" not in k}
                record["metrics"]["failed"] = float(values[f"failures/{record['class_name']}"])
            out.append(record)
        return out

    # -- checkpoints ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = set(self.trainable_names())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["lora_sam3d"] = {
            "finetune": self.hparams.finetune,
            "lora": asdict(self.lora_config),
            "unfreeze": list(self.hparams.unfreeze or []),
            "decoder": self.decoder_config,
            "base_checkpoint": self.hparams.base_checkpoint,
            "base_fingerprint": self.base_fingerprint,
            "trainable": sorted(trainable),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("lora_sam3d")
        if not isinstance(meta, dict):
            raise ValueError("this checkpoint was not written by lora-sam3d (no 'lora_sam3d' section)")
        if meta["finetune"] != self.hparams.finetune:
            raise ValueError(
                f"checkpoint is a '{meta['finetune']}' fine-tune but the model is configured for "
                f"'{self.hparams.finetune}'; set model.finetune: {meta['finetune']}"
            )
        if meta["base_fingerprint"] != self.base_fingerprint:
            raise ValueError(
                f"checkpoint was trained on another base decoder (fingerprint {meta['base_fingerprint'][:12]}..., "
                f"this model {self.base_fingerprint[:12]}...; base_checkpoint was {meta.get('base_checkpoint')!r})"
            )
        self.configure_adapters()
        own = dict(self.named_parameters())
        expected = set(self.trainable_names())
        got = set(checkpoint["state_dict"])
        missing, unexpected = sorted(expected - got), sorted(got - expected)
        shapes = sorted(
            f"{k}: checkpoint {tuple(checkpoint['state_dict'][k].shape)}, model {tuple(own[k].shape)}"
            for k in expected & got
            if tuple(checkpoint["state_dict"][k].shape) != tuple(own[k].shape)
        )
        if missing or unexpected or shapes:
            raise ValueError(
                "checkpoint does not fit this model: "
                + "; ".join(
                    f"{t} {v[:10]}"
                    for t, v in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes))
                    if v
                )
                + " (check model.lora / model.unfreeze against the checkpoint's)"
            )

    def merged_decoder(self) -> SLatMeshDecoder:
        """A copy of the decoder with LoRA merged into the base weights (the module is untouched)."""
        return merge_lora_weights(self.decoder, inplace=False)  # type: ignore[return-value]


def occupancy_logits(sdf: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n, n, n) logits of each cell being inside, from the mean SDF of its 8 corners, in voxel units."""
    cell = F.avg_pool3d(sdf[:, None], kernel_size=2, stride=1)[:, 0]
    return -cell * n


def frame_side_mm(frame_to_world: torch.Tensor) -> torch.Tensor:
    """(B,) side of each frame cube in mm (the length of its first axis)."""
    return frame_to_world[:, :3, 0].double().norm(dim=-1)


def meshes_in_world(sdf: torch.Tensor, frame_to_world: torch.Tensor) -> list[Mesh]:
    """Marching cubes of each SDF grid, mapped to world RAS mm."""
    return [
        marching_cubes(s).to_world(np.asarray(m.detach().cpu()))
        for s, m in zip(sdf, frame_to_world, strict=True)
    ]
