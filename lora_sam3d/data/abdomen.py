"""Abdomen phantoms: anatomy closer to a real scan than the heart or the generic shapes.

Eight structures named as TotalSegmentator's (liver, spleen, both kidneys, pancreas, aorta, the
lumbar vertebrae as one structure, small bowel) placed as in a body: the liver against the right
kidney, the spleen against the left, the pancreas across the aorta, the vertebrae behind it, the
bowel loops filling the lower abdomen between them. The aorta is a curved tube running the whole
length of the volume and the vertebrae a column of bodies and discs (so structures cut by the
scan's ends are common), the others deformed superquadrics and capsules. Each tissue's intensity
is drawn per case (as SynthSeg does), within a soft-tissue range in Hounsfield units, so
neighbours are sometimes alike and sometimes not and no contrast can be learned as fixed; the
body's fat, muscle wall and the air around it keep the scan a CT (and `mr_from_ct` makes an MR of
it). Implicit functions evaluated at each voxel's world position, as `lora_sam3d.data.phantoms`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise

import numpy as np
from scipy import ndimage

from lora_sam3d.data.phantoms import (
    GENERATORS,
    Deformation,
    _rotation,
    _superquadric,
    grid_affine,
    world_points,
)

__all__ = ["ABDOMEN_CLASSES", "abdomen_case"]

ABDOMEN_CLASSES = (
    "liver",
    "spleen",
    "kidney_left",
    "kidney_right",
    "pancreas",
    "aorta",
    "vertebrae",
    "small_bowel",
)

Shape = Callable[[np.ndarray], np.ndarray]


def _capsule_path(points: np.ndarray, radius: float, deform: Deformation) -> Shape:
    """A tube of ``radius`` (mm) along a polyline of ``points`` (M, 3), negative inside (in radii)."""

    def f(p: np.ndarray) -> np.ndarray:
        best = np.full(p.shape[:-1], np.inf)
        for a, b in pairwise(points):
            ab = b - a
            t = np.clip(((p - a) @ ab) / max(float(ab @ ab), 1e-9), 0.0, 1.0)  # a repeated point: its ball
            best = np.minimum(best, np.linalg.norm(p - (a + t[..., None] * ab), axis=-1))
        return best / radius - 1.0 + deform(p)

    return f


def _column(x: float, y: float, z_lo: float, z_hi: float, radius: float, body: float, gap: float) -> Shape:
    """Vertebral bodies: cylinders of ``radius`` and height ``body`` along z, ``gap`` apart (discs)."""
    period = body + gap

    def f(p: np.ndarray) -> np.ndarray:
        radial = np.hypot(p[..., 0] - x, p[..., 1] - y) / radius - 1.0
        phase = np.mod(p[..., 2] - z_lo, period) - body / 2
        along = np.abs(phase) / (body / 2) - 1.0
        inside_z = (p[..., 2] >= z_lo) & (p[..., 2] <= z_hi)
        return np.where(inside_z, np.maximum(radial, along), 1.0)

    return f


def _organs(half: np.ndarray, rng: np.random.Generator) -> dict[str, Shape]:
    """Each structure's implicit function in world mm; ``half``: the volume's half-extent per axis.
    Body coordinates: x to the patient's left, y anterior, z superior (RAS), in units of ``half``."""
    hx, hy, hz = half

    def at(x: float, y: float, z: float) -> np.ndarray:
        return np.array([x * hx, y * hy, z * hz]) + rng.uniform(-0.05, 0.05, 3) * half

    def sized(*r: float) -> np.ndarray:
        return np.array(r) * np.array([hx, hy, hz]) * rng.uniform(0.85, 1.15, 3)

    aorta_x, aorta_y = 0.1 * hx, -0.3 * hy
    zs = np.linspace(-1.3 * hz, 1.3 * hz, 7)
    aorta_path = np.stack(
        [aorta_x + rng.normal(0, 0.04 * hx, 7), aorta_y + rng.normal(0, 0.04 * hy, 7), zs], axis=1
    )
    start, end = at(-0.15, -0.05, 0.05), at(0.5, -0.2, 0.25)
    bend = (start + end) / 2 + np.array([0.0, 0.12 * hy, -0.05 * hz])
    bowel = [at(rng.uniform(-0.5, 0.5), rng.uniform(0.0, 0.5), rng.uniform(-0.9, -0.3))]
    for _ in range(10):  # a loop wandering through the lower abdomen
        step = rng.normal(0, 1, 3) * np.array([0.25 * hx, 0.2 * hy, 0.2 * hz])
        bowel.append(
            np.clip(bowel[-1] + step, [-0.6 * hx, -0.1 * hy, -1.1 * hz], [0.6 * hx, 0.6 * hy, -0.1 * hz])
        )
    vertebra_height = 0.22 * hz * rng.uniform(0.85, 1.15)
    return {
        "liver": _superquadric(at(-0.42, 0.05, 0.45), sized(0.5, 0.55, 0.4), _rotation(rng, 20), Deformation(rng, 0.1), 2.4),
        "spleen": _superquadric(at(0.6, -0.25, 0.45), sized(0.18, 0.3, 0.26), _rotation(rng, 25), Deformation(rng), 2.0),
        "kidney_left": _superquadric(at(0.38, -0.45, 0.0), sized(0.13, 0.12, 0.24), _rotation(rng, 20), Deformation(rng), 2.0),
        "kidney_right": _superquadric(at(-0.38, -0.45, -0.05), sized(0.13, 0.12, 0.24), _rotation(rng, 20), Deformation(rng), 2.0),
        "pancreas": _capsule_path(np.stack([start, bend, end]), 0.08 * hy * rng.uniform(0.8, 1.2), Deformation(rng, 0.1)),
        "aorta": _capsule_path(aorta_path, 0.075 * hx * rng.uniform(0.8, 1.2), Deformation(rng, 0.04)),
        "vertebrae": _column(0.0, -0.62 * hy, -1.2 * hz, 1.2 * hz, 0.15 * hx, vertebra_height, 0.25 * vertebra_height),
        "small_bowel": _capsule_path(np.stack(bowel), 0.11 * hx * rng.uniform(0.8, 1.2), Deformation(rng, 0.1)),
    }  # fmt: skip


def _neighbours(half: np.ndarray, rng: np.random.Generator) -> list[Shape]:
    """Unlabelled structures next to the labelled ones: a stomach under the spleen and liver, a colon
    framing the abdomen (a model must not take them for the structure drawn)."""
    hx, hy, hz = half
    stomach = _superquadric(
        np.array([0.25 * hx, 0.3 * hy, 0.4 * hz]) + rng.uniform(-0.05, 0.05, 3) * half,
        np.array([0.22 * hx, 0.2 * hy, 0.25 * hz]) * rng.uniform(0.8, 1.2, 3), _rotation(rng, 30), Deformation(rng), 2.0,
    )  # fmt: skip
    frame = np.array(
        [[-0.55, 0.2, -0.9], [-0.6, 0.25, 0.1], [0.0, 0.45, 0.2], [0.6, 0.25, 0.1], [0.55, 0.2, -0.9]]
    )
    colon = _capsule_path(frame * half + rng.normal(0, 0.04, (5, 3)) * half, 0.1 * hx, Deformation(rng, 0.1))
    return [stomach, colon]


def _branches(half: np.ndarray, rng: np.random.Generator) -> list[Shape]:
    """Arteries leaving the aorta, unlabelled: two forward (as the coeliac trunk and the superior
    mesenteric artery) and one to each kidney. Enhanced with the aorta, they are tissue like it and
    joined to it, which only a learned shape tells apart."""
    hx, hy, hz = half
    root_x, root_y = 0.1 * hx, -0.3 * hy
    paths = []
    for z, to in (
        (0.35, (0.0, 0.35, 0.2)),
        (0.2, (0.05, 0.4, -0.35)),
        (0.0, (0.38, -0.42, 0.0)),
        (-0.05, (-0.38, -0.42, -0.05)),
    ):
        start = np.array([root_x, root_y, z * hz])
        end = np.array(to) * half + rng.normal(0, 0.04, 3) * half
        middle = (start + end) / 2 + rng.normal(0, 0.05, 3) * half
        paths.append(
            _capsule_path(
                np.stack([start, middle, end]), 0.03 * hx * rng.uniform(0.8, 1.2), Deformation(rng, 0.03)
            )
        )
    return paths


def abdomen_case(
    shape: Sequence[int], spacing: Sequence[float], rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """One abdomen phantom: (HU int16, masks by class, affine). Structures earlier in
    `ABDOMEN_CLASSES` keep their voxels where two meet; each tissue's intensity is drawn in
    -20..220 HU (the vertebrae in 250..700), the body's fat around -100, air -1000 outside it.
    Half the cases are arterial-phase: the aorta and its branches (`_branches`) enhanced to
    200..450 HU, as bright as the vertebrae beside them (then 200..700), as in a contrast CT."""
    affine = grid_affine(shape, spacing, rng)
    p = world_points(shape, affine)
    half = np.abs(affine[:3, :3] @ (np.asarray(shape) - 1)) / 2
    body = np.hypot(p[..., 0] / (1.05 * half[0]), p[..., 1] / (0.95 * half[1])) - 1.0
    hu = np.where(body < 0, rng.uniform(-110, -70), -1000.0)  # fat inside the body, air around it
    wall = (body < 0) & (body > -0.12)
    hu = np.where(wall, rng.uniform(30, 60), hu)  # the abdominal wall's muscle
    hu = np.where(body < -0.12, rng.uniform(-60, 20), hu)  # mesenteric fat and soft tissue between organs
    masks, taken = {}, np.zeros(tuple(shape), dtype=bool)
    arterial = rng.random() < 0.5
    levels = {
        "vertebrae": (200, 700) if arterial else (250, 700),
        "aorta": (200, 450) if arterial else (-20, 220),
    }
    drawn = {}
    for name, f in _organs(half, rng).items():
        drawn[name] = rng.uniform(*levels.get(name, (-20, 220)))
        inside = (f(p) < 0) & ~taken & (body < 0)
        masks[name] = inside
        taken |= inside
        hu = np.where(inside, drawn[name], hu)
    looks = [(f, rng.uniform(-20, 220)) for f in _neighbours(half, rng)]  # stomach, colon
    looks += [(f, drawn["aorta"] if arterial else rng.uniform(-20, 220)) for f in _branches(half, rng)]
    for f, level in looks:  # unlabelled look-alikes beside them
        inside = (f(p) < 0) & ~taken & (body < 0)
        taken |= inside
        hu = np.where(inside, level, hu)
    hu = ndimage.gaussian_filter(hu, 0.6)  # partial volume at every edge
    hu += ndimage.gaussian_filter(rng.normal(0, 40, tuple(shape)), 1.5) * (body < 0)  # texture
    hu += rng.normal(0, 10, tuple(shape))
    return np.round(np.clip(hu, -1024, 3000)).astype(np.int16), masks, affine


GENERATORS["abdomen"] = (abdomen_case, ABDOMEN_CLASSES)
