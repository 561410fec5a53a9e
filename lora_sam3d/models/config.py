"""The model's settings as one small tree of dataclasses, declared once (as LitGPT's `Config`).

`ModelConfig` is what a trained model is made of: the decoder and stage-1 sizes, the base, how the
scan is read, the band the decoder runs on and where the latents come from. `FinetuneConfig`
(`lora_sam3d.models.finetuning`) says what trains and `LossWeights` (`lora_sam3d.training.losses`) how.
The LightningCLI arguments and the YAML files mirror the tree (``model.base.checkpoint``,
``model.context.read``); the flat keys of earlier versions are mapped by `lora_sam3d.settings.old_keys`.
Checkpoints and ``model.json`` store the tree as plain dicts (`ModelConfig.to_dict`), so
``torch.load(weights_only=True)`` reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

from lora_sam3d.settings.tree import coerce

__all__ = [
    "TRAIN_BANDS",
    "BandConfig",
    "BaseConfig",
    "ContextConfig",
    "LatentConfig",
    "ModelConfig",
    "StepConfig",
    "TrainBand",
    "coerce",
]


@dataclass(frozen=True)
class BaseConfig:
    """The frozen base.

    Args:
        checkpoint: our safetensors base (both stages), Meta's ``slat_decoder_mesh`` file (decoder only:
            stage 1 must train, ``finetune.structure_mode: full``) or ``builtin:<name>`` (shipped).
        seed: initialises what the base does not hold (all of it without ``checkpoint``).
    """

    checkpoint: str | None = None
    seed: int = 0


@dataclass(frozen=True)
class ContextConfig:
    """What the model reads beside the slice unprojection: the scan around the slices, and the slices'
    own interpolation.

    Args:
        read: stage 1 reads the scan (``data.context.source: volume``) beside the slice unprojection; a batch
            without it reads "no scan" (zeros), so such a model also predicts from slices alone.
        conditioning: the decoder's levels receive the evidence at their own cells (`EvidenceConditioning`).
        interpolation: both stages also read the drawn slices' shape-based interpolation
            (`lora_sam3d.models.latent.shape_interpolation`): between parallel slices the model learns the
            correction to a classic fill between slices. A base trained without it reads it through
            zero weights (its outputs unchanged) until training moves them.
        tissue: both stages also read the context's third channel, the per-request tissue model's
            probability (``data.context.tissue_model: forest``, `lora_sam3d.data.tissue_forest`); a
            base trained without it reads it through zero weights, as the interpolation.
    """

    read: bool = False
    conditioning: bool = False
    interpolation: bool = False
    tissue: bool = False

    def __post_init__(self) -> None:
        if self.tissue and not self.read:
            raise ValueError(
                "model.context.tissue needs model.context.read: true (the tissue model is a channel of the scan)"
            )


TrainBand = Literal["predicted", "truth", "union"]
TRAIN_BANDS: tuple[str, ...] = get_args(TrainBand)


@dataclass(frozen=True)
class BandConfig:
    """The active band: the cells the decoder runs on.

    Args:
        margin: cells within this many cells of stage 1's surface (an integer >= 1).
        train_on: while training, ``predicted`` (stage 1's band), ``truth`` (the true band) or ``union``.
        max_voxels: an error is raised when a batch has more active cells (None: no cap).
        train_margin: while training, the band's margin (None: ``margin``). Wider than ``margin``, the
            decoder learns cells farther from stage 1's surface, where stage 1's errors lie, so it can
            move the surface past them at inference (with a ``margin`` as wide).
    """

    margin: int = 1
    train_on: TrainBand = "union"
    max_voxels: int | None = None
    train_margin: int | None = None

    def __post_init__(self) -> None:
        def cells(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        if not cells(self.margin):
            raise ValueError(f"model.band.margin must be an integer >= 1 (cells), got {self.margin!r}")
        if self.train_margin is not None and not cells(self.train_margin):
            raise ValueError(
                f"model.band.train_margin must be an integer >= 1 (cells) or null, got {self.train_margin!r}"
            )
        if self.train_on not in TRAIN_BANDS:
            raise ValueError(f"model.band.train_on must be one of {list(TRAIN_BANDS)}, got {self.train_on!r}")


@dataclass(frozen=True)
class LatentConfig:
    """Where the decoder's latents come from.

    Args:
        encoder: ``slice`` (stage 1 from the slices) or ``precomputed`` (Meta's structured latents in
            ``dir`` replace stage 1).
        dir: the precomputed latents' folder.
    """

    encoder: Literal["slice", "precomputed"] = "slice"
    dir: str | None = None


@dataclass(frozen=True)
class StepConfig:
    """What a training or evaluation step does beyond its loss (``model.steps``).

    Args:
        nsd_tolerance_mm: the tolerance of the normalised surface Dice it scores with.
        on_nonfinite: ``raise`` (default) or ``skip`` a training step whose loss or gradients are
            not finite.
    """

    nsd_tolerance_mm: float = 3.0
    on_nonfinite: Literal["raise", "skip"] = "raise"

    def __post_init__(self) -> None:
        if self.on_nonfinite not in ("raise", "skip"):
            raise ValueError(
                f"model.steps.on_nonfinite must be one of ['raise', 'skip'], got {self.on_nonfinite!r}"
            )


@dataclass(frozen=True)
class ModelConfig:
    """The two-stage model (`lora_sam3d.models.Reconstructor`): every setting a trained model is made of.

    Args:
        decoder: `SLatMeshDecoder` arguments over `TINY_DECODER`.
        structure: `SparseStructureNet` arguments (``channels``, ``num_groups``).
        base, context, band, latents: see `BaseConfig`, `ContextConfig`, `BandConfig`, `LatentConfig`.
    """

    decoder: dict[str, Any] = field(default_factory=dict)
    structure: dict[str, Any] = field(default_factory=dict)
    base: BaseConfig = field(default_factory=BaseConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    band: BandConfig = field(default_factory=BandConfig)
    latents: LatentConfig = field(default_factory=LatentConfig)

    def __post_init__(self) -> None:
        for name, cls in (
            ("base", BaseConfig),
            ("context", ContextConfig),
            ("band", BandConfig),
            ("latents", LatentConfig),
        ):
            object.__setattr__(self, name, coerce(cls, getattr(self, name), f"model.{name}"))
        object.__setattr__(self, "decoder", dict(self.decoder or {}))
        object.__setattr__(self, "structure", dict(self.structure or {}))

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts (YAML, JSON and ``weights_only`` checkpoints read them)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> ModelConfig:
        """From nested dicts (`to_dict`, a YAML section); keys of other parts of the tree are ignored."""
        values = values or {}
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})
