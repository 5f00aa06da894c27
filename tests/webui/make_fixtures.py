"""Write tiny random SD1- and SDXL-architecture checkpoints for the WebUI test bed.

Run it with the WebUI's own Python (it imports the WebUI's ``ldm`` package from
``<webui>/repositories/stable-diffusion-stability-ai`` and the venv's
``transformers``/``open_clip``)::

    $MAGICFUSION_WEBUI_DIR/venv/bin/python tests/webui/make_fixtures.py --out /tmp/fixtures

What it writes into ``--out``:

* ``clip-tiny/``: a local transformers ``CLIPTextModel`` (hidden size 32, 2 layers)
  with a real CLIP BPE tokenizer (``vocab.json``/``merges.txt`` rebuilt from the
  ``bpe_simple_vocab_16e6.txt.gz`` that ``open_clip`` or ``clip`` ships).
* ``checkpoints/tiny-eps-a.safetensors`` / ``checkpoints/tiny-eps-b.safetensors``:
  epsilon-prediction models with different seeds, and ``checkpoints/tiny-v.safetensors``:
  a v-prediction model; ``checkpoints/tiny-xl-a`` / ``tiny-xl-b``: two SDXL-architecture
  (sgm ``DiffusionEngine``) epsilon models, which the WebUI loads as SDXL. Pass
  ``checkpoints/`` as ``--ckpt-dir`` (A1111 scans it recursively, so the CLIP folder must
  not be inside it). Each has a ``<name>.yaml`` beside it (A1111 uses the yaml next to a
  checkpoint), which names the absolute path of ``clip-tiny``.
* ``manifest.json``: names, seeds, parameterisation, sizes and sha256 of each file.

The output is deterministic: the same generator and library versions give the same
bytes. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

CLIP_HIDDEN = 32
CLIP_LAYERS = 2
CLIP_HEADS = 2
CLIP_INTERMEDIATE = 64
UNET_CHANNELS = 32
UNET_MULT = [1, 2]  # 32, 64 channels; one downsample
VAE_CH = 32
VAE_MULT = [1, 1, 2, 2]  # 32, 32, 64, 64 channels; four levels = 8x downsampling
RERANDOM_STD = 0.02  # std for parameters that upstream initialises to exactly zero

MODELS = [
    # name, seed, parameterization, family ("sd1": ldm LatentDiffusion; "xl": sgm DiffusionEngine)
    ("tiny-eps-a", 1001, "eps", "sd1"),
    ("tiny-eps-b", 2002, "eps", "sd1"),
    ("tiny-v", 3003, "v", "sd1"),
    ("tiny-xl-a", 5005, "eps", "xl"),
    ("tiny-xl-b", 6006, "eps", "xl"),
]
XL_VECTOR_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
XL_SIZE_EMBED = 256  # per number: each key embeds 2 numbers -> 512; 3 keys -> adm_in_channels 1536


VAE_SEED = 4242


def webui_dir() -> str:
    return os.path.abspath(os.path.expanduser(
        os.environ.get("MAGICFUSION_WEBUI_DIR", "~/stable-diffusion-webui")))


def setup_imports(root: str) -> None:
    ldm_repo = os.path.join(root, "repositories", "stable-diffusion-stability-ai")
    sgm_repo = os.path.join(root, "repositories", "generative-models")
    for repo, package in ((ldm_repo, "ldm"), (sgm_repo, "sgm")):
        if not os.path.isdir(os.path.join(repo, package)):
            raise SystemExit(f"make_fixtures: no {package} package under {repo}")
    for p in (ldm_repo, sgm_repo, root):
        if p not in sys.path:
            sys.path.insert(0, p)


# --------------------------------------------------------------------------- tokenizer

def _bytes_to_unicode() -> dict[int, str]:
    # The byte->unicode table used by GPT-2/CLIP BPE (a published algorithm).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _find_bpe_file() -> str:
    for mod in ("open_clip", "clip"):
        try:
            m = __import__(mod)
        except Exception:  # noqa: BLE001, S112 - any import problem means "not usable"
            continue
        for sub in ("", "clip"):
            p = os.path.join(os.path.dirname(m.__file__), sub, "bpe_simple_vocab_16e6.txt.gz")
            if os.path.isfile(p):
                return p
    raise SystemExit("make_fixtures: bpe_simple_vocab_16e6.txt.gz not found (install open_clip_torch or clip)")


def write_tokenizer(dst: str) -> None:
    with gzip.open(_find_bpe_file(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    with open(os.path.join(dst, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False, sort_keys=False)
    with open(os.path.join(dst, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    with open(os.path.join(dst, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=1)
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump({**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                   "do_lower_case": True, "errors": "replace",
                   "add_prefix_space": False}, f, indent=1)


def write_text_encoder(dst: str) -> None:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    os.makedirs(dst, exist_ok=True)
    write_tokenizer(dst)
    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=CLIP_HIDDEN, intermediate_size=CLIP_INTERMEDIATE,
        num_hidden_layers=CLIP_LAYERS, num_attention_heads=CLIP_HEADS,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=CLIP_HIDDEN,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    torch.manual_seed(7)
    model = CLIPTextModel(cfg).eval()
    # transformers zero-initialises every Linear bias and LayerNorm bias. With a zero
    # final_layer_norm bias each token vector has mean exactly 0, and A1111's emphasis
    # ("Original": z * mean(z) / mean(z*w)) then divides 0 by 0 for some prompts -> NaN.
    _randomise_zeros(model, torch.Generator().manual_seed(7))
    _round_to_fp16(model)
    model.save_pretrained(dst, safe_serialization=True)
    tok = CLIPTokenizer.from_pretrained(dst)
    ids = tok("a photo of a cat, BREAK")["input_ids"]
    assert ids[0] == 49406 and ids[-1] == 49407, ids


# --------------------------------------------------------------------------- models

def model_config(name: str, parameterization: str, clip_dir: str) -> dict:
    params = {
        "linear_start": 0.00085, "linear_end": 0.0120, "num_timesteps_cond": 1,
        "log_every_t": 200, "timesteps": 1000, "first_stage_key": "jpg",
        "cond_stage_key": "txt", "image_size": 8, "channels": 4,
        "cond_stage_trainable": False, "conditioning_key": "crossattn",
        "monitor": "val/loss_simple_ema", "scale_factor": 0.18215, "use_ema": False,
        "unet_config": {
            "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": {
                "image_size": 8, "in_channels": 4, "out_channels": 4,
                "model_channels": UNET_CHANNELS, "attention_resolutions": [1, 2],
                "num_res_blocks": 1, "channel_mult": UNET_MULT, "num_heads": 2,
                "use_spatial_transformer": True, "transformer_depth": 1,
                "context_dim": CLIP_HIDDEN, "use_checkpoint": False, "legacy": False,
            },
        },
        "first_stage_config": {
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {
                "embed_dim": 4, "monitor": "val/rec_loss",
                "ddconfig": {
                    "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3,
                    "out_ch": 3, "ch": VAE_CH, "ch_mult": VAE_MULT, "num_res_blocks": 1,
                    "attn_resolutions": [], "dropout": 0.0,
                },
                "lossconfig": {"target": "torch.nn.Identity"},
            },
        },
        "cond_stage_config": {
            "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
            "params": {"version": clip_dir},
        },
    }
    if parameterization == "v":
        params = {"parameterization": "v", **params}
    return {"model": {"base_learning_rate": 1.0e-4,
                      "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                      "params": params}}


def xl_model_config(clip_dir: str) -> dict:
    """An SDXL-architecture model (sgm DiffusionEngine: the WebUI treats it as SDXL) at toy
    size. Its conditioner is the tiny CLIP (cross-attention, penultimate layer) and SDXL's
    size embedders (the "vector" cond); the pooled OpenCLIP-G text vector is left out, as
    it would need a second text encoder. The VAE config, and weights, are the SD1 fixtures'."""
    ddconfig = model_config("", "eps", clip_dir)["model"]["params"]["first_stage_config"]["params"]["ddconfig"]
    sgm = "sgm.modules.diffusionmodules."
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
        "scale_factor": 0.18215, "disable_first_stage_autocast": True,
        "denoiser_config": {"target": sgm + "denoiser.DiscreteDenoiser", "params": {
            "num_idx": 1000,
            "weighting_config": {"target": sgm + "denoiser_weighting.EpsWeighting"},
            "scaling_config": {"target": sgm + "denoiser_scaling.EpsScaling"},
            "discretization_config": {"target": sgm + "discretizer.LegacyDDPMDiscretization"}}},
        "network_config": {"target": sgm + "openaimodel.UNetModel", "params": {
            "adm_in_channels": 2 * XL_SIZE_EMBED * len(XL_VECTOR_KEYS), "num_classes": "sequential",
            "use_checkpoint": False, "in_channels": 4, "out_channels": 4,
            "model_channels": UNET_CHANNELS, "attention_resolutions": [1, 2], "num_res_blocks": 1,
            "channel_mult": UNET_MULT, "num_head_channels": 16, "use_spatial_transformer": True,
            "use_linear_in_transformer": True, "transformer_depth": 1, "context_dim": CLIP_HIDDEN,
            "spatial_transformer_attn_type": "softmax", "legacy": False}},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": [
            {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
             "params": {"version": clip_dir, "layer": "hidden", "layer_idx": CLIP_LAYERS - 1}},
            *({"is_trainable": False, "input_key": key, "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
               "params": {"outdim": XL_SIZE_EMBED}} for key in XL_VECTOR_KEYS)]}},
        "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "params": {
            "embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": {**ddconfig, "attn_type": "vanilla"},
            "lossconfig": {"target": "torch.nn.Identity"}}}}}}


def _round_to_fp16(module) -> None:
    """Make every float parameter exactly representable in fp16 (checkpoints are fp16)."""
    import torch
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                p.copy_(p.half().float())


def _randomise_zeros(module, gen) -> int:
    """Give parameters that upstream zero-initialises (output convs, norm biases) small
    random values, so a random UNet does not predict exactly 0 everywhere."""
    import torch
    n = 0
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            if p.is_floating_point() and torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=gen) * RERANDOM_STD)
                n += 1
    return n


def _calibrate_unet(model, gen) -> float:
    """Scale the UNet's last conv so its output has unit std on a unit-noise input, as a
    trained epsilon/v model roughly does. Returns the applied factor."""
    import torch
    unet = model.model.diffusion_model
    x = torch.randn((2, 4, 8, 8), generator=gen)
    t = torch.tensor([250, 750])
    ctx = torch.randn((2, 77, CLIP_HIDDEN), generator=gen)
    extra = {}
    if getattr(unet, "num_classes", None) is not None:  # SDXL: the size vector
        extra["y"] = torch.randn((2, unet.label_emb[0][0].in_features), generator=gen)
    with torch.no_grad():
        out = unet(x, t, context=ctx, **extra)
        factor = 1.0 / float(out.std())
        last = unet.out[-1]
        last.weight.mul_(factor)
        last.bias.mul_(factor)
    return factor


def _calibrate_vae(model, gen) -> float:
    """Make the random VAE behave like a trained one where the WebUI relies on it.

    Encoder: the posterior's log-variance is set to -30 (std 3e-7). A1111 samples the
    posterior with the *global* torch RNG when it encodes an img2img init image, so with
    a random log-variance (~0) img2img would not be reproducible; a trained SD VAE has a
    tiny posterior std too. The mean is scaled so encoded images have latent std
    1/scale_factor, like SD's VAE.
    Decoder: the last conv is scaled so a typical latent decodes to std 0.5 in [-1, 1]
    space: images then use the whole pixel range without saturating."""
    import torch
    fs = model.first_stage_model
    zc = fs.quant_conv.out_channels // 2
    img = torch.rand((2, 3, 64, 64), generator=gen) * 2 - 1
    with torch.no_grad():
        fs.quant_conv.weight[zc:] = 0
        fs.quant_conv.bias[zc:] = -30.0
        mean = fs.quant_conv(fs.encoder(img))[:, :zc]
        k = (1.0 / model.scale_factor) / float(mean.std())
        fs.quant_conv.weight[:zc] *= k
        fs.quant_conv.bias[:zc] = fs.quant_conv.bias[:zc] * k - mean.mean(dim=(0, 2, 3)) * k
    z = torch.randn((1, 4, 8, 8), generator=gen) / model.scale_factor
    dec = model.first_stage_model.decoder
    with torch.no_grad():
        out = fs.decode(z)  # post_quant_conv + decoder, as LatentDiffusion.decode_first_stage
        factor = 0.5 / float(out.std())
        dec.conv_out.weight.mul_(factor)
        out = fs.decode(z)
        dec.conv_out.bias.sub_(out.mean(dim=(0, 2, 3)))
    return factor


def make_model(name: str, seed: int, parameterization: str, family: str, clip_dir: str, out: str,
               vae_state: dict | None = None) -> tuple[dict, dict]:
    """Write <name>.safetensors and <name>.yaml into `out`; returns (manifest entry, VAE state).

    Every fixture shares one VAE, as real checkpoints of a family share their VAE: two
    models' images then differ only by their UNets (and an expert that runs alone on the main
    model's latents decodes to exactly its own image). The first model builds and calibrates
    it; later ones (and the SDXL-architecture ones, whose VAE has the same layout) load it.
    """
    import torch
    import yaml
    from omegaconf import OmegaConf
    from safetensors.torch import save_file
    if family == "xl":
        from sgm.util import instantiate_from_config
        cfg = xl_model_config(clip_dir)
    else:
        from ldm.util import instantiate_from_config
        cfg = model_config(name, parameterization, clip_dir)
    torch.manual_seed(seed)
    model = instantiate_from_config(OmegaConf.create(cfg).model).eval()
    gen = torch.Generator().manual_seed(seed)
    zeros = _randomise_zeros(model.model, gen)
    unet_factor = _calibrate_unet(model, gen)
    vae_factor = None
    if vae_state is None:
        torch.manual_seed(VAE_SEED)
        vae = instantiate_from_config(OmegaConf.create(cfg).model.params.first_stage_config)
        model.first_stage_model.load_state_dict(vae.state_dict())
        vae_gen = torch.Generator().manual_seed(VAE_SEED)
        zeros += _randomise_zeros(model.first_stage_model, vae_gen)
        vae_factor = round(_calibrate_vae(model, vae_gen), 6)
        _round_to_fp16(model.first_stage_model)
        vae_state = {k: v.detach().clone() for k, v in model.first_stage_model.state_dict().items()}
    else:
        model.first_stage_model.load_state_dict(vae_state)
    _round_to_fp16(model.model)
    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach()
        if v.is_floating_point() and k.split(".")[0] in ("model", "first_stage_model", "cond_stage_model", "conditioner"):
            v = v.half()  # weights in fp16 (A1111 upcasts with --no-half); schedule buffers stay fp32
        sd[k] = v.contiguous().clone()
    ckpt = os.path.join(out, name + ".safetensors")
    save_file(sd, ckpt, metadata={"format": "pt", "magicfusion_fixture": name})
    with open(os.path.join(out, name + ".yaml"), "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    with torch.no_grad():
        bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v.float()).all()]
    assert not bad, bad
    return {"name": name, "seed": seed, "parameterization": parameterization, "family": family,
            "rerandomised_zero_tensors": zeros, "unet_out_scale": round(unet_factor, 6),
            "vae_out_scale": vae_factor, "tensors": len(sd)}, vae_state


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_set(out: str, clip_name: str, models, manifest: dict, log=print) -> dict:
    """Write a text encoder (`clip_name/`), `checkpoints/` with `models` (name, seed,
    parameterization, family) and `manifest.json` into `out`; returns the manifest.

    The set is built in a sibling temp dir and renamed into place, so a half-written set is
    never used. The yaml files name the text encoder's absolute path: the models are built
    against the temp copy, then their yaml files are rewritten to the final path.
    """
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".fixtures-", dir=parent)
    try:
        clip_tmp, clip_final = os.path.join(tmp, clip_name), os.path.join(out, clip_name)
        write_text_encoder(clip_tmp)
        ckdir = os.path.join(tmp, "checkpoints")
        os.makedirs(ckdir)
        entries, vae_state = [], None
        for name, seed, param, family in models:
            t0 = time.monotonic()
            info, vae_state = make_model(name, seed, param, family, clip_tmp, ckdir, vae_state)
            ypath = os.path.join(ckdir, name + ".yaml")
            with open(ypath) as f:
                text = f.read()
            with open(ypath, "w") as f:
                f.write(text.replace(clip_tmp, clip_final))
            info["bytes"] = os.path.getsize(os.path.join(ckdir, name + ".safetensors"))
            entries.append(info)
            log(f"{name}: {time.monotonic() - t0:.1f} s, {info['bytes'] / 1e6:.1f} MB")
        files = {}
        for root, _, names in os.walk(tmp):
            for n in sorted(names):
                p = os.path.join(root, n)
                files[os.path.relpath(p, tmp)] = {"bytes": os.path.getsize(p), "sha256": _sha256(p)}
        manifest = {"models": entries, "clip_dir": clip_final, "checkpoint_dir": os.path.join(out, "checkpoints"),
                    **manifest, "files": dict(sorted(files.items()))}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory (created; must be empty or absent)")
    ap.add_argument("--webui-dir", default=webui_dir(),
                    help="A1111 install (default: $MAGICFUSION_WEBUI_DIR or ~/stable-diffusion-webui)")
    args = ap.parse_args(argv)

    setup_imports(os.path.abspath(args.webui_dir))
    import torch
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # bitwise-stable reductions during calibration
    manifest = write_set(args.out, "clip-tiny", MODELS, {
        "clip": {"hidden_size": CLIP_HIDDEN, "layers": CLIP_LAYERS, "heads": CLIP_HEADS},
        "unet": {"model_channels": UNET_CHANNELS, "channel_mult": UNET_MULT},
        "vae": {"ch": VAE_CH, "ch_mult": VAE_MULT}}, log=lambda line: None)
    total = sum(v["bytes"] for v in manifest["files"].values())
    print(f"make_fixtures: wrote {len(MODELS)} checkpoints + clip-tiny to {os.path.abspath(args.out)} ({total / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
