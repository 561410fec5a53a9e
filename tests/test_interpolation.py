"""The drawn slices' own shape-based interpolation as evidence: its values against the classic
formula on discs of known radius, what a stack of real phantom slices gives between its planes, and
a base trained without it reading it through zero weights (outputs unchanged)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SCAN, TEST_CLASSES, TEST_DECODER, data_settings

from lora_sam3d.data import write_phantoms
from lora_sam3d.data.dataset import TS_SAM3D_Dataset
from lora_sam3d.inputs import Evidence, collate
from lora_sam3d.models import ModelConfig, Reconstructor
from lora_sam3d.models.latent import LATENT_CHANNELS, SliceUnprojection

SIZE = 64


def disc_views(planes: list[tuple[int, float, float]]) -> Evidence:
    """One sample whose views are discs centred in the frame: (axis, offset, radius) each, with their
    exact signed 2D distance (frame units)."""
    c = (np.arange(SIZE) + 0.5) / SIZE - 0.5
    r2d = np.hypot(*np.meshgrid(c, c, indexing="ij"))
    k = len(planes)
    distance = torch.tensor(np.stack([r2d - r for _, _, r in planes]), dtype=torch.float32)[None]
    return Evidence(
        image=torch.zeros(1, k, SIZE, SIZE),
        mask=distance < 0,
        distance=distance,
        axis=torch.tensor([[a for a, _, _ in planes]]),
        index=torch.zeros(1, k, dtype=torch.long),
        offset=torch.tensor([[o for _, o, _ in planes]], dtype=torch.float32),
        valid=torch.ones(1, k, dtype=torch.bool),
        frame_to_world=torch.eye(4, dtype=torch.float64)[None],
        sample_ids=["disc"],
    )


def interpolation_at(views: Evidence, points: list[list[float]]) -> torch.Tensor:
    """(P, 2): the interpolation's two channels at frame points."""
    reader = SliceUnprojection(16, interpolation=True)
    u = torch.tensor([points], dtype=torch.float32)
    out = reader.at(views, u)
    assert out.shape == (1, LATENT_CHANNELS + 2, len(points))
    return out[0, LATENT_CHANNELS:].T


def test_between_two_parallel_slices_the_distance_is_blended_linearly() -> None:
    """Discs of radius 0.2 at z = -0.1 and 0.3 at z = +0.1: at height z the interpolated distance at
    the centre is -(0.2 (1 - t) + 0.3 t), t = (z + 0.1) / 0.2, so the zero level is a disc whose radius
    goes linearly from one drawing to the other (shape-based interpolation); off the bracket: none."""
    views = disc_views([(2, -0.1, 0.2), (2, 0.1, 0.3), (0, 0.05, 0.25)])  # the sagittal disc brackets nothing
    points = [[0.0, 0.0, z] for z in (-0.1, -0.05, 0.0, 0.05, 0.1)] + [[0.0, 0.0, 0.2], [0.0, 0.0, -0.15]]
    read = interpolation_at(views, points)
    centre = float(np.hypot(0.5, 0.5)) / SIZE  # the frame's centre lies between four pixel centres
    for (_, _, z), (value, closeness) in zip(points[:5], read[:5].tolist(), strict=True):
        t = (z + 0.1) / 0.2
        assert value == pytest.approx(centre - (0.2 * (1 - t) + 0.3 * t), abs=1e-4), z
        on_plane = abs(z) == pytest.approx(0.1)
        assert closeness == pytest.approx(1.0 if on_plane else float(np.exp(-0.2 / 0.2)), rel=1e-5), z
    assert read[5:].abs().max() == 0, "beyond the stack's ends nothing is interpolated"
    # off the axis the in-plane distance is read at the point's projection
    ((value, _),) = interpolation_at(views, [[0.2, 0.0, 0.0]]).tolist()
    assert value == pytest.approx(0.2 - 0.25, abs=2e-3)


def test_orthogonal_slices_alone_give_no_interpolation_and_order_does_not_matter() -> None:
    ortho = disc_views([(0, 0.0, 0.2), (1, 0.0, 0.2), (2, 0.0, 0.2)])
    assert interpolation_at(ortho, [[0.1, 0.1, 0.1], [0.3, -0.2, 0.05]]).abs().max() == 0
    stack = disc_views([(2, z, 0.1 + z) for z in (-0.2, 0.0, 0.1, 0.25)])
    points = [[0.05, 0.0, z] for z in np.linspace(-0.19, 0.24, 9)]
    a = interpolation_at(stack, points)
    b = interpolation_at(stack.permute_views([2, 0, 3, 1]), points)
    torch.testing.assert_close(a, b)
    assert (a[:, 1] > 0).all(), "every point between the stack's ends is bracketed"


@pytest.fixture(scope="module")
def stack_batch(tmp_path_factory: pytest.TempPathFactory) -> tuple[TS_SAM3D_Dataset, object]:
    root = tmp_path_factory.mktemp("interpolation") / "data"
    write_phantoms(root, n_cases=4, shape=(48, 48, 32))
    settings = data_settings(
        resolution=16,
        spacing=2.0,
        cache_dir=str(root / ".cache"),
        views=16,
        view_layout="stack",
        view_spacing_mm=6.0,
        context="volume",
        axes=[2],
    )
    ds = TS_SAM3D_Dataset(root, TEST_CLASSES, "test", "central", settings=settings)
    return ds, collate([ds[0], ds[1]])


def test_on_a_phantom_stack_the_interpolation_follows_the_structure_between_its_slices(stack_batch) -> None:
    """Slices 6 mm apart through a phantom structure: between the first and last drawn plane the
    interpolation's sign agrees with the sample's true occupancy on most cells (a classic fill
    between slices); the slice unprojection's nearest-plane reading is the baseline it must beat."""
    _, batch = stack_batch
    truth = batch.targets.occupancy
    feats = SliceUnprojection(truth.shape[-1], interpolation=True)(batch.evidence)
    bracketed = feats[:, LATENT_CHANNELS + 1] > 0
    assert bracketed.any(dim=(1, 2, 3)).all()

    def dice(inside: torch.Tensor) -> float:
        a, b = inside[bracketed], truth[bracketed]
        return float(2 * (a & b).sum() / (a.sum() + b.sum()))

    interpolated, nearest = dice(feats[:, LATENT_CHANNELS] < 0), dice(feats[:, 2] < 0)
    assert interpolated > 0.9, interpolated
    assert interpolated > nearest, (interpolated, nearest)


def test_a_base_without_it_reads_it_through_zero_weights(stack_batch) -> None:
    """The shipped base (trained without the interpolation) with ``context.interpolation: true``:
    the same SDF as without it, to rounding, until training moves the new weights; a trained model's
    interpolation channels do change it."""
    _, batch = stack_batch
    base = {"checkpoint": "builtin:scan_shapes"}
    plain = Reconstructor(ModelConfig(TEST_DECODER, base=base, context=SCAN)).eval()
    reads = Reconstructor(
        ModelConfig(TEST_DECODER, base=base, context={**SCAN, "interpolation": True})
    ).eval()
    assert reads.structure.enc0[0].weight.shape[1] == plain.structure.enc0[0].weight.shape[1] + 2
    assert reads.conditioning.levels[0][0].weight.shape[1] == 12
    with torch.no_grad():
        a, b = plain(batch.evidence).sdf, reads(batch.evidence).sdf
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        reads.structure.enc0[0].weight[:, -2:].normal_(0, 0.5)
        assert not torch.allclose(reads(batch.evidence).sdf, a, atol=1e-3)
    assert reads.settings()["context"]["interpolation"] is True


def test_an_interpolating_model_saves_and_reloads_as_its_own_base(stack_batch, tmp_path: Path) -> None:
    """`save_merged` of a model that reads the interpolation is a base of that width: it loads
    strictly into the same model (no zero padding) and gives the same SDF."""
    _, batch = stack_batch
    cfg = {**SCAN, "interpolation": True}
    model = Reconstructor(
        ModelConfig(TEST_DECODER, base={"checkpoint": "builtin:scan_shapes"}, context=cfg)
    ).eval()
    with torch.no_grad():
        model.structure.enc0[0].weight[:, -2:].normal_(0, 0.1)
    path = model.save_merged(tmp_path / "base.safetensors")
    again = Reconstructor(ModelConfig(TEST_DECODER, base={"checkpoint": str(path)}, context=cfg)).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(batch.evidence).sdf, model(batch.evidence).sdf, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="do not fit"):
        Reconstructor(ModelConfig(TEST_DECODER, base={"checkpoint": str(path)}, context=SCAN))
