"""Tiny LoRA files for the WebUI tests and benchmarks, written for a given checkpoint.

Kohya-format keys (``lora_unet_…``, ``lora_te_…`` / ``lora_te1_…``) in the compvis layer
naming, which the WebUI's built-in networks extension maps onto the model's layers. The
shapes are read from the checkpoint's own tensors, so one function serves the tiny SD1 and
SDXL fixtures and the full-size SD1.5 benchmark models. Weights are seeded and non-zero.

Needs torch and safetensors (the test venv has both).
"""

from __future__ import annotations

import os
import re

ATTENTION = re.compile(r"^model\.diffusion_model\.(.+\.attn[12]\.(?:to_q|to_k|to_v|to_out\.0))\.weight$")
CONV = re.compile(r"^model\.diffusion_model\.(.+\.(?:in_layers\.2|out_layers\.3))\.weight$")
TEXT = re.compile(r"^(cond_stage_model\.transformer|conditioner\.embedders\.0\.transformer)\.text_model\.encoder\.layers\.(\d+)\."
                  r"((?:self_attn\.(?:q|k|v|out)_proj)|mlp\.fc[12])\.weight$")


def write_lora(checkpoint: str, path: str, *, seed: int = 0, rank: int = 4, strength: float = 0.5,
               unet: bool = True, text: bool = True, conv: bool = True) -> int:
    """Write a LoRA for `checkpoint` to `path`; returns how many layers it touches."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(checkpoint, framework="pt") as f:
        for key in sorted(f.keys()):
            name = None
            if unet and (m := ATTENTION.match(key)):
                name = "lora_unet_" + m.group(1).replace(".", "_")
            elif unet and conv and (m := CONV.match(key)):
                name = "lora_unet_" + m.group(1).replace(".", "_")
            elif text and (m := TEXT.match(key)):
                prefix = "lora_te1" if m.group(1).startswith("conditioner") else "lora_te"
                name = f"{prefix}_text_model_encoder_layers_{m.group(2)}_{m.group(3).replace('.', '_')}"
            if name is None:
                continue
            shape = f.get_slice(key).get_shape()
            out_ch, in_ch = shape[0], shape[1]
            if len(shape) == 4:
                down = torch.randn((rank, in_ch, shape[2], shape[3]), generator=g)
                up = torch.randn((out_ch, rank, 1, 1), generator=g)
            else:
                down = torch.randn((rank, in_ch), generator=g)
                up = torch.randn((out_ch, rank), generator=g)
            fan = (in_ch * (shape[2] * shape[3] if len(shape) == 4 else 1)) ** 0.5
            tensors[f"{name}.lora_down.weight"] = (down * strength / fan).contiguous()
            tensors[f"{name}.lora_up.weight"] = (up * strength / rank ** 0.5).contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(tensors, path, metadata={"ss_network_dim": str(rank), "magicfusion_test_lora": "1"})
    return len(tensors) // 3
