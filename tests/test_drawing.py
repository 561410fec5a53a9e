"""The user's drawing given back: on every drawn plane the prediction is the drawing (up to the
grid), the surface bends to it near the plane and is untouched away from it, and each sample's
drawn-slice Dice is reported without truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lora_sam3d.geometry import mask_signed_distance
from lora_sam3d.inputs import Evidence
from lora_sam3d.models.drawing import _drawn_on_grid, drawn_dice, keep_drawing

N, S = 64, 64
OLD = Path(__file__).parent / "data" / "previous_main" / "adapter"


def sphere(radius: float = 0.25) -> torch.Tensor:
    u = torch.arange(N + 1) / N - 0.5
    x, y, z = torch.meshgrid(u, u, u, indexing="ij")
    return (torch.sqrt(x**2 + y**2 + z**2) - radius)[None]


def evidence(views: list[tuple[int, float, float]], padded: int = 0) -> Evidence:
    """Circles of radius r drawn on planes (axis, offset) of the frame, shifted off the sphere's centre."""
    c = (torch.arange(S) + 0.5) / S - 0.5
    p, q = torch.meshgrid(c, c, indexing="ij")
    masks = [torch.sqrt(p**2 + (q - 0.05) ** 2) < r for _, _, r in views] + [
        torch.zeros(S, S, dtype=torch.bool)
    ] * padded
    k = len(masks)
    return Evidence(
        image=torch.zeros(1, k, S, S),
        mask=torch.stack(masks)[None],
        distance=torch.stack([torch.from_numpy(mask_signed_distance(m.numpy())).float() for m in masks])[
            None
        ],
        axis=torch.tensor([[a for a, _, _ in views] + [0] * padded]),
        index=torch.zeros(1, k, dtype=torch.long),
        offset=torch.tensor([[o for _, o, _ in views] + [0.0] * padded]),
        valid=torch.tensor([[True] * len(views) + [False] * padded]),
        frame_to_world=torch.eye(4, dtype=torch.float64)[None],
        sample_ids=["s"],
    )


def test_a_drawn_plane_takes_the_drawing_and_the_rest_stays() -> None:
    sdf, ev = sphere(), evidence([(2, 0.0, 0.2)], padded=2)
    assert drawn_dice(sdf, ev)[0] < 0.9, "the sphere disagrees with the drawn circle"
    kept = keep_drawing(sdf, ev, width=1.0)
    assert drawn_dice(kept, ev)[0] > 0.99
    mid, cell = N // 2, 1.0 / N  # the plane at offset 0 is the vertex slice N/2 along axis 2
    drawn = _drawn_on_grid(ev.distance[0, 0], 2, N)  # the drawing's distance at the plane's vertices
    plane = kept[0, :, :, mid]
    assert torch.equal(plane < 0, drawn < 0), "on the plane the mask is the drawing's"
    contour = (drawn.abs() < cell) | ((sdf[0, :, :, mid] < 0) != (drawn < 0))
    torch.testing.assert_close(plane[contour], drawn[contour], atol=1e-5, rtol=0)
    # deep inside both agree: corrected by at most a cell there, the network's depth kept
    deep = (drawn < -cell) & (sdf[0, :, :, mid] < -cell)
    assert (plane[deep] - sdf[0, :, :, mid][deep]).abs().max() <= 2 * cell + 1e-6
    torch.testing.assert_close(kept[0, :, :, mid + 1] - sdf[0, :, :, mid + 1], plane - sdf[0, :, :, mid])
    assert torch.equal(kept[0, :, :, : mid - 4], sdf[0, :, :, : mid - 4]), "untouched past 1 cell + 3 sigma"
    near = (kept - sdf)[0, :, :, mid + 2].abs().max() / (kept - sdf)[0, :, :, mid].abs().max()
    assert 0.3 < near < 0.9, "the surface bends to the drawing over a cell, not cut at the plane"
    assert torch.equal(keep_drawing(sdf, ev, width=0.0), sdf)


def test_crossing_drawings_are_averaged_and_any_order_gives_the_same() -> None:
    views = [(2, 0.0, 0.2), (0, 0.1, 0.18), (1, -0.05, 0.22)]
    sdf = sphere()
    a = keep_drawing(sdf, evidence(views))
    b = keep_drawing(sdf, evidence(views[::-1]))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert drawn_dice(a, evidence(views))[0] > 0.95 > drawn_dice(sdf, evidence(views))[0]


def lv_request(model: object, phantoms: Path) -> tuple[object, Path, Path, str]:
    """`reconstruct`'s first arguments for the left ventricle of the suite's first phantom."""
    case = phantoms / "s0001"
    return (
        model,
        case / "ct.nii.gz",
        case / "segmentations" / "heart_ventricle_left.nii.gz",
        "heart_ventricle_left",
    )


def test_a_trained_model_gives_the_drawing_back(phantoms: Path) -> None:
    """The previous main's adapter, with and without the drawing given back: the drawn slice comes
    back (one slice: Dice 1 on its plane; three orthogonal: >= 0.98) and the 3D Dice does not drop."""
    from lora_sam3d.models import Reconstructor
    from lora_sam3d.predict.api import reconstruct

    model = Reconstructor.from_adapter(OLD)
    args = lv_request(model, phantoms)
    three = [
        {"axis": "axial", "index": 16},
        {"axis": "coronal", "index": 20},
        {"axis": "sagittal", "index": 24},
    ]
    for request, floor in (({"index": 16}, 0.999), ({"slices": three}, 0.98)):
        model.drawing_width = 0.0
        plain = reconstruct(*args, **request).prediction
        model.drawing_width = 1.0
        kept = reconstruct(*args, **request).prediction
        assert kept.drawn_dice >= floor > plain.drawn_dice - 1e-9, (plain.drawn_dice, kept.drawn_dice)
        assert kept.metrics["dice"] >= plain.metrics["dice"] - 0.002
        assert kept.metrics["drawn_dice"] == pytest.approx(kept.drawn_dice)


def test_test_time_lora_moves_only_for_the_request_and_is_undone(phantoms: Path) -> None:
    """`reconstruct(..., adapt_steps=2)` on three slices: two held-out losses, a result other than
    without it, and the model's weights afterwards exactly as before; one slice: nothing done."""
    from lora_sam3d import reconstruct
    from lora_sam3d.models import Reconstructor

    model = Reconstructor.from_adapter(OLD)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = lv_request(model, phantoms)
    three = [
        {"axis": "axial", "index": 16},
        {"axis": "sagittal", "index": 20},
        {"axis": "coronal", "index": 22},
    ]
    plain = reconstruct(*args, slices=three)
    tuned = reconstruct(*args, slices=three, adapt_steps=2, adapt_lr=0.01)
    assert len(tuned.adapt_losses) == 2 and all(np.isfinite(tuned.adapt_losses))
    assert not np.array_equal(plain.prediction.sdf, tuned.prediction.sdf), "the adapted model reconstructed"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the adapter is restored"
    assert reconstruct(*args, index=16, adapt_steps=2).adapt_losses == []
