"""Synthetic CT phantoms written as real NIfTI files in TotalSegmentator's layouts.

Four generators (the fourth, ``abdomen``, in `lora_sam3d.data.abdomen`): heart phantoms (five structures named as TotalSegmentator v1's heart classes, in
a CT-like body with fat, muscle, lungs, contrast-enhanced blood and noise, in Hounsfield units),
generic shapes (ellipsoid, box, superquadric, torus) apart on a flat background, and
``hard_shapes``, the same four classes made hard to read from the scan alone: touching
neighbours of close intensity, unlabelled look-alike blobs, texture, a smooth intensity gradient,
partial-volume edges and shapes cut by the volume's edge (what pretraining with the scan as
context needs, so the model must combine the slices with the scan rather than threshold it). Every
case differs in size, position, orientation and a smooth random deformation of each shape; every
file has a non-trivial affine (anisotropic spacing, a flipped axis, an oblique rotation), so the
reorientation and resampling code is exercised for real. Shapes are implicit functions evaluated
at each voxel centre's world position: the ground truth is exact in millimetres.

``modality="mr"`` writes the same anatomy as an MR-like scan (``mri.nii.gz``, as TotalSegmentator's
MRI dataset names it): each tissue's intensity drawn per case (sequences differ, so a tissue may
be bright in one case and dark in the next, and no Hounsfield unit holds), a smooth multiplicative
bias field, Rician noise and an arbitrary range (`mr_from_ct`).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np

from lora_sam3d.data.cases import split_counts
from lora_sam3d.io.atomic import atomic_write

__all__ = [
    "HEART_CLASSES",
    "SHAPE_CLASSES",
    "Deformation",
    "PhantomKind",
    "PhantomSpec",
    "ellipsoid",
    "grid_affine",
    "hard_shapes_case",
    "heart_case",
    "kind_classes",
    "mr_from_ct",
    "phantom_label_values",
    "shapes_case",
    "world_points",
    "write_phantoms",
]

HEART_CLASSES = (
    "heart_myocardium",
    "heart_atrium_left",
    "heart_ventricle_left",
    "heart_atrium_right",
    "heart_ventricle_right",
)
SHAPE_CLASSES = ("ellipsoid", "box", "superquadric", "torus")
PhantomKind = Literal["heart", "shapes", "hard_shapes", "abdomen"]
KINDS: tuple[str, ...] = ("heart", "shapes", "hard_shapes", "abdomen")
Modality = Literal["ct", "mr", "mixed"]
IMAGE_NAMES = {"ct": "ct.nii.gz", "mr": "mri.nii.gz"}
"""The image file of a TotalSegmentator-layout case, by modality."""


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A random rotation of at most ``max_deg`` degrees about a random axis (Rodrigues)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(rng.uniform(-max_deg, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def grid_affine(shape: Sequence[int], spacing: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Voxel -> world affine: anisotropic spacing, x flipped (as in LPS-stored scans), an oblique tilt,
    and the grid centre near the world origin."""
    linear = _rotation(rng, 12.0) @ np.diag([-spacing[0], spacing[1], spacing[2]])
    affine = np.eye(4)
    affine[:3, :3] = linear
    centre = (np.asarray(shape) - 1) / 2
    affine[:3, 3] = -linear @ centre + rng.uniform(-5, 5, 3)
    return affine


def world_points(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    return idx @ affine[:3, :3].T + affine[:3, 3]


class Deformation:
    """A smooth random field (sum of a few plane waves), added to a shape's implicit function."""

    def __init__(
        self, rng: np.random.Generator, amplitude: float = 0.08, wavelength_mm: float = 70.0
    ) -> None:
        self.waves = []
        for _ in range(3):
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            k = 2 * math.pi / (wavelength_mm * rng.uniform(0.7, 1.4)) * direction
            self.waves.append((k, rng.uniform(0, 2 * math.pi), amplitude * rng.uniform(0.5, 1.0)))

    def __call__(self, p: np.ndarray) -> np.ndarray:
        return sum(a * np.sin(p @ k + phase) for k, phase, a in self.waves)


def ellipsoid(
    centre: np.ndarray, radii: Sequence[float], rot: np.ndarray, deform: Deformation
) -> Callable[[np.ndarray], np.ndarray]:
    """Implicit function (negative inside) of a deformed, rotated ellipsoid."""
    scale = 1.0 / np.asarray(radii)

    def f(p: np.ndarray) -> np.ndarray:
        local = (p - centre) @ rot
        return np.linalg.norm(local * scale, axis=-1) - 1.0 + deform(p)

    return f


def _superquadric(
    centre: np.ndarray, radii: Sequence[float], rot: np.ndarray, deform: Deformation, exponent: float
) -> Callable[[np.ndarray], np.ndarray]:
    scale = 1.0 / np.asarray(radii)

    def f(p: np.ndarray) -> np.ndarray:
        local = np.abs((p - centre) @ rot * scale)
        return (local**exponent).sum(-1) ** (1 / exponent) - 1.0 + deform(p)

    return f


def _torus(
    centre: np.ndarray, major: float, minor: float, rot: np.ndarray, deform: Deformation
) -> Callable[[np.ndarray], np.ndarray]:
    def f(p: np.ndarray) -> np.ndarray:
        local = (p - centre) @ rot
        ring = np.sqrt(local[..., 0] ** 2 + local[..., 1] ** 2) - major
        return np.sqrt(ring**2 + local[..., 2] ** 2) / minor - 1.0 + deform(p)

    return f


def heart_case(
    shape: Sequence[int], spacing: Sequence[float], rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """One heart phantom: (HU image int16, {class: bool mask}, affine)."""
    affine = grid_affine(shape, spacing, rng)
    p = world_points(shape, affine)
    size = rng.uniform(0.8, 1.15)
    heart_rot = _rotation(rng, 25.0)
    centre = rng.uniform(-8, 8, 3)

    def place(offset: Sequence[float]) -> np.ndarray:
        return centre + heart_rot @ (np.asarray(offset) * size)

    def shape_of(offset: Sequence[float], radii: Sequence[float]) -> np.ndarray:
        f = ellipsoid(
            place(offset), np.asarray(radii) * size * rng.uniform(0.9, 1.1, 3), heart_rot, Deformation(rng)
        )
        return f(p) < 0

    lv = shape_of((12, -4, -8), (20, 19, 32))
    wall = shape_of((12, -4, -8), (29, 28, 40))
    rv = shape_of((-20, 6, -10), (19, 26, 30))
    la = shape_of((12, 18, 30), (17, 15, 13))
    ra = shape_of((-20, 16, 26), (17, 17, 15))
    myo = wall & ~lv
    rv &= ~wall
    la &= ~(wall | rv)
    ra &= ~(wall | rv | la)
    masks = {
        "heart_myocardium": myo,
        "heart_atrium_left": la,
        "heart_ventricle_left": lv,
        "heart_atrium_right": ra,
        "heart_ventricle_right": rv,
    }
    body = ellipsoid(np.zeros(3), (170, 130, 1e4), np.eye(3), Deformation(rng, 0.02, 200))(p) < 0
    fat = body & ~(ellipsoid(np.zeros(3), (155, 115, 1e4), np.eye(3), Deformation(rng, 0.02, 200))(p) < 0)
    lungs = np.zeros(body.shape, dtype=bool)
    for side in (-1, 1):
        lungs |= (
            ellipsoid(
                centre + np.array([side * 75, 10, 10]), (45, 60, 90), np.eye(3), Deformation(rng, 0.05)
            )(p)
            < 0
        )
    hu = np.full(body.shape, -1000.0)
    hu[body] = 45.0
    hu[fat] = -100.0
    hu[lungs & body] = -820.0
    hu[myo] = 110.0
    for m in (lv, rv, la, ra):
        hu[m] = 320.0
    hu += rng.normal(0, 18, hu.shape)
    return np.round(hu).astype(np.int16), masks, affine


def shapes_case(
    shape: Sequence[int], spacing: Sequence[float], rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """One generic-shapes case: the four shapes placed apart, random size, orientation and deformation."""
    affine = grid_affine(shape, spacing, rng)
    p = world_points(shape, affine)
    extent = np.abs(affine[:3, :3] @ (np.asarray(shape) - 1)).min() / 2
    slots = np.array([[-1, -1, 0], [1, -1, 0], [-1, 1, 0], [1, 1, 0]], dtype=float) * extent * 0.45
    slots = slots[rng.permutation(4)] + rng.uniform(-4, 4, (4, 3))
    r = extent * 0.3
    makers = _shape_makers(rng, r)
    masks = {}
    taken = np.zeros(tuple(shape), dtype=bool)
    for name, slot in zip(SHAPE_CLASSES, slots, strict=True):
        m = (makers[name](slot)(p) < 0) & ~taken
        masks[name] = m
        taken |= m
    hu = np.full(tuple(shape), 30.0) + rng.normal(0, 18, tuple(shape))
    for i, name in enumerate(SHAPE_CLASSES):
        hu[masks[name]] += 150.0 + 40 * i
    return np.round(hu).astype(np.int16), masks, affine


def _shape_makers(rng: np.random.Generator, r: float) -> dict[str, Callable[[np.ndarray], Callable]]:
    """Each shape class's random implicit function, given its centre (radius scale ``r`` mm)."""
    return {
        "ellipsoid": lambda c: ellipsoid(
            c, rng.uniform(0.5, 1.0, 3) * r, _rotation(rng, 90), Deformation(rng)
        ),
        "box": lambda c: _superquadric(
            c, rng.uniform(0.45, 0.8, 3) * r, _rotation(rng, 90), Deformation(rng, 0.04), 8.0
        ),
        "superquadric": lambda c: _superquadric(
            c, rng.uniform(0.5, 0.9, 3) * r, _rotation(rng, 90), Deformation(rng), rng.uniform(1.0, 1.6)
        ),
        "torus": lambda c: _torus(
            c,
            r * rng.uniform(0.5, 0.65),
            r * rng.uniform(0.2, 0.3),
            _rotation(rng, 90),
            Deformation(rng, 0.05),
        ),
    }


def hard_shapes_case(
    shape: Sequence[int], spacing: Sequence[float], rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """One ``hard_shapes`` case: the four shapes packed so neighbours touch (each keeps its own
    voxels), intensities 20 HU apart, two unlabelled blobs of the same range, smoothed-noise
    texture, a linear intensity gradient, partial-volume edges, and often one shape cut by the edge."""
    from scipy import ndimage

    affine = grid_affine(shape, spacing, rng)
    p = world_points(shape, affine)
    half = np.abs(affine[:3, :3] @ (np.asarray(shape) - 1)) / 2  # the volume's half-extent per world axis
    extent = half.min()
    slots = np.array([[-1, -1, 0], [1, -1, 0], [-1, 1, 0], [1, 1, 0]], dtype=float) * extent * 0.3
    slots = slots[rng.permutation(4)] + rng.uniform(-4, 4, (4, 3))
    if rng.uniform() < 0.6:  # push one shape across the volume's edge
        k, axis = int(rng.integers(4)), int(rng.integers(3))
        slots[k, axis] = np.sign(slots[k, axis] or 1.0) * half[axis] * rng.uniform(0.75, 0.95)
    makers = _shape_makers(rng, extent * 0.42)
    hu = np.full(tuple(shape), 40.0)
    masks, taken = {}, np.zeros(tuple(shape), dtype=bool)
    levels = 40.0 + rng.permutation(np.array([30.0, 50.0, 70.0, 90.0]))
    for name, slot, level in zip(SHAPE_CLASSES, slots, levels, strict=True):
        f = makers[name](slot)(p)
        weight = 1.0 / (1.0 + np.exp(np.clip(f / 0.04, -50, 50)))  # partial volume across ~2 voxels
        hu += weight * (level - 40.0) * ~taken  # an earlier neighbour keeps its own voxels
        masks[name] = (f < 0) & ~taken
        taken |= masks[name]
    for _ in range(2):  # look-alike blobs, not labelled
        centre = rng.uniform(-0.7, 0.7, 3) * half
        blob = ellipsoid(centre, rng.uniform(0.15, 0.3, 3) * extent, _rotation(rng, 90), Deformation(rng))(p)
        hu = np.where((blob < 0) & ~taken, 40.0 + rng.uniform(30, 90), hu)
    hu += ndimage.gaussian_filter(rng.normal(0, 60, tuple(shape)), 1.5)  # texture
    direction = rng.normal(size=3)
    hu += 40.0 * (p @ (direction / np.linalg.norm(direction))) / extent  # smooth gradient, +-40 HU
    hu += rng.normal(0, 12, tuple(shape))
    return np.round(hu).astype(np.int16), masks, affine


def mr_from_ct(hu: np.ndarray, affine: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An MR-like image (float32, >= 0) of a phantom's anatomy from its CT (``hu``): every 60 HU band
    of tissue gets an intensity drawn for this case (a smooth random, non-monotone map, so contrast
    between two tissues may flip between cases as it does between sequences; air stays dark), times
    a bias field smooth across the volume (+-25%), with Rician noise, scaled to a range drawn
    between 300 and 4000."""
    centres = np.arange(-940.0, 460.0, 60.0)
    weights = rng.uniform(0.05, 1.0, centres.size)
    weights[centres < -900] = 0.0  # air has no signal
    h = np.clip(hu.astype(np.float32), -1000, 500)
    signal = np.zeros(hu.shape, dtype=np.float32)
    total = np.zeros(hu.shape, dtype=np.float32)
    for c, w in zip(centres, weights, strict=True):
        g = np.exp(-0.5 * ((h - c) / 35.0) ** 2)
        signal += w * g
        total += g
    signal /= np.maximum(total, 1e-6)
    p = world_points(hu.shape, affine) / 150.0  # world mm over a body's size
    bias = np.exp(0.25 * np.tanh(p @ rng.normal(0, 1, 3) + 0.5 * (p**2) @ rng.normal(0, 1, 3)))
    sigma = rng.uniform(0.01, 0.04)
    noisy = np.hypot(
        signal * bias.reshape(hu.shape) + rng.normal(0, sigma, hu.shape), rng.normal(0, sigma, hu.shape)
    )
    return (noisy * rng.uniform(300.0, 4000.0)).astype(np.float32)


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    atomic_write(path, lambda tmp: nib.save(img, str(tmp)))


def write_phantoms(
    root: str | Path,
    n_cases: int = 12,
    kind: PhantomKind = "heart",
    layout: Literal["totalsegmentator", "cropped"] = "totalsegmentator",
    shape: Sequence[int] = (96, 96, 64),
    spacing: Sequence[float] = (1.6, 1.6, 2.5),
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    workers: int = 1,
    modality: Modality = "ct",
) -> list[str]:
    """Write ``n_cases`` phantoms under ``root`` plus ``meta.csv`` (with a UTF-8 BOM, ';'-separated,
    as TotalSegmentator's). Returns the case ids. The cropped layout stores one integer label map
    with values 1..5 in the order of the class list (see `phantom_label_values`). Each case draws
    from its own seed, so ``workers`` processes write the same files as one. ``modality="mr"``:
    MR-like images of the same anatomy (`mr_from_ct`), ``mri.nii.gz`` in TotalSegmentator's layout;
    ``"mixed"``: every second case (s0002, s0004, ...) MR, the others CT, so each split holds both
    (read with ``data.preprocessing.modality: auto``)."""
    if modality not in (*IMAGE_NAMES, "mixed"):
        raise ValueError(f"phantom modality {modality!r}: expected 'ct', 'mr' or 'mixed'")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ids = [f"s{i + 1:04d}" for i in range(n_cases)]
    n_train, n_val, n_test = split_counts(n_cases, split_fractions)
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    jobs = [
        (root, case_id, i, kind, layout, tuple(shape), tuple(spacing), seed, modality)
        for i, case_id in enumerate(ids)
    ]
    if workers > 1 and n_cases > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, n_cases)) as pool:
            list(pool.map(_write_case, jobs))
    else:
        for job in jobs:
            _write_case(job)
    with (root / "meta.csv").open("w", newline="", encoding="utf-8-sig") as f:
        writer = csv.writer(f, delimiter=";")
        writer.writerow(["image_id", "age", "gender", "institute", "study_type", "split"])
        for i, (case_id, split) in enumerate(zip(ids, splits, strict=True)):
            writer.writerow([case_id, 60, "f", "phantom", f"{case_modality(modality, i)} thorax", split])
    return ids


def case_modality(modality: Modality, index: int) -> Literal["ct", "mr"]:
    """The modality of case ``index`` (0-based) of a `write_phantoms` call."""
    if modality == "mixed":
        return "mr" if index % 2 else "ct"
    return modality


Generator = Callable[..., tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]]
GENERATORS: dict[str, tuple[Generator, tuple[str, ...]]] = {
    "heart": (heart_case, HEART_CLASSES),
    "shapes": (shapes_case, SHAPE_CLASSES),
    "hard_shapes": (hard_shapes_case, SHAPE_CLASSES),
}
"""Each kind's case generator and classes; `lora_sam3d.data.abdomen` adds ``abdomen`` (imported with
`lora_sam3d.data`)."""


def _write_case(job: tuple) -> None:
    """One case of `write_phantoms` (a top-level function, so worker processes can run it)."""
    root, case_id, index, kind, layout, shape, spacing, seed, modality = job
    make, classes = GENERATORS[kind]
    rng = np.random.default_rng([seed, index, KINDS.index(kind)])
    hu, masks, affine = make(shape, spacing, rng)
    modality = case_modality(modality, index)
    if modality == "mr":  # the same anatomy (same seed) as the CT phantom, another contrast
        hu = mr_from_ct(hu, affine, np.random.default_rng([seed, index, 7]))
    case_dir = root / case_id
    case_dir.mkdir(exist_ok=True)
    if layout == "totalsegmentator":
        (case_dir / "segmentations").mkdir(exist_ok=True)
        _save(hu, affine, case_dir / IMAGE_NAMES[modality])
        for name, m in masks.items():
            _save(m.astype(np.uint8), affine, case_dir / "segmentations" / f"{name}.nii.gz")
    else:
        label = np.zeros(hu.shape, dtype=np.uint8)
        for value, name in enumerate(classes, start=1):
            label[masks[name]] = value
        _save(hu, affine, case_dir / f"{case_id}-image.nii.gz")
        _save(label, affine, case_dir / f"{case_id}-label.nii.gz")


def kind_classes(kind: str) -> tuple[str, ...]:
    """The classes a kind of phantom labels."""
    return GENERATORS[kind][1]


def phantom_label_values(kind: PhantomKind = "heart") -> dict[str, int]:
    return {name: i for i, name in enumerate(kind_classes(kind), start=1)}


@dataclass
class PhantomSpec:
    """Synthetic data to write into an empty data folder (``data.cases.phantoms``; the embedded default)."""

    kind: PhantomKind = "heart"
    n_cases: int = 12
    shape: tuple[int, int, int] = (96, 96, 64)
    spacing: tuple[float, float, float] = (1.6, 1.6, 2.5)
    seed: int = 0
    modality: Literal["ct", "mr", "mixed"] = "ct"
