"""Mesh files say which world coordinate system they are in, and the LPS flip keeps the surface valid."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import trimesh

from lora_sam3d.models import marching_cubes


def test_mesh_files_state_their_coordinate_system() -> None:
    axis = torch.linspace(-0.5, 0.5, 17)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).norm(dim=-1) - 0.3
    mesh = marching_cubes(grid)
    assert b"comment SPACE=RAS" in mesh.encode("ply", "RAS")[:100]
    assert mesh.encode("stl", "LPS")[:9] == b"SPACE=LPS"
    assert mesh.encode("obj", "RAS").startswith(b"# SPACE=RAS")
    lps = trimesh.load(io.BytesIO(mesh.encode("ply", "LPS")), file_type="ply", process=False)
    assert np.allclose(lps.vertices[:, :2], -mesh.vertices[:, :2], atol=1e-6)
    assert lps.is_winding_consistent and lps.volume > 0, "LPS flip keeps outward winding"


def test_taubin_smoothing_removes_cell_steps_without_shrinking() -> None:
    axis = torch.linspace(-0.5, 0.5, 33)
    distance = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).norm(dim=-1) - 0.3
    mesh = marching_cubes(torch.sign(distance))  # a voxelised ball: the staircase a coarse SDF leaves
    smooth = mesh.smoothed(10)
    assert np.array_equal(smooth.faces, mesh.faces) and mesh.smoothed(0) is mesh

    def radius_spread(m: object) -> float:  # a sphere's vertices: how far from one radius
        r = np.linalg.norm(m.vertices, axis=1)  # type: ignore[attr-defined]
        return float(r.std())

    before, after = (trimesh.Trimesh(m.vertices, m.faces, process=False) for m in (mesh, smooth))
    assert radius_spread(smooth) < 0.7 * radius_spread(mesh), "the marching-cubes steps are smoothed out"
    assert after.volume == pytest.approx(before.volume, rel=0.02), "Taubin does not shrink the surface"
