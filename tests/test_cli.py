"""End to end through the `lora-sam3d` command: the real process (`run`) where a test is about it (the command line, errors, kill -9, DDP), `main` in this process (`here`) for the other fits, validations, predictions and exports."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from conftest import TEST_DECODER, data_settings, run_config, write_yaml

from lora_sam3d.data import HEART_CLASSES, discover_cases

pytestmark = pytest.mark.e2e  # every test here runs the command end to end


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`lora-sam3d ARGS` in a fresh process; ``tests/`` is importable there for the fault callbacks."""
    tests = str(Path(__file__).parent)
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-m", "lora_sam3d.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=cwd,
    )


def here(*args: str) -> subprocess.CompletedProcess[str]:
    """`lora-sam3d ARGS` through `main` in this process (the same code as the command, without a new
    interpreter's start-up): for runs whose process boundary is not what a test is about."""
    import contextlib
    import io

    from lora_sam3d.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return subprocess.CompletedProcess(["lora-sam3d", *args], code, out.getvalue(), err.getvalue())


def write_config(tmp: Path, name: str, epochs: int = 1, finetune: str = "lora") -> Path:
    cfg = run_config(tmp / name, tmp / "data", epochs)
    cfg["model"]["finetune"] = {"mode": finetune}
    return write_yaml(cfg, tmp / f"{name}.yaml")


def variant_config(
    tmp: Path,
    name: str,
    file: str | None = None,
    callbacks: list[dict] = (),
    epochs: int = 2,
    checkpoint: dict | None = None,
    **data: object,
) -> Path:
    """The test config writing to ``tmp/name``, with extra callbacks, ModelCheckpoint and data settings."""
    cfg = run_config(tmp / name, tmp / "data", epochs)
    cfg["trainer"]["callbacks"][0]["init_args"].update(checkpoint or {})
    cfg["trainer"]["callbacks"] += list(callbacks)
    cfg["data"].update(data)
    return write_yaml(cfg, tmp / f"{file or name}.yaml")


def trained_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def first_step_loss(metrics_csv: Path, step: int) -> float:
    with metrics_csv.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss") and int(r["step"]) == step]
    return float(rows[0]["train/loss"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, lora_run: Path, phantoms: Path) -> Path:
    """A folder holding conftest's shared fit as ``run/`` (the fit ``write_config(tmp, "run",
    epochs=2)`` gives) and its phantoms as ``data/``: tests write their own runs beside them."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "run").symlink_to(lora_run, target_is_directory=True)
    (tmp / "data").symlink_to(phantoms, target_is_directory=True)
    write_config(tmp, "run", epochs=2)  # run.yaml, the config of that fit
    return tmp


def test_fit_writes_small_lora_checkpoints_and_adapters(trained: Path) -> None:
    ckpt_dir = trained / "run" / "checkpoints"
    ckpt = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    keys = set(ckpt["state_dict"])
    assert keys and all(".lora_A" in k or ".lora_B" in k for k in keys), sorted(keys)[:5]
    manifest = ckpt["lora_sam3d"]
    assert manifest["finetune"]["mode"] == "lora" and len(manifest["base_fingerprint"]) == 64
    assert manifest == json.loads((ckpt_dir / "adapter-last" / "model.json").read_text()) | {
        "trainable": manifest["trainable"]
    }  # one record for both (an adapter folder lists no trained tensor names)
    full = here("fit", "--config", str(write_config(trained, "full", epochs=1, finetune="full")))
    assert full.returncode == 0, full.stderr[-3000:]
    full_ckpt = torch.load(
        trained / "full" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    lora_bytes = sum(v.numel() * v.element_size() for v in ckpt["state_dict"].values())
    full_bytes = sum(v.numel() * v.element_size() for v in full_ckpt["state_dict"].values())
    # r=4 on to_qkv + to_out of the 64-channel shipped base: 2.5% (0.24% at Meta's size, see docs/benchmarks.md)
    decoder_lora, structure_lora = 4 * 4 * ((64 + 192) + (64 + 64)), 24_594  # rank 4 and rank 2 (stage 1)
    assert lora_bytes == 4 * (decoder_lora + structure_lora) and lora_bytes <= 0.05 * full_bytes
    for name in ("adapter-last", "adapter-best"):
        assert (ckpt_dir / name / "adapter_model.safetensors").is_file()
        assert json.loads((ckpt_dir / name / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_resume_gives_the_same_next_step_loss(trained: Path) -> None:
    # "run" trained 2 epochs of 3 steps; resume a 1-epoch run from its epoch-0 checkpoint.
    resumed = here(
        "fit", "--config", str(write_config(trained, "resumed", epochs=2)),
        "--ckpt_path", str(trained / "run" / "checkpoints" / "epoch=0.ckpt"),
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    uninterrupted = first_step_loss(next((trained / "run").glob("lightning_logs/*/metrics.csv")), 3)
    after_resume = first_step_loss(next((trained / "resumed").glob("lightning_logs/*/metrics.csv")), 3)
    assert after_resume == pytest.approx(uninterrupted, rel=1e-5, abs=1e-7)


def test_validate_and_predict_write_metrics_meshes_and_masks(trained: Path) -> None:
    cfg, ckpt = str(trained / "run.yaml"), str(trained / "run" / "checkpoints" / "last.ckpt")
    val = here("validate", "--config", cfg, "--ckpt_path", ckpt)
    assert val.returncode == 0, val.stderr[-3000:]
    pred = here("predict", "--config", cfg, "--ckpt_path", ckpt)
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
    import trimesh

    truths = sorted(out.glob("*_truth.ply"))
    assert truths
    offsets = []
    for truth_path in truths:
        pred_path = truth_path.with_name(truth_path.name.replace("_truth", ""))
        assert b"comment SPACE=RAS" in pred_path.read_bytes()[:200]
        truth = trimesh.load(truth_path, process=False)
        pred = trimesh.load(pred_path, process=False)
        # world mm, not voxel or frame units: the true surface lies in the scan, the predicted one near it
        assert np.all(truth.vertices >= lo) and np.all(truth.vertices <= hi), (
            "truth inside the scan's world box"
        )
        offsets.append(np.linalg.norm(pred.vertices.mean(0) - truth.vertices.mean(0)))
    # a few training steps: most centroids within a few voxels, none off by the scan's size
    assert np.median(offsets) < 10.0 and max(offsets) < 30.0, offsets
    mask = nib.load(str(masks[0]))
    assert mask.shape == src.shape and np.allclose(mask.affine, src.affine)

    # against the label files themselves, read by nibabel: every vertex of the true surface lies on the
    # label's border voxels in world mm (a RAS/LPS flip of both meshes would not), and each written mask
    # overlaps its label
    from scipy import ndimage
    from scipy.spatial import cKDTree

    cases = {c.case_id: c for c in discover_cases(trained / "data", HEART_CLASSES)}
    dices = []
    for row in summary["samples"]:
        stem = f"{row['case_id']}_{row['class_name']}_axis{row['axis']}_slice{row['grid_index']}"
        label_path = cases[row["case_id"]].image.parent / "segmentations" / f"{row['class_name']}.nii.gz"
        label = nib.load(str(label_path))
        inside = np.asarray(label.dataobj) > 0
        border = nib.affines.apply_affine(label.affine, np.argwhere(inside & ~ndimage.binary_erosion(inside)))
        truth = trimesh.load(out / f"{stem}_truth.ply", process=False)
        gap, _ = cKDTree(border).query(truth.vertices)
        voxel = float(np.linalg.norm(np.linalg.norm(label.affine[:3, :3], axis=0)))  # a voxel's diagonal, mm
        assert gap.max() <= voxel, (stem, gap.max(), voxel)
        predicted = np.asarray(nib.load(str(out / f"{stem}_mask.nii.gz")).dataobj) > 0
        dice = 2 * (predicted & inside).sum() / (predicted.sum() + inside.sum())
        assert dice > 0.3, (stem, dice)  # six training steps: a thin myocardium shell scores ~0.45
        assert dice == pytest.approx(row["dice"], abs=1e-6), "metrics.json scores exactly the written mask"
        dices.append(dice)
    assert np.mean(dices) > 0.5, dices


def test_a_checkpoint_defines_the_model_whatever_the_config_says(trained: Path) -> None:
    """With --ckpt_path, the model is built from the checkpoint's own hyper-parameters: a config asking
    for another rank and fine-tuning mode still predicts with the checkpoint's adapters."""
    cfg = yaml.safe_load((trained / "run.yaml").read_text())
    cfg["model"] |= {"finetune": {"mode": "full", "lora": {"rank": 8}}}
    cfg["trainer"]["callbacks"][2]["init_args"]["output_dir"] = str(trained / "disagreeing")
    path = write_yaml(cfg, trained / "disagreeing.yaml")
    done = here(
        "predict", "--config", str(path), "--ckpt_path", str(trained / "run" / "checkpoints" / "last.ckpt")
    )
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = yaml.safe_load((trained / "run.yaml").read_text())  # the run's own config, its own folder
    cfg["trainer"]["callbacks"][2]["init_args"]["output_dir"] = str(trained / "agreeing")
    ckpt = str(trained / "run" / "checkpoints" / "last.ckpt")
    assert (
        here(
            "predict", "--config", str(write_yaml(cfg, trained / "agreeing.yaml")), "--ckpt_path", ckpt
        ).returncode
        == 0
    )
    ours = json.loads((trained / "disagreeing" / "metrics.json").read_text())["mean"]
    reference = json.loads((trained / "agreeing" / "metrics.json").read_text())["mean"]
    assert ours["dice"] == pytest.approx(reference["dice"], abs=1e-6)


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (Path(__file__).parents[1] / "configs").glob("*.yaml"))
)
def test_every_shipped_config_parses(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    from lora_sam3d.cli import main

    configs = Path(__file__).parents[1] / "configs"
    add_on = name in ("ddp.yaml", "wide_band.yaml", "tissue_forest.yaml")  # add-ons to the demo's config
    extra = ["--config", str(configs / "demo.yaml")] if add_on else []
    with pytest.raises(SystemExit) as done:  # --print_config prints the parsed config and exits
        main(["fit", *extra, "--config", str(configs / name), "--print_config"])
    out = capsys.readouterr()
    assert done.value.code in (0, None), out.err[-2000:]
    data = yaml.safe_load(out.out)["data"]
    assert (data.get("predict") or {}).get("items") or (data["root"] and data["classes"]), (
        "a training config names its data, a predict config its requests"
    )


def test_export_merges_and_matches_the_lora_model(trained: Path) -> None:
    import reference
    from safetensors.torch import load_file

    from lora_sam3d.data import TS_SAM3D_Dataset, collate
    from lora_sam3d.models.structure import active_latent, surface_band
    from lora_sam3d.training.module import LoRAMeshDecoderModule

    ckpt = trained / "run" / "checkpoints" / "last.ckpt"
    result = here("export", "--ckpt_path", str(ckpt), "--output", str(trained / "export"))
    assert result.returncode == 0, result.stderr[-3000:]
    module = LoRAMeshDecoderModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    merged_file = trained / "export" / "decoder-merged.safetensors"
    # Meta's names: the decoder part loads, strictly, into Meta's own decoder class
    decoder_part = {k: v for k, v in load_file(str(merged_file)).items() if not k.startswith("structure.")}
    config = dict(module.model.decoder_config)
    meta = reference.build(num_groups=config.pop("num_groups"), **config)
    meta.load_state_dict(decoder_part)
    # the whole file is a complete base: both stages merged, no adapters
    merged = LoRAMeshDecoderModule(decoder=module.model.decoder_config, base={"checkpoint": str(merged_file)},
                                   classes=["heart_ventricle_left"]).eval()  # fmt: skip
    ds = TS_SAM3D_Dataset(trained / "data", ["heart_ventricle_left"], split="val", slice_sampling_method="central", settings=data_settings(resolution=16, spacing=2.0, cache_dir=trained / "data" / ".cache"))  # fmt: skip
    batch = collate([ds[0], ds[1]])
    with torch.no_grad():
        lora_out = module(batch).sdf
        merged_out = merged(batch).sdf  # the LightningModule reads the whole Batch
    torch.testing.assert_close(merged_out, lora_out, rtol=1e-4, atol=1e-4)
    # ... and computes there what the LoRA model computes, on the band stage 1 picks
    with torch.no_grad():
        logits, latent = module.model.structure(module.model.encoder(batch.evidence))
        x = active_latent(surface_band(logits > 0, 1), latent)
        ours = module.model.decoder(x)
    ref_feats, ref_coords = reference.run(meta, x.feats, x.coords)
    assert torch.equal(ours.coords, ref_coords.int())
    scale = ref_feats.abs().max().item()
    torch.testing.assert_close(ours.feats, ref_feats, rtol=1e-4, atol=1e-4 * scale)
    assert (trained / "export" / "adapter" / "adapter_model.safetensors").is_file()
    assert (trained / "export" / "adapter" / "structure" / "adapter_model.safetensors").is_file()


def test_errors_are_one_line(tmp_path: Path) -> None:
    """The real command's stderr: no traceback, our one line last (tests/test_bad_inputs.py checks 87
    more errors through `main` in this process)."""
    cfg = run_config(tmp_path / "o", tmp_path / "nodata")
    cfg["data"].setdefault("cases", {})["phantoms"] = None
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    bad = run("fit", "--config", str(tmp_path / "bad.yaml"))
    assert bad.returncode == 2 and "data root" in bad.stderr and "nodata" in bad.stderr
    last = bad.stderr.strip().splitlines()[-1]
    assert "Traceback" not in bad.stderr and last.startswith("lora-sam3d: error: DataError: data root"), (
        bad.stderr
    )
    no_ckpt = run("export", "--ckpt_path", str(tmp_path / "x.ckpt"), "--output", str(tmp_path / "e"))
    assert no_ckpt.returncode == 2 and "x.ckpt does not exist" in no_ckpt.stderr


def test_phantoms_command(tmp_path: Path) -> None:
    result = run("phantoms", "--root", str(tmp_path / "d"), "--n-cases", "3", "--shape", "40", "40", "30")
    assert result.returncode == 0, result.stderr
    assert "wrote 3 heart phantoms" in result.stdout
    assert [c.split for c in discover_cases(tmp_path / "d", HEART_CLASSES)] == ["train", "val", "test"]
    two = run(
        "phantoms",
        "--root",
        str(tmp_path / "w"),
        "--n-cases",
        "3",
        "--shape",
        "40",
        "40",
        "30",
        "--workers",
        "2",
    )
    assert two.returncode == 0, two.stderr
    files = sorted(p.relative_to(tmp_path / "d") for p in (tmp_path / "d").rglob("*.*"))
    assert len(files) == 19 and files == sorted(
        p.relative_to(tmp_path / "w") for p in (tmp_path / "w").rglob("*.*")
    )
    assert all((tmp_path / "d" / f).read_bytes() == (tmp_path / "w" / f).read_bytes() for f in files)


@pytest.mark.parametrize(
    ("fault", "every_step", "last_epoch"),
    [
        ({"at_step": 4}, False, 0),
        ({"in_save_of": "last.ckpt", "nth": 2}, False, 0),
        ({"at_step": 5}, True, 1),
    ],
    ids=["mid-epoch", "mid-checkpoint-write", "mid-epoch-with-step-checkpoints"],
)
def test_killed_run_resumes_to_the_uninterrupted_weights(
    trained: Path, fault: dict, every_step: bool, last_epoch: int
) -> None:
    """SIGKILL (kill -9) in epoch 1 of 2: at its second step, or while ``last.ckpt`` of epoch 1 is
    being written, or at its third step with a checkpoint after every step. ``--ckpt_path last``
    resumes from the last complete checkpoint (epoch 0's end, or mid-epoch 1 after its second
    batch) and ends on the weights of the uninterrupted run ("run", same config)."""
    name = "killed-" + "-".join(map(str, fault.values())) + ("-steps" if every_step else "")
    steps = {"every_n_train_steps": 1, "filename": "{epoch}-{step}"} if every_step else {}
    killing = variant_config(
        trained, name, f"{name}-kill", [{"class_path": "faults.Kill", "init_args": fault}], checkpoint=steps
    )
    killed = run("fit", "--config", str(killing))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpts = trained / name / "checkpoints"
    for path in ckpts.glob("[!.]*.ckpt"):  # whatever carries a checkpoint's name is complete
        torch.load(path, map_location="cpu", weights_only=True)
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == last_epoch
    at_kill = trained_tensors(ckpts / "last.ckpt")
    if "in_save_of" in fault:
        partial = list(ckpts.glob(".last.ckpt.*"))
        assert len(partial) == 1, "the half-written file sits beside, under a temporary name"
        with pytest.raises((RuntimeError, OSError)):  # truncated: torch refuses it
            torch.load(partial[0], map_location="cpu", weights_only=True)
    resumed = here(  # the kill needs its own process; the resume does not
        "fit", "--config", str(variant_config(trained, name, checkpoint=steps)), "--ckpt_path", "last"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final, reference = (
        trained_tensors(ckpts / "last.ckpt"),
        trained_tensors(trained / "run" / "checkpoints" / "last.ckpt"),
    )
    assert final.keys() == reference.keys()
    for key in reference:  # deterministic CPU run: equal up to float32 summation order
        torch.testing.assert_close(final[key], reference[key], rtol=0, atol=1e-6, msg=key)
    assert any(not torch.equal(final[k], at_kill[k]) for k in final), "training went on after the resume"


def logged(out: Path, prefix: str) -> dict[str, float]:
    """The last logged value of every metric starting with ``prefix`` in the run's metrics.csv."""
    values: dict[str, float] = {}
    for row in csv.DictReader(next(out.glob("lightning_logs/*/metrics.csv")).open()):
        values |= {k: float(v) for k, v in row.items() if k.startswith(prefix) and v}
    return values


def test_ddp_on_two_cpu_processes_equals_one_process(tmp_path: Path) -> None:
    """Lightning's DDP (gloo, 2 processes, batch 1 each) against one process with batch 2: DDP reduces
    only the LoRA tensors, the trained adapter is the same, and validation metrics and predictions
    cover each sample once and equal the one-process evaluation."""
    ddp = tmp_path / "ddp.yaml"
    ddp.write_text((Path(__file__).parents[1] / "configs" / "ddp.yaml").read_text())
    probe = {"class_path": "faults.DDPProbe", "init_args": {"path": str(tmp_path / "probe")}}
    one = here("fit", "--config", str(variant_config(tmp_path, "one", epochs=1, loader={"batch_size": 2})))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run("fit", "--config", str(variant_config(tmp_path, "two", callbacks=[probe], epochs=1, loader={"batch_size": 1})),
              "--config", str(ddp))  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]

    for rank in (0, 1):
        info = json.loads((tmp_path / f"probe-rank{rank}.json").read_text())
        assert info["wrapper"] == "DistributedDataParallel"
        assert (info["reduced_bytes"], info["reduced_tensors"]) == (
            info["trainable_bytes"],
            info["trainable_tensors"],
        )
        assert info["frozen_bytes"] > 20 * info["trainable_bytes"], "the frozen base is there but not reduced"
    ckpts = tmp_path / "two" / "checkpoints"
    assert (ckpts / "adapter-last" / "adapter_model.safetensors").is_file()
    assert not list(ckpts.glob(".*")), "no half-written files left"
    a, b = (
        trained_tensors(ckpts / "last.ckpt"),
        trained_tensors(tmp_path / "one" / "checkpoints" / "last.ckpt"),
    )
    assert a.keys() == b.keys() and all(".lora_" in k for k in a)
    # Same samples per step; float32 sums in another order, which Adam's g/sqrt(v) amplifies
    # (measured relative error <= 5e-4; |B| ~ 1e-2 after 3 steps).
    for key in a:
        error = float((a[key] - b[key]).norm() / b[key].norm())
        assert error < 1e-3 and float((a[key] - b[key]).abs().max()) < 1e-4, (key, error)

    ckpt = str(tmp_path / "one" / "checkpoints" / "last.ckpt")
    every = (
        "--trainer.limit_val_batches",
        "1.0",
        "--trainer.limit_predict_batches",
        "1.0",
        "--ckpt_path",
        ckpt,
    )
    # one class: the val/test split (one case x 3 axes) has 3 samples, which 2 processes cannot split
    # evenly, so a sampler that pads with repeats would count a sample twice
    results, summaries = {}, {}
    written = {"class_path": "faults.WrittenProbe", "init_args": {"path": str(tmp_path / "written")}}
    for name, extra in (("one-eval", []), ("two-eval", ["--config", str(ddp)])):
        cfg = ["--config", str(variant_config(tmp_path, name, epochs=1, loader={"batch_size": 2}, callbacks=[written],
                                              classes=["heart_ventricle_left"])), *extra]  # fmt: skip
        for command in ("validate", "predict"):  # one process's validation needs no process of its own
            done = (here if (name, command) == ("one-eval", "validate") else run)(command, *cfg, *every)
            assert done.returncode == 0, done.stderr[-3000:]
        summaries[name] = [
            line for line in (done.stdout + done.stderr).splitlines() if "predictions written" in line
        ]
        results[name] = (
            logged(tmp_path / name, "val/"),
            json.loads((tmp_path / name / "predictions" / "metrics.json").read_text())["samples"],
        )
    (val_one, pred_one), (val_two, pred_two) = results["one-eval"], results["two-eval"]
    counts = [line.split(": ", 1)[-1] for line in summaries["one-eval"] + summaries["two-eval"]]
    assert len(counts) == 2 and counts[0] == counts[1], "the summary counts every process's files"
    assert val_one.keys() == val_two.keys() and "val/dice" in val_one
    for key, value in val_one.items():
        assert val_two[key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), key
    assert len(pred_one) % 2 == 1, "an odd number of samples"
    assert (
        len(pred_two) == len(pred_one) == len({(r["case_id"], r["class_name"], r["axis"]) for r in pred_two})
    )
    key = lambda r: (r["case_id"], r["class_name"], r["axis"], r["grid_index"])  # noqa: E731
    for r1, r2 in zip(sorted(pred_one, key=key), sorted(pred_two, key=key), strict=True):
        assert r1.keys() == r2.keys()
        for column, value in r1.items():  # every column, not only Dice
            expected = (
                value if isinstance(value, str) else pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True)
            )
            assert r2[column] == expected, (key(r1), column)
    by_rank = [set(json.loads((tmp_path / f"written-rank{r}.json").read_text())) for r in (0, 1)]
    assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1], "each file written by one process"
    samples = {p for p in by_rank[0] | by_rank[1] if p.endswith(".ply") and "_truth" not in p}
    assert len(samples) == len(pred_one), "every sample's mesh written once"
    assert not list((tmp_path / "two-eval" / "predictions").glob("metrics_rank*")), (
        "rank 0 writes the metrics"
    )


def new_scan(trained: Path) -> tuple[Path, Path, int]:
    """A scan from outside the training data folder (the test case's files, copied), its left-ventricle
    mask, and the file's axial slice through the ventricle's middle."""
    case = discover_cases(trained / "data", HEART_CLASSES)[-1]
    scan = trained / "new-scans" / "s0042"
    if not scan.is_dir():
        scan.mkdir(parents=True)
        shutil.copy(case.image, scan / "ct.nii.gz")
        shutil.copy(case.image.parent / "segmentations" / "heart_ventricle_left.nii.gz", scan / "lv.nii.gz")
    lv = np.asarray(nib.load(str(scan / "lv.nii.gz")).dataobj) > 0
    return scan / "ct.nii.gz", scan / "lv.nii.gz", int(np.flatnonzero(lv.any(axis=(0, 1))).mean())


def predict_only_config(trained: Path, name: str, items: list[dict], model: dict | None = None) -> Path:
    """What a user writes to reconstruct on a new scan: the requests and where outputs go; no data
    folder, no classes, no model sizes (the checkpoint or adapter carries them)."""
    writer = {"class_path": "lora_sam3d.callbacks.MeshPredictionWriter",
              "init_args": {"output_dir": str(trained / name), "write_png": False}}  # fmt: skip
    cfg = {"trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "callbacks": [writer],
                       "default_root_dir": str(trained / name)},
           "data": {"predict": {"items": items}}}  # fmt: skip
    if model:
        cfg["model"] = model
    return write_yaml(cfg, trained / f"{name}.yaml")


def test_a_checkpoint_or_an_adapter_alone_reconstructs_a_new_scan(trained: Path) -> None:
    """The training data folder is gone; the checkpoint (or the adapter folder) carries classes, frame
    extents, preprocessing and model settings. Outputs are named by the scan's case id and the
    viewer's slice name, and report.html shows them."""
    image, mask, z = new_scan(trained)
    item = {
        "image": str(image),
        "mask": str(mask),
        "axis": "axial",
        "index": z,
        "class_name": "heart_ventricle_left",
    }
    data = (trained / "data").resolve()  # the training data itself (the session's phantoms), not the link
    away = data.with_name(f"{data.name}-moved-away")
    data.rename(away)
    try:
        by_ckpt = here("predict", "--config", str(predict_only_config(trained, "scan-ckpt", [item])),
                      "--ckpt_path", str(trained / "run" / "checkpoints" / "last.ckpt"))  # fmt: skip
        adapter = {"finetune": {"adapter": str(trained / "run" / "checkpoints" / "adapter-last")}}
        by_adapter = here(
            "predict", "--config", str(predict_only_config(trained, "scan-adapter", [item], adapter))
        )
    finally:
        away.rename(data)
    assert by_ckpt.returncode == 0, by_ckpt.stderr[-3000:]
    assert by_adapter.returncode == 0, by_adapter.stderr[-3000:]
    stem = f"s0042_heart_ventricle_left_axial{z}"
    import trimesh

    meshes = [trimesh.load(trained / d / f"{stem}.ply", process=False) for d in ("scan-ckpt", "scan-adapter")]
    np.testing.assert_allclose(meshes[0].vertices, meshes[1].vertices, atol=1e-4)
    predicted = np.asarray(nib.load(trained / "scan-ckpt" / f"{stem}_mask.nii.gz").dataobj) > 0
    truth = np.asarray(nib.load(mask).dataobj) > 0
    dice = 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())
    with (trained / "scan-ckpt" / "metrics.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert (row["slice"], row["scored_against"]) == (f"axial{z}", "request mask"), "the viewer's slice name"
    assert float(row["dice"]) == pytest.approx(dice, abs=0.02), (
        "scored on the scan's grid against the 3D mask"
    )
    assert dice > 0.5, dice
    check_report(trained / "scan-ckpt", {stem: "request mask"})
    # the notebook call gives what the command wrote, for the same request
    import lora_sam3d
    from lora_sam3d.models import Reconstructor
    from lora_sam3d.training.module import LoRAMeshDecoderModule

    loaded = LoRAMeshDecoderModule.load_from_checkpoint(
        trained / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    models = {"scan-adapter": Reconstructor.from_adapter(adapter["finetune"]["adapter"]), "scan-ckpt": loaded}
    for folder, model in models.items():
        got = lora_sam3d.reconstruct(model, image, mask, "heart_ventricle_left", axis="axial", index=z)
        assert got.name == stem
        written = trimesh.load(trained / folder / f"{stem}.ply", process=False)
        np.testing.assert_allclose(got.mesh.vertices, written.vertices, atol=1e-5)
        on_disk = nib.load(trained / folder / f"{stem}_mask.nii.gz")
        assert np.array_equal(np.asarray(got.mask.dataobj), np.asarray(on_disk.dataobj))
        assert np.allclose(got.mask.affine, on_disk.affine)
        got.mesh.save(trained / folder / "again.stl", coordinate_system="LPS")
        assert (trained / folder / "again.stl").read_bytes()[:9] == b"SPACE=LPS"
    # context spelled as the YAML spells it; this model reads no scan, so "none" is its only reading
    args = (loaded, image, mask, "heart_ventricle_left")
    plain = lora_sam3d.reconstruct(*args, axis="axial", index=z, context="none")
    np.testing.assert_array_equal(plain.mesh.vertices, got.mesh.vertices)
    for bad, message in (("volume", "does not read"), ("yes", "'volume' or 'none'")):
        with pytest.raises(ValueError, match=message):
            lora_sam3d.reconstruct(*args, axis="axial", index=z, context=bad)


def check_report(folder: Path, scored: dict[str, str | None]) -> None:
    """report.html read as a browser would: self-contained, one 3D view entry per sample with the
    written mesh's vertex count, the truth when scored, the input slice as an image, the per-class
    plot when scored, and the table saying what each score is against."""
    import base64
    import io
    import re

    import trimesh
    from PIL import Image

    from lora_sam3d.predict.report import unpacked

    page = (folder / "report.html").read_text()
    assert 'src="http' not in page and "Plotly" in page, "self-contained: no network at view time"
    data = json.loads(
        re.search(r"<script type='application/json' id='report-data'>(.*?)</script>", page, re.S)[1]
    )
    assert sorted(e["stem"] for e in data) == sorted(scored)
    for e in data:
        written = trimesh.load(folder / f"{e['stem']}.ply", process=False)
        vertices, faces = unpacked(e["view"]["pred"])
        assert vertices.shape == written.vertices.shape and np.array_equal(faces, written.faces)
        np.testing.assert_allclose(vertices, written.vertices, atol=0.006)
        assert (e["view"]["truth"] is not None) == (scored[e["stem"]] is not None)
        png = Image.open(io.BytesIO(base64.b64decode(e["view"]["slice"].split(",", 1)[1])))
        views = e["slice_name"].count("+") + 1  # every input slice, 3 a row, 2 pixels apart
        per_row, n_rows = min(views, 3), -(-views // 3)
        side = (png.size[1] + 2) // n_rows - 2
        assert (
            png.mode == "RGB"
            and side >= 32
            and png.size == (per_row * (side + 2) - 2, n_rows * (side + 2) - 2)
        )
        if scored[e["stem"]]:
            assert f"(against the {scored[e['stem']]})" in e["metrics_text"]
            assert re.search(rf"<td>{re.escape(scored[e['stem']])}</td></tr>", page)
    assert ('id="per-class"' in page) == any(scored.values())
    if any(scored.values()):
        assert '"range":[0,1.02]' in page.replace(" ", ""), "the Dice axis spans 0..1"
    # plotly.js 3 drops string titles: the viewer's title and its world axes as {text: ...}
    assert "{title: {text: title" in page and all(f"title: {{text: '{a} (mm)'}}" in page for a in "RAS")
    assert '<div class="table">' in page, "the summary table scrolls in its own box, not the page"
    assert page.count("<option value=") == len(data) and page.count('id="surface"') == 1, "one live 3D view"


def test_one_adapter_per_structure_on_one_base(trained: Path) -> None:
    """Two adapters trained on different structures, routed by class in one predict run: each output
    equals its single-adapter run; export merges one chosen adapter on its own."""
    import trimesh

    adapters = {}
    for cls in ("heart_ventricle_left", "heart_myocardium"):
        name = f"only-{cls}"
        done = here("fit", "--config", str(variant_config(trained, name, epochs=1, classes=[cls])))
        assert done.returncode == 0, done.stderr[-3000:]
        adapters[cls] = str(trained / name / "checkpoints" / "adapter-last")
    image, lv, z = new_scan(trained)
    myo = trained / "data" / "s0004" / "segmentations" / "heart_myocardium.nii.gz"
    items = {"heart_ventricle_left": {"image": str(image), "mask": str(lv), "axis": "axial", "index": z,
                                      "class_name": "heart_ventricle_left"},
             "heart_myocardium": {"image": str(trained / "data" / "s0004" / "ct.nii.gz"), "mask": str(myo),
                                  "axis": "coronal", "index": 24, "class_name": "heart_myocardium"}}  # fmt: skip
    routed = predict_only_config(
        trained, "routed", list(items.values()), {"finetune": {"adapters": adapters}}
    )
    done = here("predict", "--config", str(routed))
    assert done.returncode == 0, done.stderr[-3000:]
    for cls, item in items.items():
        single = predict_only_config(
            trained, f"single-{cls}", [item], {"finetune": {"adapter": adapters[cls]}}
        )
        alone = here("predict", "--config", str(single))
        assert alone.returncode == 0, alone.stderr[-3000:]
        (path,) = [p for p in (trained / f"single-{cls}").glob("*.ply") if not p.name.endswith("_truth.ply")]
        ours = trimesh.load(trained / "routed" / path.name, process=False)
        np.testing.assert_allclose(ours.vertices, trimesh.load(path, process=False).vertices, atol=1e-5)
    exported = here(
        "export", "--adapter", adapters["heart_myocardium"], "--output", str(trained / "export-myo")
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    from lora_sam3d.data import PredictionDataset, collate
    from lora_sam3d.models import ModelConfig, Reconstructor
    from lora_sam3d.models.adapters.files import read_model_file

    folder = adapters["heart_myocardium"]
    merged = Reconstructor(
        ModelConfig(
            TEST_DECODER, base={"checkpoint": str(trained / "export-myo" / "decoder-merged.safetensors")}
        )
    ).eval()
    adapted = Reconstructor.from_adapter(folder)
    item = items["heart_myocardium"]
    batch = collate([PredictionDataset.from_settings([item], read_model_file(folder)["data"])[0]])
    with torch.no_grad():
        torch.testing.assert_close(
            merged(batch.evidence).sdf, adapted(batch.evidence).sdf, rtol=1e-4, atol=1e-5
        )
