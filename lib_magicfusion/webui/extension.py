"""What the Script hooks do, kept out of scripts/ so the entry point stays thin."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from modules import call_queue, infotext_utils, shared

from ..params import FusionParams, MagicFusionError, flat_names, spec, unit_flat_name
from . import host, masks
from .generation import ATTR, Generation

XYZ_PREFIX = "magicfusion_"
last_report: dict | None = None  # what the last finished fused generation did (GET /magicfusion/v1/status)


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
    overrides = {name: getattr(p, XYZ_PREFIX + name) for name in flat_names() if hasattr(p, XYZ_PREFIX + name)}
    if overrides:
        flat = params.to_flat()
        flat.update(overrides)
        flat["enabled"] = True
        for name in overrides:  # an axis over a unit's checkpoint, prompt or k turns that unit on
            unit = spec(name).unit
            if unit is not None:
                flat[unit_flat_name(unit, "enabled")] = True
        params = FusionParams.from_flat(flat)
    return params


def process(p, args: Sequence[Any]) -> None:
    """Start of every generation: validate, then (if enabled) a Generation on p."""
    setattr(p, ATTR, None)
    adapter = host.adapter()
    try:
        params = parse(p, args)
    except Exception as e:
        adapter.Generation.failed(p, e)
        return
    if not params.enabled:
        return
    adapter.cache.touch()
    # A generation that failed skipped postprocess: the bound holds before anything new loads.
    adapter.cache.trim(resident_bound())
    adapter.Generation.start(p, params)


def before_sampling(p) -> None:
    gen = Generation.of(p)
    if gen is not None:
        gen.begin_pass()


def after_sampling(p) -> None:
    gen = Generation.of(p)
    if gen is not None and gen.error is None:
        gen.end_batch()


def postprocess(p, processed) -> None:
    global last_report
    gen = Generation.of(p)
    if gen is None:
        return
    try:
        if gen.params.show_mask and gen.error is None:
            masks.add_to_gallery(p, processed, gen)
    finally:
        gen.end()
        last_report = gen.report()
        settle()


def resident_bound() -> int:
    opts = shared.opts.data
    return int(opts.get("magicfusion_max_resident_experts", 2)) if opts.get("magicfusion_keep_expert_loaded", True) else 0


def settle() -> None:
    """After a generation: the resident bound, keep-loaded and the idle timer."""
    cache = host.adapter().cache
    cache.trim(resident_bound())
    cache.arm_idle_timer(float(shared.opts.data.get("magicfusion_unload_after_minutes", 0) or 0),
                                 lambda: call_queue.queue_lock)


def unload() -> bool:
    """Free every expert (the unload button and route, under the WebUI's queue lock, so never in
    the middle of a generation); whether one was loaded."""
    with call_queue.queue_lock:
        return host.adapter().cache.unload()


def on_script_unloaded() -> None:
    """Reload UI re-imports the extension: free the experts of the old module."""
    cache = host.adapter().cache
    cache.touch()
    cache.unload()


def on_model_loaded(sd_model) -> None:
    host.adapter().on_main_changed(sd_model)
