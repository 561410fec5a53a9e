"""`TSDataModule`: the Lightning face of the data: phantoms if asked, caches once, splits by case.

Batches are dicts of tensors plus lists of strings; Lightning's default
``transfer_batch_to_device`` moves such dicts (tensors) and leaves the strings, so no custom hook
is needed here; the sparse latent is built on the device by the module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset

from lora_sam3d.data.cache import FileHashes, build_case
from lora_sam3d.data.cases import Layout, discover_cases
from lora_sam3d.data.dataset import (
    EpochOffsetDistributedSampler,
    EpochShuffleSampler,
    ResumableSampler,
    SamplingMethod,
    TS_SAM3D_Dataset,
    collate,
    slice_inputs,
)
from lora_sam3d.data.phantoms import PhantomKind, write_phantoms
from lora_sam3d.data.volume import DataError, Preprocessing, load_volume


@dataclass
class PhantomSpec:
    """Synthetic data to write into an empty ``root`` (the embedded default)."""

    kind: PhantomKind = "heart"
    n_cases: int = 12
    shape: tuple[int, int, int] = (96, 96, 64)
    spacing: tuple[float, float, float] = (1.6, 1.6, 2.5)
    seed: int = 0


@dataclass
class PredictItem:
    """One reconstruction request on a new scan.

    ``axis`` (0 sagittal, 1 coronal, 2 axial) and ``index`` address the canonical (RAS) grid
    resampled to the data module's spacing. ``mask`` is a NIfTI on the image's grid whose non-zero
    voxels (or voxels equal to ``label_value``) mark the structure; only the chosen slice is read.
    ``class_name`` picks the frame extent.
    """

    image: str
    axis: int
    index: int
    mask: str
    class_name: str
    label_value: int | None = None


class ResumableDataLoader(DataLoader):
    """The training loader, with its place in the epoch saved in Lightning checkpoints.

    Lightning stores ``state_dict()`` of loaders that have one and hands it back through
    ``load_state_dict`` when resuming; here that is (epoch, batches done), read from the trainer's
    own progress counters at save time (the loader itself runs a batch ahead: Lightning
    prefetches). A run resumed from a mid-epoch checkpoint (``ModelCheckpoint(every_n_train_steps=N)``)
    then continues with the next batch of that epoch instead of replaying its first batches.
    """

    def __init__(
        self, *args: Any, position: Callable[[], tuple[int, int]] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.position = position

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self.position() if self.position is not None else (0, 0)
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if isinstance(self.sampler, ResumableSampler) and self.batch_size:
            self.sampler.resume(int(state["epoch"]), int(state["batches"]) * self.batch_size)


class PredictionDataset(Dataset):
    """Input samples (no ground truth) for `PredictItem`s."""

    def __init__(
        self,
        items: Sequence[PredictItem],
        prep: Preprocessing,
        extent_mm: Mapping[str, float],
        frame_scale: float,
        slice_size: int,
    ) -> None:
        self.items = list(items)
        self.prep, self.extent_mm, self.frame_scale, self.slice_size = (
            prep,
            dict(extent_mm),
            frame_scale,
            slice_size,
        )
        unknown = sorted({i.class_name for i in self.items} - set(self.extent_mm))
        if unknown:
            raise DataError(
                f"predict items name classes {unknown} with no frame extent; known: {sorted(self.extent_mm)}"
            )
        for k, item in enumerate(self.items, start=1):  # what can be checked without reading volumes
            for kind in ("image", "mask"):
                if not Path(getattr(item, kind)).is_file():
                    raise DataError(f"predict item {k}: {kind} {getattr(item, kind)} does not exist")
            if item.axis not in (0, 1, 2):
                raise DataError(
                    f"predict item {k}: axis {item.axis!r}; expected 0 (sagittal), 1 (coronal) or 2 (axial)"
                )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        try:
            volume = load_volume(item.image, {0: (Path(item.mask), item.label_value)}, self.prep)
            side_mm = self.frame_scale * self.extent_mm[item.class_name]
            sample, _ = slice_inputs(
                volume.image, volume.labels, 0, volume.affine, volume.spacing_mm, item.axis, item.index,
                side_mm, self.slice_size,
            )  # fmt: skip
        except DataError as err:
            raise DataError(f"predict item {i + 1} (image {item.image}, mask {item.mask}): {err}") from err
        return sample | {
            "case_id": Path(item.image).name,
            "class_name": item.class_name,
            "source_image": str(item.image),
        }


class TSDataModule(L.LightningDataModule):
    """Train/val/test/predict data from a TotalSegmentator-layout folder (see `TS_SAM3D_Dataset` for the arguments).

    Args:
        phantoms: if given and ``root`` holds no case, `prepare_data` writes synthetic phantoms there.
        train_sampling / eval_sampling: slice sampling for the training split and for val/test.
        predict_items: reconstruction requests on new scans for ``predict``; without them,
            ``predict`` runs on ``predict_split`` (with ground truth, so metrics are written too).
        batch_size, num_workers: DataLoader settings (workers are persistent when > 0).
    """

    def __init__(
        self,
        root: str,
        classes: list[str],
        cache_dir: str | None = None,
        resolution: int = 16,
        spacing: float = 1.5,
        batch_size: int = 4,
        num_workers: int = 0,
        train_sampling: SamplingMethod = "random_axis",
        eval_sampling: SamplingMethod = "uniform",
        samples_per_class: int = 8,
        slices_per_axis: int = 3,
        axes: tuple[int, ...] = (0, 1, 2),
        min_occupancy: float = 0.2,
        slice_size: int | None = None,
        extent_mm: dict[str, float] | None = None,
        frame_scale: float = 2.0,
        sdf_truncation_mm: float = 10.0,
        layout: Layout = "auto",
        label_values: dict[str, int] | None = None,
        modality: Literal["ct", "mr"] = "ct",
        ct_window_hu: tuple[float, float] = (-200.0, 400.0),
        augment: bool = True,
        seed: int = 0,
        on_bad_case: Literal["error", "skip"] = "error",
        phantoms: PhantomSpec | None = None,
        predict_items: list[PredictItem] | None = None,
        predict_split: Literal["train", "val", "test"] | None = "test",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root)
        self.cache_dir = Path(cache_dir) if cache_dir else self.root / ".cache"
        self.datasets: dict[str, Dataset] = {}

    def _dataset_args(self) -> dict[str, Any]:
        h = self.hparams
        return dict(
            root=self.root, classes=h.classes, resolution=h.resolution, spacing=h.spacing, cache_dir=self.cache_dir,
            seed=h.seed, axes=h.axes, min_occupancy=h.min_occupancy, samples_per_class=h.samples_per_class,
            slices_per_axis=h.slices_per_axis, slice_size=h.slice_size, extent_mm=h.extent_mm,
            frame_scale=h.frame_scale, sdf_truncation_mm=h.sdf_truncation_mm, layout=h.layout,
            label_values=h.label_values, modality=h.modality, ct_window_hu=h.ct_window_hu, on_bad_case=h.on_bad_case,
        )  # fmt: skip

    def prepare_data(self) -> None:
        """Write phantoms into an empty root (if configured), then build every case's cache once."""
        h = self.hparams
        has_cases = self.root.is_dir() and any(
            p.is_dir() and not p.name.startswith(".") for p in self.root.iterdir()
        )
        if not has_cases and h.phantoms is not None:
            spec = h.phantoms if isinstance(h.phantoms, PhantomSpec) else PhantomSpec(**h.phantoms)
            write_phantoms(
                self.root, spec.n_cases, spec.kind, shape=spec.shape, spacing=spec.spacing, seed=spec.seed
            )
        cases = discover_cases(self.root, h.classes, h.layout, h.label_values, h.on_bad_case)
        prep = Preprocessing(spacing_mm=h.spacing, modality=h.modality, ct_window_hu=tuple(h.ct_window_hu))
        hashes = FileHashes(self.cache_dir)
        for case in cases:
            build_case(case, list(h.classes), prep, self.cache_dir, h.sdf_truncation_mm, hashes)
        hashes.save()

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        args = self._dataset_args()
        if stage in ("fit", None) and "train" not in self.datasets:
            self.datasets["train"] = TS_SAM3D_Dataset(
                split="train",
                slice_sampling_method=h.train_sampling,
                augment=h.augment,
                score_targets=False,
                **args,
            )
        for split, stages in (("val", ("fit", "validate", None)), ("test", ("test", None))):
            if stage in stages and split not in self.datasets:
                self.datasets[split] = TS_SAM3D_Dataset(
                    split=split, slice_sampling_method=h.eval_sampling, **args
                )
        if (
            stage in ("predict", None)
            and not h.predict_items
            and h.predict_split
            and "predict" not in self.datasets
        ):
            self.datasets["predict"] = TS_SAM3D_Dataset(
                split=h.predict_split, slice_sampling_method=h.eval_sampling, **args
            )
        if stage in ("predict", None) and h.predict_items and "predict" not in self.datasets:
            reference = self.datasets.get("train") or TS_SAM3D_Dataset(split="train", **args)
            items = [i if isinstance(i, PredictItem) else PredictItem(**i) for i in h.predict_items]
            self.datasets["predict"] = PredictionDataset(
                items, reference.prep, reference.extent_mm, h.frame_scale, reference.slice_size
            )

    @property
    def extent_mm(self) -> dict[str, float]:
        """The per-class frame extents in use (training-split statistic or config)."""
        dataset = self.datasets.get("train") or self.datasets.get("val") or self.datasets.get("test")
        if not isinstance(dataset, TS_SAM3D_Dataset):
            raise RuntimeError("call setup() first")
        return dict(dataset.extent_mm)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"no {split} dataset: call setup() with the matching stage first")
        h = self.hparams
        dataset = self.datasets[split]
        sampler: Any = None
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if shuffle and distributed:
            sampler = EpochOffsetDistributedSampler(dataset, shuffle=True, seed=h.seed)
        elif shuffle:
            sampler = EpochShuffleSampler(len(dataset), h.seed)  # type: ignore[arg-type]
        elif distributed:  # each sample once over all processes (Lightning's default would pad with repeats)
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        loader = ResumableDataLoader if shuffle else DataLoader
        extra = {"position": self._train_position} if shuffle else {}
        return loader(
            dataset,
            batch_size=h.batch_size,
            sampler=sampler,
            num_workers=h.num_workers,
            persistent_workers=h.num_workers > 0,
            collate_fn=collate,
            **extra,
        )

    def _train_position(self) -> tuple[int, int]:
        """(epoch, training batches processed in it) from the trainer, at checkpoint time."""
        return self.trainer.current_epoch, self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)
