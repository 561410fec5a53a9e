"""The decoder against Meta's own code (the `sam3d` wheel's vendored SAM 3D Objects), and on its own."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import reference
import torch
from safetensors.torch import save_file

from lora_sam3d.lora import freeze_base_params, inject_lora
from lora_sam3d.models import SLatMeshDecoder, decode_meshes, marching_cubes, vertex_sdf_grid
from lora_sam3d.sparse import SparseTensor

CONFIG = dict(
    resolution=16,
    model_channels=256,
    latent_channels=8,
    num_blocks=2,
    num_heads=4,
    attn_mode="swin",
    window_size=8,
)
TINY = dict(
    resolution=8, model_channels=64, latent_channels=8, num_blocks=2, num_heads=4, attn_mode="swin",
    window_size=8, num_groups=8,
)  # fmt: skip


def shell_input(resolution: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batch elements: spherical shells of different radii/centres plus scattered voxels."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(resolution)] * 3, indexing="ij"), -1).float()
    coords = []
    for b, (centre, radius) in enumerate([((7.0, 8.0, 6.5), 5.0), ((9.0, 6.0, 9.0), 3.5)]):
        dist = (grid - torch.tensor(centre)).norm(dim=-1)
        occ = ((dist - radius).abs() < 0.9) | (torch.rand(grid.shape[:3], generator=g) < 0.01)
        xyz = torch.nonzero(occ)
        coords.append(torch.cat([torch.full((xyz.shape[0], 1), b), xyz], 1))
    c = torch.cat(coords).int()
    return torch.randn(c.shape[0], 8, generator=g), c


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random and of a sensible scale (the zero-initialised output layers included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("act_layers" in name or "out_layers.1" in name):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, SLatMeshDecoder]:
    torch.manual_seed(0)
    ref = reference.build(**CONFIG)
    randomize(ref)
    ours = SLatMeshDecoder(**CONFIG)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.fixture(scope="module")
def outputs(pair):
    ref, ours = pair
    feats, coords = shell_input()
    ref_feats, ref_coords, ref_meshes = reference.run(ref, feats, coords, meshes=True)
    with torch.no_grad():
        out = ours(SparseTensor(feats, coords))
    return out, ref_feats, ref_coords, ref_meshes


def test_state_dict_names_and_shapes_match_reference(pair) -> None:
    ref, ours = pair
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(our_sd) == list(ref_sd)
    assert {k: tuple(v.shape) for k, v in our_sd.items()} == {k: tuple(v.shape) for k, v in ref_sd.items()}
    assert our_sd["upsample.0.out_layers.0.conv.weight"].shape == (64, 3, 3, 3, 256)


def test_output_matches_reference(outputs) -> None:
    out, ref_feats, ref_coords, _ = outputs
    assert out.feats.shape == (64 * ref_coords.shape[0] // 64, 53)
    assert torch.equal(out.coords, ref_coords.int()), "same output voxels in the same order"
    scale = ref_feats.abs().max()
    assert scale > 0.1, "the comparison must not be between near-zero outputs"
    err = (out.feats - ref_feats).abs()
    rel = (err / (ref_feats.abs() + 1e-3 * scale)).max().item()
    print(
        f"\ndecoder parity: max abs err {err.max().item():.3e}, output scale {scale:.3f}, max rel err {rel:.3e}"
    )
    assert err.max() <= 1e-4 * scale
    torch.testing.assert_close(out.feats, ref_feats, rtol=1e-4, atol=1e-4 * scale.item())


def test_vertex_sdf_grid_matches_reference(outputs) -> None:
    from sam3d_objects.model.backbone.tdfy_dit.representations.mesh.utils_cube import (
        get_dense_attrs,
        sparse_cube2verts,
    )

    out, ref_feats, ref_coords, _ = outputs
    res = 4 * CONFIG["resolution"]
    ours = vertex_sdf_grid(out, res)
    for b in range(2):
        rows = ref_coords[:, 0] == b
        sdf = ref_feats[rows, :8, None] - 1.0 / res
        v_pos, v_attrs, _ = sparse_cube2verts(ref_coords[rows, 1:], sdf, training=False)
        dense = get_dense_attrs(v_pos, v_attrs, res=res + 1, sdf_init=True)[:, 0].view(
            res + 1, res + 1, res + 1
        )
        scale = dense.abs().max().item()
        torch.testing.assert_close(ours[b], dense, rtol=1e-4, atol=1e-4 * scale)
        assert (ours[b] == 1).sum() > 0, "vertices no voxel touches read +1"


def chamfer(a: np.ndarray, b: np.ndarray) -> float:
    ta, tb = (
        torch.from_numpy(np.asarray(a, dtype=np.float32)),
        torch.from_numpy(np.asarray(b, dtype=np.float32)),
    )
    d_ab = torch.cat([torch.cdist(chunk, tb).min(1).values for chunk in ta.split(4096)])
    d_ba = torch.cat([torch.cdist(chunk, ta).min(1).values for chunk in tb.split(4096)])
    return 0.5 * (d_ab.mean() + d_ba.mean()).item()


def test_marching_cubes_mesh_close_to_reference_flexicubes(outputs) -> None:
    out, _, _, ref_meshes = outputs
    res = 4 * CONFIG["resolution"]
    for ours, ref in zip(decode_meshes(out, res), ref_meshes, strict=True):
        assert not ours.is_empty and ref.success
        d = chamfer(ours.vertices, ref.vertices.numpy())
        print(
            f"\nChamfer(ours marching cubes, reference FlexiCubes) = {d:.4f} frame units = {d * res:.2f} voxels"
        )
        assert d < 1.0 / res, "the two extractions of one SDF should agree within a voxel"
        assert ours.vertices.min() >= -0.5 and ours.vertices.max() <= 0.5


def test_our_state_dict_loads_into_reference() -> None:
    twin = SLatMeshDecoder(**CONFIG)
    randomize(twin, seed=3)
    ref2 = reference.build(**CONFIG)
    ref2.load_state_dict(twin.state_dict())
    feats, coords = shell_input(seed=4)
    ref_feats, _ = reference.run(ref2, feats, coords)
    with torch.no_grad():
        ours_out = twin(SparseTensor(feats, coords)).feats
    torch.testing.assert_close(ours_out, ref_feats, rtol=1e-4, atol=1e-4 * ref_feats.abs().max().item())


def test_from_pretrained_reads_safetensors_and_lightning_ckpt(tmp_path) -> None:
    model = SLatMeshDecoder(**TINY)
    randomize(model)
    sd = model.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "dec.safetensors"))
    torch.save(
        {"state_dict": {f"model.decoder.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "dec.ckpt"
    )
    feats, coords = shell_input(resolution=8)
    x = SparseTensor(feats, coords)
    expected = model(x).feats
    for name in ("dec.safetensors", "dec.ckpt"):
        loaded = SLatMeshDecoder.from_pretrained(tmp_path / name, **TINY)
        assert torch.equal(loaded(x).feats, expected)
    bad = dict(sd)
    bad.pop("out_layer.bias")
    bad["extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(
        KeyError, match=r"bad.pt.*missing keys \['out_layer.bias'\].*unexpected keys \['extra.weight'\]"
    ):
        SLatMeshDecoder.from_pretrained(tmp_path / "bad.pt", **TINY)
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt"):
        SLatMeshDecoder.from_pretrained(tmp_path / "nope.ckpt", **TINY)
    (tmp_path / "trunc.safetensors").write_bytes((tmp_path / "dec.safetensors").read_bytes()[:50])
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*trunc\.safetensors"):
        SLatMeshDecoder.from_pretrained(tmp_path / "trunc.safetensors", **TINY)


def test_config_errors_name_the_value() -> None:
    with pytest.raises(
        ValueError,
        match=r"model_channels // 4 = 16 is not divisible by num_groups=32; use model_channels >= 256",
    ):
        SLatMeshDecoder(resolution=8, model_channels=64, latent_channels=8, num_blocks=1, num_heads=4)
    model = SLatMeshDecoder(**TINY)
    with pytest.raises(ValueError, match=r"expected feats \(N, 8\), got \(5, 3\)"):
        model(SparseTensor(torch.zeros(5, 3), torch.zeros(5, 4, dtype=torch.int32)))


def sphere_target(resolution: int) -> torch.Tensor:
    v = 4 * resolution + 1
    axis = torch.linspace(-0.5, 0.5, v)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1)
    return grid.norm(dim=-1) - 0.3


def test_backward_on_cpu_reduces_sdf_loss() -> None:
    torch.manual_seed(0)
    model = SLatMeshDecoder(**TINY)
    coords = torch.nonzero(torch.ones(8, 8, 8)).int()
    x = SparseTensor(
        torch.randn(coords.shape[0], 8),
        torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords], 1),
    )
    target = sphere_target(TINY["resolution"]).clamp(-0.1, 0.1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        pred = vertex_sdf_grid(model(x), 4 * TINY["resolution"])[0]
        loss = (pred.clamp(-0.1, 0.1) - target).abs().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_gradient_checkpointing_and_autocast() -> None:
    torch.manual_seed(1)
    plain = SLatMeshDecoder(**TINY)
    randomize(plain)
    ckpt = SLatMeshDecoder(**TINY, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    feats, coords = shell_input(resolution=8)
    x = SparseTensor(feats, coords)
    for m in (plain, ckpt):
        m(x).feats.square().mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)

    def kept_for_backward(model: SLatMeshDecoder) -> int:
        """Bytes of activations autograd keeps from one forward (checkpointed blocks keep their input only)."""
        total = 0

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(x)
        return total

    # the transformer blocks are checkpointed (the upsampling blocks are not): measured 6.5 vs 8.1 MB
    assert kept_for_backward(ckpt) < 0.9 * kept_for_backward(plain), "checkpointing is really on"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = plain(x)
    ref = plain(x).feats.detach()
    assert torch.isfinite(out.feats).all()
    rel = (out.feats.float() - ref).norm() / ref.norm()
    assert rel < 0.05, f"bf16 autocast drifted: relative error {rel:.3f}"


def test_lora_on_decoder_trains_only_adapters() -> None:
    torch.manual_seed(2)
    model = SLatMeshDecoder(**TINY)
    randomize(model)
    feats, coords = shell_input(resolution=8)
    x = SparseTensor(feats, coords)
    before_out = model(x).feats.detach()
    base = copy.deepcopy(model.state_dict())
    names = inject_lora(model, target_modules=["to_qkv", "to_out"], rank=4, alpha=8)
    assert names == [f"blocks.{i}.attn.{m}" for i in range(2) for m in ("to_qkv", "to_out")]
    assert torch.equal(model(x).feats, before_out)
    freeze_base_params(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(x).feats.square().mean().backward()
        opt.step()
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in base.items())
    assert not torch.equal(model(x).feats, before_out)


def test_marching_cubes_sphere_and_world_mapping() -> None:
    grid = sphere_target(8)
    mesh = marching_cubes(grid)
    radius = np.linalg.norm(mesh.vertices, axis=1)
    assert abs(radius.mean() - 0.3) < 0.01
    assert (np.einsum("ij,ij->i", mesh.normals, mesh.vertices) > 0).mean() > 0.99, "normals point outward"
    tri = mesh.vertices[mesh.faces]
    face_normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    assert (np.einsum("ij,ij->i", face_normals, tri.mean(1)) > 0).mean() > 0.99, "faces wind outward"
    affine = np.diag([100.0, -100.0, 100.0, 1.0])
    affine[:3, 3] = [10, 20, 30]
    world = mesh.to_world(affine)
    centre = world.vertices.mean(0)
    assert np.allclose(centre, [10, 20, 30], atol=1.0)
    assert abs(np.linalg.norm(world.vertices - centre, axis=1).mean() - 30) < 1.0
    # Face winding stays outward after a mirroring affine.
    tri = world.vertices[world.faces]
    face_normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    assert (np.einsum("ij,ij->i", face_normals, tri.mean(1) - centre) > 0).mean() > 0.99
    assert marching_cubes(torch.ones(5, 5, 5)).is_empty


def test_conditioning_seam_is_called_per_level_and_is_exact_when_neutral() -> None:
    """``forward(x, cond)`` calls ``cond`` at the input level and after each subdivision, on the
    hidden features there; a ``cond`` that returns its input leaves the output bit-equal to
    ``forward(x)``, and one that adds to it changes the output."""
    torch.manual_seed(0)
    decoder = SLatMeshDecoder(**TINY).eval()
    torch.nn.init.normal_(decoder.out_layer.weight, std=0.02)
    feats, coords = shell_input(resolution=8)
    x = SparseTensor(feats, coords)
    seen: list[tuple[int, int]] = []

    def neutral(level: int, h: SparseTensor) -> SparseTensor:
        seen.append((level, h.feats.shape[0]))
        return h

    with torch.no_grad():
        plain = decoder(x).feats
        assert torch.equal(decoder(x, cond=neutral).feats, plain)
        shifted = decoder(x, cond=lambda level, h: h + 0.1 if level == 2 else h).feats
    assert seen == [(0, len(coords)), (1, 8 * len(coords)), (2, 64 * len(coords))]
    assert not torch.allclose(shifted, plain)
