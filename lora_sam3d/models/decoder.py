"""SAM 3D Objects' structured-latent mesh decoder (`SLatMeshDecoder`, from TRELLIS), in plain PyTorch.

Same constructor arguments, module tree and state-dict names and shapes as Meta's class, so its
`slat_decoder_mesh` checkpoints load with `load_state_dict` as they are (sparse convolution weights
are kept in spconv's (out, k, k, k, in) layout). Built on `lora_sam3d.sparse`, so it trains on the
CPU. `forward` returns the 53-channel sparse output at 4x the input resolution; turning it into a
vertex SDF grid and a mesh is `lora_sam3d.models.mesh`'s job.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lora_sam3d.io.weights import load_weights
from lora_sam3d.lora import state_dict_fit
from lora_sam3d.models.mesh import FEATS_CHANNELS
from lora_sam3d.models.structure import STRUCTURE_PREFIX
from lora_sam3d.sparse import (
    LayerNorm32,
    SparseConv3d,
    SparseGELU,
    SparseGroupNorm32,
    SparseLinear,
    SparseMultiHeadAttention,
    SparseSiLU,
    SparseSubdivide,
    SparseTensor,
)

__all__ = [
    "CONDITIONING_PREFIX",
    "OVERLAY_PREFIXES",
    "AbsolutePositionEmbedder",
    "Conditioning",
    "SLatMeshDecoder",
]

CONDITIONING_PREFIX = "conditioning."
"""The conditioning layers' weights sit under this prefix in a base file (`lora_sam3d.models.conditioning`)."""

OVERLAY_PREFIXES = (STRUCTURE_PREFIX, CONDITIONING_PREFIX)
"""Keys of a base file that belong beside the decoder (stage 1, the conditioning layers), not in it."""

Conditioning = Callable[[int, SparseTensor], SparseTensor]
"""``cond(level, h) -> h``: what `SLatMeshDecoder.forward` calls at each level (see there)."""


class AbsolutePositionEmbedder(nn.Module):
    """Sin/cos embedding of integer (x, y, z): per axis [sin(p f), cos(p f)], zero-padded to ``channels``."""

    def __init__(self, channels: int, in_channels: int = 3) -> None:
        super().__init__()
        self.channels, self.in_channels = channels, in_channels
        self.freq_dim = channels // in_channels // 2
        freqs = 1.0 / (10000 ** (torch.arange(self.freq_dim, dtype=torch.float32) / self.freq_dim))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        n = positions.shape[0]
        angles = torch.outer(positions.reshape(-1).float(), self.freqs)
        embed = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(n, -1)
        return nn.functional.pad(embed, (0, self.channels - embed.shape[1]))


class SparseFeedForwardNet(nn.Module):
    def __init__(self, channels: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(
            SparseLinear(channels, hidden), SparseGELU(approximate="tanh"), SparseLinear(hidden, channels)
        )

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.mlp(x)


class SparseTransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x)); norms affine-free, eps 1e-6."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        attn_mode: str = "full",
        window_size: int | None = None,
        shift_window: int = 0,
        use_checkpoint: bool = False,
        qk_rms_norm: bool = False,
    ) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.norm1 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(channels, elementwise_affine=False, eps=1e-6)
        self.attn = SparseMultiHeadAttention(
            channels,
            num_heads,
            attn_mode=attn_mode,
            window_size=window_size,
            shift_window=shift_window,
            qk_rms_norm=qk_rms_norm,
        )
        self.mlp = SparseFeedForwardNet(channels, mlp_ratio)

    def _forward(self, feats: torch.Tensor, x: SparseTensor) -> torch.Tensor:
        x = x.replace(feats)
        x = x + self.attn(x.replace(self.norm1(x.feats)))
        x = x + self.mlp(x.replace(self.norm2(x.feats)))
        return x.feats

    def forward(self, x: SparseTensor) -> SparseTensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return x.replace(checkpoint(self._forward, x.feats, x, use_reentrant=False))
        return x.replace(self._forward(x.feats, x))


class SparseSubdivideBlock3d(nn.Module):
    """Norm, SiLU, subdivide x2, conv-norm-SiLU-conv, plus a (1x1x1 conv) skip of the subdivided input."""

    def __init__(
        self, channels: int, resolution: int, out_channels: int | None = None, num_groups: int = 32
    ) -> None:
        super().__init__()
        self.channels, self.resolution, self.out_resolution = channels, resolution, resolution * 2
        self.out_channels = out_channels or channels
        self.act_layers = nn.Sequential(SparseGroupNorm32(num_groups, channels), SparseSiLU())
        self.sub = SparseSubdivide()
        self.out_layers = nn.Sequential(
            SparseConv3d(channels, self.out_channels, 3),
            SparseGroupNorm32(num_groups, self.out_channels),
            SparseSiLU(),
            SparseConv3d(self.out_channels, self.out_channels, 3),
        )
        nn.init.zeros_(self.out_layers[3].conv.weight)
        nn.init.zeros_(self.out_layers[3].conv.bias)
        self.skip_connection: nn.Module = (
            nn.Identity() if self.out_channels == channels else SparseConv3d(channels, self.out_channels, 1)
        )

    def forward(self, x: SparseTensor) -> SparseTensor:
        # Same function as the reference's out_layers(sub(act(x))) + skip(sub(x)); the first conv
        # and the pointwise skip run on the parent voxels (see SparseConv3d.forward_subdivided).
        h = self.out_layers[0].forward_subdivided(self.act_layers(x))
        for layer in self.out_layers[1:]:
            h = layer(h)
        return h + self.sub(self.skip_connection(x))


class SLatMeshDecoder(nn.Module):
    """SAM 3D's mesh decoder: (N, latent_channels) on an R^3 grid -> (8^2 N, 53) on a (4R)^3 grid.

    Arguments are Meta's (``representation_config`` accepts ``{'use_color': False}`` only; the
    colour head is not part of the mesh decoder we adapt). ``num_groups`` (ours, default 32 as in
    the reference) sets the group-norm groups of the upsampling blocks, so small configs whose
    ``model_channels // 8`` is below 32 can be built. ``device`` is accepted for call
    compatibility and ignored: move the module with ``.to()``.
    """

    def __init__(
        self,
        resolution: int,
        model_channels: int,
        latent_channels: int,
        num_blocks: int,
        num_heads: int | None = None,
        num_head_channels: int | None = 64,
        mlp_ratio: float = 4,
        attn_mode: Literal["full", "swin"] = "swin",
        window_size: int = 8,
        pe_mode: Literal["ape"] = "ape",
        use_fp16: bool = False,
        use_checkpoint: bool = False,
        qk_rms_norm: bool = False,
        representation_config: Mapping[str, Any] | None = None,
        num_groups: int = 32,
        device: Any = None,
    ) -> None:
        super().__init__()
        _check_arguments(attn_mode, pe_mode, representation_config, model_channels, num_groups)
        num_heads = num_heads or model_channels // (num_head_channels or 64)
        self.resolution = resolution
        self.model_channels = model_channels
        self.latent_channels = latent_channels
        self.num_blocks = num_blocks
        self.num_heads = num_heads
        self.attn_mode = attn_mode
        self.window_size = window_size
        self.use_fp16 = use_fp16
        self.use_checkpoint = use_checkpoint
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.out_channels = FEATS_CHANNELS

        self.pos_embedder = AbsolutePositionEmbedder(model_channels)
        self.input_layer = SparseLinear(latent_channels, model_channels)
        self.blocks = nn.ModuleList(
            SparseTransformerBlock(
                model_channels,
                num_heads,
                mlp_ratio=mlp_ratio,
                attn_mode="full" if attn_mode == "full" else "windowed",
                window_size=window_size,
                shift_window=0 if attn_mode == "full" else window_size // 2 * (i % 2),
                use_checkpoint=use_checkpoint,
                qk_rms_norm=qk_rms_norm,
            )
            for i in range(num_blocks)
        )
        self.upsample = nn.ModuleList(
            [
                SparseSubdivideBlock3d(model_channels, resolution, model_channels // 4, num_groups),
                SparseSubdivideBlock3d(model_channels // 4, resolution * 2, model_channels // 8, num_groups),
            ]
        )
        self.out_layer = SparseLinear(model_channels // 8, self.out_channels)
        self.initialize_weights()
        if use_fp16:
            self.blocks.half()
            self.upsample.half()

    def initialize_weights(self) -> None:
        """Xavier-uniform linears with zero bias, zero output layer (the reference's initialisation)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)

    @property
    def config(self) -> dict[str, Any]:
        return {
            "resolution": self.resolution,
            "model_channels": self.model_channels,
            "latent_channels": self.latent_channels,
            "num_blocks": self.num_blocks,
            "num_heads": self.num_heads,
            "attn_mode": self.attn_mode,
            "window_size": self.window_size,
        }

    def forward(self, x: SparseTensor, cond: Conditioning | None = None) -> SparseTensor:
        """``x``: coords (N, 4) on the R^3 grid, feats (N, latent_channels). Returns 53 channels at 4R.

        ``cond``, the seam for conditioning: called as ``cond(level, h)`` on the hidden features at each
        level (0: the input level, after the input layer and position embedding; j: after subdivision
        j) and returns them, e.g. with evidence read at those cells added by layers that live outside
        this module tree (so Meta's state dict stays as it is). None: Meta's computation exactly.
        """
        if x.feats.dim() != 2 or x.feats.shape[1] != self.latent_channels:
            raise ValueError(f"expected feats (N, {self.latent_channels}), got {tuple(x.feats.shape)}")
        h = self.input_layer(x)
        h = h + self.pos_embedder(x.coords[:, 1:])
        h = h.type(self.dtype)
        if cond is not None:
            h = cond(0, h)
        for block in self.blocks:
            h = block(h)
        for level, block in enumerate(self.upsample, start=1):
            h = block(h)
            if cond is not None:
                h = cond(level, h)
        return self.out_layer(h.type(x.dtype))

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], strict: bool = True, **config: Any
    ) -> SLatMeshDecoder:
        """Build with ``config`` and load weights from ``.safetensors`` or ``.ckpt``/``.pt``/``.pth``.

        Checkpoints may nest the weights under ``state_dict`` (Lightning) or ``model``, and may
        prefix keys (``model.``, ``decoder.``, ``module.``...): the prefix shared by all weight
        keys is stripped. Pickled files are read with ``weights_only=True``: no code runs. With
        ``strict``, missing or unexpected keys raise an error that names them.
        """
        return cls.from_state_dict(load_weights(path), str(path), strict, **config)

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, torch.Tensor], source: str, strict: bool = True, **config: Any
    ) -> SLatMeshDecoder:
        """Build with ``config`` and load ``state`` (read from ``source``, named in errors).

        Keys under ``structure.`` and ``conditioning.`` (stage 1 and the conditioning layers, stored
        beside the decoder in our base files) are not the decoder's and are left out, as Meta's
        non-strict loader leaves them.
        """
        path = source
        model = cls(**config)
        own = model.state_dict()
        state = _strip_prefix(
            {k: v for k, v in state.items() if not k.startswith(OVERLAY_PREFIXES)}, set(own)
        )
        fit = state_dict_fit(own, state)
        if fit.mismatched:
            raise ValueError(
                f"{path} holds weights of another decoder size than SLatMeshDecoder({config}): "
                f"{len(fit.mismatched)} tensors differ, e.g. {'; '.join(fit.mismatched[:3])} (check model.decoder)"
            )
        if strict and (fit.missing or fit.unexpected):
            raise KeyError(f"{path}: weights do not fit SLatMeshDecoder({config}): {fit.describe(limit=20)}")
        model.load_state_dict(state, strict=False)
        return model


def _check_arguments(
    attn_mode: str, pe_mode: str, representation: Mapping[str, Any] | None, channels: int, groups: int
) -> None:
    """Errors naming the argument for what Meta's class would accept but this decoder cannot do."""
    if attn_mode not in ("full", "swin"):
        raise ValueError(f"attn_mode must be 'full' or 'swin' (the mesh decoder's modes), got {attn_mode!r}")
    if pe_mode != "ape":
        raise ValueError(f"pe_mode must be 'ape' (the mesh decoder's mode), got {pe_mode!r}")
    if representation and representation.get("use_color", False):
        raise ValueError(
            "representation_config use_color=True is not supported: the mesh decoder has no colour head"
        )
    for stage, ch in (("model_channels // 4", channels // 4), ("model_channels // 8", channels // 8)):
        if ch % groups:
            raise ValueError(
                f"{stage} = {ch} is not divisible by num_groups={groups}; "
                f"use model_channels >= {8 * groups} or a smaller num_groups"
            )


def _strip_prefix(state: Mapping[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    if not state or set(state) & expected:
        return dict(state)
    for key in state:
        parts = key.split(".")
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i]) + "."
            stripped = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            if set(stripped) & expected:
                return stripped
        break
    return dict(state)
