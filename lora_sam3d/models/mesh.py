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

from dataclasses import dataclass

import numpy as np
import torch

from lora_sam3d.sparse import SparseTensor

SDF_CHANNELS = slice(0, 8)
DEFORM_CHANNELS = slice(8, 32)
WEIGHT_CHANNELS = slice(32, 53)
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


@dataclass
class Mesh:
    """A triangle mesh: ``vertices`` (V, 3) float, ``faces`` (F, 3) int64, ``normals`` (V, 3) unit, outward."""

    vertices: np.ndarray
    faces: np.ndarray
    normals: np.ndarray

    @property
    def is_empty(self) -> bool:
        return len(self.faces) == 0

    def to_world(self, frame_to_world: np.ndarray | torch.Tensor) -> Mesh:
        """Map frame coordinates through a 4x4 affine (e.g. to RAS millimetres); normals follow."""
        m = np.asarray(
            frame_to_world.detach().cpu() if isinstance(frame_to_world, torch.Tensor) else frame_to_world
        )
        m = m.astype(np.float64)
        if m.shape != (4, 4):
            raise ValueError(f"frame_to_world must be 4x4, got {m.shape}")
        linear = m[:3, :3]
        vertices = self.vertices @ linear.T + m[:3, 3]
        normals = self.normals @ np.linalg.inv(linear)  # inverse-transpose for normals
        normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
        faces = self.faces if np.linalg.det(linear) > 0 else self.faces[:, ::-1].copy()
        return Mesh(vertices.astype(np.float32), faces, normals.astype(np.float32))


def marching_cubes(sdf_grid: torch.Tensor | np.ndarray, level: float = 0.0) -> Mesh:
    """Surface ``sdf == level`` of a (V, V, V) vertex grid, in frame coordinates [-0.5, 0.5]^3.

    Vertex i of the grid sits at ``i / (V - 1) - 0.5``. Returns an empty mesh when the grid has no
    crossing (everything inside or outside).
    """
    from skimage.measure import marching_cubes as skimage_marching_cubes

    grid = (
        sdf_grid.detach().float().cpu().numpy()
        if isinstance(sdf_grid, torch.Tensor)
        else np.asarray(sdf_grid)
    )
    if grid.ndim != 3 or len(set(grid.shape)) != 1:
        raise ValueError(f"expected a cubic (V, V, V) grid, got shape {grid.shape}")
    if not (grid.min() < level < grid.max()):
        empty = np.zeros((0, 3), dtype=np.float32)
        return Mesh(empty, np.zeros((0, 3), dtype=np.int64), empty)
    step = 1.0 / (grid.shape[0] - 1)
    # skimage's default ('descent') winds faces counter-clockwise seen from outside for an SDF
    # that is negative inside; its normals point down the gradient (inward), so flip them.
    verts, faces, normals, _ = skimage_marching_cubes(grid, level=level, spacing=(step, step, step))
    normals = -normals
    return Mesh((verts - 0.5).astype(np.float32), faces.astype(np.int64), normals.astype(np.float32))


def frame_box(
    frame_to_world: np.ndarray, affine: np.ndarray, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) voxel index bounds (hi exclusive) of the frame cube on a grid (``affine``, ``shape``)."""
    corners = np.array([[x, y, z, 1.0] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
    vox = (np.linalg.inv(affine) @ frame_to_world @ corners.T)[:3]
    size = np.asarray(shape[:3])
    return np.clip(np.floor(vox.min(1)).astype(int), 0, size), np.clip(
        np.ceil(vox.max(1)).astype(int) + 1, 0, size
    )


def sdf_on_grid(
    sdf: np.ndarray, frame_to_world: np.ndarray, affine: np.ndarray, shape: tuple[int, ...]
) -> np.ndarray:
    """(shape) bool: the inside (SDF < 0) of a vertex SDF grid voxelised on another voxel grid.

    ``affine`` maps that grid's voxel indices to world mm (e.g. a source scan's, any spacing or
    orientation); each voxel centre is mapped into the frame and the SDF read trilinearly there;
    voxels outside the frame are outside. Only the frame's bounding box of the grid is computed.
    """
    n = sdf.shape[0] - 1
    shape = tuple(int(a) for a in shape[:3])
    out = np.zeros(shape, dtype=bool)
    lo, hi = frame_box(frame_to_world, affine, shape)
    if np.any(hi <= lo):
        return out
    from scipy import ndimage

    ijk = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij"), -1)
    to_frame = np.linalg.inv(frame_to_world) @ affine
    u = ijk @ to_frame[:3, :3].T + to_frame[:3, 3]
    values = ndimage.map_coordinates(
        np.asarray(sdf, dtype=np.float32),
        ((u + 0.5) * n).reshape(-1, 3).T,
        order=1,
        mode="constant",
        cval=1.0,
    )
    out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = values.reshape(ijk.shape[:3]) < 0
    return out


def mask_surface(mask: np.ndarray, affine: np.ndarray) -> Mesh:
    """The boundary of a boolean voxel mask (marching cubes at 0.5), in the world mm of ``affine``."""
    from skimage.measure import marching_cubes as skimage_marching_cubes

    if not mask.any():
        empty = np.zeros((0, 3), dtype=np.float32)
        return Mesh(empty, np.zeros((0, 3), dtype=np.int64), empty)
    padded = np.pad(mask.astype(np.float32), 1)
    # values rise inwards here, so skimage's normals point outward and faces wind the other way
    verts, faces, normals, _ = skimage_marching_cubes(padded, level=0.5)
    mesh = Mesh(
        (verts - 1).astype(np.float32), faces[:, ::-1].astype(np.int64).copy(), normals.astype(np.float32)
    )
    return mesh.to_world(affine)


def decode_meshes(out: SparseTensor, resolution: int) -> list[Mesh]:
    """One mesh per batch element from the decoder output, in frame coordinates."""
    grids = vertex_sdf_grid(out, resolution)
    return [marching_cubes(g) for g in grids]
