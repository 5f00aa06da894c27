"""Finding, loading, caching and freeing expert checkpoints inside the A1111 WebUI.

An expert is resolved only among the WebUI's installed checkpoints and read only through the
WebUI's own checkpoint reader (sd_models.get_checkpoint_state_dict). It is built with the WebUI's
own config detection, model classes and dtype rules, but never through `sd_models.load_model`,
which would make it the main model for a while (other threads would see `shared.sd_model`
become None or the expert, and settings, VAE and hijack state change). Nothing global is
written while an expert loads: the main model, `shared.opts`, the VAE state and the hijack
state stay as they are, so a settings read or another request during the load sees the main
model throughout.

Experts are cached by checkpoint file, least recently used first; `ExpertCache.settle`
trims the cache to the resident bound after each generation, and frees experts that can no
longer fuse with a new main model.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field
from typing import Any

import torch
from modules import devices, sd_disable_initialization, sd_hijack, sd_models, sd_models_config, sd_models_xl, sd_unet, shared
from modules.timer import Timer

from ...params import MagicFusionError
from ..cache import ExpertCache
from . import networks


@dataclass
class Expert:
    model: Any                 # the LatentDiffusion / DiffusionEngine
    info: Any                  # its CheckpointInfo
    is_main: bool              # the main checkpoint itself (one model, several prompts)
    empty_cond: Any = None     # its empty-prompt token rows (1, 77, width), for padding its rows
    wrappers: dict = field(default_factory=dict)

    def release(self) -> None:
        self.wrappers.clear()

    @property
    def title(self) -> str:
        return self.info.title

    @property
    def parameterization(self) -> str:
        return getattr(self.model, "parameterization", "eps")


# --------------------------------------------------------------------------- compatibility

def architecture(model) -> str:
    if getattr(model, "is_sd3", False):
        return "SD3"
    if getattr(model, "is_sdxl", False):
        return "SDXL"
    if getattr(model, "is_sd2", False):
        return "SD2"
    return "SD1"


def text_encoder_family(model) -> tuple[str, ...]:
    """The text encoders a model conditions on, by class (the embedding spaces they produce)."""
    conditioner = getattr(model, "conditioner", None)
    if conditioner is not None:
        return tuple(type(getattr(e, "wrapped", e)).__name__ for e in conditioner.embedders
                     if getattr(e, "input_key", "txt") == "txt")
    encoder = model.cond_stage_model
    return (type(getattr(encoder, "wrapped", encoder)).__name__,)


def _cond_widths(cond) -> tuple[int, int | None]:
    if isinstance(cond, dict):
        vector = cond.get("vector")
        return cond["crossattn"].shape[-1], (vector.shape[-1] if vector is not None else None)
    return cond.shape[-1], None


def _unet_widths(model) -> tuple[int | None, int | None]:
    """The cross-attention context width and the size of the `vector` (SDXL's adm) the UNet expects."""
    unet = model.model.diffusion_model
    context = next((m.in_features for name, m in unet.named_modules() if name.endswith("attn2.to_k")), None)
    label = getattr(unet, "label_emb", None)
    vector = None
    if label is not None:
        first = next((m for m in label.modules() if isinstance(m, torch.nn.Linear)), None)
        vector = first.in_features if first is not None else None
    return context, vector


def _refuse(model, who: str, field_name: str) -> None:
    unet = model.model.diffusion_model
    key = getattr(model.model, "conditioning_key", None)
    if getattr(model, "cond_stage_key", None) == "edit":
        raise MagicFusionError(f"the {who} is an instruct/edit model, which cannot be fused", field_name)
    if getattr(unet, "in_channels", 4) != 4 or getattr(model, "is_sdxl_inpaint", False) or key == "hybrid":
        raise MagicFusionError(f"the {who} is an inpainting model, which cannot be fused (use a normal model; inpainting "
                               "with a normal model works)", field_name)
    if key == "crossattn-adm":
        raise MagicFusionError(f"the {who} is an unCLIP model, which cannot be fused", field_name)
    if architecture(model) == "SD3":
        raise MagicFusionError(f"the {who} is an SD3 model, which MagicFusion does not support", field_name)


def check_compatible(main, expert: Expert, *, text_encoder: str, field_name: str, encoder_field: str) -> None:
    """Refuse, before sampling, every pairing that cannot work: models that cannot be fused at all,
    latent spaces that differ, and prompts encoded by a text encoder whose embedding space or
    width the expert's UNet was not trained on (`text_encoder` "general": the main model's)."""
    _refuse(main, "main checkpoint", field_name)
    if expert.is_main:
        return
    model = expert.model
    _refuse(model, "expert checkpoint", field_name)
    a, b = architecture(main), architecture(model)
    if (a == "SDXL") != (b == "SDXL"):
        raise MagicFusionError(f"the expert is an {b} model and the main checkpoint an {a} model; they do not share a latent "
                               "space (SD1/SD2 fuse with SD1/SD2, SDXL with SDXL)", field_name)
    if text_encoder == "general":
        mine, theirs = text_encoder_family(main), text_encoder_family(model)
        if mine != theirs:
            raise MagicFusionError(f"'general' encodes this expert's prompts with the main model's text encoder ({'+'.join(mine)}), "
                                   f"but the expert ({b}) was trained on {'+'.join(theirs)} embeddings; use 'expert'", encoder_field)
        encoder = main
    else:
        encoder = model
    width, vector = _cond_widths(empty_cond(encoder, None if encoder is main else []))
    context, adm = _unet_widths(model)
    blame = encoder_field if encoder is main else field_name  # the main model's encoder was asked for, or the file is inconsistent
    whose = "the main model's text encoder" if encoder is main else "its own text encoder"
    if context is not None and width != context:
        raise MagicFusionError(f"{whose} gives {width}-wide embeddings but the expert's UNet expects {context}", blame)
    if adm is not None and vector is not None and vector != adm:
        raise MagicFusionError(f"{whose} gives a {vector}-wide conditioning vector but the expert's UNet expects {adm}", blame)


def empty_cond(model, nets=None):
    """A model's conditioning of the empty prompt, encoded now (`nets`: the networks its text
    encoder holds meanwhile; None leaves them as they are)."""
    swap = networks.using(nets) if nets is not None else contextlib.nullcontext()
    with devices.autocast(), torch.no_grad(), swap:
        return model.get_learned_conditioning([""])


def pad_cond(cond):
    """The part of an empty-prompt conditioning that pads token rows (the WebUI keeps the same)."""
    return cond["crossattn"] if isinstance(cond, dict) else cond


# --------------------------------------------------------------------------- loading

def _load_beside_main(info) -> Any:
    """Build and load a checkpoint the way `sd_models.load_model` does, but as a model of its own:
    nothing global changes (see the module docstring). The VAE is dropped (the main model's VAE
    decodes) and the text encoder waits off the accelerator until it encodes."""
    timer = Timer()
    cmd = shared.cmd_opts
    state_dict = sd_models.get_checkpoint_state_dict(info, timer)
    config_path = sd_models_config.find_checkpoint_config(state_dict, info)
    clip_included = any(k in state_dict for k in (sd_models.sd1_clip_weight, sd_models.sd2_clip_weight,
                                                   sd_models.sdxl_clip_weight, sd_models.sdxl_refiner_clip_weight))
    from omegaconf import OmegaConf
    config = OmegaConf.load(config_path)
    sd_models.repair_config(config, state_dict)
    with sd_disable_initialization.DisableInitialization(disable_clip=clip_included or cmd.do_not_download_clip):
        with sd_disable_initialization.InitializeOnMeta():
            model = sd_models.instantiate_from_config(config.model, state_dict)
    model.used_config = config_path
    conversion = None if cmd.no_half else {"first_stage_model": None, "alphas_cumprod": None, "": torch.float16}
    with sd_disable_initialization.LoadStateDictOnMeta(state_dict, device=sd_models.model_target_device(model),
                                                      weight_dtype_conversion=conversion):
        _load_weights(model, info, state_dict)
    del state_dict
    sd_models.send_model_to_device(model)
    # The VAE never decodes an expert's latents: its weights are dropped.
    if getattr(model, "first_stage_model", None) is not None:
        model.first_stage_model.to("meta")
    _hijack_alone(model)
    model.eval().requires_grad_(False)
    networks.name_layers(model)
    if devices.device != devices.cpu and getattr(model, "cond_stage_model", None) is not None:
        model.cond_stage_model.to(devices.cpu)
    return model


def _load_weights(model, info, state_dict) -> None:
    """`sd_models.load_model_weights` for a model that is not the main one: the same model-type
    detection, SDXL extension, dtype rules and alpha schedule, without its writes to settings,
    device globals and the VAE state."""
    model.sd_model_hash = info.calculate_shorthash()
    if devices.fp8:
        model.half()
    sd_models.set_model_type(model, state_dict)
    sd_models.set_model_fields(model)
    if model.is_sdxl:
        sd_models_xl.extend_sdxl(model)
    if getattr(model, "is_ssd", False):
        sd_hijack.model_hijack.convert_sdxl_to_ssd(model)
    if hasattr(model, "before_load_weights"):
        model.before_load_weights(state_dict)
    model.load_state_dict(state_dict, strict=False)
    if hasattr(model, "after_load_weights"):
        model.after_load_weights(state_dict)
    unet_in = model.model.state_dict().get("diffusion_model.input_blocks.0.0.weight")
    model.is_sdxl_inpaint = model.is_sdxl and unet_in is not None and unet_in.shape[1] == 9
    if shared.cmd_opts.opt_channelslast:
        model.to(memory_format=torch.channels_last)
    if shared.cmd_opts.no_half:
        model.float()
        model.alphas_cumprod_original = model.alphas_cumprod
    else:
        vae, model.first_stage_model = model.first_stage_model, None
        alphas_cumprod, model.alphas_cumprod = model.alphas_cumprod, None
        model.half()
        model.alphas_cumprod = model.alphas_cumprod_original = alphas_cumprod
        model.first_stage_model = vae
    sd_models.apply_alpha_schedule_override(model)
    if sd_models.check_fp8(model):
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and module is not getattr(model, "first_stage_model", None):
                module.to(torch.float8_e4m3fn)
    model.sd_model_checkpoint = info.filename
    model.sd_checkpoint_info = info
    if hasattr(model, "logvar"):
        model.logvar = model.logvar.to(devices.device)


def _hijack_alone(model) -> None:
    """The WebUI's text-encoder hijack (weights, BREAK, long prompts, embeddings) for a model that
    is not the main one. `model_hijack.hijack` also points three globals at the model it is given
    (the prompt-length counter's encoder, the flattened layers and the UNet forward that SD-UNet
    overrides fall back to); they are put back at once, so the main model's hijack stays as it was."""
    hijack = sd_hijack.model_hijack
    saved = (hijack.clip, hijack.layers, sd_unet.original_forward)
    try:
        hijack.hijack(model)
    finally:
        hijack.clip, hijack.layers, sd_unet.original_forward = saved


@contextlib.contextmanager
def text_encoder_ready(expert: Expert):
    """The expert's text encoder on the accelerator while prompts are encoded."""
    encoder = getattr(expert.model, "cond_stage_model", None)
    if expert.is_main or encoder is None or devices.device == devices.cpu:
        yield
        return
    encoder.to(devices.device)
    try:
        yield
    finally:
        encoder.to(devices.cpu)


def expert_memory_bytes(expert: Expert | None) -> int:
    """Bytes of weights an expert holds beyond the main model (its UNet and text encoder)."""
    if expert is None or expert.is_main:
        return 0
    tensors = list(expert.model.parameters()) + list(expert.model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors if not t.is_meta)


def _collect() -> None:
    gc.collect()
    devices.torch_gc()


# --------------------------------------------------------------------------- the cache

cache = ExpertCache(free=_collect)


def get(info, field_name: str = "expert_checkpoint") -> Expert:
    """The expert for a checkpoint: the main model itself when it is the main checkpoint (a second
    copy of its weights is never kept), else a cached or newly loaded model beside it."""
    main = shared.sd_model
    if main is None:
        raise MagicFusionError("no main checkpoint is loaded", field_name)
    if main.sd_checkpoint_info.filename == info.filename:
        cache.touch()
        cache.unload(info.filename)
        return Expert(main, main.sd_checkpoint_info, is_main=True, empty_cond=main.cond_stage_model_empty_prompt)

    def load():
        try:
            model = _load_beside_main(info)
        except MagicFusionError:
            raise
        except Exception as e:
            _collect()
            raise MagicFusionError(f"could not load {info.title!r}: {type(e).__name__}: {e}", field_name) from e
        return Expert(model, info, is_main=False, empty_cond=pad_cond(empty_cond(model, [])))

    return cache.get(info.filename, load)


def on_main_changed(main) -> None:
    """A new main model: free experts that duplicate it or can no longer fuse with it."""
    if main is None or getattr(main, "sd_checkpoint_info", None) is None:
        return
    cache.drop_if(lambda e: e.info.filename == main.sd_checkpoint_info.filename
                  or (architecture(main) == "SDXL") != (architecture(e.model) == "SDXL"))


__all__ = ["Expert", "cache", "get", "check_compatible", "architecture", "expert_memory_bytes", "text_encoder_ready",
           "empty_cond", "text_encoder_family", "on_main_changed"]
