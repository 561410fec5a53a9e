"""Shared test set-up: the test helpers (`reference`, `faults`) importable, one run config, and the
cores shared out among pytest-xdist's workers.

`run_config` is the one small configuration every end-to-end test starts from (the demo's model at
a tiny data size); tests change what they are about and nothing else.
"""

from __future__ import annotations

import os


def _share_the_cores() -> None:
    """Under ``pytest -n N`` each worker (and every process it starts: the command, DDP ranks, the
    cache builder) gets ``cores / N`` threads for torch and for numpy's BLAS. Left alone, every
    process takes all cores and the workers' thread pools fight for them: the suite took 10 min on
    2 cores instead of 5. Set before numpy and torch are imported, which read it once."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, str(max(1, cores // workers)))


_share_the_cores()

import sys  # noqa: E402 (the threads are set before numpy and torch load)
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from lora_sam3d.data.settings import DataSettings  # noqa: E402
from lora_sam3d.settings.old_keys import upgrade  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))


TEST_CLASSES = ["heart_ventricle_left", "heart_myocardium"]
SHAPES = {"checkpoint": "builtin:shapes"}
"""``model.base`` of the shipped base most tests adapt."""
SCAN = {"read": True, "conditioning": True}
"""``model.context`` of a model that reads the scan at stage 1 and every decoder level."""
TEST_DECODER = {"resolution": 16, "model_channels": 64, "num_blocks": 4, "num_heads": 4, "num_groups": 8}


def data_groups(**flat: Any) -> dict[str, Any]:
    """The tests' shorthand for `TSDataModule`'s groups: the flat names put in their groups (as
    `data_settings`), to pass as keywords."""
    return upgrade(flat, "data", warn=False)


def data_settings(**flat: Any) -> DataSettings:
    """The tests' shorthand for `DataSettings`: the flat names (``resolution=8, spacing=2.0``) put in
    their groups by the old-key table (`lora_sam3d.settings.old_keys.DATA_KEYS`), without its warning."""
    return DataSettings.from_dict(upgrade(flat, "data", warn=False))


def run_config(out: Path | str, data: Path | str, epochs: int = 1, quiet: bool = False) -> dict[str, Any]:
    """A complete `lora-sam3d` config writing under ``out`` and reading (or writing phantoms to) ``data``.

    ``quiet``: one training and one validation batch, no logger, progress bar or PNGs (for runs
    that exist only to fail or to be read back); otherwise a CSV logger, three training batches,
    a checkpoint per epoch and phantoms written when ``data`` is empty.
    """
    callbacks: list[dict[str, Any]] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": f"{out}/checkpoints", "save_last": True}},
        {"class_path": "lora_sam3d.callbacks.AdapterCheckpoint"},
        {"class_path": "lora_sam3d.callbacks.MeshPredictionWriter",
         "init_args": {"output_dir": f"{out}/predictions"}},
    ]  # fmt: skip
    trainer: dict[str, Any] = {
        "max_epochs": epochs, "accelerator": "cpu", "devices": 1, "default_root_dir": str(out),
        "enable_model_summary": False, "callbacks": callbacks,
        "num_sanity_val_steps": 0,  # every run validates after its epoch; the sanity pass would only repeat it
    }  # fmt: skip
    data_cfg: dict[str, Any] = {
        "root": str(data), "classes": list(TEST_CLASSES), "loader": {"batch_size": 2},
        "preprocessing": {"spacing_mm": 2.0}, "sampling": {"eval": "central"},
    }  # fmt: skip
    model: dict[str, Any] = {
        "decoder": dict(TEST_DECODER),
        "base": {"checkpoint": "builtin:shapes"},
        "finetune": {"mode": "lora"},
    }
    if quiet:
        trainer |= {
            "limit_train_batches": 1,
            "limit_val_batches": 1,
            "enable_progress_bar": False,
            "logger": False,
        }
        callbacks[2]["init_args"]["write_png"] = False
        data_cfg["sampling"]["samples_per_class"] = 1
    else:
        trainer |= {"deterministic": True, "limit_train_batches": 3, "limit_val_batches": 2, "log_every_n_steps": 1,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out)}}}  # fmt: skip
        callbacks[0]["init_args"] |= {"save_top_k": -1, "filename": "{epoch}"}
        model["optimizer"] = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003}}
        data_cfg.setdefault("cases", {})["phantoms"] = {"n_cases": 4, "shape": [48, 48, 32]}
        data_cfg["sampling"]["samples_per_class"] = 2
    return {"seed_everything": 0, "trainer": trainer, "model": model, "data": data_cfg}


def write_yaml(cfg: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def config_file(tmp_path: Path) -> Callable[..., Path]:
    """``config_file(name, edit=None, **run_config_args)``: `run_config` under ``tmp_path/name``,
    changed by ``edit(cfg)``, written to ``tmp_path/name.yaml``."""

    def make(name: str, edit: Callable[[dict[str, Any]], None] | None = None, **kw: Any) -> Path:
        kw.setdefault("data", tmp_path / "data")
        cfg = run_config(tmp_path / name, **kw)
        if edit is not None:
            edit(cfg)
        return write_yaml(cfg, tmp_path / f"{name}.yaml")

    return make


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 48 x 48 x 32 heart phantoms, written once per session. Shared: tests read them (their
    cache entries are shared as any data root's are) and copy them before breaking anything."""
    from lora_sam3d.data import write_phantoms

    root = tmp_path_factory.mktemp("phantoms") / "data"
    write_phantoms(root, n_cases=4, shape=(48, 48, 32))
    return root


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory: pytest.TempPathFactory, phantoms: Path) -> Path:
    """A real two-epoch LoRA fit through the command on `phantoms` (`run_config`), once per session:
    ``checkpoints/{epoch=0,epoch=1,last}.ckpt``, ``checkpoints/adapter-{last,best}/``, ``lightning_logs``.
    Tests read it; a test that writes beside it uses its own folder."""
    from lora_sam3d.cli import main

    out = tmp_path_factory.mktemp("lora-run")
    config = write_yaml(run_config(out / "run", phantoms, epochs=2), out / "run.yaml")
    assert main(["fit", "--config", str(config)]) == 0
    return out / "run"


def write_dicom_series(image: Any, folder: Path) -> Path:
    """``image`` (a nibabel image in RAS, axis-aligned) as a DICOM series, slice by slice by SimpleITK
    (LPS, one series UID, instance numbers): what a scanner or PACS export gives."""
    import nibabel as nib
    import numpy as np
    import SimpleITK as sitk

    canonical = nib.as_closest_canonical(image)
    values = np.asarray(canonical.dataobj).astype(np.int16)
    spacing = np.linalg.norm(canonical.affine[:3, :3], axis=0)
    folder.mkdir(parents=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ canonical.affine  # DICOM's patient axes
    for k in range(values.shape[2]):
        plane = sitk.GetImageFromArray(values[:, :, k].T[None])  # SimpleITK's (z, y, x)
        plane.SetSpacing(tuple(float(v) for v in spacing))
        plane.SetOrigin(tuple(float(v) for v in lps[:3, 3] + lps[:3, 2] * k))
        plane.SetDirection(tuple(float(v) for v in (lps[:3, :3] / spacing).ravel()))
        for tag, value in (
            ("0008|0060", "CT"),
            ("0020|000e", "1.2.826.0.1.3680043.2.1125.1"),
            ("0020|0013", str(k + 1)),
        ):
            plane.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(plane)
    return folder
