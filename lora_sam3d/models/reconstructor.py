"""`Reconstructor`: the two-stage model (stage 1, the active band, the decoder, the fill) as plain PyTorch.

Coarse to fine, as SAM 3D Objects: stage 1 (`SparseStructureNet`) reads the slice evidence on the
R^3 grid and predicts occupancy and latents; the mesh decoder (`SLatMeshDecoder`) runs on the band
of active cells around the predicted surface only and subdivides them 4x; vertices no active cell
reaches take their sign from stage 1 (`vertex_fill`). With ``latents.encoder: precomputed``, Meta's
structured latents replace stage 1. No Lightning here: a notebook loads a base, attaches an
adapter and reconstructs the `lora_sam3d.inputs.Evidence` of a batch with this class alone; `lora_sam3d.training.module` wraps it for training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lora_sam3d.geometry import Mesh, marching_cubes
from lora_sam3d.inputs import CONTEXT_CHANNELS, TISSUE_CHANNELS, Evidence
from lora_sam3d.io.atomic import atomic_write
from lora_sam3d.io.weights import load_weights, resolve_checkpoint
from lora_sam3d.lora import LoRAConfig, base_fingerprint, inject_lora, merge_lora_weights, state_dict_fit
from lora_sam3d.models.adapters.files import MODEL_SETTINGS, load_model_adapter, read_adapter_settings
from lora_sam3d.models.conditioning import (
    CONDITIONING_LORA_TARGETS,
    CONDITIONING_PREFIX,
    EvidenceConditioning,
)
from lora_sam3d.models.config import TRAIN_BANDS, ModelConfig, TrainBand
from lora_sam3d.models.decoder import SLatMeshDecoder
from lora_sam3d.models.drawing import DRAWING_WIDTH, keep_drawing
from lora_sam3d.models.latent import (
    INTERPOLATION_CHANNELS,
    LATENT_CHANNELS,
    PrecomputedLatents,
    SliceUnprojection,
    context_on_grid,
    make_encoder,
    with_context,
)
from lora_sam3d.models.mesh import vertex_sdf_grid
from lora_sam3d.models.structure import (
    STRUCTURE_PREFIX,
    SparseStructureNet,
    active_latent,
    surface_band,
    vertex_fill,
)
from lora_sam3d.settings.old_keys import upgrade

__all__ = [
    "STRUCTURE_LORA_TARGETS",
    "TINY_DECODER",
    "TRAIN_BANDS",
    "Reconstruction",
    "Reconstructor",
    "TrainBand",
    "conditioning_lora",
]

TINY_DECODER: dict[str, Any] = {
    "resolution": 16,
    "model_channels": 128,
    "latent_channels": 8,
    "num_blocks": 4,
    "num_heads": 4,
    "num_groups": 16,
}
"""The defaults under ``model.decoder``, a CPU size; a config gives what differs (the shipped
``builtin:shapes`` base has ``model_channels: 64, num_groups: 8``, as configs/demo.yaml says;
configs/sam3d.yaml gives Meta's size)."""

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

    def select(self, idx: torch.Tensor) -> Reconstruction:
        """The samples ``idx`` (a permutation or subset of the batch)."""
        pick = [None if t is None else t[idx] for t in (self.sdf, self.coarse_logits, self.active)]
        return Reconstruction(*pick)  # type: ignore[arg-type]

    @staticmethod
    def cat(parts: list[Reconstruction]) -> Reconstruction:
        def joined(field: str) -> torch.Tensor | None:
            values = [getattr(p, field) for p in parts]
            return None if values[0] is None else torch.cat(values)

        return Reconstruction(joined("sdf"), joined("coarse_logits"), joined("active"))  # type: ignore[arg-type]


def conditioning_lora(lora: LoRAConfig) -> LoRAConfig:
    """The conditioning layers' adapters: the decoder's rank and scaling on both linears of each level."""
    return LoRAConfig(lora.rank, lora.alpha, lora.dropout, target_modules=CONDITIONING_LORA_TARGETS)


class Reconstructor(nn.Module):
    """Slice evidence in, vertex SDF (and meshes in world mm) out: stage 1 + SAM 3D's mesh decoder.

    Args:
        config: the model (`ModelConfig`, or its nested dicts as a YAML section or ``model.json``
            holds them): the decoder and stage-1 sizes; the base (our safetensors with stage 1 under
            ``structure.``, Meta's ``slat_decoder_mesh`` file, whose stage 1 keeps its ``base.seed``
            weights so `structure_in_base` is False, or ``builtin:<name>``; None: both stages from
            ``base.seed``, drawn in a forked RNG); ``context.read``: stage 1 takes the scan's two
            channels beside the slice unprojection's eight, and a batch without the scan reads "no
            scan" (zeros), so such a model also predicts from slices alone; ``context.conditioning``:
            the decoder's levels receive the evidence at their own cells (`EvidenceConditioning`,
            zero-initialised when the base does not hold its weights); the band (``band.train_on``
            counts in training mode, with the true coarse occupancy given); ``latents.encoder:
            precomputed``: Meta's structured latents in ``latents.dir`` replace stage 1.
    """

    def __init__(self, config: ModelConfig | Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if isinstance(config, Mapping):
            config = ModelConfig.from_dict(upgrade(config, "model", "Reconstructor config"))
        self.config = c = config or ModelConfig()
        interpolation = c.context.interpolation
        self.decoder_config = {**TINY_DECODER, **(c.decoder or {})}
        # the context's channels (the scan's 2, then the tissue model's when it reads one)
        self.context_channels = CONTEXT_CHANNELS + (TISSUE_CHANNELS if c.context.tissue else 0)
        extra = (self.context_channels if c.context.read else 0) + (
            INTERPOLATION_CHANNELS if interpolation else 0
        )
        self.structure_config = {
            "latent_channels": self.decoder_config["latent_channels"],
            **(c.structure or {}),
            **({"in_channels": 8 + extra} if extra else {}),
        }
        # in eval mode the surface is corrected to the drawn slices near their planes (`keep_drawing`;
        # width in grid cells, 0: the network's surface as it is)
        self.drawing_width = DRAWING_WIDTH
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.base.seed)
            self.decoder = SLatMeshDecoder(**self.decoder_config)
            self.structure = SparseStructureNet(**self.structure_config)
            features = (
                self.context_channels + LATENT_CHANNELS + (INTERPOLATION_CHANNELS if interpolation else 0)
            )
            self.conditioning = (
                EvidenceConditioning(self.decoder_config["model_channels"], features=features)
                if c.context.conditioning
                else None
            )
        self.structure_in_base = c.base.checkpoint is None
        if c.base.checkpoint:
            self.load_base(resolve_checkpoint(c.base.checkpoint))
        parts = [self.decoder, self.structure] + ([self.conditioning] if self.conditioning else [])
        self.base_fingerprint = hashlib.sha256(
            "".join(base_fingerprint(p) for p in parts).encode()
        ).hexdigest()
        self.data_contract: dict[str, Any] | None = None  # an adapter folder's data settings (from_adapter)
        self.encoder = make_encoder(c.latents.encoder, self.resolution, c.latents.dir, interpolation)
        # the evidence the conditioning layers read: stage 1's own unprojection when it has one
        self.reader = (
            self.encoder
            if isinstance(self.encoder, SliceUnprojection)
            else SliceUnprojection(self.resolution, interpolation=interpolation)
        )

    def set_band(self, **fields: Any) -> None:
        """Change ``model.band`` (``margin=2``: a wider band at inference), the one group the weights
        do not fix; the config stays the one place the model reads it from."""
        self.config = replace(self.config, band=replace(self.config.band, **fields))

    @property
    def uses_structure(self) -> bool:
        """Stage 1 predicts the occupied cells (``latents.encoder: slice``), rather than Meta's latents."""
        return self.config.latents.encoder == "slice"

    @property
    def resolution(self) -> int:
        """R: stage 1's grid and the decoder's input grid; the output grid has 4R cells a side."""
        return self.decoder.resolution

    def load_base(self, path: str | Path) -> None:
        """Read a base file (see ``base``) into both stages; any mismatch is an error naming the file."""
        state = self._widened(load_weights(path))
        structure = {
            k.removeprefix(STRUCTURE_PREFIX): v for k, v in state.items() if k.startswith(STRUCTURE_PREFIX)
        }
        self.decoder = SLatMeshDecoder.from_state_dict(state, str(path), **self.decoder_config)
        self._load_conditioning(state, path)
        if structure:
            fit = state_dict_fit(self.structure.state_dict(), structure)
            if fit.missing or fit.unexpected or fit.mismatched:
                raise ValueError(
                    f"{path}: stage-1 weights do not fit SparseStructureNet({self.structure_config}): "
                    f"{fit.describe()} (check model.structure)"
                )
            self.structure.load_state_dict(structure)
            self.structure_in_base = True

    def _widened(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A base trained without the slices' interpolation or the tissue model's channel, for a model
        that reads them: the first layer of stage 1 and of each conditioning level get zero weights for
        the missing channels (the last ones, `with_context`), so the model's outputs are the base's
        until training moves them. Any other width is left for the loaders to refuse."""
        later = [INTERPOLATION_CHANNELS] if self.config.context.interpolation else []
        later += [TISSUE_CHANNELS] if self.config.context.tissue else []
        missing = {sum(later[k:]) for k in range(len(later))}  # the base lacks the last one(s)
        if not missing:
            return state
        wanted = {"structure.enc0.0.weight": self.structure_config.get("in_channels", 8)}
        if self.conditioning is not None:
            width = self.conditioning.config["features"]
            wanted |= {
                f"{CONDITIONING_PREFIX}levels.{j}.0.weight": width
                for j in range(len(self.conditioning.levels))
            }
        out = dict(state)
        for key, width in wanted.items():
            w = state.get(key)
            if w is not None and width - w.shape[1] in missing:
                pad = w.new_zeros(w.shape[0], width - w.shape[1], *w.shape[2:])
                out[key] = torch.cat([w, pad], dim=1)
        return out

    def _load_conditioning(self, state: dict[str, torch.Tensor], path: str | Path) -> None:
        """The base's conditioning layers (our files) into `EvidenceConditioning`; a base without them
        (Meta's file) leaves them at zero; a base with them for a model without is refused."""
        own = {
            k.removeprefix(CONDITIONING_PREFIX): v
            for k, v in state.items()
            if k.startswith(CONDITIONING_PREFIX)
        }
        if not own:
            return
        if self.conditioning is None:
            raise ValueError(
                f"{path} holds conditioning layers (evidence at every decoder level): set model.context.conditioning: "
                "true (and model.context.read: true if it was trained with the scan) to use this base"
            )
        fit = state_dict_fit(self.conditioning.state_dict(), own)
        if fit.missing or fit.unexpected or fit.mismatched:
            raise ValueError(
                f"{path}: conditioning weights do not fit EvidenceConditioning: {fit.describe()}"
            )
        self.conditioning.load_state_dict(own)

    @classmethod
    def from_adapter(cls, folder: str | Path, base: str | None = None) -> Reconstructor:
        """The model an adapter folder was trained with (its ``model.json``), with the adapter attached;
        ``base`` replaces the base path stored there (e.g. a moved file)."""
        config = ModelConfig.from_dict(read_adapter_settings(folder).require_model().model)
        if base:
            config = dataclasses.replace(config, base=dataclasses.replace(config.base, checkpoint=base))
        model = cls(config)
        model.data_contract = model.attach_adapter(folder).get("data")
        return model.eval()

    def settings(self) -> dict[str, Any]:
        """The `MODEL_SETTINGS` of this model, as adapter folders' ``model.json`` and checkpoints store them."""
        c = self.config
        values = {
            "decoder": self.decoder_config,
            "structure": self.structure_config,
            "base": {"checkpoint": self.config.base.checkpoint},
            "latents": {"encoder": c.latents.encoder},
            "band": {"margin": c.band.margin},
            "context": {
                "read": c.context.read,
                "conditioning": c.context.conditioning,
                "interpolation": c.context.interpolation,
                **(
                    {"tissue": True} if c.context.tissue else {}
                ),  # files of models without it stay as they were
            },
        }
        return {k: values[k] for k in MODEL_SETTINGS}

    def add_lora(self, lora: LoRAConfig, structure_lora: LoRAConfig | None = None, seed: int = 0) -> None:
        """Inject fresh adapters (B = 0: outputs unchanged) into the decoder and, if given, stage 1;
        A is drawn from ``seed`` in a forked RNG, so adapters start the same whatever ran before."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            inject_lora(self.decoder, lora)
            if self.conditioning is not None:
                inject_lora(self.conditioning, conditioning_lora(lora))
            if structure_lora is not None and self.uses_structure:
                inject_lora(self.structure, structure_lora)

    def attach_adapter(self, folder: str | Path) -> dict[str, Any]:
        """Load an adapter folder (both stages) onto this base; returns its ``model.json`` contents."""
        return load_model_adapter(self, folder)

    # -- forward ----------------------------------------------------------------------------------
    def band(self, occupancy: torch.Tensor, coarse_truth: torch.Tensor | None = None) -> torch.Tensor:
        """(B, R, R, R) bool: the cells the decoder runs on (see ``band.train_on``; ``coarse_truth``, the
        true R^3 occupancy, and ``band.train_margin`` count in training mode only)."""
        band = self.config.band
        margin = band.margin
        if self.training and band.train_margin is not None:
            margin = band.train_margin
        active = surface_band(occupancy, margin)
        if self.training and band.train_on != "predicted" and coarse_truth is not None:
            truth = surface_band(coarse_truth.bool(), margin)
            active = truth if band.train_on == "truth" else active | truth
        return active

    def stage_one_input(self, evidence: Evidence) -> torch.Tensor:
        """(B, 8 to 13, R, R, R): the slice unprojection, the scan on the R^3 cells when the model
        reads context, the slices' interpolation and the tissue model's channel when it reads them
        (`with_context`'s order)."""
        x = self.encoder(evidence)
        if self.config.context.read:
            x = with_context(x, context_on_grid(evidence, self.resolution, self.context_channels).to(x.dtype))
        return x

    def forward(self, evidence: Evidence, coarse_truth: torch.Tensor | None = None) -> Reconstruction:
        """Stage 1 on the slice ``evidence``, then the decoder on the band around its surface.

        ``coarse_truth``: (B, R, R, R) stage 1's target, which widens the band while training (see
        ``band.train_on``); ignored in eval mode, so predictions never depend on it.
        """
        n = 4 * self.resolution
        if evidence.context is not None and not self.config.context.read:
            raise ValueError(
                "the batch carries the scan as context (data.context.source: volume) but this model does not read "
                "context (model.context.read: false; trained without it): use data.context.source: none"
            )
        if evidence.context is not None and evidence.context.shape[1] != self.context_channels:
            has, wants = ("", "no ") if self.config.context.tissue else ("no ", "")
            raise ValueError(
                f"the batch's scan context has {evidence.context.shape[1]} channels where this model reads "
                f"{self.context_channels}: the model reads {wants}tissue model, the data gives {has}one (set "
                f"data.context.tissue_model: {'forest' if self.config.context.tissue else 'none'}, as the model was trained)"
            )
        cond = None
        if self.conditioning is not None:
            cond = self.conditioning.bind(evidence, self.resolution, self.reader)
        if isinstance(self.encoder, PrecomputedLatents):
            sdf = vertex_sdf_grid(self.decoder(self.encoder(evidence), cond), n)
            return Reconstruction(self._given_back(sdf, evidence))
        logits, latent = self.structure(self.stage_one_input(evidence))
        occupancy = logits.detach() > 0
        active = self.band(occupancy, coarse_truth)
        count, cap = int(active.sum()), self.config.band.max_voxels
        if cap is not None and count > cap:
            raise ValueError(
                f"{count} active voxels in this batch exceed model.band.max_voxels={cap}: lower "
                "data.batch_size or model.band.margin, or raise the cap"
            )
        fill = vertex_fill(occupancy, n).to(latent.dtype)
        if count == 0:
            return Reconstruction(self._given_back(fill, evidence), logits, active)
        out = self.decoder(active_latent(active, latent), cond)
        return Reconstruction(self._given_back(vertex_sdf_grid(out, n, fill), evidence), logits, active)

    def _given_back(self, sdf: torch.Tensor, evidence: Evidence) -> torch.Tensor:
        """In eval mode, the user's drawing given back on its planes (`keep_drawing`); training
        learns the network's own surface."""
        if self.training or not self.drawing_width:
            return sdf
        return keep_drawing(sdf, evidence, self.drawing_width)

    @staticmethod
    def meshes(rec: Reconstruction, frame_to_world: torch.Tensor) -> list[Mesh]:
        """Marching cubes of each sample's SDF grid, mapped to world RAS mm by its (4, 4) frame."""
        return [
            marching_cubes(s).to_world(np.asarray(m.detach().cpu()))
            for s, m in zip(rec.sdf, frame_to_world, strict=True)
        ]

    def merged_decoder(self) -> SLatMeshDecoder:
        """A copy of the decoder with LoRA merged into the base weights (this model is untouched)."""
        return merge_lora_weights(self.decoder, inplace=False)  # type: ignore[return-value]

    def merged_structure(self) -> SparseStructureNet:
        """A copy of stage 1 with LoRA merged into its base weights."""
        return merge_lora_weights(self.structure, inplace=False)  # type: ignore[return-value]

    def merged_note(self) -> str:
        """What Meta's `SLatMeshDecoder` can and cannot use of `save_merged`'s file (printed by export)."""
        note = "Meta's SLatMeshDecoder loads the decoder keys (its own names, strict on them)"
        left = ["structure.* (stage 1: which cells to decode)"] if self.uses_structure else []
        if self.conditioning is not None:
            left.append(
                "conditioning.* (the evidence added at every decoder level: without it the decoder runs as if "
                "given no slices or scan at its levels, so its output differs from this model's)"
            )
        return note + ("; it cannot use " + " or ".join(left) if left else "") + "."

    def save_merged(self, path: str | Path) -> Path:
        """The decoder with LoRA merged, in Meta's names, plus stage 1 (merged) under ``structure.``
        and the conditioning layers (merged) under ``conditioning.``: a complete base for ``base``.
        Meta's loader (non-strict) reads the decoder part, which without those layers is the
        decoder of a model that does not condition its levels. Atomic."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.merged_decoder().state_dict().items()}
        if self.uses_structure:
            structure = self.merged_structure().state_dict()
            tensors |= {f"{STRUCTURE_PREFIX}{k}": v.detach().cpu().contiguous() for k, v in structure.items()}
        if self.conditioning is not None:
            merged = merge_lora_weights(self.conditioning, inplace=False).state_dict()
            tensors |= {f"{CONDITIONING_PREFIX}{k}": v.detach().cpu().contiguous() for k, v in merged.items()}
        metadata = {
            "format": "pt",
            "decoder": json.dumps(self.decoder_config),
            "for_meta": self.merged_note(),
        }
        return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
