"""`LoRAMeshDecoderModule`: the two stages, their adapters and the step logic, as a LightningModule.

Coarse to fine, as SAM 3D Objects: stage 1 (`SparseStructureNet`) reads the slice evidence on the
R^3 grid and predicts occupancy and latents; the mesh decoder runs on the band of active cells
around the predicted surface only and subdivides them 4x. Both belong to the base: with
``finetune: lora`` both adapt through LoRA (stage 1 on its convolutions) unless
``structure_finetune: full``. It holds the model and the losses and nothing else: data come from `TSDataModule`, files are
written by callbacks. LoRA is injected once (in `setup`, or when a checkpoint is loaded), so fit
followed by validate/test/predict in one process never wraps twice. Checkpoints keep only the
trainable tensors plus a description of themselves (fine-tuning mode, LoRA config, the base
weights' fingerprint); loading checks every key and the base, and fails loudly on a mismatch.
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch.nn import functional as F

from lora_sam3d.checkpoint_io import (
    DESIGN,
    STRUCTURE_ADAPTER,
    check_design,
    load_module_adapter,
    load_weights,
    resolve_checkpoint,
)
from lora_sam3d.latent import PrecomputedLatents, make_encoder
from lora_sam3d.lora import (
    LoRAConfig,
    base_fingerprint,
    freeze_base_params,
    has_lora,
    inject_lora,
    merge_lora_weights,
    read_adapter_config,
    state_dict_fit,
)
from lora_sam3d.metrics import MeshMetrics, WeightedMeans, sample_metrics
from lora_sam3d.models import SLatMeshDecoder, marching_cubes, vertex_sdf_grid
from lora_sam3d.models.mesh import Mesh, mask_surface, sdf_on_grid
from lora_sam3d.models.structure import (
    STRUCTURE_PREFIX,
    SparseStructureNet,
    active_latent,
    surface_band,
    vertex_fill,
)

TINY_DECODER: dict[str, Any] = {
    "resolution": 16,
    "model_channels": 128,
    "latent_channels": 8,
    "num_blocks": 4,
    "num_heads": 4,
    "num_groups": 16,
}
DIAGNOSTICS = (
    "loss", "sdf_l1", "occupancy_bce", "soft_dice", "structure_bce", "structure_dice",
    "active_voxels", "frame_coarse_dice", "frame_dice",
)  # fmt: skip
"""What validation and test log beside the scores: the loss terms and the frame-grid diagnostics."""
STRUCTURE_LORA_TARGETS = r"(enc|dec)\d\.[03]|head"
"""Every convolution of `SparseStructureNet` (full-match regex on module names)."""


@dataclass
class Reconstruction:
    """What the model returns for a batch.

    Attributes:
        sdf: (B, 4R+1, 4R+1, 4R+1) vertex SDF grid in frame units, negative inside.
        coarse_logits: (B, R, R, R) stage-1 occupancy logits (None with precomputed latents).
        active: (B, R, R, R) bool, the cells the decoder ran on (None with precomputed latents).
    """

    sdf: torch.Tensor
    coarse_logits: torch.Tensor | None = None
    active: torch.Tensor | None = None

    def active_counts(self) -> list[int]:
        if self.active is None:
            return []
        return self.active.flatten(1).sum(1).tolist()


@dataclass
class Prediction:
    """One sample's result, as `predict_step` hands it to `MeshPredictionWriter`.

    Attributes:
        case_id, class_name, axis, index: which slice of which case it came from.
        source_image: the NIfTI the slice was read from (its grid receives the predicted mask).
        frame_to_world: (4, 4) frame units -> world RAS mm.
        sdf: (4R+1,)*3 predicted vertex SDF in frame units, negative inside.
        image, mask: (S, S) the input slice's first channel and its mask.
        mesh: the predicted surface in world RAS mm.
        slice_name: how the slice is named in file names (see `stem`).
        gt_sdf, gt_mesh, metrics: the truth and the scores, when the sample has ground truth.
    """

    case_id: str
    class_name: str
    axis: int
    index: int
    source_image: str | None
    frame_to_world: np.ndarray
    sdf: np.ndarray
    image: np.ndarray
    mask: np.ndarray
    mesh: Mesh
    slice_name: str = ""
    gt_sdf: np.ndarray | None = None
    gt_mesh: Mesh | None = None
    metrics: dict[str, float] | None = None

    @property
    def stem(self) -> str:
        """The file-name stem of this sample's outputs: ``<case>_<class>_<slice>``, the slice as
        ``axial57`` (a request's file slice) or ``axis2_slice44`` (a split's canonical slice)."""
        return f"{self.case_id}_{self.class_name}_{self.slice_name or f'axis{self.axis}_slice{self.index}'}"


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)


class LoRAMeshDecoderModule(L.LightningModule):
    """Fine-tune the two stages (sparse structure + SAM 3D's mesh decoder) with LoRA, or fully.

    Args:
        classes: class names, in the data's order (per-class metrics; the CLI links ``data.classes``).
        decoder: `SLatMeshDecoder` arguments (default: the tiny CPU config).
        structure: `SparseStructureNet` arguments (``channels``, ``num_groups``).
        base_checkpoint: base weights: our safetensors (decoder keys plus stage-1 keys under
            ``structure.``) or Meta's ``slat_decoder_mesh`` file (decoder only: stage 1 then starts
            from ``base_seed`` and must train, ``structure_finetune: full``);
            ``builtin:<name>`` names a base shipped in ``lora_sam3d/assets`` (``builtin:shapes``).
        base_seed: without ``base_checkpoint``, both stages are initialised from this seed, so a
            checkpoint or adapter of it can be loaded again in another process.
        adapter_seed: the LoRA A matrices are initialised from this seed, in a forked RNG, so
            adapters start the same whatever ran before them.
        finetune: ``lora`` (base frozen, adapters trained) or ``full`` (every weight of both stages).
        structure_finetune: with ``finetune: lora``, how stage 1 trains: ``lora`` (adapters on its
            convolutions, the default) or ``full``.
        lora: the decoder's adapters (default `LoRAConfig()`: r=4, alpha=8 on ``to_qkv`` and ``to_out``).
        structure_lora: stage 1's adapters (default r=2, alpha=4 on every convolution,
            `STRUCTURE_LORA_TARGETS`), used with ``structure_finetune: lora``.
        unfreeze: decoder module names trained as well in ``lora`` mode (e.g. ``["out_layer"]``).
        adapter: an adapter folder to start from (e.g. for ``predict`` without a checkpoint).
        adapters: one adapter per structure on one base, for ``predict``/``validate``/``test``: class
            name (or a shell pattern such as ``heart_*``) -> adapter folder; each sample runs with
            the adapter of its class (exact names first, then patterns in order), swapped in
            without reloading the base. The adapters must share the base and LoRA settings.
        latent_encoder: ``slice`` (both stages from the slice) or ``precomputed`` (Meta's SAM 3D
            structured latents in ``latents_dir`` replace stage 1).
        active_margin: the decoder runs on cells within this many cells of stage 1's surface.
        train_active: the cells the decoder trains on: ``predicted`` (stage 1's band), ``truth``
            (the band around the true coarse surface) or ``union`` of both (default).
        max_active_voxels: an error is raised when a batch has more active cells (None: no cap).
        sdf_weight, occupancy_weight, dice_weight: decoder loss terms: truncated L1 on the vertex
            SDF, occupancy BCE and soft Dice on the fine cells.
        structure_weight: weight of stage 1's occupancy BCE + soft Dice on the R^3 cells.
        sdf_truncation: SDF clamp for the L1 term, frame units.
        nsd_tolerance_mm: tolerance of the normalised surface Dice.
        on_nonfinite: ``raise`` (default) or ``skip`` a step whose loss or gradients are not finite.
        optimizer, scheduler: LightningCLI callables, given the trainable parameters only.
    """

    def __init__(
        self,
        classes: list[str],
        decoder: dict[str, Any] | None = None,
        structure: dict[str, Any] | None = None,
        base_checkpoint: str | None = None,
        base_seed: int = 0,
        adapter_seed: int = 0,
        finetune: Literal["lora", "full"] = "lora",
        structure_finetune: Literal["lora", "full"] = "lora",
        lora: LoRAConfig | None = None,
        structure_lora: LoRAConfig | None = None,
        unfreeze: list[str] | None = None,
        adapter: str | None = None,
        adapters: dict[str, str] | None = None,
        latent_encoder: Literal["slice", "precomputed"] = "slice",
        latents_dir: str | None = None,
        active_margin: int = 1,
        train_active: Literal["predicted", "truth", "union"] = "union",
        max_active_voxels: int | None = None,
        sdf_weight: float = 1.0,
        occupancy_weight: float = 1.0,
        dice_weight: float = 0.5,
        structure_weight: float = 1.0,
        sdf_truncation: float = 0.1,
        nsd_tolerance_mm: float = 3.0,
        on_nonfinite: Literal["raise", "skip"] = "raise",
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        for name, value, allowed in (
            ("finetune", finetune, ("lora", "full")),
            ("structure_finetune", structure_finetune, ("lora", "full")),
            ("on_nonfinite", on_nonfinite, ("raise", "skip")),
            ("train_active", train_active, ("predicted", "truth", "union")),
        ):
            if value not in allowed:
                raise ValueError(f"model.{name} must be one of {list(allowed)}, got {value!r}")
        if not (isinstance(active_margin, int) and active_margin >= 1):
            raise ValueError(f"model.active_margin must be an integer >= 1 (cells), got {active_margin!r}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "lora", "structure_lora"])
        if isinstance(lora, dict):  # from a checkpoint's hyper-parameters
            lora = LoRAConfig.from_dict(lora)
        if isinstance(structure_lora, dict):
            structure_lora = LoRAConfig.from_dict(structure_lora)
        self.lora_config = lora if lora is not None else LoRAConfig()
        self.structure_lora_config = structure_lora or LoRAConfig(
            2, 4.0, target_modules=STRUCTURE_LORA_TARGETS
        )
        if adapter and adapters:
            raise ValueError(
                "give model.adapter (one adapter) or model.adapters (one per structure), not both"
            )
        if adapters:
            adapter = next(iter(adapters.values()))  # they share their settings: the first one's
        if adapter:  # the adapter folder's own settings replace the configured ones
            meta = read_adapter_config(adapter)
            self.lora_config = LoRAConfig.from_dict(meta["lora_sam3d"]["config"])
            self.hparams["unfreeze"] = list(meta.get("modules_to_save") or [])
            if (Path(adapter) / STRUCTURE_ADAPTER).is_dir():
                stage1 = read_adapter_config(Path(adapter) / STRUCTURE_ADAPTER)
                self.structure_lora_config = LoRAConfig.from_dict(stage1["lora_sam3d"]["config"])
            elif (Path(adapter) / f"{STRUCTURE_ADAPTER}.safetensors").is_file():
                self.hparams["structure_finetune"] = "full"
        self.hparams["lora"] = asdict(self.lora_config)
        self.hparams["structure_lora"] = asdict(self.structure_lora_config)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.decoder_config = {**TINY_DECODER, **(decoder or {})}
        self.structure_config = {
            "latent_channels": self.decoder_config["latent_channels"],
            **(structure or {}),
        }
        with torch.random.fork_rng(devices=[]):  # a random base must be the same in every process
            torch.manual_seed(base_seed)
            self.decoder = SLatMeshDecoder(**self.decoder_config)
            self.structure = SparseStructureNet(**self.structure_config)
        self.structure_in_base = base_checkpoint is None
        if base_checkpoint:
            self._load_base(resolve_checkpoint(base_checkpoint))
        self.uses_structure = latent_encoder == "slice"
        if (
            self.uses_structure
            and not self.structure_in_base
            and finetune == "lora"
            and structure_finetune == "lora"
        ):
            raise ValueError(
                f"base_checkpoint {base_checkpoint} has no stage-1 (sparse structure) weights, so LoRA has "
                "nothing to adapt there: set model.structure_finetune: full to train stage 1 from scratch"
            )
        self.base_fingerprint = hashlib.sha256(
            (base_fingerprint(self.decoder) + base_fingerprint(self.structure)).encode()
        ).hexdigest()
        self.resolution = self.decoder.resolution
        self.encoder = make_encoder(latent_encoder, self.resolution, latents_dir)
        if not classes:
            raise ValueError("model.classes is empty: name the structures (the command links data.classes)")
        self.classes = list(classes)
        self.strict_loading = False  # partial checkpoints: on_load_checkpoint checks every key itself
        self.val_metrics = MeshMetrics(self.classes, nsd_tolerance_mm)
        self.test_metrics = MeshMetrics(self.classes, nsd_tolerance_mm)
        self.data_contract: dict[str, Any] | None = None  # see TSDataModule.contract; set by fit, stored
        self._bank: dict[str, dict[str, torch.Tensor]] | None = None  # model.adapters, read once
        self._active: str | None = None
        self.val_diagnostics = WeightedMeans(DIAGNOSTICS)
        self.test_diagnostics = WeightedMeans(DIAGNOSTICS)
        self.skipped_steps = 0

    def _load_base(self, path: str) -> None:
        state = load_weights(path)
        structure = {
            k.removeprefix(STRUCTURE_PREFIX): v for k, v in state.items() if k.startswith(STRUCTURE_PREFIX)
        }
        self.decoder = SLatMeshDecoder.from_state_dict(state, path, **self.decoder_config)
        if structure:
            fit = state_dict_fit(self.structure.state_dict(), structure)
            if fit.missing or fit.unexpected or fit.mismatched:
                raise ValueError(
                    f"{path}: stage-1 weights do not fit SparseStructureNet({self.structure_config}): "
                    f"{fit.describe()} (check model.structure)"
                )
            self.structure.load_state_dict(structure)
            self.structure_in_base = True

    # -- adapters -------------------------------------------------------------------------------
    def configure_adapters(self) -> None:
        """Inject LoRA and set what trains; idempotent.

        Called from `setup` and from `on_load_checkpoint`: ``load_from_checkpoint`` restores the
        state before any ``setup`` runs, so the LoRA tensors must exist by then.
        """
        if self.hparams.finetune == "full":
            self.requires_grad_(True)
            return
        lora_structure = self.uses_structure and self.hparams.structure_finetune == "lora"
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
                if lora_structure:
                    inject_lora(self.structure, self.structure_lora_config)
            if self.hparams.adapter:
                load_module_adapter(self, self.hparams.adapter)
        freeze_base_params(self.decoder)
        freeze_base_params(self.structure)
        if self.uses_structure and self.hparams.structure_finetune == "full":
            self.structure.requires_grad_(True)
        for name in self.hparams.unfreeze or []:
            try:
                self.decoder.get_submodule(name).requires_grad_(True)
            except AttributeError as err:
                raise ValueError(f"unfreeze: the decoder has no module {name!r}") from err
        if self.hparams.get("adapters") and self._bank is None:
            self._load_bank(self.hparams.adapters)

    def _load_bank(self, adapters: dict[str, str]) -> None:
        """Read every adapter of ``model.adapters`` once; `_use` swaps their tensors in."""
        names = self.trainable_names()
        params = dict(self.named_parameters())
        bank, contracts = {}, {}
        for key, folder in adapters.items():
            self.data_contract = None
            load_module_adapter(self, folder)  # checks the base fingerprint and the LoRA shapes
            bank[key] = {n: params[n].detach().clone() for n in names}
            contracts[folder] = self.data_contract
        self._bank, self._active = bank, None
        known = {f: c for f, c in contracts.items() if c}
        if known:
            (first, base), *others = known.items()
            for folder, contract in others:
                for k in ("spacing", "modality", "ct_window_hu", "slice_size", "frame_scale"):
                    if contract[k] != base[k]:
                        raise ValueError(
                            f"model.adapters: {first} and {folder} were trained with different data.{k} "
                            f"({base[k]} vs {contract[k]}); one run predicts with one preprocessing"
                        )
            extents = {k: v for c in known.values() for k, v in c["extent_mm"].items()}
            classes = list(dict.fromkeys(c for contract in known.values() for c in contract["classes"]))
            self.data_contract = {**base, "extent_mm": extents, "classes": classes}

    @property
    def routed(self) -> bool:
        """Whether samples run with their class's adapter of ``model.adapters``."""
        return self._bank is not None

    def adapter_for(self, class_name: str) -> str:
        """The key of ``model.adapters`` that covers a class: its exact name, else the first matching pattern."""
        assert self._bank is not None
        if class_name in self._bank:
            return class_name
        for key in self._bank:
            if fnmatch.fnmatchcase(class_name, key):
                return key
        raise ValueError(
            f"class {class_name!r} is covered by no adapter of model.adapters (keys {list(self._bank)})"
        )

    def _use(self, key: str) -> None:
        if self._active != key:
            assert self._bank is not None
            params = dict(self.named_parameters())
            with torch.no_grad():
                for name, tensor in self._bank[key].items():
                    params[name].copy_(tensor)
            self._active = key

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
        if stage == "fit" and self.hparams.get("adapters"):
            raise ValueError(
                "model.adapters routes prediction to one adapter per structure; train one adapter per run"
            )
        if stage == "fit" and hasattr(datamodule, "contract"):
            self.data_contract = datamodule.contract()  # what predicting on a new scan will need
        data_classes = hparams.get("classes") if hparams else None
        if data_classes is not None and list(data_classes) != self.classes:
            raise ValueError(
                f"model.classes {self.classes} differ from data.classes {list(data_classes)}: the class "
                "indices would not match (the command links them; give both the same list)"
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

    # -- forward and losses ---------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> Reconstruction:
        """Stage 1 on the slice evidence, then the decoder on the active band (see `Reconstruction`);
        with ``model.adapters``, each sample with its class's adapter."""
        if self._bank is None:
            return self._reconstruct(batch)
        keys = [self.adapter_for(c) for c in batch["class_name"]]
        parts, order = [], []
        for key in dict.fromkeys(keys):
            idx = [i for i, k in enumerate(keys) if k == key]
            self._use(key)
            parts.append(self._reconstruct(_select(batch, idx)))
            order += idx
        back = torch.as_tensor(np.argsort(order), device=parts[0].sdf.device)

        def joined(field: str) -> torch.Tensor | None:
            values = [getattr(p, field) for p in parts]
            return None if values[0] is None else torch.cat(values)[back]

        return Reconstruction(joined("sdf"), joined("coarse_logits"), joined("active"))  # type: ignore[arg-type]

    def _reconstruct(self, batch: dict[str, Any]) -> Reconstruction:
        n = 4 * self.resolution
        if isinstance(self.encoder, PrecomputedLatents):
            return Reconstruction(vertex_sdf_grid(self.decoder(self.encoder(batch)), n))
        logits, latent = self.structure(self.encoder(batch))
        occupancy = logits.detach() > 0
        margin = self.hparams.active_margin
        active = surface_band(occupancy, margin)
        if self.training and self.hparams.train_active != "predicted" and "gt_coarse_occupancy" in batch:
            truth = surface_band(batch["gt_coarse_occupancy"].bool(), margin)
            active = truth if self.hparams.train_active == "truth" else active | truth
        count, cap = int(active.sum()), self.hparams.max_active_voxels
        if cap is not None and count > cap:
            raise ValueError(
                f"{count} active voxels in this batch exceed model.max_active_voxels={cap}: lower "
                "data.batch_size or model.active_margin, or raise the cap"
            )
        fill = vertex_fill(occupancy, n).to(latent.dtype)
        if count == 0:
            return Reconstruction(fill, logits, active)
        out = self.decoder(active_latent(active, latent))
        return Reconstruction(vertex_sdf_grid(out, n, fill), logits, active)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        terms = reconstruction_losses(self(batch), batch, self.hparams, 4 * self.resolution)
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

    def _score(self, rec: Reconstruction, batch: dict[str, Any]) -> list[tuple[Mesh, Mesh, dict[str, float]]]:
        """Per sample with ground truth: predicted mesh, true mesh (world mm) and metrics on the scan's grid."""
        counts = rec.active_counts()
        out = []
        for i, mesh in enumerate(meshes_in_world(rec.sdf, batch["frame_to_world"])):
            if counts and counts[i] == 0:
                rank_zero_warn(
                    f"stage 1 found no surface for {batch['case_id'][i]}/{batch['class_name'][i]} "
                    f"(axis {int(batch['axis'][i])}, slice {int(batch['index'][i])}): scored as a failure"
                )
            native = batch["native"][i]
            pred = sdf_on_grid(
                rec.sdf[i].detach().float().cpu().numpy(), batch["frame_to_world"][i].cpu().numpy(),
                native["affine"], native["gt"].shape,
            )  # fmt: skip
            truth = mask_surface(native["gt"], native["affine"])
            values = sample_metrics(
                pred,
                native["gt"],
                native["spacing_mm"],
                self.hparams.nsd_tolerance_mm,
                mesh.vertices,
                truth.vertices,
            )
            out.append((mesh, truth, values))
        return out

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        rec = self(batch)
        n = 4 * self.resolution
        diagnostics = reconstruction_losses(rec, batch, self.hparams, n)
        if rec.active is not None:
            diagnostics["active_voxels"] = rec.active.flatten(1).sum(1).float().mean()
            diagnostics["frame_coarse_dice"] = hard_dice(rec.coarse_logits > 0, batch["gt_coarse_occupancy"])
        diagnostics["frame_dice"] = hard_dice(occupancy_logits(rec.sdf, n) > 0, batch["gt_occupancy"])
        getattr(self, f"{stage}_diagnostics").update(diagnostics, len(batch["case_id"]))
        getattr(self, f"{stage}_metrics").update(
            [v for _, _, v in self._score(rec, batch)], batch["class_index"].cpu()
        )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
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

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[Prediction]:
        """Per sample: the mesh in world RAS mm, the SDF grid, the frame, and metrics when ground truth exists."""
        rec = self(batch)
        scored = self._score(rec, batch) if "native" in batch else None
        meshes = [m for m, _, _ in scored] if scored else meshes_in_world(rec.sdf, batch["frame_to_world"])
        out = []
        for i, mesh in enumerate(meshes):
            record = Prediction(
                case_id=batch["case_id"][i],
                class_name=batch["class_name"][i],
                axis=int(batch["axis"][i]),
                index=int(batch["index"][i]),
                source_image=batch["source_image"][i] if "source_image" in batch else None,
                frame_to_world=batch["frame_to_world"][i].cpu().numpy(),
                sdf=rec.sdf[i].detach().float().cpu().numpy(),
                image=batch["image"][i, 0].cpu().numpy(),
                mask=batch["mask"][i].cpu().numpy(),
                mesh=mesh,
                slice_name=batch["slice_name"][i] if "slice_name" in batch else "",
            )
            if scored is not None:
                _, record.gt_mesh, values = scored[i]
                record.gt_sdf = batch["gt_sdf"][i].cpu().numpy()
                record.metrics = {**values, "failed": float(any(np.isinf(v) for v in values.values()))}
            out.append(record)
        return out

    # -- checkpoints ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = set(self.trainable_names())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["lora_sam3d"] = {
            "design": DESIGN,
            "finetune": self.hparams.finetune,
            "structure_finetune": self.hparams.structure_finetune,
            "lora": asdict(self.lora_config),
            "structure_lora": asdict(self.structure_lora_config),
            "unfreeze": list(self.hparams.unfreeze or []),
            "decoder": self.decoder_config,
            "structure": self.structure_config,
            "base_checkpoint": self.hparams.base_checkpoint,
            "base_fingerprint": self.base_fingerprint,
            "trainable": sorted(trainable),
            "data": self.data_contract,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("lora_sam3d")
        if not isinstance(meta, dict):
            raise ValueError("this checkpoint was not written by lora-sam3d (no 'lora_sam3d' section)")
        check_design(meta)
        self.data_contract = meta.get("data") or self.data_contract
        for key in ("finetune", "structure_finetune"):
            if meta[key] != self.hparams[key]:
                raise ValueError(
                    f"checkpoint has {key} '{meta[key]}' but the model is configured for "
                    f"'{self.hparams[key]}'; set model.{key}: {meta[key]}"
                )
        if meta["base_fingerprint"] != self.base_fingerprint:
            raise ValueError(
                f"checkpoint was trained on another base (fingerprint {meta['base_fingerprint'][:12]}..., "
                f"this model {self.base_fingerprint[:12]}...; base_checkpoint was {meta.get('base_checkpoint')!r})"
            )
        self.configure_adapters()
        params = dict(self.named_parameters())
        fit = state_dict_fit({k: params[k] for k in self.trainable_names()}, checkpoint["state_dict"])
        if fit.missing or fit.unexpected or fit.mismatched:
            raise ValueError(
                f"checkpoint does not fit this model: {fit.describe()} "
                "(check model.lora / model.unfreeze / model.structure against the checkpoint's)"
            )

    def merged_decoder(self) -> SLatMeshDecoder:
        """A copy of the decoder with LoRA merged into the base weights (the module is untouched)."""
        return merge_lora_weights(self.decoder, inplace=False)  # type: ignore[return-value]

    def merged_structure(self) -> SparseStructureNet:
        """A copy of stage 1 with LoRA merged into its base weights."""
        return merge_lora_weights(self.structure, inplace=False)  # type: ignore[return-value]


def _select(batch: dict[str, Any], idx: list[int]) -> dict[str, Any]:
    """The samples ``idx`` of a collated batch (tensors indexed, lists picked)."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        out[key] = value[idx] if isinstance(value, torch.Tensor) else [value[i] for i in idx]
    return out


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    inter = (prob.flatten(1) * target.flatten(1)).sum(1)
    return 1 - ((2 * inter + 1) / (prob.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)).mean()


def hard_dice(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the Dice of two boolean grids (frame-grid training diagnostic)."""
    p, g = pred.flatten(1).float(), gt.flatten(1).float()
    return ((2 * (p * g).sum(1) + 1e-6) / (p.sum(1) + g.sum(1) + 1e-6)).mean()


def reconstruction_losses(
    rec: Reconstruction, batch: dict[str, Any], h: Any, n: int
) -> dict[str, torch.Tensor]:
    """Decoder terms (truncated SDF L1, cell occupancy BCE and soft Dice on the (4R)^3 cells) plus stage 1's
    occupancy BCE and soft Dice on the R^3 cells; ``h`` holds the weights (the module's hparams)."""
    tau = h.sdf_truncation
    sdf = rec.sdf
    gt = batch["gt_sdf"].to(sdf.dtype)
    sdf_l1 = (sdf.clamp(-tau, tau) - gt.clamp(-tau, tau)).abs().mean()
    logits = occupancy_logits(sdf, n)
    target = batch["gt_occupancy"].to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    dice = soft_dice_loss(torch.sigmoid(logits), target)
    total = h.sdf_weight * sdf_l1 + h.occupancy_weight * bce + h.dice_weight * dice
    terms = {"sdf_l1": sdf_l1, "occupancy_bce": bce, "soft_dice": dice}
    if rec.coarse_logits is not None:
        coarse = batch["gt_coarse_occupancy"].to(rec.coarse_logits.dtype)
        s_bce = F.binary_cross_entropy_with_logits(rec.coarse_logits, coarse)
        s_dice = soft_dice_loss(torch.sigmoid(rec.coarse_logits), coarse)
        total = total + h.structure_weight * (s_bce + s_dice)
        terms |= {"structure_bce": s_bce, "structure_dice": s_dice}
    return {"loss": total, **terms}


def occupancy_logits(sdf: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n, n, n) logits of each cell being inside, from the mean SDF of its 8 corners, in voxel units."""
    cell = F.avg_pool3d(sdf[:, None], kernel_size=2, stride=1)[:, 0]
    return -cell * n


def meshes_in_world(sdf: torch.Tensor, frame_to_world: torch.Tensor) -> list[Mesh]:
    """Marching cubes of each SDF grid, mapped to world RAS mm."""
    return [
        marching_cubes(s).to_world(np.asarray(m.detach().cpu()))
        for s, m in zip(sdf, frame_to_world, strict=True)
    ]
