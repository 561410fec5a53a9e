"""Step 5 of the data flow: a batch's `Evidence` -> what stage 1 reads (or Meta's latents instead).

`SliceUnprojection` (no parameters) gives every cell of the R^3 frame grid 8 features read from the
slice at the cell's orthogonal projection, as a dense (B, 8, R, R, R) tensor, and with
``interpolation`` 2 more: the slices' own shape-based interpolation (`shape_interpolation`: the
signed distances of the two nearest parallel slices either side of the cell, blended linearly
by the cell's distance to each, as a classic "fill between slices" interpolates); stage 1
(`lora_sam3d.models.structure`) turns it into occupancy and the decoder's latent. `PrecomputedLatents`
reads structured latents exported from Meta's SAM 3D pipeline (its `sample_sparse_structure` +
`sample_slat` outputs), which replace both stages' choice of voxels and latents. Both build
tensors on the batch's device: nothing to move by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from lora_sam3d.inputs import CONTEXT_CHANNELS, Evidence
from lora_sam3d.sparse import SparseTensor

__all__ = [
    "EVIDENCE_FEATURES",
    "INTERPOLATION_CHANNELS",
    "LATENT_CHANNELS",
    "PrecomputedLatents",
    "SliceUnprojection",
    "context_at",
    "context_on_grid",
    "evidence_at_cells",
    "latent_cell_centres",
    "make_encoder",
    "shape_interpolation",
    "with_context",
]

LATENT_CHANNELS = 8

INTERPOLATION_CHANNELS = 2
"""`shape_interpolation`'s features: the interpolated signed distance, and how closely it is bracketed."""

PLANE_AXES = torch.tensor([[1, 2], [0, 2], [0, 1]])
"""The two in-plane axes of a slice normal to axis 0, 1 or 2, in order."""


def latent_cell_centres(resolution: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(R^3, 3) frame coordinates of the latent grid's cell centres, x-major like `torch.nonzero`."""
    axis = (torch.arange(resolution, device=device, dtype=torch.float32) + 0.5) / resolution - 0.5
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)


class SliceUnprojection:
    """Unproject the input views into the frame: (B, 8, R, R, R) features on the R^3 grid.

    Per view: mask, intensity and signed 2D distance to the mask border, each read (bilinear) at
    the cell's orthogonal projection onto the view's plane, and the cell's signed distance to that
    plane. Several views (`lora_sam3d.data.views`) are merged as a set, so their order never
    matters: each cell takes the views' values weighted by ``softmax(-(d / plane_decay)^2)`` over
    the views (the nearest plane dominates), and the evidence channel is the largest over views of
    the mask damped by the distance to its plane (``m * exp(-(d / plane_decay)^2)``). With one view
    the weights are exactly 1. Channels: mask, intensity, 2D distance, plane distance, the cell's
    position (3), evidence. All in frame units. With ``interpolation``, the two channels of
    `shape_interpolation` follow (10 in all).
    """

    def __init__(self, resolution: int, plane_decay: float = 0.1, interpolation: bool = False) -> None:
        self.resolution = resolution
        self.plane_decay = plane_decay
        self.interpolation = interpolation

    @property
    def channels(self) -> int:
        return LATENT_CHANNELS + (INTERPOLATION_CHANNELS if self.interpolation else 0)

    def __call__(self, views: Evidence) -> torch.Tensor:
        b, r = views.valid.shape[0], self.resolution
        u = latent_cell_centres(r, views.device).expand(b, -1, -1)  # (B, R^3, 3)
        return self.at(views, u).view(b, self.channels, r, r, r)

    def at(self, views: Evidence, u: torch.Tensor) -> torch.Tensor:
        """(B, 8 or 10, P): the features at points ``u`` (B, P, 3) in frame coordinates (any grid's cells).

        Only the valid (sample, view) pairs are read, in one batched call: a batch padded to 16 views
        for one stack costs what its real views cost. Padding reads 0 with weight 0, as it did when
        every view was read, so the features are the same."""
        b, k = views.valid.shape
        valid = views.valid.to(u.device)
        sample, view = valid.nonzero(as_tuple=True)
        m, intensity, dist2d, d_plane = self._read(u[sample], views, sample, view)
        read = u.new_zeros(b, k, 4, u.shape[1])
        read[sample, view] = torch.stack([m, intensity, dist2d, d_plane], dim=1)
        d = read[:, :, 3]  # (B, K, P)
        closeness = torch.where(valid[:, :, None], -((d / self.plane_decay) ** 2), float("-inf"))
        weight = torch.softmax(closeness, dim=1)  # (B, K, P); 1 for a single view
        merged = (weight[:, :, None] * read).sum(1) if k > 1 else read[:, 0]
        evidence = (read[:, :, 0] * torch.exp(closeness)).amax(1)
        m, intensity, dist2d, d_plane = merged.unbind(1)
        out = [m, intensity, dist2d, d_plane, u[..., 0], u[..., 1], u[..., 2], evidence]
        if self.interpolation:
            axis = views.axis.to(u.device)
            out += shape_interpolation(read[:, :, 2], d, valid, axis, self.plane_decay).unbind(1)
        return torch.stack(out, dim=1)

    @staticmethod
    def _read(
        u: torch.Tensor, views: Evidence, sample: torch.Tensor, view: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """View ``view[i]`` of sample ``sample[i]`` at its points ``u[i]`` (V, P, 3): mask, intensity and
        2D distance (each (V, P)) read at the points' projections onto the view's plane, and the
        points' signed distance to that plane (V, P)."""
        device = u.device
        axis = views.axis.to(device)[sample, view].long()
        normal = F.one_hot(axis, 3).to(u.dtype)  # (V, 3)
        plane = PLANE_AXES.to(device)[axis]  # (V, 2): the in-plane axes, in order
        up = torch.gather(u, 2, plane[:, None, :1].expand(-1, u.shape[1], 1))[..., 0]
        uq = torch.gather(u, 2, plane[:, None, 1:].expand(-1, u.shape[1], 1))[..., 0]
        grid = torch.stack([2 * uq, 2 * up], dim=-1)[:, :, None, :]  # grid_sample (x, y) = (column, row)
        maps = torch.stack(
            [m.to(device)[sample, view].to(u.dtype) for m in (views.mask, views.image, views.distance)], dim=1
        )
        read = F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)[..., 0]
        d_plane = (u * normal[:, None, :]).sum(-1) - views.offset.to(device)[sample, view, None].to(u.dtype)
        return (*read.unbind(1), d_plane)


def shape_interpolation(
    distance: torch.Tensor, d_plane: torch.Tensor, valid: torch.Tensor, axis: torch.Tensor, plane_decay: float
) -> torch.Tensor:
    """(B, 2, P): the drawn slices' shape-based interpolation at P points, from each view's 2D signed
    distance ``distance`` (B, K, P) read at the points' projections and the points' signed distance
    ``d_plane`` (B, K, P) to each view's plane (``valid`` (B, K), ``axis`` (B, K)).

    Along each axis, a point between two parallel drawn planes takes their distances blended
    linearly by its distance to each (the nearest plane on either side; on a plane, that plane's);
    points bracketed along several axes average them. Channel 0 is that distance (0 where no two
    parallel slices bracket the point: beyond a stack's ends, or with one slice per axis), channel 1
    how close the bracket is, ``exp(-gap / (2 plane_decay))`` for planes ``gap`` apart (1 on a drawn
    plane, 0: none), so a 10 mm stack's interpolation counts for more than that of two slices far
    apart."""
    inf = torch.tensor(float("inf"), device=distance.device, dtype=distance.dtype)
    value = torch.zeros_like(distance[:, 0])
    closeness = torch.zeros_like(value)
    count = torch.zeros_like(value)
    for a in range(3):
        same = (valid & (axis == a))[:, :, None]
        if not bool(same.any()):
            continue
        # the nearest plane at or under the point, and at or over it
        below, k_below = torch.where(same & (d_plane >= 0), d_plane, inf).min(1)
        above, k_above = torch.where(same & (d_plane <= 0), -d_plane, inf).min(1)
        bracketed = torch.isfinite(below) & torch.isfinite(above)
        gap = torch.where(bracketed, below + above, 0.0)
        t = torch.where(gap > 0, below / gap.clamp_min(1e-12), 0.0)  # 0 on the lower plane, 1 on the upper
        v_below = distance.gather(1, k_below[:, None])[:, 0]
        v_above = distance.gather(1, k_above[:, None])[:, 0]
        blended = (1 - t) * v_below + t * v_above
        value = value + torch.where(bracketed, blended, 0.0)
        closeness = torch.maximum(closeness, torch.where(bracketed, torch.exp(-gap / (2 * plane_decay)), 0.0))
        count = count + bracketed.to(value.dtype)
    return torch.stack([value / count.clamp_min(1), closeness], dim=1)


def with_context(slices: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The slices' features and the scan's in the model's channel order, along dim 1: the slice
    unprojection's 8, the scan's 2, then the interpolation's 2 when there are any, then the tissue
    model's channel when the context has one (so a base trained without the later ones keeps its
    first channels)."""
    parts = [slices[:, :LATENT_CHANNELS], context[:, :CONTEXT_CHANNELS], slices[:, LATENT_CHANNELS:]]
    return torch.cat([*parts, context[:, CONTEXT_CHANNELS:]], dim=1)


class PrecomputedLatents:
    """Structured latents from Meta's SAM 3D pipeline, one safetensors file per sample.

    ``<folder>/<sample id>.safetensors`` (`Evidence.sample_ids`:
    ``<case_id>__<class_name>__<axis>__<index>``) with ``coords`` (N, 3) int (x, y, z on the R^3
    grid) and ``feats`` (N, 8). Read with safetensors (no code runs).
    """

    def __init__(self, folder: str | Path, resolution: int) -> None:
        self.folder = Path(folder)
        self.resolution = resolution
        if not self.folder.is_dir():
            raise FileNotFoundError(f"precomputed latents folder {self.folder} does not exist")

    def __call__(self, evidence: Evidence) -> SparseTensor:
        from safetensors.torch import load_file

        device = evidence.device
        coords, feats = [], []
        for i, sid in enumerate(evidence.sample_ids):
            path = self.folder / f"{sid}.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"no precomputed latent {path} for sample {sid}")
            data = load_file(str(path))
            c, f = data.get("coords"), data.get("feats")
            if (
                c is None
                or f is None
                or c.dim() != 2
                or c.shape[1] != 3
                or f.shape != (c.shape[0], LATENT_CHANNELS)
            ):
                raise ValueError(f"{path}: expected 'coords' (N, 3) and 'feats' (N, {LATENT_CHANNELS})")
            if c.numel() and (c.min() < 0 or c.max() >= self.resolution):
                raise ValueError(f"{path}: coords outside the {self.resolution}^3 grid")
            coords.append(torch.cat([torch.full((c.shape[0], 1), i), c.long()], 1))
            feats.append(f.float())
        return SparseTensor(
            torch.cat(feats).to(device), torch.cat(coords).int().to(device), batch_size=len(coords)
        )


def context_on_grid(evidence: Evidence, resolution: int, channels: int = CONTEXT_CHANNELS) -> torch.Tensor:
    """(B, C, R, R, R): the scan's context averaged over each of the R^3 cells (``channels`` zeros: no
    context)."""
    b = len(evidence)
    if evidence.context is None:
        return torch.zeros(b, channels, resolution, resolution, resolution, device=evidence.device)
    c = evidence.context.shape[-1]
    if c % resolution:
        raise ValueError(f"context grid {c}^3 is not a multiple of the model's {resolution}^3 grid")
    return F.avg_pool3d(evidence.context.float(), c // resolution) if c != resolution else evidence.context


def context_at(evidence: Evidence, u: torch.Tensor, channels: int = CONTEXT_CHANNELS) -> torch.Tensor:
    """(B, C, P): the context read (trilinear) at points ``u`` (B, P, 3) in frame coordinates;
    zeros (no scan) outside the frame, or ``channels`` zeros without context."""
    b, p = u.shape[:2]
    if evidence.context is None:
        return torch.zeros(b, channels, p, device=u.device, dtype=u.dtype)
    grid = (2 * u[..., [2, 1, 0]]).reshape(b, p, 1, 1, 3).to(evidence.context.dtype)
    read = F.grid_sample(evidence.context, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return read.reshape(b, evidence.context.shape[1], p).to(u.dtype)


EVIDENCE_FEATURES = LATENT_CHANNELS + CONTEXT_CHANNELS
"""Features `evidence_at_cells` gives each cell: the slice unprojection's 8, then the context's 2
(then `INTERPOLATION_CHANNELS` more when the reader interpolates, then `TISSUE_CHANNELS` when the
context carries the tissue model's)."""


def evidence_at_cells(
    evidence: Evidence,
    coords: torch.Tensor,
    resolution: int,
    reader: SliceUnprojection,
    context_channels: int = CONTEXT_CHANNELS,
) -> torch.Tensor:
    """(N, 10 to 13) evidence at sparse cells: ``coords`` (N, 4) = (sample, x, y, z) on a ``resolution``^3
    grid over the frame; the slices' 8 features (`SliceUnprojection.at`), the context's 2, the
    interpolation's 2 if the reader gives them and the tissue model's if the context has it
    (`with_context`; ``context_channels``: the context's width when a batch has none)."""
    n, b = coords.shape[0], len(evidence)
    width = reader.channels + context_channels
    if n == 0:
        return torch.zeros(0, width, device=coords.device)
    sample = coords[:, 0].long()
    u = (coords[:, 1:].float() + 0.5) / resolution - 0.5
    order = torch.argsort(sample, stable=True)
    counts = torch.bincount(sample, minlength=b)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(n, device=coords.device) - starts[sample[order]]
    padded = torch.zeros(b, int(counts.max()), 3, device=coords.device)
    padded[sample[order], slot] = u[order]
    context = context_at(evidence, padded, context_channels)
    feats = with_context(reader.at(evidence, padded), context)  # (B, F, P)
    out = torch.empty(n, width, device=coords.device, dtype=feats.dtype)
    out[order] = feats[sample[order], :, slot]
    return out


def make_encoder(
    kind: str, resolution: int, directory: str | None = None, interpolation: bool = False
) -> Any:
    if kind == "slice":
        return SliceUnprojection(resolution, interpolation=interpolation)
    if kind == "precomputed":
        if directory is None:
            raise ValueError("model.latents.encoder 'precomputed' needs model.latents.dir")
        return PrecomputedLatents(directory, resolution)
    raise ValueError(f"latent encoder must be 'slice' or 'precomputed', got {kind!r}")
