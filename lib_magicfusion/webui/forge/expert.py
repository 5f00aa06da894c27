"""Experts on Forge: diffusion engines built by Forge's own loader, kept beside the main model.

`backend.loader.forge_loader` builds an engine from a checkpoint file without touching the main
model, the settings or Forge's memory manager (it is what Forge's own model reload calls, minus
the global steps). An expert is cached by (checkpoint file, slot): slot 0 is the file's first
network set in a generation; a unit that needs the same file with other networks (the main
checkpoint with its own LoRA, say) gets a copy of its own in the next slot, since Forge merges
LoRAs into the weights of the one model it patches.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

import torch
from modules import shared

from ...params import MagicFusionError
from ..cache import ExpertCache
from . import backend


@dataclass
class ForgeExpert:
    engine: Any                  # the ForgeDiffusionEngine (the main model's own for is_main)
    info: Any                    # its CheckpointInfo
    is_main: bool                # the main model itself, run with the main prompt's networks
    objects: Any = None          # the ForgeObjects this unit runs and encodes with (None: the engine's current)

    @property
    def title(self) -> str:
        return self.info.title

    def release(self) -> None:
        """Drop the engine from Forge's memory manager, so its memory can return."""
        mm = backend.memory_management()
        engine, self.objects = self.engine, None
        if engine is None or self.is_main:
            return
        fo = engine.forge_objects
        ids = {id(m) for m in (fo.unet.model, fo.clip.patcher.model, fo.vae.patcher.model) if m is not None}
        for i in range(len(mm.current_loaded_models) - 1, -1, -1):
            if id(mm.current_loaded_models[i].model.model) in ids:
                mm.current_loaded_models.pop(i).model_unload(avoid_model_moving=True)
        self.engine = None


def architecture(engine) -> str:
    for flag, name in (("is_sd3", "SD3"), ("is_sdxl", "SDXL"), ("is_sd2", "SD2"), ("is_sd1", "SD1")):
        if getattr(engine, flag, False):
            return name
    return type(engine).__name__


def check_compatible(main, expert: ForgeExpert, *, text_encoder: str, field_name: str, encoder_field: str) -> None:
    """Refuse, before sampling, what cannot fuse with the main model."""
    for who, engine in (("main checkpoint", main), ("expert checkpoint", expert.engine)):
        if getattr(engine, "is_inpaint", False):
            raise MagicFusionError(f"the {who} is an inpainting model, which cannot be fused (use a normal model; "
                                   "inpainting with a normal model works)", field_name)
        if architecture(engine) not in ("SD1", "SD2", "SDXL"):
            raise MagicFusionError(f"the {who} is an {architecture(engine)} model, which MagicFusion does not support", field_name)
    if expert.is_main:
        return
    a, b = architecture(main), architecture(expert.engine)
    if (a == "SDXL") != (b == "SDXL"):
        raise MagicFusionError(f"the expert is an {b} model and the main checkpoint an {a} model; they do not share a latent "
                               "space (SD1/SD2 fuse with SD1/SD2, SDXL with SDXL)", field_name)
    if text_encoder == "general" and a != b:
        raise MagicFusionError(f"'general' encodes this expert's prompts with the main model's text encoder ({a}), but the "
                               f"expert ({b}) was trained on another; use 'expert'", encoder_field)


def _collect() -> None:
    gc.collect()
    backend.memory_management().soft_empty_cache()


cache = ExpertCache(free=_collect)


def get(info, field_name: str, slot: int = 0) -> ForgeExpert:
    """The expert engine for a checkpoint (`slot` > 0: another copy, for another network set)."""
    main = shared.sd_model
    main_info = getattr(main, "sd_checkpoint_info", None)
    if main_info is None:
        raise MagicFusionError("no main checkpoint is loaded", field_name)
    if slot == 0 and main_info.filename == info.filename:
        cache.touch()
        cache.unload((info.filename, 0))  # a copy of the main model's weights is kept only when a unit needs one
        return ForgeExpert(main, main_info, is_main=True)

    def load():
        try:
            with torch.inference_mode():
                engine = backend.load_engine(info.filename)
        except Exception as e:
            _collect()
            raise MagicFusionError(f"could not load {info.title!r}: {type(e).__name__}: {e}", field_name) from e
        engine.sd_checkpoint_info = info
        engine.filename = info.filename
        return ForgeExpert(engine, info, is_main=False)

    return cache.get((info.filename, slot), load)


def memory_bytes(expert: ForgeExpert | None) -> int:
    """Bytes of weights an expert engine holds beyond the main model (UNet, text encoders, VAE)."""
    if expert is None or expert.is_main or expert.engine is None:
        return 0
    fo = expert.engine.forge_objects
    modules = [fo.unet.model, fo.clip.cond_stage_model, fo.vae.first_stage_model]
    return sum(t.numel() * t.element_size() for m in modules if m is not None
               for t in list(m.parameters()) + list(m.buffers()) if not t.is_meta)


def on_main_changed(main) -> None:
    """A new main model: free experts that duplicate it or can no longer fuse with it."""
    info = getattr(main, "sd_checkpoint_info", None)
    if info is None or not hasattr(main, "forge_objects"):
        return
    cache.drop_if(lambda e: e.info.filename == info.filename or (architecture(main) == "SDXL") != (architecture(e.engine) == "SDXL"))
