"""Where to draw next (`where_to_draw`): a new axis through the structure's middle while one is left,
the one cutting the most surface far from the drawing; then a parallel slice away from the drawn
ones; names follow the file's orientation; an empty result names nothing."""

from __future__ import annotations

import numpy as np

from lora_sam3d.predict.next_slice import where_to_draw


def ellipsoid(shape: tuple[int, int, int], centre: tuple[float, ...], radii: tuple[float, ...]) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1.0


def test_a_new_axis_through_the_middle_then_a_slice_far_from_the_drawn_ones() -> None:
    mask = ellipsoid((60, 50, 40), (30, 22, 20), (22, 8, 12))  # long along i (x), thin along j (y)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    named = where_to_draw(mask, affine, [{"axis": "axial", "index": 20}])
    # the coronal plane holds the long axis: its surface runs farthest from the axial slice
    assert named is not None and (named["axis"], named["index"]) == ("coronal", 22)
    assert 15 < named["far_mm"] <= 12 * 1.5 + 1e-6
    every = [
        {"axis": "axial", "index": 20},
        {"axis": "coronal", "index": 22},
        {"axis": "sagittal", "index": 30},
    ]
    named = where_to_draw(mask, affine, every)
    assert named is not None and all(
        not (named["axis"] == p["axis"] and abs(named["index"] - p["index"]) <= 1) for p in every
    )
    assert where_to_draw(np.zeros((8, 8, 8), np.uint8), affine, every) is None


def test_names_follow_the_file_s_orientation_and_a_box_of_the_grid() -> None:
    """Stored (z, x, y) with x flipped: file axis 0 is axial; a box of the grid given with its origin."""
    mask = ellipsoid((40, 60, 50), (20, 30, 22), (12, 22, 8))
    affine = np.zeros((4, 4))
    affine[0, 1], affine[1, 2], affine[2, 0], affine[3, 3] = -1.5, 1.5, 1.5, 1.0
    named = where_to_draw(mask, affine, [{"axis": "axial", "index": 20}])
    assert named is not None and (named["axis"], named["index"]) == ("coronal", 22)
    box = mask[6:36, 6:55, 12:34]
    assert where_to_draw(box, affine, [{"axis": "axial", "index": 20}], origin=(6, 6, 12)) == named


def test_thin_paint_is_read_on_its_own_slice_not_beside_a_drawn_one() -> None:
    """A coronal slice whose paint is one column wide, next to a drawn sagittal slice: found as the
    coronal slice (a sagittal slice beside the drawn one would read as a 3D stroke and be refused)."""
    from lora_sam3d.predict.user_inputs import drawn_slices

    paint = np.zeros((40, 40, 30), dtype=bool)
    paint[10:30, 10:30, 15] = True  # axial 15
    paint[20, 10:30, 5:25] = True  # sagittal 20
    paint[21, 33, 8:12] = True  # coronal 33: four voxels in one column, beside sagittal 20
    found = drawn_slices(paint, np.eye(4))
    assert sorted(found, key=str) == sorted(
        [{"axis": "axial", "index": 15}, {"axis": "sagittal", "index": 20}, {"axis": "coronal", "index": 33}],
        key=str,
    )
