"""The toy models' architecture, once: the LDM (A1111 yaml) parameters and the matching
diffusers configs. Only plain dicts here (no imports beyond the standard library), so
assemble.py can use it under the WebUI's Python."""

from __future__ import annotations

# ldm.modules.diffusionmodules.openaimodel.UNetModel
UNET_LDM = {
    "image_size": 16, "in_channels": 4, "out_channels": 4, "model_channels": 64,
    "attention_resolutions": [2, 4], "num_res_blocks": 2, "channel_mult": [1, 1, 1],
    "num_heads": 2, "use_spatial_transformer": True, "transformer_depth": 1,
    "context_dim": 32, "use_checkpoint": False, "legacy": False,
}
# ldm.models.autoencoder.AutoencoderKL ddconfig
VAE_LDM = {
    "double_z": True, "z_channels": 4, "resolution": 128, "in_channels": 3, "out_ch": 3,
    "ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
}
LINEAR_START, LINEAR_END, TIMESTEPS = 0.00085, 0.012, 1000


def diffusers_unet_config() -> dict:
    u = UNET_LDM
    chans = [u["model_channels"] * m for m in u["channel_mult"]]
    down, ds = [], 1
    for _ in chans:
        down.append("CrossAttnDownBlock2D" if ds in u["attention_resolutions"] else "DownBlock2D")
        ds *= 2
    up = [b.replace("Down", "Up") for b in reversed(down)]
    return {
        "sample_size": u["image_size"], "in_channels": u["in_channels"], "out_channels": u["out_channels"],
        "block_out_channels": tuple(chans), "layers_per_block": u["num_res_blocks"],
        "down_block_types": tuple(down), "up_block_types": tuple(up),
        "cross_attention_dim": u["context_dim"],
        "attention_head_dim": u["num_heads"],  # diffusers' SD1 naming: this is the number of heads
        "transformer_layers_per_block": u["transformer_depth"], "use_linear_projection": False,
        "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
        "act_fn": "silu", "downsample_padding": 1, "center_input_sample": False,
    }


def diffusers_vae_config() -> dict:
    v = VAE_LDM
    n = len(v["ch_mult"])
    return {
        "in_channels": v["in_channels"], "out_channels": v["out_ch"],
        "down_block_types": ("DownEncoderBlock2D",) * n, "up_block_types": ("UpDecoderBlock2D",) * n,
        "block_out_channels": tuple(v["ch"] * m for m in v["ch_mult"]),
        "layers_per_block": v["num_res_blocks"], "latent_channels": v["z_channels"],
        "norm_num_groups": 32, "sample_size": v["resolution"], "act_fn": "silu",
    }


def alphas_cumprod():
    """SD1's scaled-linear schedule (as ldm's make_beta_schedule("linear") in float64)."""
    import torch
    betas = torch.linspace(LINEAR_START ** 0.5, LINEAR_END ** 0.5, TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)
