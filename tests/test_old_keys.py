"""Files and command lines of the flat layout (before the settings tree) still load and predict as before.

``tests/data/previous_main`` was written by the previous main (see its README): a checkpoint, an
adapter folder and the flat config that trained them, with what they reconstructed then
(``expected.json``). They are read here by today's code: the same voxels, SDF and Dice.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from lora_sam3d.cli import main
from lora_sam3d.settings.old_keys import DATA_KEYS, MODEL_KEYS, upgrade, upgrade_argv

OLD = Path(__file__).parent / "data" / "previous_main"
EXPECTED = json.loads((OLD / "expected.json").read_text())


def reconstructed(model: object, phantoms: Path, context: str) -> dict[str, float]:
    from lora_sam3d.geometry import sdf_on_grid
    from lora_sam3d.metrics import overlap
    from lora_sam3d.predict.api import reconstruct

    case = phantoms / "s0001"
    mask = case / "segmentations" / "heart_ventricle_left.nii.gz"
    network = getattr(model, "model", model)
    network.drawing_width = (
        0.0  # the network's own surface, as the previous main gave it (no drawing blended in)
    )
    # the network's own output: every piece kept, nothing cut at the scan, the drawing not painted in
    r = reconstruct(
        model, case / "ct.nii.gz", mask, "heart_ventricle_left", index=16, context=context,
        all_pieces=True, beyond_scan=True,
    )  # fmt: skip
    scan = nib.load(case / "ct.nii.gz")
    own = sdf_on_grid(r.prediction.sdf, r.prediction.frame_to_world, scan.affine, scan.shape)
    truth = np.asarray(nib.load(mask).dataobj) > 0
    return {
        "voxels": int(own.sum()),
        "sdf_sum": float(r.prediction.sdf.sum()),
        "dice": overlap(own, truth)[0],
    }


def assert_as_before(got: dict[str, float], key: str) -> None:
    want = EXPECTED[key]
    assert got["voxels"] == want["voxels"], (key, got, want)
    assert got["sdf_sum"] == pytest.approx(want["sdf_sum"], rel=1e-5), key
    assert got["dice"] == pytest.approx(want["dice"], abs=1e-6), key


def test_a_checkpoint_of_the_flat_layout_loads_silently_and_predicts_as_before(phantoms: Path) -> None:
    from lora_sam3d.training.module import LoRAMeshDecoderModule

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*earlier flat keys.*")  # a stored file is not the user's
        module = LoRAMeshDecoderModule.load_from_checkpoint(
            OLD / "last.ckpt", map_location="cpu", weights_only=True
        )
    assert module.model.config.base.checkpoint == "builtin:scan_shapes"
    assert module.model.config.context.read and module.model.config.context.conditioning
    assert module.finetune.lora.rank == 2 and module.finetune.lora.alpha == 4
    for context in ("volume", "none"):
        assert_as_before(reconstructed(module, phantoms, context), f"checkpoint/{context}")


def test_an_adapter_folder_of_the_flat_layout_loads_and_predicts_as_before(phantoms: Path) -> None:
    from lora_sam3d.models import Reconstructor

    model = Reconstructor.from_adapter(OLD / "adapter")
    assert model.config.context.read and model.config.band.margin == 1
    for context in ("volume", "none"):
        assert_as_before(reconstructed(model, phantoms, context), f"adapter/{context}")


@pytest.mark.e2e
def test_the_flat_config_and_checkpoint_predict_through_the_command(
    phantoms: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The previous main's own config file (flat keys) with its checkpoint and a flat command-line
    key: `predict` runs, with one warning per source naming each old key and its new place."""
    config = yaml.safe_load((OLD / "flat_config.yaml").read_text())
    data = tmp_path / "data"
    shutil.copytree(phantoms, data, ignore=shutil.ignore_patterns(".cache"))
    text = (OLD / "flat_config.yaml").read_text().replace("/tmp/old/data", str(data))
    path = tmp_path / "flat.yaml"
    path.write_text(text.replace("/tmp/old/run", str(tmp_path / "run")))
    assert config["model"]["reads_context"] is True and "base_checkpoint" in config["model"]
    with pytest.warns(UserWarning, match=r"earlier flat keys") as caught:
        code = main(
            ["predict", "--config", str(path), "--ckpt_path", str(OLD / "last.ckpt"), "--data.views", "3"]
        )
    assert code == 0, capsys.readouterr().err
    moved = [str(w.message) for w in caught if "earlier flat keys" in str(w.message)]
    assert len(moved) == 2 and str(path) in moved[0] and "the command line" in moved[1], "one per source"
    for old in ("base_checkpoint", "reads_context", "conditioning", "lora"):
        assert f"model.{old} -> model.{MODEL_KEYS[old]}" in moved[0]
    for old in ("spacing", "views", "view_layout", "context", "context_dropout", "eval_sampling"):
        assert f"data.{old} -> data.{DATA_KEYS[old]}" in moved[0]
    assert "--data.views -> --data.views.count" in moved[1]
    written = yaml.safe_load(next((tmp_path / "run").rglob("config.yaml")).read_text())
    assert written["model"]["context"] == {
        "read": True,
        "conditioning": True,
        "interpolation": False,
        "tissue": False,
    }, "config.yaml says the tree"
    assert written["model"]["finetune"]["lora"]["rank"] == 2
    assert written["data"]["views"]["count"] == 3 and written["data"]["context"]["source"] == "volume"
    assert written["data"]["preprocessing"]["spacing_mm"] == 2.0
    assert list((tmp_path / "run" / "predictions").rglob("*.ply")), "meshes written"


def test_command_line_keys_of_the_flat_layout_are_renamed_with_one_warning() -> None:
    argv = ["fit", "--model.lora.rank", "16", "--model.reads_context=false", "--model.finetune", "full"]
    with pytest.warns(UserWarning, match=r"the command line uses the earlier flat keys") as caught:
        new = upgrade_argv(argv)
    assert new == [
        "fit",
        "--model.finetune.lora.rank",
        "16",
        "--model.context.read=false",
        "--model.finetune.mode",
        "full",
    ]
    assert len(caught) == 1 and "--model.lora.rank -> --model.finetune.lora.rank" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = ["fit", "--model.finetune.lora.rank", "16", "--model.finetune.mode", "full"]
        assert upgrade_argv(tree) == tree, "the tree's own keys pass untouched, silently"
        assert upgrade_argv(["fit", "--model.finetune", "{mode: full}"]) == [
            "fit",
            "--model.finetune",
            "{mode: full}",
        ]
    with pytest.raises(
        ValueError, match=r"--model\.reads_context true and --model\.context\.read false, two values"
    ):
        upgrade_argv(["fit", "--model.reads_context", "true", "--model.context.read", "false"])


def test_a_key_given_old_and_new_with_different_values_is_one_line_naming_both(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"model\.base_checkpoint \(an earlier name of model\.base\.checkpoint\)"
    ):
        upgrade(
            {"base_checkpoint": "a.safetensors", "base": {"checkpoint": "b.safetensors"}}, where="config x"
        )
    same = upgrade(
        {"finetune": "full", "lora": {"rank": 8}, "base": {"seed": 3}, "base_checkpoint": "a"}, warn=False
    )
    assert same == {"finetune": {"mode": "full", "lora": {"rank": 8}}, "base": {"seed": 3, "checkpoint": "a"}}
    reordered = upgrade({"lora": {"rank": 8}, "finetune": "full"}, warn=False)  # the mode is kept either way
    assert reordered == {"finetune": {"mode": "full", "lora": {"rank": 8}}}
    bad = tmp_path / "both.yaml"
    bad.write_text(yaml.safe_dump({"model": {"reads_context": True, "context": {"read": False}}}))
    with pytest.raises(
        ValueError, match=rf"config {bad}: model\.reads_context .* is True but model\.context\.read is False"
    ):
        upgrade_argv(["fit", "--config", str(bad)])


def test_the_constructors_take_the_tree_and_the_flat_keys_map_on_the_way_in() -> None:
    """The flat keys live in one module (`lora_sam3d.settings.old_keys`), applied where settings
    come in (configs, command lines, stored files); the constructors take the tree's names only."""
    from conftest import TEST_DECODER

    from lora_sam3d.training.module import LoRAMeshDecoderModule

    with pytest.raises(TypeError, match=r"unexpected keyword argument 'unfreeze'"):
        LoRAMeshDecoderModule(["a"], decoder=TEST_DECODER, unfreeze=["out_layer"])
    groups = upgrade({"unfreeze": ["out_layer"], "base_seed": 3}, warn=False)
    module = LoRAMeshDecoderModule(["a"], decoder=TEST_DECODER, **groups)
    assert module.finetune.unfreeze == ["out_layer"] and module.model.config.base.seed == 3
    assert module.hparams["finetune"]["unfreeze"] == ["out_layer"] and "unfreeze" not in module.hparams


def test_one_manifest_reads_both_earlier_layouts_and_writes_one_layout_for_both(tmp_path: Path) -> None:
    """The previous main's checkpoint section and model.json describe the same model; read by the
    one reader they agree, and today's writer gives checkpoints and folders the same record."""
    import torch

    from lora_sam3d.models import Reconstructor
    from lora_sam3d.models.adapters.manifest import SECTION, VERSION, Manifest

    ckpt = torch.load(OLD / "last.ckpt", map_location="cpu", weights_only=True)
    from_ckpt = Manifest.of_checkpoint(ckpt)
    from_folder = Manifest.of_folder(OLD / "adapter")
    assert from_folder is not None and from_ckpt.version == from_folder.version == 1
    assert from_ckpt.classes == from_folder.classes == ["heart_ventricle_left", "heart_myocardium"]
    assert from_ckpt.data == from_folder.data and from_ckpt.data["extent_mm"]["heart_myocardium"] == 72.0
    assert from_ckpt.model["decoder"] == from_folder.model["decoder"]
    assert from_folder.model["context"] == {"read": True, "conditioning": True}  # flat keys moved
    assert from_ckpt.finetune["mode"] == "lora" and from_ckpt.finetune["lora"]["rank"] == 2

    model = Reconstructor.from_adapter(OLD / "adapter")
    today = Manifest.describe(model, from_folder.classes, from_folder.data, from_ckpt.finetune)
    written: dict = {}
    today.write_to(written)
    today.write_folder(tmp_path)
    assert written[SECTION] == json.loads((tmp_path / "model.json").read_text())
    assert written[SECTION]["version"] == VERSION and Manifest.of_folder(tmp_path) == today
    assert Manifest.of_checkpoint(written) == today
    with pytest.raises(ValueError, match=r"^test was written by a newer lora-sam3d \(manifest version 3;"):
        Manifest.from_dict({**today.to_dict(), "version": 3}, "test")


def test_the_flat_layout_module_paths_still_import_with_a_warning() -> None:
    """A script's ``from lora_sam3d.module import LoRAMeshDecoderModule``, or a stored config.yaml's
    ``lora_sam3d.checkpoint_io.AtomicCheckpointIO``: the module where it lives now, with a
    DeprecationWarning naming it."""
    import importlib
    import sys

    from lora_sam3d.settings.old_keys import MODULES

    for old, new in MODULES.items():
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=rf"{old} moved to {new}"):
            moved = importlib.import_module(old)
        assert moved is importlib.import_module(new), old
    from lora_sam3d.training.checkpoint_io import AtomicCheckpointIO

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from lora_sam3d.checkpoint_io import AtomicCheckpointIO as stored  # type: ignore[import-not-found]
    assert stored is AtomicCheckpointIO
