"""From the decoder's 53 output channels to a vertex SDF grid and a triangle mesh.

The channel layout and the SDF grid follow the reference's `SparseFeatures2Mesh` exactly: per
output voxel, ``sdf`` 8 (one value per cube corner), ``deform`` 24, ``weights`` 21 (FlexiCubes'
beta 12, alpha 8, gamma 1); the bias ``-1/res`` is added to the SDF; corner values are averaged
onto the (res+1)^3 vertex grid and vertices no voxel touches read +1 (outside). Negative is
inside. The mesh itself comes from marching cubes (scikit-image) on that grid, in the frame's
normalised coordinates [-0.5, 0.5]^3; FlexiCubes' deformation and weights are not used there.
Mapping to world millimetres is `to_world` with the sample's 4x4 ``frame_to_world``.
"""

from __future__ import annotations

import torch

from lora_sam3d.geometry import Mesh, marching_cubes
from lora_sam3d.sparse import SparseTensor

__all__ = ["CUBE_CORNERS", "FEATS_CHANNELS", "SDF_CHANNELS", "corner_sdf", "decode_meshes", "vertex_sdf_grid"]

SDF_CHANNELS = slice(0, 8)
FEATS_CHANNELS = 53

# Corner j of a cube at voxel (x, y, z) is vertex (x, y, z) + CUBE_CORNERS[j] (x fastest), as in
# the reference's utils_cube.
CUBE_CORNERS = torch.tensor(
    [[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 1]], dtype=torch.long
)


def corner_sdf(out: SparseTensor, resolution: int) -> torch.Tensor:
    """(N, 8) SDF at each output voxel's corners, with the reference's ``-1/resolution`` bias."""
    return out.feats[:, SDF_CHANNELS].float() - 1.0 / resolution


def vertex_sdf_grid(out: SparseTensor, resolution: int, fill: torch.Tensor | None = None) -> torch.Tensor:
    """(B, res+1, res+1, res+1) SDF on the vertex grid; differentiable; untouched vertices = +1.

    ``resolution`` is the output grid's (4R for a decoder of resolution R). Index order is
    (x, y, z) of the sparse coordinates. ``fill`` (same shape as the result) gives the values of
    vertices no output voxel touches (stage 1's sign in the coarse-to-fine design) instead of +1.
    """
    v = resolution + 1
    coords = out.coords.long()
    corners = coords[:, None, 1:] + CUBE_CORNERS.to(coords.device)[None]  # (N, 8, 3)
    if coords.shape[0] and int(corners.max()) >= v:
        raise ValueError(f"output coordinates exceed the {resolution}^3 grid; wrong resolution?")
    index = ((coords[:, None, 0] * v + corners[..., 0]) * v + corners[..., 1]) * v + corners[..., 2]
    index = index.reshape(-1)
    total = out.batch_size * v**3
    sdf = corner_sdf(out, resolution).reshape(-1)
    sums = sdf.new_zeros(total).index_add(0, index, sdf)
    counts = torch.bincount(index, minlength=total)
    default = torch.ones_like(sums) if fill is None else fill.reshape(-1).to(sums.dtype)
    grid = torch.where(counts > 0, sums / counts.clamp_min(1), default)
    return grid.view(out.batch_size, v, v, v)


def decode_meshes(out: SparseTensor, resolution: int) -> list[Mesh]:
    """One mesh per batch element from the decoder output, in frame coordinates."""
    grids = vertex_sdf_grid(out, resolution)
    return [marching_cubes(g) for g in grids]
