"""The tissue model per sample (``data.context.tissue_model: forest``, ``model.context.tissue``): its
probability marks the structure on real phantom samples, reads "no scan" and "no forest" as it should,
reaches requests through a model's stored contract, and a base trained without it reads it through
zero weights; a context of the wrong width and a data side that disagrees with the model are named."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SCAN, TEST_CLASSES, TEST_DECODER, data_settings

from lora_sam3d.data import PredictionDataset
from lora_sam3d.data.dataset import TS_SAM3D_Dataset
from lora_sam3d.data.settings import DataContract, DataSettings
from lora_sam3d.data.tissue_forest import NEUTRAL, with_tissue_model
from lora_sam3d.inputs import collate
from lora_sam3d.lora import LoRAConfig, lora_layers
from lora_sam3d.models import ModelConfig, Reconstructor
from lora_sam3d.models.adapters.files import save_model_adapter
from lora_sam3d.models.adapters.manifest import Manifest
from lora_sam3d.training.data_link import check_data_agrees

HERE = Path(__file__).parent
ADAPTER = HERE / "data" / "previous_main" / "adapter"
FOREST = {"read": True, "conditioning": True, "interpolation": True, "tissue": True}


@pytest.fixture(scope="module")
def forest_samples(phantoms: Path, tmp_path_factory: pytest.TempPathFactory) -> TS_SAM3D_Dataset:
    settings = data_settings(
        resolution=16, spacing=2.0, views=3, context="volume", cache_dir=str(tmp_path_factory.mktemp("cache"))
    )
    settings = DataSettings.from_dict(
        settings.to_dict()
        | {"context": {"source": "volume", "reading": "relative", "tissue_model": "forest"}}
    )
    return TS_SAM3D_Dataset(phantoms, TEST_CLASSES, "test", "central", settings=settings)


def test_the_forest_marks_the_drawn_structure_on_phantom_samples(forest_samples: TS_SAM3D_Dataset) -> None:
    """On both structures of a held-out phantom, from three drawn slices: the channel is high inside
    the true structure and low around it, 0 outside the scan, and the relative reading stays channel 0."""
    for i in range(2):
        sample = forest_samples[i]
        context, truth = sample["context"].numpy(), sample["gt_occupancy"].numpy()
        assert context.shape[0] == 3
        scan = context[1] > 0
        inside, around = context[2][truth & scan].mean(), context[2][~truth & scan].mean()
        assert inside > 0.6 and around < 0.3, (sample["class_name"], inside, around)
        assert (context[2][~scan] == 0).all()
        assert context[0][truth & scan].mean() > context[0][~truth & scan].mean()


def test_no_scan_reads_blank_and_no_drawing_reads_neutral(forest_samples: TS_SAM3D_Dataset) -> None:
    sample = dict(forest_samples[0])
    context = sample["context"].numpy()[:2].copy()
    assert not with_tissue_model(np.zeros_like(context), sample, "forest")[2].any()
    assert with_tissue_model(context, sample, "none") is context
    sample["view_mask"] = torch.zeros_like(sample["view_mask"])  # nothing drawn: nothing to fit
    channel = with_tissue_model(context, sample, "forest")[2]
    np.testing.assert_allclose(channel[context[1] == 1], NEUTRAL)
    with pytest.raises(
        ValueError, match=r"data.context.tissue_model must be one of \['none', 'forest'\], got 'tree'"
    ):
        with_tissue_model(context, sample, "tree")


def test_requests_get_the_channel_from_the_model_s_contract(phantoms: Path) -> None:
    """A request read by a model trained with the forest (its stored contract says so) carries it."""
    contract = replace(
        DataContract.from_dict(Reconstructor.from_adapter(ADAPTER).data_contract),
        context="volume",
        context_tissue_model="forest",
    )
    case = phantoms / "s0001"
    item = {"image": str(case / "ct.nii.gz"), "mask": str(case / "segmentations" / "heart_ventricle_left.nii.gz"),
            "class_name": "heart_ventricle_left", "axis": "axial", "index": 16}  # fmt: skip
    sample = PredictionDataset.from_settings([item], contract)[0]
    assert sample["context"].shape[0] == 3
    without = PredictionDataset.from_settings([item], replace(contract, context_tissue_model="none"))[0]
    torch.testing.assert_close(sample["context"][:2], without["context"])


def test_a_base_without_it_reads_it_through_zero_weights(
    forest_samples: TS_SAM3D_Dataset, tmp_path: Path
) -> None:
    """The shipped base with ``context.tissue: true``: the same SDF as the model without it, to
    rounding, until training moves the new weights, which then change it. Its adapter folder says
    that it reads the channel, so the folder alone rebuilds the same model."""
    batch = collate([forest_samples[0], forest_samples[1]])
    base = {"checkpoint": "builtin:relative_shapes"}
    reads = Reconstructor(ModelConfig(TEST_DECODER, base=base, context=FOREST)).eval()
    plain = Reconstructor(ModelConfig(TEST_DECODER, base=base, context={**FOREST, "tissue": False})).eval()
    assert reads.structure.enc0[0].weight.shape[1] == plain.structure.enc0[0].weight.shape[1] + 1
    assert reads.conditioning.levels[0][0].weight.shape[1] == 13
    two = replace(batch.evidence, context=batch.evidence.context[:, :2])
    with torch.no_grad():
        a = plain(two).sdf
        torch.testing.assert_close(reads(batch.evidence).sdf, a, atol=1e-5, rtol=0)
        reads.add_lora(LoRAConfig(4, 8.0), LoRAConfig(2, 4.0, target_modules=r"(enc|dec)\d\.[03]|head"))
        for layer in lora_layers(reads.structure).values():
            layer.lora_B.normal_(0, 0.5)
        moved = reads(batch.evidence).sdf
        blank = batch.evidence.context.clone()
        blank[:, 2] = 0
        assert not torch.allclose(reads(replace(batch.evidence, context=blank)).sdf, moved, atol=1e-3), (
            "once trained, the channel is read"
        )
    assert "tissue" not in plain.settings()["context"], "files of models without it stay as they were"
    data = {"classes": TEST_CLASSES, "extent_mm": dict.fromkeys(TEST_CLASSES, 60.0), "spacing": 2.0, "modality": "ct",
            "ct_window_hu": [-200, 400], "slice_size": 64, "frame_scale": 2.0, "resolution": 16,
            "context": "volume", "context_reading": "relative", "context_tissue_model": "forest"}  # fmt: skip
    folder = save_model_adapter(reads, tmp_path / "adapter", Manifest.describe(reads, TEST_CLASSES, data))
    again = Reconstructor.from_adapter(folder).eval()
    assert again.config.context.tissue and again.data_contract["context_tissue_model"] == "forest"
    with torch.no_grad():
        torch.testing.assert_close(again(batch.evidence).sdf, moved, atol=1e-5, rtol=0)
    with pytest.raises(
        ValueError, match=r"has 2 channels where this model reads 3.*data.context.tissue_model: forest"
    ):
        reads(two)
    with pytest.raises(
        ValueError, match=r"has 3 channels where this model reads 2.*data.context.tissue_model: none"
    ):
        plain(batch.evidence)


def test_settings_that_disagree_are_named() -> None:
    with pytest.raises(ValueError, match=r"model.context.tissue needs model.context.read: true"):
        ModelConfig(TEST_DECODER, context={**SCAN, "read": False, "tissue": True})
    with pytest.raises(ValueError, match=r"tissue_model"):
        DataSettings.from_dict({"context": {"tissue_model": "svm"}})
    data = {"context": {"source": "volume", "tissue_model": "forest"}}
    with pytest.raises(
        ValueError, match=r"data.context.tissue_model is forest but model.context.tissue is false"
    ):
        check_data_agrees(data, 16, [], context=True, tissue=False)
    check_data_agrees(data, 16, [], context=True, tissue=True)
    check_data_agrees(data, 16, [], context=True)  # outside fit the model's stored contract decides
