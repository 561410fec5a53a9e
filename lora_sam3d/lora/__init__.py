"""Low-rank adapters (LoRA) for the linears of the mesh decoder and the convolutions of stage 1.

Why a module of our own instead of PEFT: the decoder's linears take sparse tensors (a `SparseLinear`
is an `nn.Linear` whose forward receives an object with `.feats`), SAM 3D fuses q, k and v into one
`to_qkv` projection that we want to adapt partially, and the adapter must keep the base model's
state-dict names so that Meta's checkpoints load into an injected model unchanged. The files we
write use PEFT's layout (`adapter_model.safetensors` + `adapter_config.json`), so `peft` reads them.

The layer keeps the wrapped layer's `weight` and `bias` parameters as its own (same tensors, no
copy), adds `lora_A` (r, in) and `lora_B` (out, r), and computes
``W x + b + s * B (A dropout(x))`` with ``s = alpha / r`` (or ``alpha / sqrt(r)``, rsLoRA) in one
fused ``addmm`` on the base output, so no full-size temporary is made for the LoRA path.
`LoRAConv3d` does the same for the dense 3D convolutions of the sparse-structure stage, as PEFT
does for convolutions: ``lora_A`` is a convolution with the base's kernel (r, in, k, k, k) and
``lora_B`` a 1x1x1 convolution (out, r, 1, 1, 1), so its files are PEFT's too.
"""

from lora_sam3d.lora.config import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, LoRAConfig
from lora_sam3d.lora.files import (
    LoadResult,
    base_fingerprint,
    get_lora_state_dict,
    load_adapter,
    load_lora_state_dict,
    read_adapter_config,
    save_adapter,
    state_dict_fit,
)
from lora_sam3d.lora.inject import (
    count_parameters,
    freeze_base_params,
    get_lora_params,
    has_lora,
    inject_lora,
    lora_layers,
    merge_lora_weights,
    setup_lora_for_medical_finetuning,
    unload_lora,
)
from lora_sam3d.lora.layers import LoRAConv3d, LoRALayer, LoRALinear

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "LoRAConfig",
    "LoRAConv3d",
    "LoRALayer",
    "LoRALinear",
    "LoadResult",
    "base_fingerprint",
    "count_parameters",
    "freeze_base_params",
    "get_lora_params",
    "get_lora_state_dict",
    "has_lora",
    "inject_lora",
    "load_adapter",
    "load_lora_state_dict",
    "lora_layers",
    "merge_lora_weights",
    "read_adapter_config",
    "save_adapter",
    "setup_lora_for_medical_finetuning",
    "state_dict_fit",
    "unload_lora",
]
