"""`Session`: one model and one scan, answering drawing after drawing (a viewer's labels layer).

The scan is read once (a file, a DICOM folder, an image or an array), its modality decided and its
normalised image resampled to the model's grid once, and the model kept in eval mode; each drawing
then costs its own slices, the model and the outputs. The same code as `lora_sam3d.reconstruct`,
which a session calls with its kept scan.
"""

from __future__ import annotations

import tempfile
from types import TracebackType
from typing import Any

import numpy as np

from lora_sam3d.predict.api import Reconstructed, _model_and_contract, reconstruct
from lora_sam3d.predict.next_slice import where_to_draw
from lora_sam3d.predict.user_inputs import Scan, read_scan, scan_file

__all__ = ["Session"]


class Session:
    """``Session(model, scan)``; ``session.reconstruct(drawing, class_name=None, label_value=None)``.

    ``drawing``: a 3D label array on the scan's grid (painted on a few slices, any axes), or what
    `reconstruct` takes as a mask with ``slices=``/``index=``. Options of `reconstruct` pass through
    (``truth=`` a 3D mask to score against, ``context=``, ...). Close it (or use ``with``) to remove
    the copy of an in-memory scan it keeps on disk.
    """

    def __init__(self, model: Any, scan: Scan, data: Any = None) -> None:
        self.network, self.contract = _model_and_contract(model, data)
        self.network.eval()
        self.image, name = read_scan(scan)
        self._folder = tempfile.TemporaryDirectory(prefix="lora-sam3d-session-")
        self.path = scan_file(scan, self.image, name, self._folder.name)  # an in-memory scan written once
        self.cache: dict[str, dict[str, Any]] = {}

    def reconstruct(
        self, drawing: Any, class_name: str | None = None, label_value: int | None = None, **options: Any
    ) -> Reconstructed:
        """The structure drawn (`reconstruct` on the session's scan, its reading and image kept), and
        where to draw next (``result.next_slice``, `where_to_draw`)."""
        result = reconstruct(
            self.network, self.path, drawing, class_name, label_value=label_value, data=self.contract,
            scan_cache=self.cache, **options,
        )  # fmt: skip
        result.next_slice = where_to_draw(
            np.asanyarray(result.mask.dataobj), result.mask.affine, result.slices
        )
        return result

    def close(self) -> None:
        self._folder.cleanup()

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
