"""`DataLink`: the one place the data module and the LightningModule meet.

The two sides never read each other (no ``trainer.datamodule`` in the module, no
``trainer.lightning_module`` in the data module). What one needs of the other passes here, once per
run: the data module's contract (classes, frame extents of the training split, how scans are read)
goes to the module in ``fit``, to be stored in its manifest; outside ``fit``, the model's stored
contract (an adapter folder's, or a checkpoint's once Lightning has restored it) goes to the data
module, so requests are read the way the model was trained. The module installs it itself
(`LoRAMeshDecoderModule.configure_callbacks`), so Python users of ``Trainer`` get it as the command does.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from lora_sam3d.data import DataError

__all__ = ["DataLink", "check_data_agrees"]


def check_data_agrees(
    data: Any, resolution: int, classes: list[str], context: bool = False, tissue: bool | None = None
) -> None:
    """The data module's resolution and class list (its hyper-parameters ``data``) must be the model's,
    scan context is given only to a model that reads it, and (``tissue`` given: in ``fit``; requests
    follow the model's stored contract) the tissue model's channel exactly to a model that reads it."""
    source = (data.get("context") or {}).get("source")
    tissue_model = (data.get("context") or {}).get("tissue_model") or "none"
    if tissue is not None and (tissue_model != "none") != tissue:
        raise ValueError(
            f"data.context.tissue_model is {tissue_model} but model.context.tissue is {str(tissue).lower()}: "
            "give the model the tissue model's channel exactly when the data computes it (forest with true, none with false)"
        )
    data_resolution = (data.get("frame") or {}).get("resolution")
    if source == "volume" and not context:
        raise ValueError(
            "data.context.source is volume but this model does not read context (model.context.read: false; a "
            "checkpoint or adapter trained without the scan): use data.context.source: none, or train with model.context.read: true"
        )
    if data_resolution not in (None, resolution):
        raise ValueError(
            f"data resolution {data_resolution} differs from the decoder's resolution {resolution}: "
            "set data.frame.resolution and model.decoder.resolution to the same value"
        )
    if data.get("classes") is not None and list(data["classes"]) != classes:
        raise ValueError(
            f"model.classes {classes} differ from data.classes {list(data['classes'])}: the class "
            "indices would not match (the command links them; give both the same list)"
        )


class DataLink(L.Callback):
    """See the module docstring. Data modules other than `TSDataModule` (no ``contract``) are left alone."""

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        data = trainer.datamodule
        if not hasattr(data, "contract"):
            return
        pl_module.configure_adapters()  # an adapter folder's contract is known from here on
        context = pl_module.model.config.context
        tissue = context.tissue if stage == "fit" else None
        check_data_agrees(data.hparams, pl_module.resolution, pl_module.classes, context.read, tissue)
        if stage == "fit":
            pl_module.data_contract = data.contract().to_dict()
            return
        if pl_module.bank is not None:  # model.finetune.adapters: every request's class has its adapter
            for k, name in enumerate(data.request_classes(), start=1):
                try:
                    pl_module.bank.key_for(name)
                except ValueError as err:
                    raise DataError(f"predict item {k}: {err}") from None
        data.use_trained_contract(pl_module.data_contract)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """After the module read the checkpoint's manifest (``--ckpt_path``), before any dataloader."""
        data = trainer.datamodule
        if hasattr(data, "use_trained_contract"):
            data.use_trained_contract(pl_module.data_contract)
