"""Import Meta's SAM 3D Objects decoder code (vendored in the `sam3d` wheel) as a test oracle.

See shared notes: the vendored package imports as top-level `sam3d_objects`; it needs
LIDRA_SKIP_INIT=1 and SPARSE_ATTN_BACKEND=sdpa, a kaolin stand-in for one argument checker,
train mode on the CPU (spconv's eval path asserts on fused bias), and one thread (spconv's CPU
submanifold convolution races on more). Used only by tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

STUBS = Path(__file__).parent / "reference_stubs"


def available() -> bool:
    try:
        import sam3d  # noqa: F401
        import spconv  # noqa: F401
    except ImportError:
        return False
    return True


def load() -> tuple[type, ModuleType]:
    """Return (Meta's SLatMeshDecoder class, its sparse module `sp`)."""
    os.environ.setdefault("LIDRA_SKIP_INIT", "1")
    os.environ["SPARSE_ATTN_BACKEND"] = "sdpa"
    import sam3d

    meta = Path(sam3d.__file__).parent / "third_party" / "meta"
    for p in (str(meta), str(STUBS)):
        if p not in sys.path:
            sys.path.insert(0, p)
    from sam3d_objects.model.backbone.tdfy_dit.models.structured_latent_vae import decoder_mesh
    from sam3d_objects.model.backbone.tdfy_dit.modules import sparse as sp

    return decoder_mesh.SLatMeshDecoder, sp


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build(num_groups: int = 32, **config: Any) -> torch.nn.Module:
    """Meta's decoder in train mode. ``num_groups`` != 32 (ours is configurable, theirs is fixed at
    32 inside `SparseSubdivideBlock3d`) is set through that class's default argument while building."""
    cls, _ = load()
    from sam3d_objects.model.backbone.tdfy_dit.models.structured_latent_vae import decoder_mesh

    block_init = decoder_mesh.SparseSubdivideBlock3d.__init__
    saved = block_init.__defaults__
    block_init.__defaults__ = (None, num_groups)
    try:
        model = cls(**config, representation_config={"use_color": False}, device="cpu")
    finally:
        block_init.__defaults__ = saved
    return model.train()


def run(model: torch.nn.Module, feats: torch.Tensor, coords: torch.Tensor, meshes: bool = False) -> Any:
    """Reference forward on one thread. Returns the 53-channel (feats, coords), and the meshes if asked."""
    _, sp = load()
    x = sp.SparseTensor(feats=feats, coords=coords.int())
    with one_thread(), torch.no_grad():
        h = super(type(model), model).forward(x)
        for block in model.upsample:
            h = block(h)
        h = model.out_layer(h.type(x.dtype))
        result = (h.feats.clone(), h.coords.clone())
        if meshes:
            return (*result, model.to_representation(h))
    return result
