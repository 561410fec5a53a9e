"""`TSDataModule`: the Lightning face of the data: phantoms if asked, caches once, splits by case.

Batches are `lora_sam3d.inputs.Batch` records (``collate``); ``transfer_batch_to_device`` moves
their tensors, so user code never calls ``.to(device)``; the sparse latent is built on the device
by the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset

from lora_sam3d.data.cache import check_failed
from lora_sam3d.data.cases import Layout, check_class_names, discover_cases
from lora_sam3d.data.dataset import (
    EpochOffsetDistributedSampler,
    EpochShuffleSampler,
    ResumableSampler,
    SamplingMethod,
    TS_SAM3D_Dataset,
    cache_dataset,
)
from lora_sam3d.data.phantoms import PhantomKind, write_phantoms
from lora_sam3d.data.requests import PredictionDataset, PredictItem
from lora_sam3d.data.settings import Context, DataContract, DataSettings, ViewLayout
from lora_sam3d.data.volume import DataError
from lora_sam3d.inputs import Batch, collate

__all__ = ["PhantomSpec", "ResumableDataLoader", "TSDataModule"]


@dataclass
class PhantomSpec:
    """Synthetic data to write into an empty ``root`` (the embedded default)."""

    kind: PhantomKind = "heart"
    n_cases: int = 12
    shape: tuple[int, int, int] = (96, 96, 64)
    spacing: tuple[float, float, float] = (1.6, 1.6, 2.5)
    seed: int = 0


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


_DEFAULT = DataSettings()


class TSDataModule(L.LightningDataModule):
    """Train/val/test/predict data from a TotalSegmentator-layout folder.

    The settings from ``resolution`` to ``on_bad_case`` are `DataSettings` fields (documented
    there, defaults taken from there); they are listed flat so a config's ``data`` section names
    them directly.

    Args:
        root: data folder (see `lora_sam3d.data.cases`); may be left out only to predict
            ``predict_items`` with a checkpoint or adapter that stores its data settings.
        classes: structure names; their order fixes the class indices (with ``--ckpt_path`` or
            ``model.adapter``, left out = the stored ones).
        batch_size, num_workers: DataLoader settings (workers are persistent when > 0).
        train_sampling / eval_sampling: slice sampling for the training split and for val/test.
        augment: intensity augmentation of the training split's input slices.
        phantoms: if given and ``root`` holds no case, `prepare_data` writes synthetic phantoms there.
        predict_items: reconstruction requests on new scans for ``predict`` (`PredictItem`); they
            use the preprocessing, slice size, frame scale and per-class frame extents stored in
            the model's checkpoint or adapter (``extent_mm`` here overrides extents), or, for a
            model without stored settings, this config's and the training split's. Without
            them, ``predict`` runs on ``predict_split`` (with ground truth, so metrics are written too).
        intensity_check: a request's scan unlike the modality the model reads (an MR-range scan read
            as CT: most voxels above the window) gets a warning naming the file and the share
            (``warn``), or is refused (``error``).
        views: as `DataSettings.views` (1 when not given); given, it also caps a request's slices
            (a request with more is refused), while left out a request may have as many slices as
            the model was trained with.
    """

    def __init__(
        self,
        root: str | None = None,
        classes: list[str] | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        train_sampling: SamplingMethod = "random_axis",
        eval_sampling: SamplingMethod = "uniform",
        augment: bool = True,
        phantoms: PhantomSpec | None = None,
        predict_items: list[PredictItem] | None = None,
        predict_split: Literal["train", "val", "test"] | None = "test",
        intensity_check: Literal["warn", "error"] = "warn",
        resolution: int = _DEFAULT.resolution,
        spacing: float = _DEFAULT.spacing,
        cache_dir: str | None = _DEFAULT.cache_dir,
        seed: int = _DEFAULT.seed,
        axes: tuple[int, ...] = _DEFAULT.axes,
        min_occupancy: float = _DEFAULT.min_occupancy,
        samples_per_class: int = _DEFAULT.samples_per_class,
        slices_per_axis: int = _DEFAULT.slices_per_axis,
        slice_size: int | None = _DEFAULT.slice_size,
        extent_mm: dict[str, float] | None = _DEFAULT.extent_mm,
        frame_scale: float = _DEFAULT.frame_scale,
        sdf_truncation_mm: float = _DEFAULT.sdf_truncation_mm,
        layout: Layout = _DEFAULT.layout,
        label_values: dict[str, int] | None = _DEFAULT.label_values,
        modality: Literal["ct", "mr"] = _DEFAULT.modality,
        ct_window_hu: tuple[float, float] = _DEFAULT.ct_window_hu,
        on_bad_case: Literal["error", "skip"] = _DEFAULT.on_bad_case,
        views: int | None = None,
        view_layout: ViewLayout = _DEFAULT.view_layout,
        view_spacing_mm: float = _DEFAULT.view_spacing_mm,
        coarse_target: Literal["centre", "any"] = _DEFAULT.coarse_target,
        view_layouts: list[ViewLayout] | None = None,
        context: Context = _DEFAULT.context,
        context_dropout: float = _DEFAULT.context_dropout,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for key, value in (("batch_size", batch_size), ("num_workers", num_workers)):
            if (
                not isinstance(value, int)
                or isinstance(value, bool)
                or value < (1 if key == "batch_size" else 0)
            ):
                raise DataError(
                    f"data.{key} must be an integer >= {1 if key == 'batch_size' else 0}, got {value!r}"
                )
        check_class_names(classes or [])
        check_class_names(list(extent_mm or {}), "data.extent_mm")
        self.settings = DataSettings.pick(
            {**self.hparams, "views": _DEFAULT.views if views is None else views}
        )
        self.datasets: dict[str, Dataset] = {}

    @property
    def root(self) -> Path:
        if self.hparams.root is None:
            raise DataError(
                "data.root is not set: training, validation, test and predicting a split read the data "
                "folder (only data.predict_items with a checkpoint or adapter that stores its settings do not)"
            )
        return Path(self.hparams.root)

    @property
    def classes(self) -> list[str]:
        if not self.hparams.classes:
            raise DataError("data.classes is not set: name the structures (e.g. [heart_ventricle_left])")
        return list(self.hparams.classes)

    @property
    def cache_dir(self) -> Path:
        return self.settings.cache_path(self.root)

    def _dataset(self, split: str, sampling: SamplingMethod, **kw: Any) -> TS_SAM3D_Dataset:
        return TS_SAM3D_Dataset(self.root, self.classes, split, sampling, settings=self.settings, **kw)

    def _predicting_items(self) -> bool:
        trainer = self.trainer
        return bool(self.hparams.predict_items) and (trainer is None or trainer.state.fn == "predict")

    def write_phantoms_if_empty(self) -> None:
        """Write the configured phantoms (``data.phantoms``) when the root holds no case yet."""
        h = self.hparams
        has_cases = self.root.is_dir() and any(
            p.is_dir() and not p.name.startswith(".") for p in self.root.iterdir()
        )
        if not has_cases and h.phantoms is not None:
            spec = h.phantoms if isinstance(h.phantoms, PhantomSpec) else PhantomSpec(**h.phantoms)
            write_phantoms(
                self.root, spec.n_cases, spec.kind, shape=spec.shape, spacing=spec.spacing, seed=spec.seed
            )

    def prepare_data(self) -> None:
        """Write phantoms into an empty root (if configured), then build every case's cache once
        (nothing to prepare for predict items on new scans)."""
        h, s = self.hparams, self.settings
        if self._predicting_items() and h.root is None:
            return
        self.write_phantoms_if_empty()
        cases = discover_cases(self.root, self.classes, s.layout, s.label_values, s.on_bad_case)
        _, failed, _ = cache_dataset(
            cases, self.classes, s, self.cache_dir, workers=max(1, h.num_workers), progress=True
        )
        check_failed(failed, len(cases), s.on_bad_case)

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if stage in ("fit", None) and "train" not in self.datasets:
            self.datasets["train"] = self._dataset(
                "train", h.train_sampling, augment=h.augment, score_targets=False
            )
        for split, stages in (("val", ("fit", "validate", None)), ("test", ("test", None))):
            if stage in stages and split not in self.datasets:
                self.datasets[split] = self._dataset(split, h.eval_sampling)
        if (
            stage in ("predict", None)
            and not h.predict_items
            and h.predict_split
            and "predict" not in self.datasets
        ):
            self.datasets["predict"] = self._dataset(h.predict_split, h.eval_sampling)

    def contract(self) -> DataContract:
        """What predicting on a new scan needs from the data this model was trained on (stored in its
        checkpoints and adapters): classes, per-class frame extents of the training split, how scans
        are read, slice size, frame scale and views."""
        train = self.datasets.get("train")
        if not isinstance(train, TS_SAM3D_Dataset):
            raise RuntimeError("contract() needs the training split: call setup('fit') first")
        s = self.settings
        return DataContract(
            classes=self.classes,
            extent_mm=dict(train.extent_mm),
            spacing=s.spacing,
            modality=s.modality,
            ct_window_hu=list(s.ct_window_hu),
            slice_size=train.slice_size,
            frame_scale=s.frame_scale,
            resolution=s.resolution,
            views=s.views,
            view_layout=s.view_layout,
            view_layouts=list(s.view_layouts) if s.view_layouts else None,
            context=s.context,
        )

    def _request_dataset(self) -> PredictionDataset:
        """The predict items' dataset, with the model's stored data settings when it has them (read
        here, after Lightning restored the checkpoint), else this config's and the training split's."""
        h, s = self.hparams, self.settings
        module = self.trainer.lightning_module if self.trainer is not None else None
        stored = getattr(module, "data_contract", None)
        bank = getattr(module, "bank", None)
        if bank is not None:  # model.adapters: every request's class has its adapter
            for k, item in enumerate(h.predict_items or [], start=1):
                name = item.class_name if isinstance(item, PredictItem) else item.get("class_name")
                try:
                    bank.key_for(name)
                except ValueError as err:
                    raise DataError(f"predict item {k}: {err}") from None
        trained = None
        if stored:
            contract = DataContract.from_dict(stored)
            dataset = PredictionDataset.from_settings(
                h.predict_items, contract, h.extent_mm, h.intensity_check, h.context
            )
            trained = contract.views
        else:
            extents = {}
            if h.root is not None:
                reference = self.datasets.get("train") or self._dataset("train", h.train_sampling)
                extents = dict(reference.extent_mm)
            dataset = PredictionDataset(
                h.predict_items,
                s.prep,
                {**extents, **(h.extent_mm or {})},
                s.frame_scale,
                s.slice_size or 4 * s.resolution,
                h.intensity_check,
                h.context,
                4 * s.resolution,
            )
        dataset.check_view_counts(trained, h.views)
        dataset.check_unique_outputs()
        return dataset

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

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if isinstance(batch, Batch):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def predict_dataloader(self) -> DataLoader:
        if self.hparams.predict_items and "predict" not in self.datasets:
            self.datasets["predict"] = self._request_dataset()
        return self._loader("predict", shuffle=False)
