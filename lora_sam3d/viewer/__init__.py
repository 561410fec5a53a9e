"""The napari plugin ``lora-sam3d``: a reader that places NIfTI files and DICOM series in world mm,
and a dock widget that reconstructs what the user paints (`lora_sam3d.Session` behind it).

`reader` needs only nibabel; `widget` and `app` import napari and Qt, which come with the
``[napari]`` extra, so the core install stays free of Qt. The manifest is ``napari.yaml`` here.
"""

from lora_sam3d.viewer.reader import get_reader

__all__ = ["get_reader"]
