"""What the Script hooks do, kept out of scripts/ so the entry point stays thin."""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch

from modules import devices, extra_networks, infotext_utils, prompt_parser, sd_samplers, shared

from ..fusion import SNBFusion
from ..params import FIELD_NAMES, FusionParams, MagicFusionError
from . import expert as experts
from . import masks, sampling

XYZ_PREFIX = "magicfusion_"


def is_forge() -> bool:
    try:
        import modules_forge  # noqa: F401
    except ImportError:
        return False
    return True


def parse(p, args: Sequence[Any]) -> FusionParams:
    """The params for this generation: the script args (positional, one dict, or a dict
    holding an infotext), then any XYZ overrides carried on p."""
    if len(args) >= 1 and isinstance(args[0], dict) and set(args[0]) == {"infotext"}:
        text = args[0]["infotext"]
        if not isinstance(text, str):
            raise MagicFusionError("must be a string", "infotext")
        params = FusionParams.from_infotext(infotext_utils.parse_generation_parameters(text))
        if params is None:
            raise MagicFusionError("holds no MagicFusion keys", "infotext")
    else:
        params = FusionParams.from_args(args)
    overrides = {name: getattr(p, XYZ_PREFIX + name) for name in FIELD_NAMES if hasattr(p, XYZ_PREFIX + name)}
    if overrides:
        params = FusionParams.from_dict({**params.to_dict(), **overrides, "enabled": True})
    return params


def process(p, args: Sequence[Any]) -> None:
    """Start of every generation: reset the hook state, validate, find and load the expert."""
    run = sampling.Run(p)
    sampling.start(run)
    try:
        params = parse(p, args)
        if not params.enabled:
            sampling.start(None)
            experts.cache.unload_if_idle(shared.opts.data.get("magicfusion_unload_after_minutes", 0))
            return
        _prepare(run, params)
    except Exception as e:
        run.fail(e)  # raised by the sampling gate: the generation fails with this message


def _prepare(run: sampling.Run, params: FusionParams) -> None:
    p = run.p
    if is_forge():
        raise MagicFusionError("WebUI Forge is not supported; use AUTOMATIC1111 1.10", "enabled")
    if getattr(p, "refiner_checkpoint", None) not in (None, "", "None", "none") and (p.refiner_switch_at or 1) < 1:
        raise MagicFusionError("cannot run together with the refiner; turn one of them off", "enabled")
    info = experts.resolve(params.expert_checkpoint)
    # An empty window with the general model outside it never needs the expert: not even loaded.
    if params.fusion_start < params.fusion_end or params.outside_window == "expert":
        run.expert = experts.cache.get(info)  # checked against the main model before each sampling pass
    run.params = params
    run.fusion = SNBFusion(
        ks=(params.k_general, params.k_expert), blur=params.blur, baseline=params.saliency_baseline,
        start=params.fusion_start, end=params.fusion_end, outside=0 if params.outside_window == "general" else 1,
        record_masks=params.show_mask,
    )
    p.extra_generation_params.update(params.replace(expert_checkpoint=info.name_for_extra).infotext())
    if getattr(info, "shorthash", None):
        p.extra_generation_params["MagicFusion expert hash"] = info.shorthash


def before_sampling(p) -> None:
    """Before each sampling pass (first pass, hires pass, img2img): the expert's conditioning."""
    run = sampling.current
    if run is None or run.p is not p or run.error is not None or run.params is None:
        return
    try:
        hires = bool(getattr(p, "is_hr_pass", False))
        run.active = not hires or run.params.apply_in_hires
        run.conds = None
        run.fusion.reset()
        if not run.active or run.expert is None:
            return
        main = shared.sd_model
        if run.expert.is_main and run.expert.model is not main:
            run.expert = experts.cache.get(experts.resolve(run.params.expert_checkpoint))
        experts.check_compatible(main, run.expert.model)
        run.conds = encode(p, run, hires)
    except Exception as e:
        run.fail(e)


def _strip_networks(prompt: str) -> str:
    text, _ = extra_networks.parse_prompt(prompt)
    return text


def encode(p, run: sampling.Run, hires: bool) -> sampling.PassConds:
    """The expert prompts, encoded through the WebUI's prompt machinery (weights, BREAK,
    long prompts, prompt editing and embeddings all apply)."""
    params = run.params
    model = run.expert.model if params.expert_text_encoder == "expert" else shared.sd_model
    if hires:
        prompts, negatives = list(p.hr_prompts), list(p.hr_negative_prompts)
        width, height = p.hr_upscale_to_x, p.hr_upscale_to_y
        config = sd_samplers.find_sampler_config(p.hr_sampler_name or p.sampler_name)
        hr_steps = p.hr_second_pass_steps or p.steps
        hires_steps = config.total_steps(hr_steps) if config else hr_steps
    else:
        prompts, negatives = list(p.prompts), list(p.negative_prompts)
        width, height = p.width, p.height
        hires_steps = None
    if params.expert_prompt.strip():
        prompts = [_strip_networks(params.expert_prompt)] * len(prompts)
    if params.expert_negative_prompt.strip():
        negatives = [params.expert_negative_prompt] * len(negatives)
    steps = p.firstpass_steps
    ready = experts.text_encoder_ready(run.expert) if model is run.expert.model else contextlib.nullcontext()
    with ready, devices.autocast(), torch.no_grad():
        c = prompt_parser.get_multicond_learned_conditioning(
            model, prompt_parser.SdConditioning(prompts, width=width, height=height), steps, hires_steps, shared.opts.use_old_scheduling)
        uc = prompt_parser.get_learned_conditioning(
            model, prompt_parser.SdConditioning(negatives, width=width, height=height, is_negative_prompt=True), steps, hires_steps,
            shared.opts.use_old_scheduling)
    return sampling.PassConds(c, uc)


def after_batch(p) -> None:
    run = sampling.current
    if run is not None and run.p is p and run.params is not None and run.params.show_mask:
        run.batch_masks.append(dict(run.fusion.masks))


def postprocess(p, processed) -> None:
    run = sampling.current
    if run is None or run.p is not p or run.params is None:
        return
    try:
        if run.params.show_mask:
            masks.add_to_gallery(p, processed, run.batch_masks)
    finally:
        run.batch_masks = []
        if not shared.opts.data.get("magicfusion_keep_expert_loaded", True):
            sampling.start(None)
            experts.cache.unload()


def unload() -> bool:
    """Free the expert (script unload, "Reload UI", the unload button and route); whether one was loaded."""
    sampling.start(None)
    return experts.cache.unload()
