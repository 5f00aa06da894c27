"""diffusers -> LDM (original SD1 checkpoint) key names for the toy UNet and VAE.

Only renaming (and the VAE attention's linear -> 1x1 conv reshape): the tensors are the
same. The other direction is diffusers' own ``convert_ldm_unet_checkpoint`` /
``convert_ldm_vae_checkpoint`` (``diffusers.loaders.single_file_utils``), which toy.py uses
to load the committed LDM-layout files, so the mapping is checked by a round trip
(``check_roundtrip``).
"""

from __future__ import annotations

import arch

_RESNET_UNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_block_map() -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix, for the architecture in arch.UNET_LDM."""
    u = arch.UNET_LDM
    n, r = len(u["channel_mult"]), u["num_res_blocks"]
    attn = []
    ds = 1
    for _ in range(n):
        attn.append(ds in u["attention_resolutions"])
        ds *= 2
    m = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
         "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
         "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
         "mid_block.resnets.1": "middle_block.2"}
    k = 1
    for i in range(n):
        for j in range(r):
            m[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{k}.0"
            if attn[i]:
                m[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{k}.1"
            k += 1
        if i != n - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{k}.0.op"
            k += 1
    k = 0
    for i in range(n):
        level = n - 1 - i
        for j in range(r + 1):
            m[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{k}.0"
            slot = 1
            if attn[level]:
                m[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{k}.1"
                slot = 2
            if j == r and i != n - 1:
                m[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{k}.{slot}.conv"
            k += 1
    return m


def _rename(key: str, blocks: dict[str, str]) -> tuple[str, str, str]:
    """Split a diffusers key into (diffusers prefix, LDM prefix, rest) by the longest block prefix."""
    best = max((p for p in blocks if key == p or key.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise KeyError(f"no LDM name for {key}")
    return best, blocks[best], key[len(best) + 1:]


def unet_to_ldm(sd: dict) -> dict:
    """A diffusers UNet2DConditionModel state dict -> ``model.diffusion_model.*`` keys."""
    blocks = _unet_block_map()
    out = {}
    for key, v in sd.items():
        src, dst, rest = _rename(key, blocks)
        if ".resnets." in src or src.startswith("mid_block.resnets"):
            head, _, tail = rest.partition(".")
            rest = f"{_RESNET_UNET[head]}.{tail}"
        out[f"model.diffusion_model.{dst}.{rest}"] = v
    return out


def _vae_block_map() -> dict[str, str]:
    v = arch.VAE_LDM
    n, r = len(v["ch_mult"]), v["num_res_blocks"]
    m = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        m |= {f"{part}.conv_in": f"{part}.conv_in", f"{part}.conv_norm_out": f"{part}.norm_out",
              f"{part}.conv_out": f"{part}.conv_out", f"{part}.mid_block.resnets.0": f"{part}.mid.block_1",
              f"{part}.mid_block.resnets.1": f"{part}.mid.block_2", f"{part}.mid_block.attentions.0": f"{part}.mid.attn_1"}
    for i in range(n):
        for j in range(r):
            m[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        if i != n - 1:
            m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
    for i in range(n):
        level = n - 1 - i  # diffusers counts the decoder's levels from the bottom, LDM from the top
        for j in range(r + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{level}.block.{j}"
        if i != n - 1:
            m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{level}.upsample.conv"
    return m


def vae_to_ldm(sd: dict) -> dict:
    """A diffusers AutoencoderKL state dict -> ``first_stage_model.*`` keys."""
    blocks = _vae_block_map()
    out = {}
    for key, v in sd.items():
        src, dst, rest = _rename(key, blocks)
        if src.endswith("attentions.0"):
            head, _, tail = rest.rpartition(".")
            rest = f"{_VAE_ATTN[head]}.{tail}"
            if v.ndim == 2:  # LDM's attention uses 1x1 convs
                v = v[:, :, None, None]
        elif "resnets" in src and rest.startswith("conv_shortcut."):
            rest = rest.replace("conv_shortcut.", "nin_shortcut.")
        out[f"first_stage_model.{dst}.{rest}"] = v
    return out


def half(sd: dict) -> dict:
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sorted(sd.items())}


# --------------------------------------------------------------------------- LDM -> diffusers (diffusers' converters)

def original_config(scale_factor: float, clip_dir: str = "clip") -> dict:
    """The A1111 yaml (an ldm LatentDiffusion) of every toy checkpoint."""
    return {"model": {
        "base_learning_rate": 1.0e-4,
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": arch.LINEAR_START, "linear_end": arch.LINEAR_END, "num_timesteps_cond": 1,
            "log_every_t": 200, "timesteps": arch.TIMESTEPS, "first_stage_key": "jpg", "cond_stage_key": "txt",
            "image_size": arch.UNET_LDM["image_size"], "channels": 4, "cond_stage_trainable": False,
            "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema", "scale_factor": scale_factor,
            "use_ema": False,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": dict(arch.UNET_LDM)},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
                "embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": dict(arch.VAE_LDM),
                "lossconfig": {"target": "torch.nn.Identity"}}},
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                                  "params": {"version": clip_dir}},
        }}}


def unet_from_ldm(ldm_sd: dict, scale_factor: float = 1.0):
    """A diffusers UNet2DConditionModel (float32) from ``model.diffusion_model.*`` tensors, with
    the config and weights diffusers' own single-file converters derive from the LDM yaml."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
    cfg = original_config(scale_factor)
    ck = {k: v.float() for k, v in ldm_sd.items()}
    dconf = create_unet_diffusers_config_from_ldm(cfg, ck, image_size=arch.UNET_LDM["image_size"] * 8)
    unet = UNet2DConditionModel(**dconf)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ck, dconf), strict=True)
    return unet.eval()


def vae_from_ldm(ldm_sd: dict, scale_factor: float):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm
    cfg = original_config(scale_factor)
    ck = {k: v.float() for k, v in ldm_sd.items()}
    dconf = create_vae_diffusers_config_from_ldm(cfg, ck, image_size=arch.VAE_LDM["resolution"])
    vae = AutoencoderKL(**dconf)
    vae.load_state_dict(convert_ldm_vae_checkpoint(ck, dconf), strict=True)
    return vae.eval()


def check_roundtrip(unet=None, vae=None) -> dict:
    """diffusers model -> LDM keys -> diffusers' converters -> identical tensors and outputs."""
    import torch
    report = {}
    g = torch.Generator().manual_seed(0)
    if unet is not None:
        back = unet_from_ldm(unet_to_ldm(unet.state_dict()))
        a, b = unet.state_dict(), back.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "UNet tensors differ"
        x, c = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
        t = torch.tensor([10, 700])
        with torch.no_grad():
            report["unet_max_abs_diff"] = float((unet(x, t, c).sample - back(x, t, c).sample).abs().max())
        report["unet_config_diff"] = {k: (v, back.config[k]) for k, v in arch.diffusers_unet_config().items()
                                      if (tuple(v) if isinstance(v, (list, tuple)) else v)
                                      != (tuple(back.config[k]) if isinstance(back.config[k], (list, tuple)) else back.config[k])}
    if vae is not None:
        back = vae_from_ldm(vae_to_ldm(vae.state_dict()), 1.0)
        a, b = vae.state_dict(), back.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "VAE tensors differ"
        x = torch.rand(1, 3, 128, 128, generator=g) * 2 - 1
        with torch.no_grad():
            report["vae_max_abs_diff"] = float((vae.decode(vae.encode(x).latent_dist.mean).sample
                                                - back.decode(back.encode(x).latent_dist.mean).sample).abs().max())
    return report
