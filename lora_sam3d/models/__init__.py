"""The mesh decoder and the step from its output to SDF grids and meshes."""

from lora_sam3d.models.decoder import SLatMeshDecoder
from lora_sam3d.models.mesh import Mesh, decode_meshes, marching_cubes, vertex_sdf_grid

__all__ = ["Mesh", "SLatMeshDecoder", "decode_meshes", "marching_cubes", "vertex_sdf_grid"]
