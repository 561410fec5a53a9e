"""Every bad input the data, model and CLI layers know of, fed through the `lora-sam3d` command
(and through the Python API for the mismatches the command cannot produce).

Each case breaks one thing in an otherwise good setup (phantom data, a trained LoRA checkpoint and
adapter, a full fine-tune checkpoint) and asserts what a user sees: exit status 2, one line
``lora-sam3d: error: ...`` (or jsonargparse's usage error for config keys and types) that names
the file, key or value and says what was expected; no traceback; no temporary file left behind;
and the files already written (checkpoints, adapters, earlier predictions) unchanged. The README's
reliability section counts these cases.

`main()` is called in this process: it is the console script's own entry point, and this keeps
some fifty runs of the CLI within seconds.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import pickle
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from conftest import TEST_DECODER, run_config, write_yaml

from lora_sam3d.cli import main
from lora_sam3d.data import write_phantoms

pytestmark = pytest.mark.e2e  # every test here runs the command end to end


@dataclass
class Setup:
    root: Path  # a folder of this test module
    data: Path  # good phantom data (4 cases)
    out: Path  # a trained LoRA run: checkpoints/last.ckpt, checkpoints/adapter-last/, predictions/
    full_ckpt: Path  # a full fine-tune's checkpoint

    @property
    def ckpt(self) -> Path:
        return self.out / "checkpoints" / "last.ckpt"

    @property
    def adapter(self) -> Path:
        return self.out / "checkpoints" / "adapter-last"

    def config(
        self,
        name: str,
        edit: Callable[[dict], None] | None = None,
        data: Path | None = None,
        own: bool = False,
    ) -> str:
        """A quiet run config named ``name``; it writes into the trained run's folder (so a failing
        run that touched anything there would show) unless ``own``."""
        cfg = run_config(self.root / name if own else self.out, data or self.data, quiet=True)
        if edit is not None:
            edit(cfg)
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    def broken_data(self, name: str, breaking: Callable[[Path], None]) -> Path:
        """A copy of the good data (two cases, no cache) with ``breaking(case s0001)`` applied."""
        root = self.root / f"data-{name}"
        shutil.copytree(self.data, root, ignore=shutil.ignore_patterns("s0003", "s0004", ".cache"))
        breaking(root / "s0001")
        return root


def cli(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # jsonargparse's usage errors
        code = exit_.code if isinstance(exit_.code, int) else 1
    return code, capsys.readouterr().err


def fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = tmp_path_factory.mktemp("bad")
    write_phantoms(root / "data", n_cases=4, shape=(48, 48, 32))
    s = Setup(root, root / "data", root / "good", root / "full" / "checkpoints" / "last.ckpt")
    assert main(["fit", "--config", s.config("good")]) == 0
    assert main(["predict", "--config", s.config("good"), "--ckpt_path", str(s.ckpt)]) == 0

    def full(cfg: dict) -> None:
        cfg["model"]["finetune"] = {"mode": "full"}

    assert main(["fit", "--config", s.config("full", full, own=True)]) == 0
    return s


# -- how to break things ----------------------------------------------------------------------------
def save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(data, affine), str(path))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_label(case: Path, change: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]) -> None:
    path = case / "segmentations" / "heart_myocardium.nii.gz"
    img = nib.load(str(path))
    save_nifti(*change(np.asarray(img.dataobj), img.affine.copy()), path)


def edit_image(case: Path, change: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]) -> None:
    path = case / "ct.nii.gz"
    img = nib.load(str(path))
    save_nifti(*change(np.asarray(img.dataobj), img.affine.copy()), path)


def shifted(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    affine[0, 3] += 5
    return data, affine


def with_nan(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    data = data.astype(np.float32)
    data[3, 3, 3] = np.nan
    return data, affine


def singular_affine(case: Path) -> None:
    img = nib.Nifti1Image(np.zeros((10, 10, 10), np.int16), None)
    singular = np.eye(4)
    singular[2, 2] = 0
    img.header.set_sform(singular, code=2)
    img.header.set_qform(np.eye(4), code=0)
    nib.save(img, str(case / "ct.nii.gz"))


def empty_label(case: Path) -> None:
    for other in case.parent.iterdir():
        if other.is_dir():
            edit_label(other, lambda d, a: (np.zeros_like(d), a))


DATA_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing image": (lambda c: (c / "ct.nii.gz").unlink(), r"case s0001: missing files .*s0001/ct\.nii\.gz"),
    "truncated image": (
        lambda c: truncate(c / "ct.nii.gz"),
        r"s0001/ct\.nii\.gz cannot be read \(truncated or corrupt\?\)",
    ),
    "not a NIfTI": (
        lambda c: (c / "ct.nii.gz").write_bytes(gzip.compress(b"not a nifti" * 50)),
        r"s0001/ct\.nii\.gz is not a readable NIfTI",
    ),
    "label shape": (
        lambda c: edit_label(c, lambda d, a: (d[:-2], a)),
        r"heart_myocardium\.nii\.gz has shape .* but image .*ct\.nii\.gz has",
    ),
    "label affine": (
        lambda c: edit_label(c, shifted),
        r"heart_myocardium\.nii\.gz and image .*ct\.nii\.gz lie on different grids: the same voxel lies up to [\d.]+ mm apart",
    ),
    "NaN voxels": (lambda c: edit_image(c, with_nan), r"ct\.nii\.gz has 1 NaN/inf voxels"),
    "fractional float label": (
        lambda c: edit_label(c, lambda d, a: (d.astype(np.float32) * 0.5, a)),
        r"heart_myocardium\.nii\.gz has \d+ voxels that are not integers \(e\.g\. \[0\.5\]\)",
    ),
    "NaN in a label": (
        lambda c: edit_label(c, with_nan),
        r"label .*heart_myocardium\.nii\.gz has 1 NaN/inf voxels: a mask must hold integers",
    ),
    "2D image": (
        lambda c: save_nifti(np.zeros((10, 10), np.int16), np.eye(4), c / "ct.nii.gz"),
        r"ct\.nii\.gz has shape \(10, 10\): expected a 3D volume",
    ),
    "4D image": (
        lambda c: save_nifti(np.zeros((10, 10, 10, 2), np.int16), np.eye(4), c / "ct.nii.gz"),
        r"ct\.nii\.gz has shape \(10, 10, 10, 2\): expected a 3D volume",
    ),
    "singular affine": (singular_affine, r"ct\.nii\.gz has a non-invertible or non-finite affine"),
    "bad split in meta.csv": (
        lambda c: (c.parent / "meta.csv").write_text("image_id;split\ns0001;training\ns0002;val\n"),
        r"meta\.csv line 2: split 'training' for 's0001'",
    ),
    "an id twice in meta.csv with other splits": (
        lambda c: (c.parent / "meta.csv").write_text("image_id;split\ns0001;train\ns0002;val\ns0001;test\n"),
        r"meta\.csv: image_id 's0001' is listed twice with different splits: 'train' on line 2, 'test' on line 4",
    ),
    "class empty in every training case": (
        empty_label,
        r"classes \['heart_myocardium'\] have no voxels in any training case",
    ),
    "no cases": (
        lambda c: [shutil.rmtree(p) for p in c.parent.iterdir() if p.is_dir()],
        r"no cases found in .*data-no-cases",
    ),
}


@pytest.mark.parametrize("name", list(DATA_CASES))
def test_bad_data(setup: Setup, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    breaking, pattern = DATA_CASES[name]
    data = setup.broken_data(name.replace(" ", "-"), breaking)
    before = fingerprint(setup.out)
    expect_error(
        setup,
        cli("fit", "--config", setup.config(f"run-{name.replace(' ', '-')}", data=data), capsys=capsys),
        pattern,
    )
    assert fingerprint(setup.out) == before, "a failed run changed the trained run's files"


def expect_error(setup: Setup, result: tuple[int, str], pattern: str) -> None:
    """Exit status 2, and the last line of stderr is our one-line error matching ``pattern``; no
    temporary file left anywhere under the test folder."""
    code, err = result
    assert code == 2, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert last.startswith("lora-sam3d: error: "), f"not our one-line error: {err[-1500:]!r}"
    assert re.search(pattern, last), f"{pattern!r} not in the last line {last!r}"
    assert_no_leftovers(setup.root)


def assert_no_leftovers(root: Path) -> None:
    leftovers = [p for p in root.rglob(".*") if ".tmp" in p.name or p.name.endswith(".removing")]
    assert not leftovers, f"half-written files left: {leftovers}"


def set_in(*keys_value: object) -> Callable[[dict], None]:
    *keys, value = keys_value

    def edit(cfg: dict) -> None:
        node = cfg
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value

    return edit


def broken_copy(setup: Setup, src: Path, name: str, breaking: Callable[[Path], None]) -> Path:
    dst = setup.root / "broken" / name / src.name
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    breaking(dst)
    return dst


class RunsCode:
    """A pickle that would create a marker file when unpickled: loading must refuse it."""

    marker = ""

    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(self.marker),))


def code_pickle(path: Path) -> None:
    RunsCode.marker = str(path.with_suffix(".ran"))
    with path.open("wb") as f:
        pickle.dump({"state_dict": RunsCode()}, f)


def fit_with(setup: Setup, name: str, edit: Callable[[dict], None]) -> list[str]:
    return ["fit", "--config", setup.config(name, edit)]


def predict_from(
    setup: Setup, name: str, ckpt: Path | str, edit: Callable[[dict], None] | None = None
) -> list[str]:
    """``predict`` from ``ckpt`` with the quiet config (changed by ``edit``), writing predictions to
    a folder of its own (the trained run's folder holds the outputs of the set-up's predict)."""

    def own_folder(cfg: dict) -> None:
        writer = next(
            c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("MeshPredictionWriter")
        )
        writer["init_args"]["output_dir"] = str(setup.root / name / "predictions")
        if edit is not None:
            edit(cfg)

    return ["predict", "--config", setup.config(name, own_folder), "--ckpt_path", str(ckpt)]


def with_adapter(adapter: Path) -> Callable[[dict], None]:
    return set_in("model", "adapter", str(adapter))


def broken_yaml(s: Setup) -> Path:
    path = s.root / "broken.yaml"
    path.write_text(Path(s.config("y")).read_text().replace("model:", "model: [", 1))
    return path


def predict_items(
    s: Setup,
    name: str,
    workers: int = 0,
    ckpt: Path | str | None = "trained",
    model: dict | None = None,
    root: object = "data",
    twice: bool = False,
    modality: str | None = None,
    extent: dict | None = None,
    used_folder: bool = False,
    **change: object,
) -> list[str]:
    """``predict`` on a good request for test case s0004 (axial file slice 20 of its myocardium), with
    one field changed; from the trained checkpoint unless ``ckpt`` says otherwise."""
    small = s.root / "small.nii.gz"
    case = s.data / "s0004"
    if not small.exists():
        save_nifti(np.zeros((20, 20, 20), np.int16), np.eye(4), small)
        scan = nib.load(str(case / "ct.nii.gz"))
        save_nifti(np.zeros(scan.shape, np.uint8), scan.affine, s.root / "empty_mask.nii.gz")
        save_nifti(np.ones((10, 10), np.uint8), np.eye(4), s.root / "mask2d.nii.gz")
        labels = (
            np.asarray(nib.load(str(case / "segmentations" / "heart_myocardium.nii.gz")).dataobj) > 0
        ) * 1
        labels[
            np.asarray(nib.load(str(case / "segmentations" / "heart_ventricle_left.nii.gz")).dataobj) > 0
        ] = 2
        save_nifti(labels.astype(np.uint8), scan.affine, s.root / "label_map.nii.gz")
    item = {"image": str(case / "ct.nii.gz"), "mask": str(case / "segmentations" / "heart_myocardium.nii.gz"),
            "axis": "axial", "index": 20, "class_name": "heart_myocardium"} | change  # fmt: skip

    def edit(cfg: dict) -> None:
        cfg["data"]["predict"] = {"items": [item, item] if twice else [item]}
        cfg["data"].setdefault("loader", {})["num_workers"] = workers
        if modality:
            cfg["data"]["preprocessing"]["modality"] = modality
        if extent:
            cfg["data"]["frame"] = {"extent_mm": extent}
        if root is None:  # a predict-only config: no data folder, no classes, no model settings
            del (
                cfg["data"]["root"],
                cfg["data"]["classes"],
                cfg["model"]["base"]["checkpoint"],
                cfg["model"]["decoder"],
            )
        cfg["model"].update(model or {})
        # each request writes a folder of its own, but the one about the trained run's (holding its predict)
        writer = next(
            c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("MeshPredictionWriter")
        )
        writer["init_args"]["output_dir"] = str(
            s.out / "predictions" if used_folder else s.root / name / "predictions"
        )

    if ckpt is None:
        return ["predict", "--config", s.config(name, edit)]
    return predict_from(s, name, s.ckpt if ckpt == "trained" else ckpt, edit)


def text_file(s: Setup) -> Path:
    path = s.root / "notes.ckpt"
    path.write_text("training notes: lr 3e-3, 6 epochs\n")
    return path


def nan_voxel(path: Path) -> None:
    img = nib.load(str(path))
    data = np.asarray(img.dataobj).astype(np.float32)
    data[1, 1, 1] = np.nan
    save_nifti(data, img.affine, path)


def halved_mask(s: Setup) -> Path:
    """s0004's myocardium mask written as float 0.5 where the structure is."""
    src = nib.load(str(s.data / "s0004" / "segmentations" / "heart_myocardium.nii.gz"))
    path = s.root / "half.nii.gz"
    save_nifti((np.asarray(src.dataobj) > 0).astype(np.float32) * 0.5, src.affine, path)
    return path


def jpeg_mask(s: Setup) -> Path:
    from PIL import Image

    mask = np.asarray(nib.load(str(s.data / "s0004" / "segmentations" / "heart_myocardium.nii.gz")).dataobj)[
        :, :, 20
    ]
    path = s.root / "slice.jpg"
    Image.fromarray((mask > 0).astype(np.uint8) * 255).save(path)
    return path


def edited_adapter(s: Setup, name: str, edit: Callable[[dict], None]) -> Path:
    """A copy of the trained adapter folder ``name`` whose model.json ``edit`` changed (made once)."""
    folder = s.root / name
    if not folder.exists():
        shutil.copytree(s.adapter, folder)
        stored = json.loads((folder / "model.json").read_text())
        edit(stored)
        (folder / "model.json").write_text(json.dumps(stored))
    return folder


def moved_base_adapter(s: Setup) -> Path:
    """The trained adapter, its model.json naming a base file that has since moved away."""
    return edited_adapter(
        s,
        "adapter-moved",
        set_in("model", "base", {"checkpoint": str(s.root / "moved" / "shapes.safetensors")}),
    )


def edited_model_file(s: Setup) -> Path:
    """The trained adapter, its model.json edited to another decoder width than its base has."""
    return edited_adapter(s, "adapter-edited", set_in("model", "decoder", "model_channels", 128))


def no_contract(path: Path) -> None:
    """A checkpoint written before checkpoints stored their data settings."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["lora_sam3d"].pop("data")
    torch.save(ckpt, path)


def newer_manifest(path: Path) -> None:
    """A checkpoint as a later version of lora-sam3d might write it."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["lora_sam3d"]["version"] = 99
    torch.save(ckpt, path)


def no_manifest(path: Path) -> None:
    """A Lightning checkpoint of another project: no ``lora_sam3d`` section."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    del ckpt["lora_sam3d"]
    torch.save(ckpt, path)


def replaced_adapter(s: Setup) -> Path:
    """The adapter of a run on a base file changed since (see `base_replaced`)."""
    adapter = s.root / "replaced" / "checkpoints" / "adapter-last"
    if not adapter.is_dir():
        base_replaced(s)
    return adapter


def one_stage(path: Path) -> None:
    """What a checkpoint of the one-stage design holds: no design tag, decoder LoRA tensors only."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["lora_sam3d"].pop("design")
    ckpt["state_dict"] = {
        k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.decoder.")
    }
    hparams = ckpt["hyper_parameters"]
    for key in ("structure", "band"):
        hparams.pop(key, None)
    hparams["latent_band"] = None
    torch.save(ckpt, path)


def base_replaced(s: Setup) -> list[str]:
    """Fit on a copy of the shipped base, then change that file: its checkpoint no longer fits it."""
    from safetensors.torch import load_file, save_file

    from lora_sam3d.io.weights import resolve_checkpoint

    base = s.root / "replaced" / "shapes.safetensors"
    base.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(resolve_checkpoint("builtin:shapes"), base)
    assert (
        main(
            [
                "fit",
                "--config",
                s.config("replaced", set_in("model", "base", "checkpoint", str(base)), own=True),
            ]
        )
        == 0
    )
    weights = load_file(str(base))
    weights["out_layer.bias"] = weights["out_layer.bias"] + 0.01
    save_file(weights, str(base))

    def stored_base(cfg: dict) -> None:  # the checkpoint's own base path, as a predict config leaves it
        del cfg["model"]["base"]["checkpoint"]

    return predict_from(s, "replaced-predict", s.root / "replaced" / "checkpoints" / "last.ckpt", stored_base)


def rewrite_rank(adapter: Path, rank: int) -> None:
    path = adapter / "adapter_config.json"
    meta = json.loads(path.read_text())
    meta["r"] = rank
    meta["lora_sam3d"]["config"]["rank"] = rank
    path.write_text(json.dumps(meta))


RUN_CASES: dict[str, tuple[Callable[[Setup], list[str]], str]] = {
    # configuration
    "missing config file": (lambda s: ["fit", "--config", str(s.root / "nope.yaml")], r"nope\.yaml"),
    "wrong config key": (lambda s: ["fit", "--config", s.config("k"), "--model.rank", "4"], r"model\.rank"),
    "wrong value type": (
        lambda s: fit_with(s, "t", set_in("data", "loader", "batch_size", "eight")),
        r"\"data\.loader\.batch_size\":\s+Expected a <class 'int'>\. Got value: eight",
    ),
    "unknown fine-tuning mode": (
        lambda s: fit_with(s, "f", set_in("model", "finetune", "mode", "partial")),
        r"\"model\.finetune\.mode\":\s+Expected a typing\.Literal\['lora', 'full'\]\. Got value: partial",
    ),
    "unknown class name": (
        lambda s: fit_with(s, "c", set_in("data", "classes", ["heart_atrium_middle"])),
        r"missing files .*heart_atrium_middle\.nii\.gz",
    ),
    "unfreeze an absent module": (
        lambda s: fit_with(s, "u", set_in("model", "finetune", "unfreeze", ["head"])),
        r"model\.finetune\.unfreeze: the decoder has no module 'head'",
    ),
    "on_nonfinite value": (
        lambda s: fit_with(s, "n", set_in("model", "steps", "on_nonfinite", "ignore")),
        r"\"model\.steps\.on_nonfinite\":\s+Expected a typing\.Literal\['raise', 'skip'\]\. Got value: ignore",
    ),
    "LoRA rank 0": (
        lambda s: fit_with(s, "r", set_in("model", "finetune", "lora", {"rank": 0})),
        r"rank must be a positive integer",
    ),
    "LoRA target absent": (
        lambda s: fit_with(s, "tg", set_in("model", "finetune", "lora", {"target_modules": ["query"]})),
        r"no module matched target_modules=\['query'\]",
    ),
    "negative batch size": (
        lambda s: fit_with(s, "bs", set_in("data", "loader", "batch_size", -2)),
        r"DataError: data\.loader\.batch_size must be an integer >= 1, got -2$",
    ),
    "min_occupancy above 1": (
        lambda s: fit_with(s, "mo", set_in("data", "sampling", "min_occupancy", 2.0)),
        r"DataError: data\.sampling\.min_occupancy must be a fraction in \[0, 1\], got 2\.0$",
    ),
    "frame_scale 0": (
        lambda s: fit_with(s, "fs", set_in("data", "frame", "scale", 0)),
        r"DataError: data\.frame\.scale must be a number > 0, got 0",
    ),
    "class name with a slash": (
        lambda s: fit_with(s, "sl", set_in("data", "classes", ["heart/ventricle_left"])),
        r"class names \['heart/ventricle_left'\] are not safe file-name parts",
    ),
    "YAML syntax error": (
        lambda s: ["fit", "--config", str(broken_yaml(s))],
        r"config .*broken\.yaml is not valid YAML: .* at line \d+, column \d+$",
    ),
    "missing data root": (
        lambda s: fit_with(s, "d", set_in("data", "root", str(s.root / "absent"))),
        r"data root .*absent does not exist",
    ),
    "cache_dir is a file": (
        lambda s: fit_with(s, "cd", set_in("data", "cache_dir", str(s.ckpt))),
        r"(FileExistsError|NotADirectoryError): cannot \w+( \w+)* .*good/checkpoints/last\.ckpt.*: (File exists|Not a directory)$",
    ),
    # base decoder
    "missing base checkpoint": (
        lambda s: fit_with(s, "b1", set_in("model", "base", "checkpoint", str(s.root / "base.safetensors"))),
        r"checkpoint .*base\.safetensors does not exist",
    ),
    "unknown shipped base": (
        lambda s: fit_with(s, "b2", set_in("model", "base", "checkpoint", "builtin:nope")),
        r"no shipped decoder 'builtin:nope'; available: \['builtin:relative_shapes', 'builtin:scan_shapes', 'builtin:shapes'\]",
    ),
    "truncated base checkpoint": (
        lambda s: fit_with(
            s, "b3", set_in("model", "base", "checkpoint", str(broken_copy(s, s.full_ckpt, "b3", truncate)))
        ),
        r"cannot read checkpoint .*b3/last\.ckpt",
    ),
    "base for another decoder size": (
        lambda s: fit_with(
            s,
            "b4",
            set_in(
                "model", "decoder", {"resolution": 8, "model_channels": 96, "num_blocks": 4, "num_groups": 12}
            ),
        ),
        r"shapes\.safetensors holds weights of another decoder size .* tensors differ, e\.g\. blocks\.0\.attn\.to_out\.bias: expected \(96,\), got \(64,\)",
    ),
    "base checkpoint that runs code": (
        lambda s: fit_with(
            s,
            "b5",
            set_in("model", "base", "checkpoint", str(broken_copy(s, s.full_ckpt, "b5", code_pickle))),
        ),
        r"cannot read checkpoint .*b5/last\.ckpt: it holds Python objects .* refused \(torch\.load weights_only=True\)",
    ),
    # Lightning checkpoints
    "missing checkpoint": (lambda s: predict_from(s, "c1", s.root / "none.ckpt"), r"none\.ckpt"),
    "truncated checkpoint": (
        lambda s: predict_from(s, "c2", broken_copy(s, s.ckpt, "c2", truncate)),
        r"cannot read checkpoint .*c2/last\.ckpt: truncated or corrupt\?",
    ),
    "checkpoint of the one-stage design": (
        lambda s: predict_from(s, "c4", broken_copy(s, s.ckpt, "c4", one_stage)),
        r"this checkpoint is from the earlier one-stage design",
    ),
    "checkpoint of a newer version": (
        lambda s: predict_from(s, "c6", broken_copy(s, s.ckpt, "c6", newer_manifest)),
        r"checkpoint .*c6/last\.ckpt was written by a newer lora-sam3d \(manifest version 99; this one reads versions 1 to 2\)",
    ),
    "checkpoint without a manifest": (
        lambda s: predict_from(s, "c7", broken_copy(s, s.ckpt, "c7", no_manifest)),
        r"checkpoint .*c7/last\.ckpt has no lora-sam3d manifest: not written by lora-sam3d",
    ),
    "checkpoint path is a folder": (
        lambda s: predict_from(s, "c5", s.out / "checkpoints"),
        r"checkpoint .*good/checkpoints is a folder, expected a file",
    ),
    "checkpoint that runs code": (
        lambda s: predict_from(s, "c3", broken_copy(s, s.ckpt, "c3", code_pickle)),
        r"cannot read checkpoint .*c3/last\.ckpt: it holds Python objects",
    ),
    "base replaced since training": (
        base_replaced,
        r"trained on another base .*stored in the checkpoint is '.*replaced/shapes\.safetensors'",
    ),
    # adapters
    "missing adapter": (
        lambda s: fit_with(s, "a1", with_adapter(s.root / "no-adapter")),
        r"no-adapter/adapter_config\.json does not exist",
    ),
    "full fine-tune checkpoint given as adapter": (
        lambda s: fit_with(s, "a6", with_adapter(s.full_ckpt)),
        r"full/checkpoints/last\.ckpt is a file, but an adapter is a folder .* goes to --ckpt_path",
    ),
    "truncated adapter weights": (
        lambda s: fit_with(
            s,
            "a2",
            with_adapter(
                broken_copy(s, s.adapter, "a2", lambda d: truncate(d / "adapter_model.safetensors"))
            ),
        ),
        r"cannot read .*a2/adapter-last/adapter_model\.safetensors",
    ),
    "corrupt adapter config": (
        lambda s: fit_with(
            s,
            "a3",
            with_adapter(
                broken_copy(s, s.adapter, "a3", lambda d: (d / "adapter_config.json").write_text("{not json"))
            ),
        ),
        r"a3/adapter-last/adapter_config\.json",
    ),
    "adapter of another base": (
        lambda s: fit_with(
            s,
            "a4",
            lambda cfg: (with_adapter(s.adapter)(cfg), set_in("model", "base", "checkpoint", None)(cfg)),
        ),
        r"trained on another base model",
    ),
    "adapter of another rank": (
        lambda s: fit_with(
            s, "a5", with_adapter(broken_copy(s, s.adapter, "a5", lambda d: rewrite_rank(d, 8)))
        ),
        r"adapter-last.*expected \(8, 64\), got \(4, 64\)",
    ),
    # reconstruction requests on new scans (data.predict.items)
    "predict item image missing": (
        lambda s: predict_items(s, "p1", image=str(s.root / "scan.nii.gz")),
        r"predict item 1 \(heart_myocardium in .*scan\.nii\.gz, axial index 20\): image .*scan\.nii\.gz does not exist$",
    ),
    "predict item axis": (
        lambda s: predict_items(s, "p2", axis=3),
        r"predict item 1 .*: axis 3; expected one of sagittal, coronal, axial \(or 0, 1, 2\)$",
    ),
    "predict item axis name": (
        lambda s: predict_items(s, "p2n", axis="transverse"),
        r"predict item 1 .*: axis 'transverse'; expected one of sagittal, coronal, axial \(or 0, 1, 2\)$",
    ),
    "predict item slice outside the file": (
        lambda s: predict_items(s, "p3", index=500),
        r"predict item 1 \(heart_myocardium in .*s0004/ct\.nii\.gz, axial index 500\): index 500 is outside the file's axial axis "
        r"\(file axis 2, slices 0\.\.31\)$",
    ),
    "predict item position outside the scan": (
        lambda s: predict_items(s, "p3p", index=None, position_mm=5000.0),
        r"predict item 1 .*: position_mm 5000\.0 is outside the scan: its axial planes run from -?\d+\.\d to -?\d+\.\d mm$",
    ),
    "predict item mask of another grid": (
        lambda s: predict_items(
            s,
            "p4",
            mask=str(s.data / "s0001" / "segmentations" / "heart_myocardium.nii.gz"),
            image=str(s.root / "small.nii.gz"),
            index=10,
        ),
        r"mask .*heart_myocardium\.nii\.gz has shape \(48, 48, 32\) but the image has \(20, 20, 20\)",
    ),
    "predict item 2D mask of another size": (
        lambda s: predict_items(s, "p4b", mask=str(s.root / "mask2d.nii.gz")),
        r"2D mask .*mask2d\.nii\.gz has shape \(10, 10\) but axial20 \(file axis 2\) of the image has shape \(48, 48\)$",
    ),
    "predict item empty mask slice": (
        lambda s: predict_items(s, "p5", mask=str(s.root / "empty_mask.nii.gz")),
        r"predict item 1 .*: mask .*empty_mask\.nii\.gz has no voxels on axial20 \(file axis 2, index 20\)$",
    ),
    "predict item label map without label_value": (
        lambda s: predict_items(s, "p5b", mask=str(s.root / "label_map.nii.gz")),
        r"predict item 1 .*: mask .*label_map\.nii\.gz holds 2 label values \[1, 2\]: a label map, not one "
        r"structure's mask; give the structure's value",
    ),
    "predict item label_value absent from the mask": (
        lambda s: predict_items(s, "p5c", mask=str(s.root / "label_map.nii.gz"), label_value=9),
        r"predict item 1 .*: mask .*label_map\.nii\.gz holds no voxel of label value 9; values present: \[1, 2\]$",
    ),
    "predict with a model setting the checkpoint contradicts": (
        lambda s: [*predict_items(s, "p5d"), "--model.finetune.lora.rank", "31"],
        r"--model\.finetune\.lora\.rank asks for model\.finetune\.lora\.rank: 31 but the checkpoint .* was "
        r"trained with \d+: a checkpoint defines its model",
    ),
    "predict item truncated image (found before the workers start)": (
        lambda s: predict_items(
            s, "p7", image=str(broken_copy(s, s.data / "s0004" / "ct.nii.gz", "p7", truncate)), workers=2
        ),
        r"DataError: predict item 1 \(heart_myocardium in .*p7/ct\.nii\.gz, axial index 20\): image .*p7/ct\.nii\.gz "
        r"cannot be read \(truncated or corrupt\?\)",
    ),
    "predict item unknown class": (
        lambda s: predict_items(s, "p6", class_name="liver"),
        r"predict item 1 \(liver in .*\): class 'liver' has no frame extent; known: \['heart_myocardium', "
        r"'heart_ventricle_left'\]",
    ),
    "predict item class no adapter covers": (
        lambda s: predict_items(
            s, "p8", ckpt=None, model={"finetune": {"adapters": {"heart_ventricle_left": str(s.adapter)}}}
        ),
        r"predict item 1: class 'heart_myocardium' is covered by no adapter of model\.finetune\.adapters "
        r"\(keys \['heart_ventricle_left'\]\)$",
    ),
    "adapters trained on different bases": (
        lambda s: predict_items(
            s,
            "p9",
            ckpt=None,
            root=None,  # the base the first adapter's model.json names (the replaced file)
            model={
                "finetune": {
                    "adapters": {"heart_myocardium": str(s.adapter), "heart_*": str(replaced_adapter(s))}
                }
            },
        ),
        r"load_adapter: .*replaced/checkpoints/adapter-last was trained on another base model",
    ),
    "checkpoint without stored data settings": (
        lambda s: predict_items(s, "p10", ckpt=broken_copy(s, s.ckpt, "p10", no_contract), root=None),
        r"predict item 1 .*: class 'heart_myocardium' has no frame extent; known: \[\] \(give it one: data\.frame\.extent_mm in a config, "
        r"reconstruct\(\.\.\., extent_mm=\{'heart_myocardium': mm\}\) in Python",
    ),
    # users' own files and folders
    "predict into a folder an earlier predict wrote": (
        lambda s: predict_items(s, "p11", used_folder=True),
        r"FileExistsError: .*good/predictions holds the outputs of an earlier predict \(\d+ files, e\.g\. .*\): "
        r"set overwrite: true on MeshPredictionWriter to replace them, or give another output_dir$",
    ),
    "predict item twice": (
        lambda s: predict_items(s, "p12", twice=True),
        r"predict items 1 and 2 ask for the same reconstruction \(s0004_heart_myocardium_axial20: same scan",
    ),
    "predict item with NaN intensities": (
        lambda s: predict_items(
            s, "p13", image=str(broken_copy(s, s.data / "s0004" / "ct.nii.gz", "p13", nan_voxel))
        ),
        r"predict item 1 \(heart_myocardium in .*p13/ct\.nii\.gz, axial index 20\): image .* has 1 NaN/inf voxels",
    ),
    "predict item fractional float mask": (
        lambda s: predict_items(s, "p14", mask=str(halved_mask(s))),
        r"predict item 1 .*: mask .*half\.nii\.gz has \d+ voxels that are not integers \(e\.g\. \[0\.5\]\)",
    ),
    "predict item JPEG mask": (
        lambda s: predict_items(s, "p15", mask=str(jpeg_mask(s))),
        r"predict item 1 .*: mask .*slice\.jpg is a JPEG: its lossy compression blurs the mask's edge",
    ),
    "predict item unsafe class name": (
        lambda s: predict_items(s, "p16", class_name="../outside"),
        r"predict item 1 .*: class_name: class names \['\.\./outside'\] are not safe file-name parts",
    ),
    "extent_mm unsafe class name": (
        lambda s: predict_items(s, "p17", extent={"../outside": 50.0}),
        r"data\.frame\.extent_mm: class names \['\.\./outside'\] are not safe file-name parts",
    ),
    "class matched by two adapter patterns": (
        lambda s: predict_items(
            s,
            "p18",
            ckpt=None,
            model={"finetune": {"adapters": {"heart_*": str(s.adapter), "heart_m*": str(s.adapter)}}},
        ),
        r"predict item 1: class 'heart_myocardium' matches 2 patterns of model\.finetune\.adapters \(\['heart_\*', 'heart_m\*'\]\)",
    ),
    "preprocessing against the checkpoint's": (
        lambda s: predict_items(s, "p19", modality="mr"),
        r"data\.preprocessing\.modality is 'mr' but the checkpoint .*last\.ckpt was trained with 'ct': a model reads scans the way",
    ),
    "adapter whose base moved": (
        lambda s: predict_items(
            s, "p20", ckpt=None, root=None, model={"finetune": {"adapter": str(moved_base_adapter(s))}}
        ),
        r"base checkpoint .*moved/shapes\.safetensors \(the path stored in .*adapter-moved/model\.json\) does not "
        r"exist; if it moved, give its new path with --model\.base\.checkpoint$",
    ),
    "a text file as the checkpoint": (
        lambda s: predict_from(s, "txt", text_file(s)),
        r"cannot read checkpoint .*notes\.ckpt: it is not a PyTorch checkpoint \(neither a zip archive nor a "
        r"pickle; it looks like text\)$",
    ),
    "adapter whose model.json was edited": (
        lambda s: predict_items(
            s, "p21", ckpt=None, root=None, model={"finetune": {"adapter": str(edited_model_file(s))}}
        ),
        r"shapes\.safetensors holds weights of another decoder size .*\(check model\.decoder\) \(the model "
        r"settings come from .*adapter-edited/model\.json\)$",
    ),
    # export
    "export of a missing checkpoint": (
        lambda s: ["export", "--ckpt_path", str(s.root / "x.ckpt"), "--output", str(s.root / "e1")],
        r"x\.ckpt does not exist",
    ),
    "export onto a file": (
        lambda s: ["export", "--ckpt_path", str(s.ckpt), "--output", str(s.ckpt)],
        r"(FileExistsError|NotADirectoryError): cannot \w+( \w+)* .*good/checkpoints/last\.ckpt.*: (File exists|Not a directory)$",
    ),
    "export of a truncated checkpoint": (
        lambda s: [
            "export",
            "--ckpt_path",
            str(broken_copy(s, s.ckpt, "e2", truncate)),
            "--output",
            str(s.root / "e2"),
        ],
        r"cannot read checkpoint .*e2/last\.ckpt: truncated or corrupt\?",
    ),
}


@pytest.mark.parametrize("name", list(RUN_CASES))
def test_bad_run_inputs(setup: Setup, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    make, pattern = RUN_CASES[name]
    argv = make(setup)
    before = fingerprint(setup.out)
    expect_error(setup, cli(*argv, capsys=capsys), pattern)
    assert fingerprint(setup.out) == before, "a failed run changed the trained run's files"
    assert not list(setup.root.rglob("*.ran")), "a checkpoint ran code on load"


def load_ckpt(path: Path, **override: object) -> None:
    from lora_sam3d.training.module import LoRAMeshDecoderModule

    LoRAMeshDecoderModule.load_from_checkpoint(path, map_location="cpu", weights_only=True, **override)


def load_adapter_into(adapter: Path, **lora: object) -> None:
    """The adapter loaded into the shipped base injected with LoRA of the given settings."""
    from lora_sam3d.io.weights import resolve_checkpoint
    from lora_sam3d.lora import LoRAConfig, inject_lora, load_adapter
    from lora_sam3d.models import SLatMeshDecoder

    size = TEST_DECODER | {"latent_channels": 8}
    decoder = SLatMeshDecoder.from_pretrained(resolve_checkpoint("builtin:shapes"), **size)
    inject_lora(decoder, LoRAConfig(**lora))  # type: ignore[arg-type]
    load_adapter(decoder, adapter)


# Python API: a checkpoint or adapter loaded into a model configured otherwise (through the CLI,
# ``--ckpt_path`` defines the model from the checkpoint's own hyper-parameters, so these cannot arise).
API_CASES: dict[str, tuple[Callable[[Setup], None], type[Exception], str]] = {
    "checkpoint of another rank": (
        lambda s: load_ckpt(s.ckpt, finetune={"lora": {"rank": 8}}),
        ValueError,
        r"mis-shaped keys .*lora_A: expected \(8, 64\), got \(4, 64\)",
    ),
    "checkpoint of other targets": (
        lambda s: load_ckpt(s.ckpt, finetune={"lora": {"target_modules": ["to_qkv"]}}),
        ValueError,
        r"unexpected keys \[.*to_out\.lora_A",
    ),
    "checkpoint with other trained heads": (
        lambda s: load_ckpt(s.ckpt, finetune={"unfreeze": ["out_layer"]}),
        ValueError,
        r"missing keys \['model\.decoder\.out_layer\.bias'",
    ),
    "checkpoint of another base": (
        lambda s: load_ckpt(s.ckpt, base={"checkpoint": None}),
        ValueError,
        r"trained on another base .*stored in the checkpoint is 'builtin:shapes'",
    ),
    "LoRA checkpoint where a full fine-tune is expected": (
        lambda s: load_ckpt(s.ckpt, finetune={"mode": "full"}),
        ValueError,
        r"checkpoint has finetune\.mode 'lora' but the model is configured for 'full'",
    ),
    "full fine-tune where LoRA is expected": (
        lambda s: load_ckpt(s.full_ckpt, finetune={"mode": "lora"}),
        ValueError,
        r"checkpoint has finetune\.mode 'full' but the model is configured for 'lora'; set model\.finetune\.mode: full",
    ),
    "adapter into LoRA of another rank": (
        lambda s: load_adapter_into(s.adapter, rank=8),
        KeyError,
        r"adapter-last.*expected \(8, 64\), got \(4, 64\)",
    ),
    "adapter into LoRA of other targets": (
        lambda s: load_adapter_into(s.adapter, target_modules=["to_qkv"]),
        KeyError,
        r"unexpected keys \[.*to_out",
    ),
}


@pytest.mark.parametrize("name", list(API_CASES))
def test_bad_api_inputs(setup: Setup, name: str) -> None:
    call, error, pattern = API_CASES[name]
    before = fingerprint(setup.out)
    with pytest.raises(error, match=pattern):
        call(setup)
    assert fingerprint(setup.out) == before
    assert_no_leftovers(setup.root)


# -- the operating system says no: read-only filesystems and writes cut short, for real ------------------
@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """``folder`` made read-only for this process: a read-only bind mount onto itself (root ignores
    file modes), or without root, the write bits removed."""
    import os
    import subprocess

    if os.geteuid() != 0:
        paths = [folder, *folder.rglob("*")]
        modes = {p: p.stat().st_mode for p in paths}
        for p in paths:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p in paths:
                p.chmod(modes[p])
        return
    for cmd in (
        ["mount", "--bind", str(folder), str(folder)],
        ["mount", "-o", "remount,ro,bind", str(folder)],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, f"cannot make {folder} read-only ({' '.join(cmd)}): {done.stderr}"
    try:
        yield
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)  # memory maps may still be open


def test_read_only_data_root_and_predictions_folder(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    fresh = setup.broken_data("read-only", lambda case: None)  # cases without a cache
    before = fingerprint(setup.out)
    with read_only(fresh):
        code, err = cli("fit", "--config", setup.config("ro-data", data=fresh), capsys=capsys)
    expect_error(
        setup,
        (code, err),
        r"cannot (create folder|write) .*data-read-only/\.cache.*: (Permission denied|Read-only file system)$",
    )

    # a read-only data root whose cache a colleague built: predicting reads it and writes nothing there
    shared = setup.root / "shared"
    shutil.copytree(setup.data, shared)
    out = setup.root / "shared-run"
    with read_only(shared):
        assert cli("predict", "--config", setup.config("ro-ok", set_in("trainer", "default_root_dir", str(out)),
                   data=shared, own=True), "--ckpt_path", str(setup.ckpt), capsys=capsys)[0] == 0  # fmt: skip

    # a predictions folder the run may not write: one line naming the file it could not write (the run
    # had started, so it runs in its own folder)
    locked = setup.root / "locked"
    locked.mkdir()
    with read_only(locked):
        result = cli("predict", "--config", setup.config(
            "ro-pred", set_in("trainer", "callbacks", [{"class_path": "lora_sam3d.callbacks.MeshPredictionWriter",
                                                        "init_args": {"output_dir": str(locked)}}]), own=True),
            "--ckpt_path", str(setup.ckpt), capsys=capsys)  # fmt: skip
    expect_error(
        setup,
        result,
        r"cannot write .*locked/s000\d_heart_\w+\.ply: (Permission denied|Read-only file system)$",
    )
    assert not list(locked.iterdir())
    assert fingerprint(setup.out) == before


def test_a_write_that_fails_mid_file(setup: Setup, tmp_path: Path) -> None:
    """A write cut short (by a file-size limit, as a full disk cuts it), in a real process: one line
    naming the cache entry, and no entry or temporary folder left."""
    import resource
    import signal
    import subprocess
    import sys

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    data = tmp_path / "data"
    shutil.copytree(setup.data, data, ignore=shutil.ignore_patterns(".cache", "s0003", "s0004"))
    config = write_yaml(run_config(tmp_path / "out", data, quiet=True), tmp_path / "c.yaml")
    done = subprocess.run([sys.executable, "-m", "lora_sam3d.cli", "fit", "--config", str(config)],
                          capture_output=True, text=True, timeout=600, preexec_fn=limit)  # fmt: skip
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and re.fullmatch(
        r"lora-sam3d: error: OSError: cannot write .*data/\.cache/(images/)?s000\d-[0-9a-f]{16}: .*(File too large|"
        r"disk full or a file-size limit\?\))", last,
    ), done.stderr[-1500:]  # fmt: skip
    cache = data / ".cache"
    assert not [
        p for p in [*cache.iterdir(), *cache.glob("images/*")] if p.is_dir() and p.name != "images"
    ], "no entry, complete or not"


def test_the_reliability_page_states_how_many_bad_inputs_are_tested() -> None:
    os_tests = 3  # read-only data root, read-only predictions folder, a write cut short
    total = len(DATA_CASES) + len(RUN_CASES) + len(API_CASES) + os_tests
    page = Path(__file__).parents[1] / "docs" / "reliability.md"
    assert f"`tests/test_bad_inputs.py`): {total} cases" in page.read_text()


def test_a_moved_base_is_pointed_to(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    """The base an adapter's model.json names has moved: `--model.base.checkpoint` points to its new
    place and the prediction is the one the original base gives."""
    from lora_sam3d.io.weights import resolve_checkpoint

    moved = setup.root / "new-home" / "shapes.safetensors"
    moved.parent.mkdir(exist_ok=True)
    shutil.copy(resolve_checkpoint("builtin:shapes"), moved)
    adapter = moved_base_adapter(setup)  # model.json names <root>/moved/shapes.safetensors, which is gone
    argv = predict_items(
        setup, "moved-ok", ckpt=None, root=None, model={"finetune": {"adapter": str(adapter)}}
    )
    code, err = cli(*argv, "--model.base.checkpoint", str(moved), capsys=capsys)
    assert code == 0, err[-2000:]
    reference = predict_items(
        setup, "moved-ref", ckpt=None, root=None, model={"finetune": {"adapter": str(setup.adapter)}}
    )
    assert cli(*reference, capsys=capsys)[0] == 0
    import trimesh

    (ours,) = [p for p in (setup.root / "moved-ok" / "predictions").glob("*.ply") if "_truth" not in p.name]
    theirs = setup.root / "moved-ref" / "predictions" / ours.name
    np.testing.assert_allclose(
        trimesh.load(ours, process=False).vertices, trimesh.load(theirs, process=False).vertices
    )
