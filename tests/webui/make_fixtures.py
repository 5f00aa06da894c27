"""Write tiny random SD1-, SD2- and SDXL-architecture checkpoints for the WebUI test bed.

Run it with the WebUI's own Python (it imports the WebUI's ``ldm`` and ``sgm`` packages from
``<webui>/repositories/`` and the venv's ``transformers``/``open_clip``)::

    $MAGICFUSION_WEBUI_DIR/venv/bin/python tests/webui/make_fixtures.py --out /tmp/fixtures

What it writes into ``--out``:

* ``clip-tiny/``: a local transformers ``CLIPTextModel`` (hidden size 32, 2 layers)
  with a real CLIP BPE tokenizer (``vocab.json``/``merges.txt`` rebuilt from the
  ``bpe_simple_vocab_16e6.txt.gz`` that ``open_clip`` or ``clip`` ships).
* ``open_clip/magicfusion-tiny-openclip.json``: an open_clip model config for a tiny
  OpenCLIP text tower (width 32, 2 layers). The SD2 and SDXL yaml files name it as their
  ``arch``; a process that builds those models must first call
  ``open_clip.add_model_config(<that file>)`` (the test bed's helper extension does it in
  the WebUI, when its script is imported, before the WebUI loads a model).
* ``checkpoints/`` (pass it as ``--ckpt-dir``; A1111 scans it recursively, so the text
  encoder folders must not be inside it), each ``<name>.safetensors`` with its
  ``<name>.yaml`` beside it (A1111 uses the yaml next to a checkpoint):

  - ``tiny-eps-a``, ``tiny-eps-b``: SD1 epsilon models (different seeds);
  - ``tiny-eps-b-vae2``: tiny-eps-b's UNet and text encoder, byte for byte, with another VAE;
  - ``tiny-sd2-v``: an SD2-style v-prediction model (OpenCLIP text tower, penultimate layer,
    linear projections in the transformers, ``num_head_channels``): A1111 loads it as SD2;
  - ``tiny-v``: an SD1 model with a v-prediction yaml;
  - ``tiny-xl-a``, ``tiny-xl-b``: SDXL-architecture (sgm ``DiffusionEngine``) epsilon models
    with SDXL's two text encoders (the tiny CLIP and a tiny OpenCLIP-G-style tower whose
    pooled output is part of the ``vector`` cond) and the three size embedders;
  - ``tiny-zz-big``: an SD1 model with a UNet of about 62 M parameters (most of them at
    the 2x2-latent level, so it stays fast) for memory tests; it sorts last, so the WebUI
    still starts with tiny-eps-a.
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

OPENCLIP_ARCH = "magicfusion-tiny-openclip"  # the open_clip model-config name the yaml files use
OPENCLIP_WIDTH = 32  # text tower width (= its cross-attention context width)
OPENCLIP_EMBED = 32  # embed_dim: the pooled (projected) text vector's width
OPENCLIP_SEED = 4545  # one tiny OpenCLIP tower, shared by every model that has one
OPENCLIP_CONFIG = {
    "embed_dim": OPENCLIP_EMBED,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "mlp_ratio": 1.0,
                   "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": OPENCLIP_WIDTH, "heads": 2,
                 "layers": 2},
}

# The memory-test UNet: 32 channels at the 8x8 latent level, 32 at 4x4, 576 at 2x2 (where a
# weight is used at 4 positions, not 64): 61.7 M parameters, 247 MB in fp32, and still about
# 0.8 GFLOP per sampling step at 64x64.
BIG_UNET = {"model_channels": 32, "channel_mult": [1, 1, 18], "attention_resolutions": [4]}

MODELS = [
    # name, seed, parameterization, family ("sd1"/"sd2": ldm LatentDiffusion; "xl": sgm
    # DiffusionEngine)[, options: "vae_seed" (a VAE other than the shared one), "unet" (UNet
    # config overrides), "same_as" (a model whose UNet and text encoder must be byte-equal)]
    ("tiny-eps-a", 1001, "eps", "sd1"),
    ("tiny-eps-b", 2002, "eps", "sd1"),
    ("tiny-eps-b-vae2", 2002, "eps", "sd1", {"vae_seed": 4343, "same_as": "tiny-eps-b"}),
    ("tiny-sd2-v", 7007, "v", "sd2"),
    ("tiny-v", 3003, "v", "sd1"),
    ("tiny-xl-a", 5005, "eps", "xl"),
    ("tiny-xl-b", 6006, "eps", "xl"),
    ("tiny-zz-big", 8008, "eps", "sd1", {"unet": BIG_UNET}),
]
XL_VECTOR_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
XL_SIZE_EMBED = 256  # per number: each key embeds 2 numbers -> 512; 3 keys -> 1536
XL_CONTEXT = CLIP_HIDDEN + OPENCLIP_WIDTH  # crossattn: the two text encoders' outputs concatenated
XL_ADM = OPENCLIP_EMBED + 2 * XL_SIZE_EMBED * len(XL_VECTOR_KEYS)  # vector: pooled text + sizes


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


# --------------------------------------------------------------------------- open_clip

def write_openclip_config(dst_dir: str) -> str:
    """Write the tiny open_clip model config (``<dst_dir>/<OPENCLIP_ARCH>.json``) and register
    it with open_clip in this process; returns the file's path. open_clip names a config by
    its file name, and every process that builds an SD2/SDXL fixture needs it registered."""
    os.makedirs(dst_dir, exist_ok=True)
    path = os.path.join(dst_dir, OPENCLIP_ARCH + ".json")
    with open(path, "w") as f:
        json.dump(OPENCLIP_CONFIG, f, indent=1)
    register_openclip_config(path)
    return path


def register_openclip_config(path: str) -> None:
    import open_clip
    if OPENCLIP_ARCH not in open_clip.list_models():
        open_clip.add_model_config(path)
    assert OPENCLIP_ARCH in open_clip.list_models(), open_clip.list_models()


def _openclip_text_state() -> dict:
    """The one tiny OpenCLIP text tower every SD2/SDXL fixture holds (as SD2 and SDXL
    checkpoints of a family share their text encoder): ``model.*`` keys of an embedder."""
    import open_clip
    import torch
    torch.manual_seed(OPENCLIP_SEED)
    m = open_clip.create_model(OPENCLIP_ARCH, pretrained=None)
    del m.visual  # as FrozenOpenCLIPEmbedder(2) do
    # nn.MultiheadAttention and LayerNorm biases start at exactly 0 (the NaN-prone case that
    # write_text_encoder describes for the CLIP tower)
    _randomise_zeros(m, torch.Generator().manual_seed(OPENCLIP_SEED))
    _round_to_fp16(m)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


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


def sd2_model_config(name: str, parameterization: str) -> dict:
    """An SD2-style model at toy size, as in SD2's own v2-inference(-v).yaml: the OpenCLIP
    text tower (``FrozenOpenCLIPEmbedder``, penultimate layer), ``use_linear_in_transformer``
    and ``num_head_channels``. A1111 treats it as SD2 (the cond stage has ``.model``). Its
    cond-stage params name no ``version``, as SD2's yaml does: the embedder's default
    pretrained tag is then skipped by A1111's DisableInitialization, and the weights come
    from the checkpoint (``cond_stage_model.model.*``)."""
    cfg = model_config(name, parameterization, "")
    params = cfg["model"]["params"]
    unet = params["unet_config"]["params"]
    del unet["num_heads"]
    unet.update({"num_head_channels": 16, "use_linear_in_transformer": True, "context_dim": OPENCLIP_WIDTH})
    params["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                                   "params": {"arch": OPENCLIP_ARCH, "freeze": True, "layer": "penultimate"}}
    return cfg


def xl_model_config(clip_dir: str) -> dict:
    """An SDXL-architecture model (sgm DiffusionEngine: the WebUI treats it as SDXL) at toy
    size, laid out as SDXL base: its conditioner holds the tiny CLIP (hidden layer
    ``CLIP_LAYERS - 1``, i.e. the penultimate), a tiny OpenCLIP-G-style
    ``FrozenOpenCLIPEmbedder2`` (penultimate layer, with its pooled output) and the three size
    embedders. The cross-attention context is the two text encoders' outputs concatenated;
    the ``vector`` cond is the pooled text vector then the sizes. The VAE config, and weights,
    are the SD1 fixtures'."""
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
            "adm_in_channels": XL_ADM, "num_classes": "sequential",
            "use_checkpoint": False, "in_channels": 4, "out_channels": 4,
            "model_channels": UNET_CHANNELS, "attention_resolutions": [1, 2], "num_res_blocks": 1,
            "channel_mult": UNET_MULT, "num_head_channels": 16, "use_spatial_transformer": True,
            "use_linear_in_transformer": True, "transformer_depth": 1, "context_dim": XL_CONTEXT,
            "spatial_transformer_attn_type": "softmax", "legacy": False}},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": [
            {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
             "params": {"version": clip_dir, "layer": "hidden", "layer_idx": CLIP_LAYERS - 1}},
            {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
             "params": {"arch": OPENCLIP_ARCH, "version": "laion2b_s39b_b160k", "freeze": True,
                        "layer": "penultimate", "always_return_pooled": True, "legacy": False}},
            *({"is_trainable": False, "input_key": key, "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
               "params": {"outdim": XL_SIZE_EMBED}} for key in XL_VECTOR_KEYS)]}},
        "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "params": {
            "embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": {**ddconfig, "attn_type": "vanilla"},
            "lossconfig": {"target": "torch.nn.Identity"}}}}}}


def _without_pretrained(cfg: dict) -> dict:
    """A copy of a model config whose OpenCLIP embedders load no pretrained weights (the
    fixture builds them at random; the yaml keeps the pretrained tag a real one has)."""
    cfg = json.loads(json.dumps(cfg))
    params = cfg["model"]["params"]
    embedders = [params.get("cond_stage_config", {})]
    embedders += params.get("conditioner_config", {}).get("params", {}).get("emb_models", [])
    for e in embedders:
        if "OpenCLIP" in e.get("target", ""):
            e["params"]["version"] = None
    return cfg


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


def _calibrate_unet(model, gen, context_dim: int | None = None) -> float:
    """Scale the UNet's last conv so its output has unit std on a unit-noise input, as a
    trained epsilon/v model roughly does. Returns the applied factor."""
    import torch
    unet = model.model.diffusion_model
    x = torch.randn((2, 4, 8, 8), generator=gen)
    t = torch.tensor([250, 750])
    ctx = torch.randn((2, 77, context_dim or CLIP_HIDDEN), generator=gen)
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


def _make_vae(cfg: dict, model, vae_seed: int) -> tuple[dict, float]:
    """Build and calibrate a VAE from seed `vae_seed` inside `model`; returns its state and
    the decoder's output scale."""
    import torch
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf
    torch.manual_seed(vae_seed)
    vae = instantiate_from_config(OmegaConf.create(cfg).model.params.first_stage_config)
    model.first_stage_model.load_state_dict(vae.state_dict())
    vae_gen = torch.Generator().manual_seed(vae_seed)
    _randomise_zeros(model.first_stage_model, vae_gen)
    factor = round(_calibrate_vae(model, vae_gen), 6)
    _round_to_fp16(model.first_stage_model)
    return {k: v.detach().clone() for k, v in model.first_stage_model.state_dict().items()}, factor


def _openclip_embedders(model, family: str) -> list:
    if family == "sd2":
        return [model.cond_stage_model]
    if family == "xl":
        return [e for e in model.conditioner.embedders if hasattr(e, "model") and hasattr(e.model, "ln_final")]
    return []


def make_model(name: str, seed: int, parameterization: str, family: str, clip_dir: str, out: str,
               shared: dict | None = None, options: dict | None = None) -> dict:
    """Write <name>.safetensors and <name>.yaml into `out`; returns the manifest entry.

    Every fixture shares one VAE (seed ``VAE_SEED``, unless ``options["vae_seed"]`` names
    another), as real checkpoints of a family share their VAE: two models' images then differ
    only by their UNets (and an expert that runs alone on the main model's latents decodes to
    exactly its own image). Likewise one tiny OpenCLIP tower is shared by every SD2/SDXL
    fixture, as the CLIP folder is by every SD1/SDXL one. `shared` caches the VAEs (by seed)
    and the OpenCLIP state between calls. ``options["unet"]`` overrides UNet config params.
    """
    import torch
    import yaml
    from omegaconf import OmegaConf
    from safetensors.torch import save_file
    shared = {} if shared is None else shared
    options = options or {}
    if family == "xl":
        from sgm.util import instantiate_from_config
        cfg = xl_model_config(clip_dir)
        unet_params = cfg["model"]["params"]["network_config"]["params"]
    else:
        from ldm.util import instantiate_from_config
        cfg = sd2_model_config(name, parameterization) if family == "sd2" else model_config(name, parameterization, clip_dir)
        unet_params = cfg["model"]["params"]["unet_config"]["params"]
    unet_params.update(options.get("unet", {}))
    torch.manual_seed(seed)
    model = instantiate_from_config(OmegaConf.create(_without_pretrained(cfg)).model).eval()
    gen = torch.Generator().manual_seed(seed)
    zeros = _randomise_zeros(model.model, gen)
    unet_factor = _calibrate_unet(model, gen, unet_params["context_dim"])
    for embedder in _openclip_embedders(model, family):
        if "openclip" not in shared:
            shared["openclip"] = _openclip_text_state()
        embedder.model.load_state_dict(shared["openclip"])
    vae_seed = options.get("vae_seed", VAE_SEED)
    vae_factor = None
    if ("vae", vae_seed) not in shared:
        shared[("vae", vae_seed)], vae_factor = _make_vae(cfg, model, vae_seed)
    model.first_stage_model.load_state_dict(shared[("vae", vae_seed)])
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
    unet_n = sum(v.numel() for k, v in sd.items() if k.startswith("model.diffusion_model."))
    return {"name": name, "seed": seed, "parameterization": parameterization, "family": family,
            "vae_seed": vae_seed, "unet_parameters": unet_n, "weights_sha256": weight_digests(sd),
            "rerandomised_zero_tensors": zeros, "unet_out_scale": round(unet_factor, 6),
            "vae_out_scale": vae_factor, "tensors": len(sd)}


WEIGHT_PARTS = {"unet": ("model.diffusion_model.",), "text_encoder": ("cond_stage_model.", "conditioner."),
                "vae": ("first_stage_model.",)}


def weight_digests(sd: dict) -> dict:
    """Per part (unet, text_encoder, vae): the digest that the test-bed extension's
    GET /magicfusion-testbed/v1/main-weights reports for a loaded model (see
    testbed_extension): sha256 over the sorted sha256s of the part's tensors, each over
    ``"<dtype>|<shape>|"`` and its bytes, with float weights in fp32 as the WebUI runs them
    with --no-half. Key names are left out, so the WebUI's hijack wrappers do not matter."""
    import torch
    out = {}
    for part, prefixes in WEIGHT_PARTS.items():
        digests = []
        for k, t in sd.items():
            if not k.startswith(prefixes):
                continue
            t = t.float() if t.is_floating_point() else t
            t = t.contiguous()
            h = hashlib.sha256(f"{str(t.dtype).removeprefix('torch.')}|{','.join(map(str, t.shape))}|".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy())
            digests.append(h.hexdigest())
        out[part] = hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()
    return out


def _check_same_as(ckdir: str, name: str, other: str) -> None:
    """`name` must hold exactly `other`'s UNet and text encoder, and another VAE."""
    from safetensors.torch import load_file
    a, b = load_file(os.path.join(ckdir, name + ".safetensors")), load_file(os.path.join(ckdir, other + ".safetensors"))
    assert a.keys() == b.keys(), (name, other)
    vae_differs = False
    for k in sorted(a):
        same = a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and bool((a[k] == b[k]).all())
        if k.startswith("first_stage_model."):
            vae_differs |= not same
        else:
            assert same, f"{name}: {k} differs from {other}'s"
    assert vae_differs, f"{name} has {other}'s VAE"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_set(out: str, clip_name: str, models, manifest: dict, log=print) -> dict:
    """Write a text encoder (`clip_name/`), the open_clip config (`open_clip/`, when a model
    needs it), `checkpoints/` with `models` (name, seed, parameterization, family[, options])
    and `manifest.json` into `out`; returns the manifest.

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
        if any(m[3] in ("sd2", "xl") for m in models):
            write_openclip_config(os.path.join(tmp, "open_clip"))
        ckdir = os.path.join(tmp, "checkpoints")
        os.makedirs(ckdir)
        entries, shared = [], {}
        for name, seed, param, family, *rest in models:
            options = rest[0] if rest else {}
            t0 = time.monotonic()
            info = make_model(name, seed, param, family, clip_tmp, ckdir, shared, options)
            if "same_as" in options:
                _check_same_as(ckdir, name, options["same_as"])
                info["same_as"] = options["same_as"]
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
        openclip = os.path.join(out, "open_clip", OPENCLIP_ARCH + ".json")
        manifest = {"models": entries, "clip_dir": clip_final, "checkpoint_dir": os.path.join(out, "checkpoints"),
                    **({"openclip_config": openclip, "openclip_arch": OPENCLIP_ARCH}
                       if os.path.isdir(os.path.join(tmp, "open_clip")) else {}),
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
        "openclip": OPENCLIP_CONFIG, "big_unet": BIG_UNET,
        "unet": {"model_channels": UNET_CHANNELS, "channel_mult": UNET_MULT},
        "vae": {"ch": VAE_CH, "ch_mult": VAE_MULT}}, log=lambda line: None)
    total = sum(v["bytes"] for v in manifest["files"].values())
    print(f"make_fixtures: wrote {len(MODELS)} checkpoints + clip-tiny to {os.path.abspath(args.out)} ({total / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
