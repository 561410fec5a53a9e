"""One call for a notebook: a scan, a mask and the slices in, the surface and the mask on the scan out.

`reconstruct` runs a request through the code the ``predict`` command runs (`PredictionDataset`,
`collate`, the model, `prediction_records`, the writer's smoothing and mask), so its mesh and mask
equal the files the command writes for the same request. No Lightning, no Trainer.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from lora_sam3d.data.nifti import DataError
from lora_sam3d.data.requests import PredictionDataset, PredictItem
from lora_sam3d.data.requests.dataset import ANY_STRUCTURE
from lora_sam3d.data.requests.items import AXIS_NAMES, locate_slice, parse_axis
from lora_sam3d.data.requests.masks import masks_in_memory, read_slice_mask
from lora_sam3d.data.settings import DataContract
from lora_sam3d.geometry import Mesh
from lora_sam3d.inputs import Batch, collate
from lora_sam3d.models.config import ModelConfig
from lora_sam3d.models.reconstructor import Reconstruction, Reconstructor
from lora_sam3d.models.test_time import adapted
from lora_sam3d.predict.files import mask_on_source_grid
from lora_sam3d.predict.records import Prediction, prediction_records
from lora_sam3d.predict.user_inputs import (
    Scan,
    drawing_extent_mm,
    drawn_slices,
    read_mask,
    read_scan,
    scan_file,
)

__all__ = ["Reconstructed", "load_model", "reconstruct"]


@dataclass
class Reconstructed:
    """What `reconstruct` returns.

    Attributes:
        name: the output name the command gives it (``<case>_<class>_<slices>``).
        mesh: the surface in world RAS mm, smoothed as the command writes it (``mesh.save(path)``).
        mask: the predicted mask on the scan's own grid, uint8 (``nib.save(mask, path)``).
        prediction: the record behind both: the unsmoothed mesh, the SDF grid, the frame and, when
            the mask given was the structure's 3D mask, the scores against it.
        adapt_losses: the held-out losses of test-time LoRA's steps (empty without it).
        slices: the slices the result was made from (``{"axis": "axial", "index": 16}``, file
            numbering), the drawing's slices when a drawing was given.
        frame: where the frame's extent came from (``from``: the drawing, for several slices or a
            structure the model has no extent for; the class's training extent; or the
            ``extent_mm`` given) and the extent itself (``extent_mm``).
        next_slice: where a drawing would change the result most (``{"axis": "coronal", "index":
            40, "far_mm": 31.5}``, `lora_sam3d.predict.next_slice.where_to_draw`); a session's
            answers carry it, a single call leaves it None.
    """

    name: str
    mesh: Mesh
    mask: nib.Nifti1Image
    prediction: Prediction
    adapt_losses: list[float] = field(default_factory=list)
    slices: list[dict[str, Any]] = field(default_factory=list)
    frame: dict[str, Any] = field(default_factory=dict)
    next_slice: dict[str, Any] | None = None


def _reads_scan(context: bool | str | None, model_reads: bool) -> bool:
    """Whether ``reconstruct`` reads the scan: ``context`` as the YAML's ``data.context.source`` spells it
    too, None meaning as the model was trained; anything else, or the scan asked of a model that
    does not read it, is refused."""
    if context in ("volume", "none"):
        context = context == "volume"
    if not (context is None or isinstance(context, bool)):
        raise ValueError(
            f"reconstruct: context must be True, False, None, 'volume' or 'none' (as data.context.source), got {context!r}"
        )
    if context and not model_reads:
        raise ValueError(
            "reconstruct: the scan was asked (context=True or 'volume') but this model does not read "
            "the scan (trained without it): give context=None, False or 'none'"
        )
    return model_reads if context is None else context


def reconstruct(
    model: Any,
    scan: Scan,
    mask: Any,
    class_name: str | None = None,
    *,
    slices: Sequence[Mapping[str, Any]] | None = None,
    axis: str | int = "axial",
    index: int | None = None,
    position_mm: float | None = None,
    label_value: int | None = None,
    data: DataContract | Mapping[str, Any] | None = None,
    smooth_iterations: int = 10,
    nsd_tolerance_mm: float = 3.0,
    context: bool | str | None = None,
    all_pieces: bool = False,
    beyond_scan: bool = False,
    extent_mm: Mapping[str, float] | None = None,
    adapt_steps: int = 0,
    adapt_lr: float = 2e-3,
    truth: Any = None,
    scan_cache: dict[str, dict[str, Any]] | None = None,
) -> Reconstructed:
    """Reconstruct a structure in ``scan`` from its ``mask`` on one slice (``axis``, ``index`` or
    ``position_mm``), several (``slices``) or, with none of those, a drawing: a 3D label array whose
    slices are found (``result.slices``). Scans, masks and every option: docs/api.md, "Scans and
    drawings in memory". ``class_name`` None (or a class the model has no extent for) frames the
    structure by its drawing (``result.frame``); a 3D ``mask`` with slices, or ``truth``, scores it.
    """
    network, contract = _model_and_contract(model, data)
    with _request_files(scan, mask, axis, index, position_mm, truth) as (image, mask_img, paths):
        where = {"axis": axis, "index": index, "position_mm": position_mm, "slices": slices}
        item, extents, frame = _request_item(
            image, mask, mask_img, paths, class_name, label_value, where, extent_mm, contract
        )
        name = item.class_name
        use = _reads_scan(context, network.config.context.read)
        requests = PredictionDataset.from_settings(
            [item], contract, extents, context="volume" if use else "none", all_pieces=all_pieces,
            beyond_scan=beyond_scan, scans=scan_cache,
            frame_from="class" if frame["from"] == "extent_mm given" else "auto",  # the caller's extent holds
        )  # fmt: skip
        if requests.frames[0][0] == "the drawing":  # several slices measure the structure themselves
            frame = {"from": "the drawing", "extent_mm": requests.frames[0][1]}
        requests.check_view_counts(contract.views, None)
        batch = collate([requests[0]])
        rec, losses = _run(network, batch, adapt_steps, adapt_lr)
        (record,) = prediction_records(rec, batch, nsd_tolerance_mm, network.config.context.read)
        assert record.source_image is not None
        on_scan = mask_on_source_grid(record.sdf, record.frame_to_world, record.source_image, record.on_scan)
        found = [{"axis": AXIS_NAMES[r.axis], "index": r.index} for r in requests.slices[0]]
    record.source_image = str(scan) if isinstance(scan, str | Path) else None
    frame.setdefault("extent_mm", extents.get(name, contract.extent_mm.get(name)))
    return Reconstructed(
        record.stem, record.mesh.smoothed(smooth_iterations), on_scan, record, losses, found, frame
    )


def _request_item(
    image: nib.Nifti1Image,
    mask: Any,
    mask_img: nib.Nifti1Image | None,
    paths: tuple[str, str, str | None],
    class_name: str | None,
    label_value: int | None,
    where: dict[str, Any],
    extent_mm: Mapping[str, float] | None,
    contract: DataContract,
) -> tuple[PredictItem, dict[str, float], dict[str, Any]]:
    """The request: its slices (a drawing's found, `drawn_slices`), the frame extents (the drawing's
    when the model has none for the class) and where the frame came from."""
    slices, axis, index, position_mm = where["slices"], where["axis"], where["index"], where["position_mm"]
    drawing = slices is None and index is None and position_mm is None
    if drawing and mask_img is None:
        raise DataError(
            f"mask {mask} is one slice's file: name its slice (axis and index), or give a 3D drawing"
        )
    if drawing:
        values = np.asanyarray(mask_img.dataobj)
        slices = drawn_slices(values == label_value if label_value is not None else values != 0, image.affine)
    name = class_name or ANY_STRUCTURE
    extents, frame = dict(extent_mm or {}), _frame_source(name, extent_mm, contract)
    if frame["from"] == "the drawing":
        planes = slices or [
            {"axis": axis, "index": locate_slice(image, parse_axis(axis), index, position_mm).index}
        ]
        if mask_img is None:  # one slice's own file: placed on its slice, as a 2D array would be
            ref = locate_slice(image, parse_axis(axis), index, position_mm)
            mask_img = read_mask(read_slice_mask(Path(mask), image, ref, label_value), image, axis, ref.index)
        extents[name] = frame["extent_mm"] = drawing_extent_mm(mask_img, planes)
    item = PredictItem(
        paths[0], paths[1], name, axis, index, position_mm, label_value, slices and list(slices),
        scored=not drawing and np.ndim(mask) != 2, truth=paths[2],  # a drawing or a 2D mask is no truth
    )  # fmt: skip
    return item, extents, frame


def _frame_source(name: str, given: Mapping[str, float] | None, contract: DataContract) -> dict[str, Any]:
    """Where a request's frame extent comes from: the caller, the model's training, or the drawing."""
    if given and name in given:
        return {"from": "extent_mm given"}
    if name in contract.extent_mm:
        return {"from": "the class's training extent"}
    return {"from": "the drawing"}


@contextmanager
def _request_files(
    scan: Scan, mask: Any, axis: str | int, index: int | None, position_mm: float | None, truth: Any = None
) -> Iterator[tuple[nib.Nifti1Image, nib.Nifti1Image | None, tuple[str, str, str | None]]]:
    """The scan and the masks as images and as paths the request pipeline reads: the user's own files
    where they are NIfTI files on the scan's voxels; an in-memory scan as an uncompressed copy in a
    temporary folder (removed on exit); in-memory masks held under a path, never written."""
    image, name = read_scan(scan)
    mask_img = read_mask(mask, image, axis, index, position_mm)
    with tempfile.TemporaryDirectory(prefix="lora-sam3d-") as tmp:
        image_path = scan_file(scan, image, name, tmp)
        held: dict[str, nib.Nifti1Image] = {}
        mask_path = _as_path(mask, mask_img, str(Path(tmp) / "mask.nii"), held)
        truth_path = (
            None
            if truth is None
            else _as_path(truth, read_mask(truth, image), str(Path(tmp) / "truth.nii"), held)
        )
        with masks_in_memory(held):
            yield image, mask_img, (image_path, mask_path, truth_path)


def _as_path(given: Any, img: nib.Nifti1Image | None, spare: str, held: dict[str, nib.Nifti1Image]) -> str:
    """The path a request names for a mask: ``given``'s own when it is a file the pipeline reads as it
    is (a NIfTI on the scan's voxels, a slice's PNG or 2D NIfTI: ``img`` None), else ``spare``, under
    which ``img`` is held in memory (`masks_in_memory`: never written)."""
    if isinstance(given, str | Path) and (img is None or img.get_filename() is not None):
        return str(given)  # read as it is: `read_mask` gives the file's own image unless it reordered it
    assert img is not None
    values = np.asanyarray(img.dataobj)
    held[spare] = nib.Nifti1Image(values.astype(np.uint8) if values.dtype == bool else values, img.affine)
    return spare


def _run(network: Reconstructor, batch: Batch, steps: int, lr: float) -> tuple[Reconstruction, list[float]]:
    """The network on one request in eval mode, after test-time LoRA when asked (`adapted`)."""
    was_training = network.training
    with adapted(network, batch.evidence, steps, lr) as losses:
        try:
            with torch.no_grad():
                return network.eval()(batch.evidence), losses
        finally:
            network.train(was_training)


def _model_and_contract(
    model: Any, data: DataContract | Mapping[str, Any] | None
) -> tuple[Reconstructor, DataContract]:
    """The network of ``model`` and how it reads scans (``data``, else what the model carries)."""
    data = data if data is not None else getattr(model, "data_contract", None)
    network = getattr(model, "model", model)
    if not isinstance(network, Reconstructor):
        raise TypeError(
            f"reconstruct: model must be a Reconstructor or a LoRAMeshDecoderModule, got {type(model)}"
        )
    if data is None:
        raise ValueError(
            "reconstruct: the model carries no data settings (classes' frame extents, spacing, ...): "
            "load it with Reconstructor.from_adapter or from a checkpoint, or give data="
        )
    return network, data if isinstance(data, DataContract) else DataContract.from_dict(data)


BUILTIN_READS = {
    "relative_shapes": ({"read": True, "conditioning": True, "interpolation": True}, "relative"),
    "scan_shapes": ({"read": True, "conditioning": True, "interpolation": False}, "absolute"),
    "shapes": ({"read": False, "conditioning": False, "interpolation": False}, "absolute"),
}
"""How each shipped base reads scans (its asset's notes): model.context settings and the reading;
all three are the demo's decoder size (`lora_sam3d.assets`)."""


def load_model(path: str | Path) -> Reconstructor:
    """A model ready for `reconstruct`, carrying how it reads scans (``data_contract``): a trained
    checkpoint (``.ckpt``), an adapter folder (``adapter-best/``: base and adapters), or a shipped base
    ``builtin:<name>`` (generic shapes, no classes: every request's frame comes from its drawing)."""
    text = str(path)
    if text.startswith("builtin:"):
        name = text.removeprefix("builtin:")
        if name not in BUILTIN_READS:
            raise ValueError(
                f"load_model: {text} is not a shipped base; known: {', '.join(f'builtin:{n}' for n in BUILTIN_READS)}"
            )
        context, reading = BUILTIN_READS[name]
        decoder = {"resolution": 16, "model_channels": 64, "num_blocks": 4, "num_heads": 4, "num_groups": 8}
        config = ModelConfig.from_dict({"base": {"checkpoint": text}, "context": context, "decoder": decoder})
        network = Reconstructor(config)
        network.data_contract = DataContract(
            classes=[], extent_mm={}, spacing=1.5, modality="auto", ct_window_hu=[-200.0, 400.0], slice_size=64,
            frame_scale=2.0, resolution=16, views=16, view_layouts=["orthogonal", "stack"],
            context="volume" if context["read"] else "none", context_reading=reading,
        ).to_dict()  # fmt: skip
        return network.eval()
    target = Path(path)
    if target.is_dir():
        return Reconstructor.from_adapter(target)
    if not target.is_file():
        raise FileNotFoundError(
            f"load_model: {target} does not exist (a .ckpt, an adapter folder or builtin:<name>)"
        )
    from lora_sam3d.training.module import LoRAMeshDecoderModule

    module = LoRAMeshDecoderModule.load_from_checkpoint(str(target), map_location="cpu", weights_only=True)
    network = module.model
    network.data_contract = module.data_contract
    return network.eval()
