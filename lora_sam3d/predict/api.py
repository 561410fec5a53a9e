"""One call for a notebook: a scan, a mask and the slices in, the surface and the mask on the scan out.

`reconstruct` runs a request through the code the ``predict`` command runs (`PredictionDataset`,
`collate`, the model, `prediction_records`, the writer's smoothing and mask), so its mesh and mask
equal the files the command writes for the same request. No Lightning, no Trainer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import torch

from lora_sam3d.data.requests import PredictionDataset, PredictItem
from lora_sam3d.data.settings import DataContract
from lora_sam3d.geometry import Mesh
from lora_sam3d.inputs import Batch, collate
from lora_sam3d.models.reconstructor import Reconstruction, Reconstructor
from lora_sam3d.models.test_time import adapted
from lora_sam3d.predict.files import mask_on_source_grid
from lora_sam3d.predict.records import Prediction, prediction_records

__all__ = ["Reconstructed", "reconstruct"]


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
    """

    name: str
    mesh: Mesh
    mask: nib.Nifti1Image
    prediction: Prediction
    adapt_losses: list[float] = field(default_factory=list)


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
    image: str | Path,
    mask: str | Path,
    class_name: str,
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
) -> Reconstructed:
    """Reconstruct ``class_name`` in ``image`` from its ``mask`` on one slice (``axis`` with ``index`` or
    ``position_mm``, as a viewer numbers it) or on several (``slices``: ``[{"axis": "axial", "index":
    16}, ...]``), as a ``predict.items`` entry says it (`PredictItem`).

    ``model``: a `Reconstructor` (`Reconstructor.from_adapter` keeps the folder's data settings),
    or a trained `LoRAMeshDecoderModule` (``load_from_checkpoint``). ``data``: how the model reads
    scans (a `DataContract` or the dict a checkpoint or ``model.json`` stores), when the model does
    not carry it. ``smooth_iterations``: the writer's Taubin smoothing of the mesh (0: none).
    ``context``: read the scan around the slices: ``True`` or ``"volume"`` (the YAML's spelling),
    ``False`` or ``"none"``, or None (when the model reads context, as it was trained); asking for
    the scan with a model that does not read it is an error. ``all_pieces``: keep the pieces of
    the prediction that touch no drawn mask (removed by default, counted in
    ``prediction.pieces_removed``); ``beyond_scan``: keep the surface past the scan's field of
    view (cut and closed there by default, as the mask is). ``extent_mm``: a class's frame
    extent (mm; as ``data.frame.extent_mm``), for a class the model stores none of.
    ``adapt_steps``: test-time LoRA on the request's own slices before it is reconstructed
    (`lora_sam3d.models.test_time`: each step predicts one drawn slice from the others; two slices
    or more; the model is restored after), at ``adapt_lr``.
    """
    network, contract = _model_and_contract(model, data)
    item = PredictItem(
        str(image), str(mask), class_name, axis, index, position_mm, label_value, slices and list(slices)
    )
    use = _reads_scan(context, network.config.context.read)
    requests = PredictionDataset.from_settings(
        [item], contract, extent_mm, context="volume" if use else "none", all_pieces=all_pieces,
        beyond_scan=beyond_scan,
    )  # fmt: skip
    requests.check_view_counts(contract.views, None)
    batch = collate([requests[0]])
    rec, losses = _run(network, batch, adapt_steps, adapt_lr)
    (record,) = prediction_records(rec, batch, nsd_tolerance_mm, network.config.context.read)
    assert record.source_image is not None
    surface = record.mesh.smoothed(smooth_iterations)
    on_scan = mask_on_source_grid(record.sdf, record.frame_to_world, record.source_image, record.on_scan)
    return Reconstructed(record.stem, surface, on_scan, record, losses)


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
