"""LoRA library: injection, training isolation, merge, state, adapter files, parity with PEFT."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lora_sam3d.lora import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    LoRAConfig,
    LoRAConv3d,
    LoRALinear,
    base_fingerprint,
    count_parameters,
    freeze_base_params,
    get_lora_params,
    get_lora_state_dict,
    has_lora,
    inject_lora,
    load_adapter,
    load_lora_state_dict,
    lora_layers,
    merge_lora_weights,
    save_adapter,
    setup_lora_for_medical_finetuning,
    unload_lora,
)


@dataclass
class Feats:
    """Minimal sparse-tensor-like carrier: features plus an immutable coordinate payload."""

    feats: torch.Tensor
    coords: torch.Tensor

    def replace(self, feats: torch.Tensor) -> Feats:
        return Feats(feats, self.coords)


class FeatsLinear(nn.Linear):
    """An nn.Linear subclass whose forward takes a feature carrier, like SAM 3D's SparseLinear."""

    def forward(self, x: Feats) -> Feats:  # type: ignore[override]
        return x.replace(super().forward(x.feats))


class Attn(nn.Module):
    def __init__(self, c: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(c, 3 * c)
        self.to_out = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out(y.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(approximate="tanh"), nn.Linear(4 * c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False)
        self.attn = Attn(c)
        self.norm2 = nn.LayerNorm(c, elementwise_affine=False)
        self.mlp = MLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyDecoder(nn.Module):
    """The decoder's module names (input_layer, blocks.i.attn.to_qkv/to_out, mlp.mlp.0/2, out_layer)."""

    def __init__(self, c: int = 32, blocks: int = 2, out: int = 53) -> None:
        super().__init__()
        self.input_layer = FeatsLinear(8, c)
        self.blocks = nn.ModuleList(Block(c) for _ in range(blocks))
        self.out_layer = nn.Linear(c, out)

    def forward(self, x: Feats) -> torch.Tensor:
        h = self.input_layer(x).feats.unsqueeze(0)
        for block in self.blocks:
            h = block(h)
        return self.out_layer(h)[0]


def make_input(n: int = 64, seed: int = 1) -> Feats:
    g = torch.Generator().manual_seed(seed)
    return Feats(torch.randn(n, 8, generator=g), torch.randint(0, 16, (n, 4), generator=g))


def randomize_lora(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in get_lora_params(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def train_steps(model: nn.Module, x: Feats, steps: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randn(x.feats.shape[0], 53, generator=torch.Generator().manual_seed(9))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        opt.step()


@pytest.fixture
def model() -> TinyDecoder:
    torch.manual_seed(0)
    return TinyDecoder()


# ---------------------------------------------------------------------------------------------
# Injection


def test_fresh_injection_is_bit_identical(model: TinyDecoder) -> None:
    x = make_input()
    before = model(x)
    names = inject_lora(model, target_modules=["to_qkv", "to_out", "input_layer"], rank=4, alpha=8)
    assert names == [
        "input_layer",
        "blocks.0.attn.to_qkv",
        "blocks.0.attn.to_out",
        "blocks.1.attn.to_qkv",
        "blocks.1.attn.to_out",
    ]
    assert torch.equal(model(x), before)
    layer = model.blocks[0].attn.to_qkv
    assert isinstance(layer, LoRALinear)
    assert layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (96, 4)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0


def test_state_dict_keeps_base_names(model: TinyDecoder) -> None:
    base_keys = set(model.state_dict())
    inject_lora(model)
    keys = set(model.state_dict())
    assert base_keys <= keys
    assert keys - base_keys == {
        f"blocks.{i}.attn.{m}.lora_{ab}" for i in (0, 1) for m in ("to_qkv", "to_out") for ab in "AB"
    }


def test_only_lora_changes_after_training(model: TinyDecoder) -> None:
    inject_lora(model, target_modules=["to_qkv", "to_out"], rank=4, alpha=8)
    freeze_base_params(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, make_input())
    after = model.state_dict()
    for key, value in before.items():
        if ".lora_" in key:
            assert not torch.equal(after[key], value), f"{key} did not train"
        else:
            assert torch.equal(after[key], value), f"base tensor {key} changed"


def test_output_formula_matches_definition(model: TinyDecoder) -> None:
    lin = nn.Linear(16, 12)
    for rslora, scale in ((False, 8 / 4), (True, 8 / math.sqrt(4))):
        layer = LoRALinear(copy.deepcopy(lin), rank=4, alpha=8, use_rslora=rslora)
        randomize_lora(layer)
        x = torch.randn(2, 5, 16)
        expected = lin(x) + scale * (x @ layer.lora_A.T @ layer.lora_B.T)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_gradients_match_unfused_formula() -> None:
    torch.manual_seed(3)
    lin = nn.Linear(16, 12)
    layer = LoRALinear(lin, rank=2, alpha=3)
    randomize_lora(layer)
    x = torch.randn(7, 16, requires_grad=True)
    upstream = torch.randn(7, 12)
    (layer(x) * upstream).sum().backward()
    A = layer.lora_A.detach().clone().requires_grad_()
    B = layer.lora_B.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    out = nn.functional.linear(x2, lin.weight, lin.bias) + 1.5 * (x2 @ A.T @ B.T)
    (out * upstream).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, A.grad)
    torch.testing.assert_close(layer.lora_B.grad, B.grad)
    torch.testing.assert_close(x.grad, x2.grad)


def test_feature_carrier_input(model: TinyDecoder) -> None:
    inject_lora(model, target_modules=["input_layer"])
    randomize_lora(model)
    x = make_input()
    out = model.input_layer(x)
    assert isinstance(out, Feats) and out.coords is x.coords
    layer = model.input_layer
    expected = x.feats @ layer.merged_weight.T + layer.bias
    torch.testing.assert_close(out.feats, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match=r"Tensor or an object with \.feats"):
        layer([1, 2, 3])


def test_selection_by_regex_callable_exclude_and_patterns(model: TinyDecoder) -> None:
    m1 = copy.deepcopy(model)
    assert inject_lora(m1, LoRAConfig(target_modules=r"blocks\.1\..*to_(qkv|out)")) == [
        "blocks.1.attn.to_qkv",
        "blocks.1.attn.to_out",
    ]
    m2 = copy.deepcopy(model)
    assert inject_lora(m2, target_modules=lambda n, m: isinstance(m, nn.Linear) and n.endswith("mlp.2")) == [
        "blocks.0.mlp.mlp.2",
        "blocks.1.mlp.mlp.2",
    ]
    m3 = copy.deepcopy(model)
    cfg = LoRAConfig(
        target_modules=["to_qkv", "to_out"],
        exclude_modules=["blocks.0.attn.to_out"],
        rank_pattern={"to_out": 2, r"blocks\.0\.attn\.to_qkv": 8},
        alpha_pattern={"to_out": 1.0},
    )
    names = inject_lora(m3, cfg)
    assert "blocks.0.attn.to_out" not in names
    ranks = {n: (layer.rank, layer.alpha) for n, layer in lora_layers(m3).items()}
    assert ranks == {
        "blocks.0.attn.to_qkv": (8, 8.0),
        "blocks.1.attn.to_qkv": (4, 8.0),
        "blocks.1.attn.to_out": (2, 1.0),
    }
    # A substring that hits containers and activations wraps only the linears inside them.
    m4 = copy.deepcopy(model)
    assert inject_lora(m4, target_modules=["blocks.0.mlp"]) == ["blocks.0.mlp.mlp.0", "blocks.0.mlp.mlp.2"]


def test_selection_errors_name_modules(model: TinyDecoder) -> None:
    with pytest.raises(ValueError, match=r"no module matched target_modules=\['nope'\].*to_qkv"):
        inject_lora(model, target_modules=["nope"])
    with pytest.raises(
        TypeError, match=r"not nn.Linear or nn.Conv3d layers: \[\('blocks.0.norm1', 'LayerNorm'\)"
    ):
        inject_lora(model, target_modules=["norm1"])
    inject_lora(model)
    with pytest.raises(ValueError, match=r"already have LoRA.*blocks.0.attn.to_qkv"):
        inject_lora(model)
    layer = model.blocks[0].attn.to_qkv
    assert isinstance(layer, LoRALinear) and type(layer.unload()) is nn.Linear, "one wrap, not two"
    assert sorted(n for n, _ in layer.named_parameters()) == ["bias", "lora_A", "lora_B", "weight"]
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="qkv_slices"):
        LoRAConfig(qkv_slices=["q", "x"])


def test_config_builds_from_yaml() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(LoRAConfig, "lora")
    cfg = parser.parse_string(
        "lora:\n  rank: 8\n  alpha: 16\n  qkv_slices: [q, v]\n  rank_pattern: {to_out: 2}\n"
    )
    config = parser.instantiate(cfg).lora
    assert config == LoRAConfig(rank=8, alpha=16, qkv_slices=["q", "v"], rank_pattern={"to_out": 2})


def test_counts_and_medical_setup(model: TinyDecoder) -> None:
    total = sum(p.numel() for p in model.parameters())
    counts = setup_lora_for_medical_finetuning(
        model, rank=4, alpha=8, dropout=0.0, unfreeze_output_layers=True
    )
    lora = 2 * (4 * 32 + 96 * 4) + 2 * (4 * 32 + 32 * 4)
    head = 32 * 53 + 53
    assert counts == {"total": total + lora, "trainable": lora + head, "lora": lora}
    assert count_parameters(model) == counts
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".lora_" in n or n.startswith("out_layer.")}
    assert {"out_layer.weight", "out_layer.bias"} <= trainable


# ---------------------------------------------------------------------------------------------
# Partial LoRA on fused qkv


def test_partial_qkv_leaves_k_untouched(model: TinyDecoder) -> None:
    x = torch.randn(3, 10, 32)
    qkv_before = model.blocks[0].attn.to_qkv(x).detach()
    inject_lora(model, LoRAConfig(qkv_slices=["q", "v"], target_modules=["to_qkv"]))
    freeze_base_params(model)
    layer = model.blocks[0].attn.to_qkv
    assert layer.enabled_slices == (True, False, True)
    assert layer.lora_A.shape == (8, 32) and layer.lora_B.shape == (64, 4)
    train_steps(model, make_input(), steps=4)
    after = layer(x).detach()
    q0, k0, v0 = qkv_before.chunk(3, dim=-1)
    q1, k1, v1 = after.chunk(3, dim=-1)
    assert torch.equal(k1, k0), "the k slice must get exactly zero update"
    assert not torch.allclose(q1, q0) and not torch.allclose(v1, v0)
    delta = layer.delta_weight()
    assert torch.count_nonzero(delta[32:64]) == 0 and torch.count_nonzero(delta[:32]) > 0
    # Each enabled slice has its own rank-r pair: q's update only uses the first A block.
    torch.testing.assert_close(delta[:32], layer.scaling * layer.lora_B[:32] @ layer.lora_A[:4])
    torch.testing.assert_close(delta[64:], layer.scaling * layer.lora_B[32:] @ layer.lora_A[4:])


# ---------------------------------------------------------------------------------------------
# Merge / unload


def test_merge_matches_unmerged_and_leaves_copy_untouched(model: TinyDecoder) -> None:
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, LoRAConfig(target_modules=["to_qkv", "to_out", "input_layer"], qkv_slices=["q", "v"]))
    randomize_lora(model)
    x = make_input()
    expected = model(x)
    merged = merge_lora_weights(model, inplace=False)
    assert has_lora(model) and not has_lora(merged)
    assert type(merged.input_layer) is FeatsLinear, "merge must keep the wrapped class"
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    # Merging a model with no LoRA changes nothing.
    again = merge_lora_weights(copy.deepcopy(merged))
    for key, value in merged.state_dict().items():
        assert torch.equal(again.state_dict()[key], value)
    # Unload gives back the base weights exactly.
    unload_lora(model)
    assert not has_lora(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, base_state[key]), key
    # In-place merge (the original call form) returns the same object.
    inject_lora(model)
    randomize_lora(model)
    expected = model(x)
    assert merge_lora_weights(model) is model and not has_lora(model)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_bf16_merge_is_done_in_fp32() -> None:
    torch.manual_seed(4)
    lin = nn.Linear(64, 48).to(torch.bfloat16)
    layer = LoRALinear(lin, rank=4, alpha=8)
    randomize_lora(layer)
    fp32 = lin.weight.float() + layer.scaling * (layer.lora_B.float() @ layer.lora_A.float())
    merged = layer.merge()
    assert merged.weight.dtype == torch.bfloat16
    assert torch.equal(merged.weight, fp32.to(torch.bfloat16))
    x = torch.randn(32, 64).to(torch.bfloat16)
    ref = x.float() @ fp32.T + lin.bias.float()
    err_merged = (merged(x).float() - ref).abs().max()
    err_unmerged = (layer(x).float() - ref).abs().max()
    assert err_merged <= 2 * err_unmerged + 0.05


# ---------------------------------------------------------------------------------------------
# State and files


def test_state_dict_round_trip_and_strict_errors(model: TinyDecoder) -> None:
    twin = copy.deepcopy(model)
    inject_lora(model, rank=4, alpha=8)
    randomize_lora(model)
    sd = get_lora_state_dict(model)
    assert all(k.endswith((".lora_A", ".lora_B")) for k in sd) and len(sd) == 8
    inject_lora(twin, target_modules=["to_qkv", "to_out"], rank=4, alpha=8)
    result = load_lora_state_dict(twin, sd)
    assert result.missing == result.unexpected == result.mismatched == []
    x = make_input()
    assert torch.equal(twin(x), model(x))

    bad = dict(sd)
    del bad["blocks.0.attn.to_out.lora_A"]
    bad["blocks.9.attn.to_out.lora_A"] = torch.zeros(4, 32)
    bad["blocks.1.attn.to_qkv.lora_B"] = torch.zeros(96, 8)
    with pytest.raises(KeyError) as err:
        load_lora_state_dict(twin, bad)
    msg = str(err.value)
    assert "missing keys ['blocks.0.attn.to_out.lora_A']" in msg
    assert "unexpected keys ['blocks.9.attn.to_out.lora_A']" in msg
    assert "blocks.1.attn.to_qkv.lora_B: expected (96, 4), got (96, 8)" in msg
    result = load_lora_state_dict(twin, bad, strict=False)
    assert result.missing == ["blocks.0.attn.to_out.lora_A"]
    assert result.unexpected == ["blocks.9.attn.to_out.lora_A"]
    assert len(result.mismatched) == 1


def test_adapter_files_round_trip(model: TinyDecoder, tmp_path) -> None:
    base = copy.deepcopy(model)
    counts = setup_lora_for_medical_finetuning(
        model, config=LoRAConfig(rank=2, alpha=4, qkv_slices=["q", "v"])
    )
    assert counts["lora"] > 0
    randomize_lora(model)
    with torch.no_grad():
        model.out_layer.bias.add_(1.0)
    save_adapter(model, tmp_path / "adapter", modules_to_save=["out_layer"])
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        ADAPTER_CONFIG_NAME,
        ADAPTER_WEIGHTS_NAME,
    ]
    meta = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_NAME).read_text())
    assert meta["peft_type"] == "LORA" and meta["r"] == 2 and meta["lora_alpha"] == 4
    assert meta["lora_sam3d"]["base_fingerprint"] == base_fingerprint(base, ["out_layer"])
    tensors = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS_NAME))
    assert "base_model.model.blocks.0.attn.to_qkv.lora_A.weight" in tensors
    assert "base_model.model.out_layer.bias" in tensors

    names = load_adapter(base, tmp_path / "adapter")
    assert names == sorted(lora_layers(model))
    x = make_input()
    assert torch.equal(base(x), model(x))


def test_adapter_load_errors(model: TinyDecoder, tmp_path) -> None:
    inject_lora(model)
    randomize_lora(model)
    save_adapter(model, tmp_path / "a")
    other_base = TinyDecoder()
    with pytest.raises(ValueError, match=r"trained on another base model"):
        load_adapter(other_base, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match=r"missing/adapter_config.json does not exist"):
        load_adapter(other_base, tmp_path / "missing")
    weights = tmp_path / "a" / ADAPTER_WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cannot read .*adapter_model.safetensors"):
        load_adapter(copy.deepcopy(model), tmp_path / "a", check_base=False)
    # An adapter for another rank does not load silently.
    fresh = TinyDecoder()
    inject_lora(fresh, rank=8)
    save_adapter(model, tmp_path / "b")
    with pytest.raises(
        KeyError,
        match=r"does not fit this model.*expected \(4, 32\), got \(8, 32\)|expected \(8, 32\), got \(4, 32\)",
    ):
        load_adapter(fresh, tmp_path / "b", check_base=False)


# ---------------------------------------------------------------------------------------------
# Parity with PEFT


class PlainNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(32) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("use_rslora", [False, True])
def test_layer_matches_peft(use_rslora: bool) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    net = nn.Sequential()
    net.add_module("proj", nn.Linear(48, 40))
    peft_model = get_peft_model(
        copy.deepcopy(net), LoraConfig(r=4, lora_alpha=6, target_modules=["proj"], use_rslora=use_rslora)
    )
    ours = LoRALinear(copy.deepcopy(net.proj), rank=4, alpha=6, use_rslora=use_rslora)
    randomize_lora(ours)
    peft_layer = peft_model.base_model.model.proj
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(ours.lora_A)
        peft_layer.lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(5, 7, 48)
    torch.testing.assert_close(ours(x), peft_layer(x), rtol=1e-5, atol=1e-6)
    assert ours.scaling == pytest.approx(peft_layer.scaling["default"])


def test_adapter_file_loads_in_peft(tmp_path) -> None:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    torch.manual_seed(6)
    net = PlainNet()
    ours = copy.deepcopy(net)
    inject_lora(ours, rank=4, alpha=8, target_modules=["to_qkv", "to_out"])
    randomize_lora(ours)
    save_adapter(ours, tmp_path)
    meta = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    config = LoraConfig(r=meta["r"], lora_alpha=meta["lora_alpha"], target_modules=meta["target_modules"])
    peft_model = get_peft_model(copy.deepcopy(net), config)
    result = set_peft_model_state_dict(peft_model, load_file(str(tmp_path / ADAPTER_WEIGHTS_NAME)))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(peft_model(x), ours(x), rtol=1e-5, atol=1e-5)


def test_peft_layout_tensors_load_back(tmp_path, model: TinyDecoder) -> None:
    """A PEFT-layout file edited by hand (e.g. by another tool) still loads through load_adapter."""
    inject_lora(model)
    randomize_lora(model)
    save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / ADAPTER_WEIGHTS_NAME))
    save_file({k: v * 2 for k, v in tensors.items()}, str(tmp_path / ADAPTER_WEIGHTS_NAME))
    twin = copy.deepcopy(model)
    load_adapter(twin, tmp_path)
    assert torch.equal(twin.blocks[1].attn.to_out.lora_B, 2 * model.blocks[1].attn.to_out.lora_B)


def test_dropout_path_and_autocast() -> None:
    torch.manual_seed(7)
    lin = nn.Linear(16, 12)
    layer = LoRALinear(copy.deepcopy(lin), rank=4, alpha=8, dropout=0.5)
    randomize_lora(layer)
    x = torch.randn(64, 16)
    expected = lin(x) + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    layer.eval()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.train()
    assert not torch.allclose(layer(x), expected), "dropout must act on the LoRA path in training"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer.eval()(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


def test_conv3d_adapter_matches_peft_and_merges(tmp_path) -> None:
    """Stage 1's convolutions: our LoRAConv3d computes PEFT's Conv3d LoRA, merges exactly, and its
    adapter file loads into a PEFT model."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    torch.manual_seed(7)
    net = nn.Sequential()
    net.add_module("conv", nn.Conv3d(5, 6, 3, stride=2, padding=1))
    net.add_module("head", nn.Conv3d(6, 3, 1))
    ours = copy.deepcopy(net)
    names = inject_lora(ours, rank=2, alpha=3, target_modules=["conv", "head"])
    assert names == ["conv", "head"] and isinstance(ours.conv, LoRAConv3d)
    assert ours.conv.lora_A.shape == (2, 5, 3, 3, 3) and ours.conv.lora_B.shape == (6, 2, 1, 1, 1)
    x = torch.randn(2, 5, 8, 8, 8)
    torch.testing.assert_close(ours(x), net(x))  # a fresh adapter changes nothing
    randomize_lora(ours)
    save_adapter(ours, tmp_path)
    peft_model = get_peft_model(
        copy.deepcopy(net), LoraConfig(r=2, lora_alpha=3, target_modules=["conv", "head"])
    )
    result = set_peft_model_state_dict(peft_model, load_file(str(tmp_path / ADAPTER_WEIGHTS_NAME)))
    assert not result.unexpected_keys
    torch.testing.assert_close(peft_model(x), ours(x), rtol=1e-5, atol=1e-5)
    merged = merge_lora_weights(ours, inplace=False)
    assert type(merged.conv) is nn.Conv3d
    torch.testing.assert_close(merged(x), ours(x), rtol=1e-5, atol=1e-5)
    freeze_base_params(ours)
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == [
        "conv.lora_A", "conv.lora_B", "head.lora_A", "head.lora_B"
    ]  # fmt: skip
