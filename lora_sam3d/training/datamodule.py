"""`TSDataModule`: the Lightning face of the data: phantoms if asked, caches once, splits by case.

Batches are `lora_sam3d.inputs.Batch` records (``collate``); ``transfer_batch_to_device`` moves
their tensors, so user code never calls ``.to(device)``; the sparse latent is built on the device
by the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset

from lora_sam3d.data.cache import check_failed
from lora_sam3d.data.cases import check_class_names
from lora_sam3d.data.dataset import (
    EpochOffsetDistributedSampler,
    EpochShuffleSampler,
    ResumableSampler,
    TS_SAM3D_Dataset,
    cache_dataset,
)
from lora_sam3d.data.nifti import DataError
from lora_sam3d.data.phantoms import write_phantoms
from lora_sam3d.data.requests import PredictionDataset, PredictItem
from lora_sam3d.data.settings import (
    CaseSettings,
    ContextSettings,
    DataContract,
    DataSettings,
    FrameFrom,
    FrameSettings,
    SamplingMethod,
    SamplingSettings,
    ViewSettings,
)
from lora_sam3d.data.tissue import tissue_ranges
from lora_sam3d.data.volume import Preprocessing
from lora_sam3d.inputs import Batch, collate
from lora_sam3d.settings.tree import coerce

__all__ = ["LoaderSettings", "PredictSettings", "ResumableDataLoader", "TSDataModule"]


@dataclass(frozen=True)
class LoaderSettings:
    """How batches are loaded (``data.loader``): ``batch_size`` samples a batch, built by
    ``num_workers`` loader processes (persistent when > 0; 0: in the training process)."""

    batch_size: int = 4
    num_workers: int = 0

    def __post_init__(self) -> None:
        for key, low in (("batch_size", 1), ("num_workers", 0)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise DataError(f"data.loader.{key} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class PredictSettings:
    """What ``predict`` reads (``data.predict``).

    Args:
        items: reconstruction requests on new scans (`PredictItem`, or their fields as dicts); they
            use the preprocessing, slice size, frame scale and per-class frame extents stored in
            the model's checkpoint or adapter (``frame.extent_mm`` overrides extents), or, for a
            model without stored settings, the config's and the training split's. Without them,
            ``predict`` runs on ``split`` (with ground truth, so metrics are written too).
        split: the split predicted without ``items`` (None: none).
        intensity_check: a request's scan whose values doubt how it is read (an MR-range scan read
            as CT, a 0..1-normalised CT, air in an MR), or whose marked tissue is unlike the model's
            training or indistinguishable from its surroundings, gets a warning naming the file and
            why (``warn``), or is refused (``error``).
        all_pieces: keep every piece of a prediction; by default a piece that touches no drawn mask
            (a blob past the structure's end) is removed, counted in ``metrics.csv`` (``pieces_removed``).
        beyond_scan: keep the surface past the scan's field of view (written as
            ``<name>_beyond_scan.ply``); by default it is cut and closed there, as the mask is.
        frame_from: ``auto``: a request of several slices is framed by its drawing (the largest
            side of the drawn masks' box, times `DRAWN_FRAME_SHARE` of the frame scale), one slice
            by its class's extent; ``class``: every request by its class's extent, as validation
            frames.
    """

    items: list[PredictItem] | None = None
    split: Literal["train", "val", "test"] | None = "test"
    intensity_check: Literal["warn", "error"] = "warn"
    all_pieces: bool = False
    beyond_scan: bool = False
    frame_from: FrameFrom = "auto"


LOADER, PREDICT = LoaderSettings(), PredictSettings()


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


PREPROCESSING, FRAME, VIEWS = Preprocessing(), FrameSettings(), ViewSettings()
CONTEXT, SAMPLING, CASES = ContextSettings(), SamplingSettings(), CaseSettings()
"""The groups' defaults (frozen: one instance is shared safely)."""


class TSDataModule(L.LightningDataModule):
    """Train/val/test/predict data from a TotalSegmentator-layout folder.

    Args:
        root: data folder (see `lora_sam3d.data.cases`); may be left out only to predict
            ``predict.items`` with a checkpoint or adapter that stores its data settings.
        classes: structure names; their order fixes the class indices (with ``--ckpt_path`` or
            ``model.finetune.adapter``, left out = the stored ones).
        preprocessing, frame, views, context, sampling, cases: the settings tree's groups
            (`lora_sam3d.data.settings`: how scans are read, the frame and its targets, the slices
            of a sample, the scan as context, which slices are drawn, how cases are found); each also
            takes a dict of its fields. ``views.count`` given also caps a request's slices (a request
            with more is refused), while left out a request may have as many slices as the model
            was trained with.
        seed, cache_dir: as `DataSettings`.
        loader: the DataLoader's ``batch_size`` and ``num_workers`` (`LoaderSettings`).
        predict: the requests on new scans (``items``), the split predicted without them and the
            intensity check (`PredictSettings`).

    Hyper-parameters store the groups as plain dicts (`DataSettings.to_dict`).
    """

    def __init__(
        self,
        root: str | None = None,
        classes: list[str] | None = None,
        preprocessing: Preprocessing = PREPROCESSING,
        frame: FrameSettings = FRAME,
        views: ViewSettings = VIEWS,
        context: ContextSettings = CONTEXT,
        sampling: SamplingSettings = SAMPLING,
        cases: CaseSettings = CASES,
        seed: int = 0,
        cache_dir: str | None = None,
        loader: LoaderSettings = LOADER,
        predict: PredictSettings = PREDICT,
    ) -> None:
        super().__init__()
        groups = {"preprocessing": preprocessing, "frame": frame, "views": views, "context": context}
        groups |= {"sampling": sampling, "cases": cases, "loader": loader, "predict": predict}
        self.loader_settings = coerce(LoaderSettings, groups.pop("loader"), "data.loader")
        self.predict_settings = coerce(PredictSettings, groups.pop("predict"), "data.predict")
        check_class_names(classes or [])
        self.settings = DataSettings(**groups, seed=seed, cache_dir=cache_dir)  # type: ignore[arg-type]
        check_class_names(list(self.settings.frame.extent_mm or {}), "data.frame.extent_mm")
        self.save_hyperparameters(ignore=["loader", "predict", *groups])
        self.hparams.update(self.settings.to_dict())
        self.hparams.update(
            {"loader": asdict(self.loader_settings), "predict": asdict(self.predict_settings)}
        )
        self.datasets: dict[str, Dataset] = {}
        self.trained: dict[str, Any] | None = None  # the model's data contract, see use_trained_contract

    @property
    def root(self) -> Path:
        if self.hparams.root is None:
            raise DataError(
                "data.root is not set: training, validation, test and predicting a split read the data "
                "folder (only data.predict.items with a checkpoint or adapter that stores its settings do not)"
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
        return bool(self.predict_settings.items) and (trainer is None or trainer.state.fn == "predict")

    def write_phantoms_if_empty(self) -> None:
        """Write the configured phantoms (``data.cases.phantoms``) when the root holds no case yet."""
        spec = self.settings.cases.phantoms
        has_cases = self.root.is_dir() and any(
            p.is_dir() and not p.name.startswith(".") for p in self.root.iterdir()
        )
        if not has_cases and spec is not None:
            write_phantoms(
                self.root,
                spec.n_cases,
                spec.kind,
                shape=spec.shape,
                spacing=spec.spacing,
                seed=spec.seed,
                workers=max(1, self.loader_settings.num_workers),
                modality=spec.modality,
            )

    def prepare_data(self) -> None:
        """Write phantoms into an empty root (if configured), then build every case's cache once
        (nothing to prepare for predict items on new scans: they read their own files, and the
        training split only when a class needs its frame extent, `_request_dataset`)."""
        s = self.settings
        if self._predicting_items():
            return
        self.write_phantoms_if_empty()
        cases = s.cases.find(self.root, self.classes)
        _, failed, _ = cache_dataset(
            cases,
            self.classes,
            s,
            self.cache_dir,
            workers=max(1, self.loader_settings.num_workers),
            progress=True,
        )
        check_failed(failed, len(cases), s.cases.on_bad_case)

    def setup(self, stage: str | None = None) -> None:
        sampling = self.settings.sampling
        if stage in ("fit", None) and "train" not in self.datasets:
            self.datasets["train"] = self._dataset(
                "train", sampling.train, augment=sampling.augment, score_targets=False
            )
        for split, stages in (("val", ("fit", "validate", None)), ("test", ("test", None))):
            if stage in stages and split not in self.datasets:
                self.datasets[split] = self._dataset(split, sampling.eval)
        if (
            stage in ("predict", None)
            and not self.predict_settings.items
            and self.predict_settings.split
            and "predict" not in self.datasets
        ):
            self.datasets["predict"] = self._dataset(self.predict_settings.split, sampling.eval)

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
            spacing=s.preprocessing.spacing_mm,
            modality=s.preprocessing.modality,
            ct_window_hu=list(s.preprocessing.ct_window_hu),
            slice_size=s.frame.pixels,
            frame_scale=s.frame.scale,
            resolution=s.frame.resolution,
            views=s.views.most,
            view_layout=s.views.layout,
            view_layouts=list(s.views.layouts) if s.views.layouts else None,
            context=s.context.source or "none",
            tissue=tissue_ranges(train.cases, self.classes),
            context_reading=s.context.reading,
            context_tissue_model=s.context.tissue_model,
        )

    def use_trained_contract(self, contract: dict[str, Any] | None) -> None:
        """The data contract of the model about to predict (its checkpoint's or adapter's manifest,
        handed over by `lora_sam3d.training.data_link.DataLink`): requests are read the way it was trained."""
        self.trained = contract

    def request_classes(self) -> list[str]:
        """The class name of each predict item, in order."""
        return [
            item.class_name if isinstance(item, PredictItem) else item.get("class_name")
            for item in self.predict_settings.items or []
        ]

    def _request_dataset(self) -> PredictionDataset:
        """The predict items' dataset, with the model's data contract when it has one (see
        `use_trained_contract`), else this config's and the training split's."""
        h, s, stored = self.hparams, self.settings, self.trained
        trained = None
        if stored:
            contract = DataContract.from_dict(stored)
            if contract.context_reading == "relative":  # the scan's units are this config's (an MR, say)
                prep = s.preprocessing
                contract = replace(contract, modality=prep.modality, ct_window_hu=list(prep.ct_window_hu))
            dataset = PredictionDataset.from_settings(
                self.predict_settings.items,
                contract,
                s.frame.extent_mm,
                self.predict_settings.intensity_check,
                s.context.source,
                self.predict_settings.all_pieces,
                self.predict_settings.beyond_scan,
                frame_from=self.predict_settings.frame_from,
            )
            trained = contract.views
        else:
            extents: dict[str, float] = {}
            given = s.frame.extent_mm or {}
            if h.root is not None and any(c not in given for c in self.request_classes()):
                self.write_phantoms_if_empty()  # the training split's extents: only when one is needed
                reference = self.datasets.get("train") or self._dataset("train", s.sampling.train)
                extents = dict(reference.extent_mm)
            dataset = PredictionDataset(
                self.predict_settings.items,
                s.preprocessing,
                {**extents, **(s.frame.extent_mm or {})},
                s.frame.scale,
                s.frame.pixels,
                self.predict_settings.intensity_check,
                s.context.source or "none",
                4 * s.frame.resolution,
                reading=s.context.reading,
                all_pieces=self.predict_settings.all_pieces,
                beyond_scan=self.predict_settings.beyond_scan,
                frame_from=self.predict_settings.frame_from,
                tissue_model=s.context.tissue_model,
            )
        dataset.check_view_counts(trained, s.views.count)
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
        dataset = self.datasets[split]
        sampler: Any = None
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if shuffle and distributed:
            sampler = EpochOffsetDistributedSampler(dataset, shuffle=True, seed=self.settings.seed)
        elif shuffle:
            sampler = EpochShuffleSampler(len(dataset), self.settings.seed)  # type: ignore[arg-type]
        elif distributed:  # each sample once over all processes (Lightning's default would pad with repeats)
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        loader = ResumableDataLoader if shuffle else DataLoader
        extra = {"position": self._train_position} if shuffle else {}
        return loader(
            dataset,
            batch_size=self.loader_settings.batch_size,
            sampler=sampler,
            num_workers=self.loader_settings.num_workers,
            persistent_workers=self.loader_settings.num_workers > 0,
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
        if self.predict_settings.items and "predict" not in self.datasets:
            self.datasets["predict"] = self._request_dataset()
        return self._loader("predict", shuffle=False)
