"""Geometry shared by the data and the model: meshes, frames on voxel grids, signed distances.

The data side (targets, scoring boxes, 2D distance maps) and the model side (meshes, the predicted
mask on a scan's grid) both need these, so they live below both. NumPy, SciPy's exact Euclidean
distance transform and scikit-image's marching cubes do the work; nothing here knows a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from scipy import ndimage

from lora_sam3d.io.atomic import atomic_write

__all__ = [
    "AXIS_NAMES",
    "BoxMask",
    "CoordinateSystem",
    "Mesh",
    "MeshFormat",
    "frame_box",
    "frame_vertices_on",
    "marching_cubes",
    "mask_signed_distance",
    "mask_surface",
    "sdf_on_box",
    "sdf_on_grid",
    "signed_distance_mm",
]

CoordinateSystem = Literal["RAS", "LPS"]
MeshFormat = Literal["ply", "stl", "obj"]

AXIS_NAMES = ("sagittal", "coronal", "axial")
"""The anatomical name of each voxel axis of the canonical RAS grid (0, 1, 2)."""


@dataclass
class Mesh:
    """A triangle mesh: ``vertices`` (V, 3) float, ``faces`` (F, 3) int64, ``normals`` (V, 3) unit, outward."""

    vertices: np.ndarray
    faces: np.ndarray
    normals: np.ndarray

    @property
    def is_empty(self) -> bool:
        return len(self.faces) == 0

    def save(self, path: str | Path, coordinate_system: CoordinateSystem = "RAS") -> Path:
        """Write a world-RAS mesh as PLY, STL or OBJ (by the suffix), its coordinate system in the
        header (``SPACE=RAS``/``SPACE=LPS``, which 3D Slicer reads); atomically."""
        path = Path(path)
        data = self.encode(path.suffix.lstrip(".").lower(), coordinate_system)  # type: ignore[arg-type]
        return atomic_write(path, lambda tmp: tmp.write_bytes(data))

    def encode(self, fmt: MeshFormat = "ply", coordinate_system: CoordinateSystem = "RAS") -> bytes:
        """The file bytes of a world-RAS mesh; LPS flips x and y (a rotation: faces stay outward)."""
        import trimesh

        vertices, normals = self.vertices.astype(np.float64), self.normals.astype(np.float64)
        if coordinate_system == "LPS":
            flip = np.array([-1.0, -1.0, 1.0])
            vertices, normals = vertices * flip, normals * flip
        elif coordinate_system != "RAS":
            raise ValueError(f"coordinate_system must be 'RAS' or 'LPS', got {coordinate_system!r}")
        tm = trimesh.Trimesh(vertices, self.faces, vertex_normals=normals, process=False)
        tag = f"SPACE={coordinate_system}"
        if fmt == "ply":
            data = trimesh.exchange.ply.export_ply(tm, encoding="binary", vertex_normal=True)
            first = data.index(b"\n", data.index(b"format")) + 1
            return data[:first] + f"comment {tag}\n".encode() + data[first:]
        if fmt == "stl":
            return tag.encode().ljust(80, b" ") + trimesh.exchange.stl.export_stl(tm)[80:]
        if fmt == "obj":
            return f"# {tag}\n".encode() + trimesh.exchange.obj.export_obj(tm, include_normals=True).encode()
        raise ValueError(f"mesh format must be ply, stl or obj, got {fmt!r}")

    def smoothed(self, iterations: int = 10) -> Mesh:
        """Taubin's lambda/mu smoothing (trimesh): removes marching cubes' cell steps without
        shrinking the surface as plain Laplacian smoothing does. Vertices move, faces stay; 0: this mesh."""
        import trimesh

        if iterations <= 0 or self.is_empty:
            return self
        tm = trimesh.Trimesh(self.vertices.astype(np.float64), self.faces, process=False)
        trimesh.smoothing.filter_taubin(tm, lamb=0.5, nu=0.53, iterations=iterations)
        return Mesh(tm.vertices.astype(np.float32), self.faces, tm.vertex_normals.astype(np.float32))

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
    crossing (everything inside or outside). The surface is closed where it reaches the grid's edge.
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
    # a border of outside values: a surface that reaches the grid's edge is closed there, so every
    # mesh is watertight (its vertices shift back by the border's one step)
    grid = np.pad(grid, 1, constant_values=max(float(grid.max()), level + step))
    # skimage's default ('descent') winds faces counter-clockwise seen from outside for an SDF
    # that is negative inside; its normals point down the gradient (inward), so flip them.
    verts, faces, normals, _ = skimage_marching_cubes(grid, level=level, spacing=(step, step, step))
    normals = -normals
    verts = np.clip(verts - 0.5 - step, -0.5, 0.5)  # a surface closed at the edge lies on the frame's face
    return Mesh(verts.astype(np.float32), faces.astype(np.int64), normals.astype(np.float32))


def frame_vertices_on(n: int, frame_to_world: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """((n+1)^3, 3) the voxel coordinates, on a grid of ``affine``, of a frame's (n+1)^3 vertex grid
    (vertex i at ``i / n - 0.5`` per axis, x slowest), as float."""
    u = np.arange(n + 1, dtype=np.float64) / n - 0.5
    grid = np.stack(np.meshgrid(u, u, u, indexing="ij"), -1).reshape(-1, 3)
    to_voxel = np.linalg.inv(affine) @ frame_to_world
    return grid @ to_voxel[:3, :3].T + to_voxel[:3, 3]


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


@dataclass
class BoxMask:
    """A bool mask held on a box of a voxel grid: ``box`` (the box's voxels), its ``origin`` (3,) on
    the grid, the grid's ``shape`` and ``affine`` (voxel -> world mm). A structure and its frame fill
    a small part of a real CT's grid; the rest is empty and need not be computed or held."""

    box: np.ndarray
    origin: np.ndarray
    shape: tuple[int, int, int]
    affine: np.ndarray

    def on(self, affine: np.ndarray, shape: tuple[int, ...]) -> bool:
        """Whether this mask's grid is the grid (``affine``, ``shape``)."""
        return tuple(int(s) for s in shape[:3]) == tuple(self.shape) and np.allclose(
            affine, self.affine, atol=1e-6
        )

    def paint(self, axis: int, index: int, plane: np.ndarray) -> None:
        """Set the grid's slice ``index`` normal to ``axis`` to ``plane`` (the slice's whole 2D mask,
        the grid's other two axes in order), in place, where the box holds that slice: a drawing
        replaces what was predicted on its own slice."""
        k = index - int(self.origin[axis])
        if not 0 <= k < self.box.shape[axis]:
            return
        p, q = (a for a in range(3) if a != axis)
        lo, hi = self.origin, self.origin + np.asarray(self.box.shape)
        crop = np.asarray(plane, dtype=bool)[lo[p] : hi[p], lo[q] : hi[q]]
        take: list[Any] = [slice(None)] * 3
        take[axis] = k
        self.box[tuple(take)] = crop

    def holds(self, axis: int, plane: np.ndarray) -> bool:
        """Whether every voxel of a slice mask ``plane`` normal to ``axis`` lies in the box's span."""
        p, q = (a for a in range(3) if a != axis)
        lo, hi = self.origin, self.origin + np.asarray(self.box.shape)
        plane = np.asarray(plane, dtype=bool)
        outside = plane.copy()
        outside[lo[p] : hi[p], lo[q] : hi[q]] = False
        return not outside.any()

    def full(self, dtype: type = bool) -> np.ndarray:
        """The mask on the whole grid (as ``dtype``: a file's uint8 is made once, not converted)."""
        box = self.box
        if box.dtype == bool and np.dtype(dtype).itemsize == 1 and np.dtype(dtype).kind in "ub":
            box = box.view(np.dtype(dtype))  # the same bytes: no conversion pass
        if box.shape == tuple(self.shape):
            return box.copy()
        out = np.zeros(self.shape, dtype=dtype)
        lo, hi = self.origin, self.origin + np.asarray(box.shape)
        out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = box
        return out


def _separable_inside(
    sdf: np.ndarray, matrix: np.ndarray, offset: np.ndarray, size: tuple[int, ...], chunk: int = 32
) -> np.ndarray | None:
    """Where the trilinear reading of ``sdf`` at ``matrix @ voxel + offset`` is below 0, for every
    voxel of a box of ``size``, done as three 1D linear interpolations (three small matrix products)
    when each box axis moves along one SDF axis; None otherwise. A voxel outside the SDF grid reads
    1.0 (outside), as scipy's ``mode="constant", cval=1.0``. The last product runs ``chunk`` planes at
    a time and keeps only the sign, so a scan-sized box never holds its float values at once.
    Written here: scipy reads every voxel's eight neighbours; this costs a few matrix products."""
    axes = np.abs(matrix) > 1e-9 * np.abs(matrix).max()
    if not (axes.sum(0) == 1).all() or not (axes.sum(1) == 1).all():
        return None
    grid = np.asarray(sdf, dtype=np.float32)
    source = np.argmax(axes, axis=0)  # box axis q reads SDF axis source[q]
    grid = np.transpose(grid, source)
    out = np.zeros(size, dtype=bool)
    negative = np.argwhere(grid < 0)
    if not len(negative):
        return out
    # a voxel reading only non-negative vertices is outside: only the box over the negative ones is read
    first_neg, last_neg = negative.min(0), negative.max(0)
    weights, part = [], []
    for q in range(3):  # SDF axis -> box axis q: linear weights, zero rows beyond the grid
        n, d = grid.shape[q], source[q]
        u = matrix[d, q] * np.arange(size[q]) + offset[d]
        near = np.flatnonzero((u > first_neg[q] - 1) & (u < last_neg[q] + 1))  # contiguous: u is linear
        if not len(near):
            return out
        part.append(slice(int(near[0]), int(near[-1]) + 1))
        u = u[part[q]]
        inside = (u >= 0) & (u <= n - 1)
        low = np.clip(np.floor(u), 0, n - 2).astype(int)
        w = (u - low).astype(np.float32)
        rows = np.flatnonzero(inside)
        matrix_q = np.zeros((len(u), n), dtype=np.float32)
        matrix_q[rows, low[rows]], matrix_q[rows, low[rows] + 1] = 1.0 - w[rows], w[rows]
        weights.append((matrix_q, inside))
    for q in (1, 2):  # contract SDF axes 1 and 2: (n0, size1, size2), small
        grid = np.moveaxis(np.tensordot(weights[q][0], grid, axes=(1, q)), 0, q)
        beyond: list[Any] = [slice(None)] * 3
        beyond[q] = ~weights[q][1]
        grid[tuple(beyond)] = 1.0  # beyond the grid: the constant itself
    first, inside0 = weights[0]
    box = out[tuple(part)]  # a view: written in place
    for start in range(0, box.shape[1], chunk):  # the big product in slabs, only its sign kept
        slab = np.tensordot(first, grid[:, start : start + chunk], axes=(1, 0))
        box[:, start : start + chunk] = slab < 0
    box[~inside0] = False
    return out


def sdf_on_grid(
    sdf: np.ndarray, frame_to_world: np.ndarray, affine: np.ndarray, shape: tuple[int, ...]
) -> np.ndarray:
    """(shape) bool: the inside (SDF < 0) of a vertex SDF grid voxelised on another voxel grid
    (`sdf_on_box` on the frame's box, placed on the whole grid)."""
    return sdf_on_box(sdf, frame_to_world, affine, shape).full()


def box_to_sdf_index(
    n: int, frame_to_world: np.ndarray, affine: np.ndarray, lo: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(matrix (3, 3), offset (3,)): a voxel of a box of a grid (``affine``; the box's first voxel
    at ``lo``) to its continuous index in a frame's (n+1)^3 vertex SDF grid, as scipy's
    ``affine_transform`` takes them."""
    to_frame = np.linalg.inv(frame_to_world) @ affine
    offset = n * (to_frame[:3, :3] @ np.asarray(lo, dtype=float) + to_frame[:3, 3] + 0.5)
    return n * to_frame[:3, :3], offset


def sdf_on_box(
    sdf: np.ndarray,
    frame_to_world: np.ndarray,
    affine: np.ndarray,
    shape: tuple[int, ...],
    box: tuple[np.ndarray, np.ndarray] | None = None,
) -> BoxMask:
    """The inside (SDF < 0) of a vertex SDF grid voxelised on another voxel grid, held on ``box``
    ((lo, hi) voxel bounds, hi exclusive; default the frame's box, outside which it is empty).

    ``affine`` maps that grid's voxel indices to world mm (e.g. a source scan's, any spacing or
    orientation); each voxel centre is mapped into the frame and the SDF read trilinearly there;
    voxels outside the frame are outside. A grid whose axes lie along the frame's (any order and
    direction: scans as they are stored) is read axis by axis (`_separable_inside`); an oblique one by
    scipy's ``affine_transform``.
    """
    shape = tuple(int(a) for a in shape[:3])
    lo, hi = frame_box(frame_to_world, affine, shape) if box is None else box
    lo, hi = np.asarray(lo, dtype=int), np.maximum(np.asarray(hi, dtype=int), lo)
    size = tuple(int(v) for v in hi - lo)
    grid_affine = np.asarray(affine, dtype=float)
    if min(size) == 0:
        return BoxMask(np.zeros(size, dtype=bool), lo, shape, grid_affine)  # type: ignore[arg-type]
    matrix, offset = box_to_sdf_index(sdf.shape[0] - 1, frame_to_world, affine, lo)
    inside = _separable_inside(sdf, matrix, offset, size)
    if inside is None:  # an oblique grid: the general transform
        inside = ndimage.affine_transform(
            np.asarray(sdf, dtype=np.float32), matrix, offset=offset, output_shape=size, order=1,
            mode="constant", cval=1.0,
        ) < 0  # fmt: skip
    return BoxMask(inside, lo, shape, grid_affine)  # type: ignore[arg-type]


def mask_surface(mask: np.ndarray, affine: np.ndarray) -> Mesh:
    """The boundary of a boolean voxel mask (marching cubes at 0.5), in the world mm of ``affine``."""
    from skimage.measure import marching_cubes as skimage_marching_cubes

    if not mask.any():
        empty = np.zeros((0, 3), dtype=np.float32)
        return Mesh(empty, np.zeros((0, 3), dtype=np.int64), empty)
    nz = np.argwhere(mask)  # only the mask's own box is meshed (a structure on a large scan grid)
    lo, hi = nz.min(0), nz.max(0) + 1
    padded = np.pad(mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(np.float32), 1)
    # values rise inwards here, so skimage's normals point outward and faces wind the other way
    verts, faces, normals, _ = skimage_marching_cubes(padded, level=0.5)
    mesh = Mesh(
        (verts - 1 + lo).astype(np.float32),
        faces[:, ::-1].astype(np.int64).copy(),
        normals.astype(np.float32),
    )
    return mesh.to_world(affine)


def signed_distance_mm(mask: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Signed distance to the mask's boundary in mm (negative inside), exact Euclidean (scipy EDT).

    The boundary sits half a voxel outside the outermost mask voxel centres: a voxel next to the
    structure reads +spacing/2, the structure's border voxels -spacing/2.
    """
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing_mm)
    inside = ndimage.distance_transform_edt(mask, sampling=spacing_mm)
    return np.where(mask, -(inside - 0.5 * spacing_mm), outside - 0.5 * spacing_mm)


def mask_signed_distance(mask: np.ndarray) -> np.ndarray:
    """(S, S) float32 signed distance to the mask's border in frame units (pixels / S), negative inside."""
    if not mask.any():
        return np.full(mask.shape, 1.0, dtype=np.float32)
    return signed_distance_mm(mask, 1.0 / mask.shape[0]).astype(np.float32)
