"""The two-stage model (`Reconstructor`), the mesh decoder, and the step from its output to SDF grids and meshes."""

from lora_sam3d.geometry import Mesh, marching_cubes
from lora_sam3d.models.config import (
    BandConfig,
    BaseConfig,
    ContextConfig,
    LatentConfig,
    ModelConfig,
    StepConfig,
)
from lora_sam3d.models.decoder import SLatMeshDecoder
from lora_sam3d.models.mesh import decode_meshes, vertex_sdf_grid
from lora_sam3d.models.reconstructor import Reconstruction, Reconstructor

__all__ = [
    "BandConfig",
    "BaseConfig",
    "ContextConfig",
    "LatentConfig",
    "Mesh",
    "ModelConfig",
    "Reconstruction",
    "Reconstructor",
    "SLatMeshDecoder",
    "StepConfig",
    "decode_meshes",
    "marching_cubes",
    "vertex_sdf_grid",
]
