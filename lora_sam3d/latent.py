"""Step 5 of the data flow, the evidence: a batch of slice samples -> what stage 1 reads.

`SliceUnprojection` (no parameters) gives every cell of the R^3 frame grid 8 features read from the
slice at the cell's orthogonal projection, as a dense (B, 8, R, R, R) tensor; stage 1
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

from lora_sam3d.sparse import SparseTensor

LATENT_CHANNELS = 8


def latent_cell_centres(resolution: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(R^3, 3) frame coordinates of the latent grid's cell centres, x-major like `torch.nonzero`."""
    axis = (torch.arange(resolution, device=device, dtype=torch.float32) + 0.5) / resolution - 0.5
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)


class SliceUnprojection:
    """Unproject the input slice into the frame: (B, 8, R, R, R) features on the R^3 grid.

    Features: mask, intensity and signed 2D distance to the mask border, each read (bilinear) at
    the cell's projection onto the slice; the cell's signed distance to the slice plane; its
    position (3); and the mask damped by the distance to the plane (``exp(-(d / plane_decay)^2)``),
    which says where the slice is direct evidence. All in frame units.
    """

    def __init__(self, resolution: int, plane_decay: float = 0.1) -> None:
        self.resolution = resolution
        self.plane_decay = plane_decay

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        image, mask, distance, axis = batch["image"], batch["mask"], batch["mask_distance"], batch["axis"]
        b, device, r = image.shape[0], image.device, self.resolution
        u = latent_cell_centres(r, device).expand(b, -1, -1)  # (B, R^3, 3)
        normal = F.one_hot(axis.long(), 3).to(u.dtype)  # (B, 3)
        plane = torch.stack(
            [torch.tensor([p for p in range(3) if p != int(a)], device=device) for a in axis.tolist()]
        )
        up = torch.gather(u, 2, plane[:, None, :1].expand(-1, u.shape[1], 1))[..., 0]
        uq = torch.gather(u, 2, plane[:, None, 1:].expand(-1, u.shape[1], 1))[..., 0]
        grid = torch.stack([2 * uq, 2 * up], dim=-1)[:, :, None, :]  # grid_sample (x, y) = (column, row)
        maps = torch.stack([mask.to(u.dtype), image[:, 0].to(u.dtype), distance.to(u.dtype)], dim=1)
        read = F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)[..., 0]
        m, intensity, dist2d = read.unbind(1)  # (B, R^3) each
        d_plane = (u * normal[:, None, :]).sum(-1)
        evidence = m * torch.exp(-((d_plane / self.plane_decay) ** 2))
        feats = torch.stack([m, intensity, dist2d, d_plane, u[..., 0], u[..., 1], u[..., 2], evidence], dim=1)
        return feats.view(b, LATENT_CHANNELS, r, r, r)


class PrecomputedLatents:
    """Structured latents from Meta's SAM 3D pipeline, one safetensors file per sample.

    ``<folder>/<case_id>__<class_name>__<axis>__<index>.safetensors`` with ``coords`` (N, 3) int
    (x, y, z on the R^3 grid) and ``feats`` (N, 8). Read with safetensors (no code runs).
    """

    def __init__(self, folder: str | Path, resolution: int) -> None:
        self.folder = Path(folder)
        self.resolution = resolution
        if not self.folder.is_dir():
            raise FileNotFoundError(f"precomputed latents folder {self.folder} does not exist")

    @staticmethod
    def sample_id(case_id: str, class_name: str, axis: int, index: int) -> str:
        return f"{case_id}__{class_name}__{axis}__{index}"

    def __call__(self, batch: dict[str, Any]) -> SparseTensor:
        from safetensors.torch import load_file

        device = batch["image"].device
        coords, feats = [], []
        for i, (case_id, name) in enumerate(zip(batch["case_id"], batch["class_name"], strict=True)):
            sid = self.sample_id(case_id, name, int(batch["axis"][i]), int(batch["index"][i]))
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


def make_encoder(kind: str, resolution: int, latents_dir: str | None = None) -> Any:
    if kind == "slice":
        return SliceUnprojection(resolution)
    if kind == "precomputed":
        if latents_dir is None:
            raise ValueError("latent encoder 'precomputed' needs latents_dir")
        return PrecomputedLatents(latents_dir, resolution)
    raise ValueError(f"latent encoder must be 'slice' or 'precomputed', got {kind!r}")
