"""Finding, loading, caching and freeing the expert checkpoint inside the WebUI.

The expert is resolved only among the WebUI's installed checkpoints and read only through
the WebUI's own loader. Loading goes through `sd_models.load_model`, which is global in
every way (it trashes the current model, rewrites settings, VAE and hijack state); the
main model and all of that state are saved before and put back after, also on failure.
"""

from __future__ import annotations

import contextlib
import gc
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional


from modules import devices, sd_hijack, sd_models, sd_vae, shared

from ..params import MagicFusionError


@dataclass
class Expert:
    model: Any                 # the LatentDiffusion model
    info: Any                  # its CheckpointInfo
    is_main: bool              # the main checkpoint itself (one model, two prompts)

    @property
    def title(self) -> str:
        return self.info.title

    @property
    def parameterization(self) -> str:
        return getattr(self.model, "parameterization", "eps")


def checkpoint_titles() -> list[str]:
    """The installed checkpoints' titles, as the expert picker and the XYZ axis list them."""
    return sorted(sd_models.checkpoints_list, key=str.casefold)


def resolve(name: str):
    """The CheckpointInfo of an installed checkpoint, matched as the WebUI matches names."""
    if not isinstance(name, str) or not name.strip():
        raise MagicFusionError("is required when MagicFusion is enabled", "expert_checkpoint")
    name = name.strip()
    if _looks_like_path(name):
        raise MagicFusionError(f"must name an installed checkpoint (title, name or hash), not a path or URL: {name!r}", "expert_checkpoint")
    info = sd_models.checkpoint_aliases.get(name) or sd_models.get_closet_checkpoint_match(name)
    if info is None:
        raise MagicFusionError(f"no installed checkpoint matches {name!r}", "expert_checkpoint")
    return info


def _looks_like_path(name: str) -> bool:
    """Absolute paths, drive letters, '..' segments, home dirs and URLs: never a checkpoint title."""
    return ("://" in name or name.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:", name) is not None
            or ".." in re.split(r"[\\/]", name))


def architecture(model) -> str:
    if getattr(model, "is_sd3", False):
        return "SD3"
    if getattr(model, "is_sdxl", False):
        return "SDXL"
    if getattr(model, "is_sd2", False):
        return "SD2"
    return "SD1"


def check_compatible(main, expert_model, role: str = "expert") -> None:
    """Refuse what cannot share the main model's latents and conditioning layout."""
    for who, model in (("main checkpoint", main), (f"{role} checkpoint", expert_model)):
        unet = model.model.diffusion_model
        key = getattr(model.model, "conditioning_key", None)
        if getattr(model, "cond_stage_key", None) == "edit":
            raise MagicFusionError(f"the {who} is an instruct/edit model, which cannot be fused", "expert_checkpoint")
        if getattr(unet, "in_channels", 4) != 4 or getattr(model, "is_sdxl_inpaint", False) or key == "hybrid":
            raise MagicFusionError(f"the {who} is an inpainting model, which cannot be fused (use a normal model; inpainting with a normal model works)", "expert_checkpoint")
        if key == "crossattn-adm":
            raise MagicFusionError(f"the {who} is an unCLIP model, which cannot be fused", "expert_checkpoint")
        if architecture(model) == "SD3":
            raise MagicFusionError(f"the {who} is an SD3 model, which MagicFusion does not support", "expert_checkpoint")
    a, b = architecture(main), architecture(expert_model)
    if (a == "SDXL") != (b == "SDXL"):
        raise MagicFusionError(f"the expert is an {b} model and the main checkpoint an {a} model; they do not share a latent space "
                               "(SD1/SD2 fuse with SD1/SD2, SDXL with SDXL)", "expert_checkpoint")


class ExpertCache:
    """Holds at most one loaded expert, reused across generations until freed."""

    def __init__(self):
        self.expert: Optional[Expert] = None
        self.last_used = 0.0
        self.loads = 0
        self._lock = threading.RLock()

    def get(self, info) -> Expert:
        main = shared.sd_model
        if main is None:
            raise MagicFusionError("no main checkpoint is loaded", "expert_checkpoint")
        with self._lock:
            self.last_used = time.monotonic()
            if main.sd_checkpoint_info.filename == info.filename:
                if self.expert is not None and self.expert.info.filename == info.filename:
                    self.unload()  # a second copy of the main model's weights
                return Expert(main, main.sd_checkpoint_info, is_main=True)
            if self.expert is not None and self.expert.info.filename == info.filename:
                return self.expert
            self.unload()
            model = _load_beside_main(info)
            try:
                check_compatible(main, model)
            except MagicFusionError:
                del model
                _collect()
                raise
            self.expert = Expert(model, info, is_main=False)
            self.loads += 1
            return self.expert

    def unload(self) -> bool:
        with self._lock:
            if self.expert is None:
                return False
            self.expert = None
            _collect()
            return True

    def unload_if_idle(self, minutes: float) -> bool:
        if self.expert is not None and minutes > 0 and time.monotonic() - self.last_used > minutes * 60:
            return self.unload()
        return False


def _collect() -> None:
    gc.collect()
    devices.torch_gc()


def _load_beside_main(info):
    """Load a checkpoint with the WebUI's loader without disturbing the main model."""
    model_data = sd_models.model_data
    main = model_data.sd_model
    saved_loaded = list(model_data.loaded_sd_models)
    saved_opts = {k: shared.opts.data.get(k) for k in ("sd_model_checkpoint", "sd_checkpoint_hash")}
    saved_devices = {k: getattr(devices, k, None) for k in ("dtype_unet", "fp8", "unet_needs_upcast")}
    saved_vae = (sd_vae.base_vae, sd_vae.loaded_vae_file, sd_vae.checkpoint_info)
    expert = None
    try:
        with sd_models.SkipWritingToConfig():
            model_data.sd_model = None  # keeps load_model from sending the main model to the trash
            expert = sd_models.load_model(info)
    except Exception as e:
        raise MagicFusionError(f"could not load {info.title!r}: {e}", "expert_checkpoint") from e
    finally:
        model_data.loaded_sd_models[:] = [m for m in saved_loaded if m is not expert]
        model_data.set_sd_model(main, already_loaded=True)
        for key, value in saved_opts.items():
            if value is None:
                shared.opts.data.pop(key, None)
            else:
                shared.opts.data[key] = value
        for key, value in saved_devices.items():
            setattr(devices, key, value)
        sd_vae.base_vae, sd_vae.loaded_vae_file, sd_vae.checkpoint_info = saved_vae
        if main is not None:
            sd_hijack.model_hijack.hijack(main)
            sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)
    # The expert's VAE is never used: its weights are dropped. Its text encoder is needed
    # only to encode prompts: it waits off the accelerator (see text_encoder_ready).
    if getattr(expert, "first_stage_model", None) is not None:
        expert.first_stage_model.to("meta")
    if devices.device != devices.cpu and getattr(expert, "cond_stage_model", None) is not None:
        expert.cond_stage_model.to(devices.cpu)
    expert.eval().requires_grad_(False)
    return expert


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


def expert_memory_bytes(expert: Optional[Expert]) -> int:
    """Bytes of weights the expert holds beyond the main model (its UNet and text encoder)."""
    if expert is None or expert.is_main:
        return 0
    tensors = list(expert.model.parameters()) + list(expert.model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors if not t.is_meta)


cache = ExpertCache()

__all__ = ["Expert", "ExpertCache", "cache", "checkpoint_titles", "resolve", "check_compatible", "architecture", "expert_memory_bytes", "text_encoder_ready"]
