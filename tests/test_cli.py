"""End to end through the real `lora-sam3d` command (subprocesses): fit, resume, validate, predict, export."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from lora_sam3d.data import HEART_CLASSES, discover_cases

CONFIG = """
seed_everything: 0
trainer:
  max_epochs: {epochs}
  accelerator: cpu
  devices: 1
  deterministic: true
  default_root_dir: {out}
  limit_train_batches: 3
  limit_val_batches: 2
  log_every_n_steps: 1
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {out}}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {out}/checkpoints, save_last: true, save_top_k: -1, filename: "{{epoch}}"}}
    - class_path: lora_sam3d.callbacks.AdapterCheckpoint
    - class_path: lora_sam3d.callbacks.MeshPredictionWriter
      init_args: {{output_dir: {out}/predictions}}
model:
  decoder: {{resolution: 8, model_channels: 96, num_blocks: 2, num_heads: 4, num_groups: 12}}
  finetune: {finetune}
  optimizer:
    class_path: torch.optim.AdamW
    init_args: {{lr: 0.003}}
data:
  root: {data}
  classes: [heart_ventricle_left, heart_myocardium]
  batch_size: 2
  spacing: 2.0
  phantoms: {{n_cases: 4, shape: [48, 48, 32]}}
  eval_sampling: central
  samples_per_class: 2
"""


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "lora_sam3d.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=cwd,
    )


def write_config(tmp: Path, name: str, epochs: int = 1, finetune: str = "lora") -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(CONFIG.format(epochs=epochs, out=tmp / name, data=tmp / "data", finetune=finetune))
    return path


def first_step_loss(metrics_csv: Path, step: int) -> float:
    with metrics_csv.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss") and int(r["step"]) == step]
    return float(rows[0]["train/loss"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    result = run("fit", "--config", str(write_config(tmp, "run", epochs=2)))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp


def test_fit_writes_small_lora_checkpoints_and_adapters(trained: Path) -> None:
    ckpt_dir = trained / "run" / "checkpoints"
    ckpt = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    keys = set(ckpt["state_dict"])
    assert keys and all(".lora_A" in k or ".lora_B" in k for k in keys), sorted(keys)[:5]
    assert ckpt["lora_sam3d"]["finetune"] == "lora" and len(ckpt["lora_sam3d"]["base_fingerprint"]) == 64
    full = run("fit", "--config", str(write_config(trained, "full", epochs=1, finetune="full")))
    assert full.returncode == 0, full.stderr[-3000:]
    full_ckpt = torch.load(
        trained / "full" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    lora_bytes = sum(v.numel() * v.element_size() for v in ckpt["state_dict"].values())
    full_bytes = sum(v.numel() * v.element_size() for v in full_ckpt["state_dict"].values())
    assert lora_bytes <= 0.02 * full_bytes, (lora_bytes, full_bytes)
    for name in ("adapter-last", "adapter-best"):
        assert (ckpt_dir / name / "adapter_model.safetensors").is_file()
        assert json.loads((ckpt_dir / name / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_resume_gives_the_same_next_step_loss(trained: Path) -> None:
    # "run" trained 2 epochs of 3 steps; resume a 1-epoch run from its epoch-0 checkpoint.
    resumed = run(
        "fit", "--config", str(write_config(trained, "resumed", epochs=2)),
        "--ckpt_path", str(trained / "run" / "checkpoints" / "epoch=0.ckpt"),
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    uninterrupted = first_step_loss(next((trained / "run").glob("lightning_logs/*/metrics.csv")), 3)
    after_resume = first_step_loss(next((trained / "resumed").glob("lightning_logs/*/metrics.csv")), 3)
    assert after_resume == pytest.approx(uninterrupted, rel=1e-5, abs=1e-7)


def test_validate_and_predict_write_metrics_meshes_and_masks(trained: Path) -> None:
    cfg, ckpt = str(trained / "run.yaml"), str(trained / "run" / "checkpoints" / "last.ckpt")
    val = run("validate", "--config", cfg, "--ckpt_path", ckpt)
    assert val.returncode == 0, val.stderr[-3000:]
    pred = run("predict", "--config", cfg, "--ckpt_path", ckpt)
    assert pred.returncode == 0, pred.stderr[-3000:]
    out = trained / "run" / "predictions"
    summary = json.loads((out / "metrics.json").read_text())
    assert (
        summary["samples"]
        and np.isfinite(summary["mean"]["dice"])
        and np.isfinite(summary["mean"]["hd95_mm"])
    )
    pngs, masks = sorted(out.glob("*.png")), sorted(out.glob("*_mask.nii.gz"))
    assert len(pngs) == len(summary["samples"]) == len(masks)
    case = discover_cases(trained / "data", HEART_CLASSES)[-1]
    src = nib.load(str(case.image))
    corners = np.array(
        [
            [i, j, k, 1]
            for i in (0, src.shape[0] - 1)
            for j in (0, src.shape[1] - 1)
            for k in (0, src.shape[2] - 1)
        ]
    )
    world = (src.affine @ corners.T)[:3]
    lo, hi = world.min(1) - 1e-3, world.max(1) + 1e-3
    meshes = sorted(out.glob("*.ply"))
    for mesh_path in meshes:
        import trimesh

        data = mesh_path.read_bytes()
        assert b"comment SPACE=RAS" in data[:200]
        mesh = trimesh.load(mesh_path, process=False)
        assert np.all(mesh.vertices >= lo) and np.all(mesh.vertices <= hi), (
            "vertices inside the scan's world box"
        )
    mask = nib.load(str(masks[0]))
    assert mask.shape == src.shape and np.allclose(mask.affine, src.affine)


def test_export_merges_and_matches_the_lora_model(trained: Path) -> None:
    from safetensors.torch import load_file

    from lora_sam3d.data import TS_SAM3D_Dataset, collate
    from lora_sam3d.models import SLatMeshDecoder, vertex_sdf_grid
    from lora_sam3d.module import LoRAMeshDecoderModule

    ckpt = trained / "run" / "checkpoints" / "last.ckpt"
    result = run("export", "--ckpt_path", str(ckpt), "--output", str(trained / "export"))
    assert result.returncode == 0, result.stderr[-3000:]
    module = LoRAMeshDecoderModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    merged = SLatMeshDecoder(**module.decoder_config)
    merged.load_state_dict(load_file(str(trained / "export" / "decoder-merged.safetensors")))
    ds = TS_SAM3D_Dataset(trained / "data", ["heart_ventricle_left"], split="val", resolution=8, spacing=2.0,
                          slice_sampling_method="central", cache_dir=trained / "data" / ".cache")  # fmt: skip
    batch = collate([ds[0], ds[1]])
    with torch.no_grad():
        lora_out = module(batch)
        merged_out = vertex_sdf_grid(merged(module.encoder(batch)), 32)
    torch.testing.assert_close(merged_out, lora_out, rtol=1e-4, atol=1e-5)
    assert (trained / "export" / "adapter" / "adapter_model.safetensors").is_file()


def test_errors_are_one_line(tmp_path: Path) -> None:
    missing = run("fit", "--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode != 0 and "nope.yaml" in missing.stderr and "Traceback" not in missing.stderr
    cfg = yaml.safe_load(
        CONFIG.format(epochs=1, out=tmp_path / "o", data=tmp_path / "nodata", finetune="lora")
    )
    cfg["data"]["phantoms"] = None
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    bad = run("fit", "--config", str(tmp_path / "bad.yaml"))
    assert bad.returncode == 2 and "data root" in bad.stderr and "nodata" in bad.stderr
    last = bad.stderr.strip().splitlines()[-1]
    assert "Traceback" not in bad.stderr and last.startswith("lora-sam3d: error: DataError: data root"), (
        bad.stderr
    )
    wrong_key = run("fit", "--config", str(tmp_path / "bad.yaml"), "--model.rank", "4")
    assert wrong_key.returncode != 0 and "rank" in wrong_key.stderr and "Traceback" not in wrong_key.stderr
    no_ckpt = run("export", "--ckpt_path", str(tmp_path / "x.ckpt"), "--output", str(tmp_path / "e"))
    assert no_ckpt.returncode == 2 and "x.ckpt does not exist" in no_ckpt.stderr


def test_phantoms_command(tmp_path: Path) -> None:
    result = run("phantoms", "--root", str(tmp_path / "d"), "--n-cases", "3", "--shape", "40", "40", "30")
    assert result.returncode == 0, result.stderr
    assert "wrote 3 heart phantoms" in result.stdout
    assert [c.split for c in discover_cases(tmp_path / "d", HEART_CLASSES)] == ["train", "val", "test"]


def test_ddp_fit_on_two_cpu_processes(tmp_path: Path) -> None:
    """Lightning's DDP (gloo) through the CLI: LoRA-only checkpoint, adapters written, finite synced metrics."""
    (tmp_path / "ddp.yaml").write_text((Path(__file__).parents[1] / "configs" / "ddp.yaml").read_text())
    cfg = write_config(tmp_path, "ddp", epochs=1)
    result = run("fit", "--config", str(cfg), "--config", str(tmp_path / "ddp.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert all(".lora_" in k for k in ckpt["state_dict"])
    assert (tmp_path / "ddp" / "checkpoints" / "adapter-last" / "adapter_model.safetensors").is_file()
    metrics = next((tmp_path / "ddp").glob("lightning_logs/*/metrics.csv"))
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("val/dice")]
    assert rows and np.isfinite(float(rows[-1]["val/dice"]))
    assert not list((tmp_path / "ddp" / "checkpoints").glob(".*.tmp*")), "no half-written files left"
