"""The sampling hook on Forge: where its backend composes guidance.

Per sampling pass (`arm`, from process_before_every_sampling) a clone of the main UnetPatcher
gets three things, and replaces `p.sd_model.forge_objects.unet`:

  a conditioning modifier   sees the call's guidance scale (1 on calls Forge runs without an
                            uncond: CFG 1, skip-early, NGMS) and plans the call: fuse, or which
                            model runs alone; it raises a recorded failure, so a fusion that
                            cannot happen fails the generation;
  a model-function wrapper  skips the main UNet where the plan does not use it (a unit runs
                            alone outside the window), and lets the cond rows of the units on the
                            main checkpoint that share its uncond ride in the main model's call
                            (one UNet call, as on A1111), passing through everything else;
  a post-CFG function       evaluates every other planned unit on the same x and sigma with
                            Forge's own `calc_cond_uncond_batch` (its engine, or the main model),
                            and returns the fused x0.

Forge works in sigma space for every sampler (DDIM included) and hands x0 predictions; the
fusion step measures saliency in epsilon space from them. AND-parts arrive as Forge's weighted
mean, so each model is one cond row per image with the summed weight, as Forge's own formula
has it. `on_cfg_denoiser` tells which denoiser call this is; `on_cfg_after_cfg` gives DDIM CFG++
the fused uncond noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from modules import prompt_parser, script_callbacks

from ...fusion import Prediction, StepPlan, sampling_step
from ...params import MagicFusionError
from ...snb import blend
from .. import cfg_pp, host
from ..generation import Generation
from . import backend

GENERAL = 0


@dataclass
class Call:
    denoiser: Any
    step: int
    plan: StepPlan | None = None
    cond_scale: float = 1.0
    skip_uncond: bool = False
    main_ran: bool = False
    x: Any = None                                 # the call's latent and sigma, as the modifier saw them
    sigma: Any = None
    riders: dict = field(default_factory=dict)    # unit index -> compiled conds to ride in the main call
    ridden: dict = field(default_factory=dict)    # unit index -> its cond x0, from the main call

    @property
    def alone(self) -> bool:
        return self.plan is not None and GENERAL not in self.plan.models


def _edit_strength(conds) -> float:
    return sum(item.get("strength", 1) for item in conds)


def _guided(cond, uncond, scale: float, strength: float):
    """Forge's own CFG arithmetic (sampling_function_inner), operation for operation."""
    if not math.isclose(strength, 1.0):
        return uncond + (cond - uncond) * scale * strength
    return uncond + (cond - uncond) * scale


def arm(gen: Generation) -> None:
    """Hook this pass: a clone of the main UnetPatcher with our three functions (see the module docstring)."""
    sd_model = gen.p.sd_model
    unet = sd_model.forge_objects.unet.clone()
    previous = unet.model_options.get("model_function_wrapper")
    unet.add_conditioning_modifier(_modifier(gen))
    unet.set_model_unet_function_wrapper(_wrapper(gen, previous))
    unet.set_model_sampler_post_cfg_function(_post_cfg(gen, previous))
    for unit in gen.units:
        if unit.expert is not None and not unit.expert.is_main and unit.expert.objects is not None:
            unet.add_extra_model_patcher_during_sampling(unit.expert.objects.unet)  # Forge manages its memory
    sd_model.forge_objects.unet = unet
    gen.armed = unet


def disarm(gen: Generation) -> None:
    """After the generation: the main model no longer holds our clone (it pins the experts)."""
    sd_model = getattr(gen.p, "sd_model", None)
    armed = getattr(gen, "armed", None)
    if armed is not None and sd_model is not None and getattr(sd_model, "forge_objects", None) is not None \
            and sd_model.forge_objects.unet is armed:
        sd_model.forge_objects = sd_model.forge_objects_after_applying_lora.shallow_copy()
        backend.memory_management().unload_model_clones(sd_model.forge_objects.unet)
    gen.armed = None


def on_cfg_denoiser(params: script_callbacks.CFGDenoiserParams) -> None:
    denoiser = params.denoiser
    gen = Generation.of(getattr(denoiser, "p", None))
    if gen is None:
        return
    gen.denoiser = denoiser
    gen.call = Call(denoiser, sampling_step(denoiser.step, denoiser.total_steps, denoiser.steps))


def _modifier(gen: Generation):
    def modifier(model, x, timestep, uncond, cond, cond_scale, model_options, seed):
        gen.raise_if_failed()
        call = gen.call
        if call is None or not gen.active:
            return model, x, timestep, uncond, cond, cond_scale, model_options, seed
        try:
            steps = call.denoiser.steps
            call.cond_scale = float(cond_scale)
            call.skip_uncond = uncond is None or math.isclose(cond_scale, 1.0)
            call.plan = gen.fusion.plan(call.step, steps, uncond_skipped=call.skip_uncond)
            gen.record.skipped_calls += int(call.skip_uncond)
            if call.plan.fuse:
                gen.record.fused_steps.add(call.step)
            call.x, call.sigma = x, timestep
            if not call.alone and not call.skip_uncond:
                for m in call.plan.models:
                    unit = gen.units[m - 1] if m != GENERAL else None
                    if unit is not None and unit.expert.is_main and unit.conds.main_negative:
                        unit_cond = _unit_cond(unit, call.denoiser.step)
                        if not _same_conds(unit_cond, cond):
                            call.riders[m] = unit_cond
        except Exception as e:
            gen.fail(e)
            gen.raise_if_failed()
        return model, x, timestep, uncond, cond, cond_scale, model_options, seed
    return modifier


def _wrapper(gen: Generation, previous):
    def run(apply_model, args):
        if previous is not None:
            return previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    def wrapper(apply_model, args):
        call = gen.call
        if call is None or gen.in_unit:
            return run(apply_model, args)
        if call.alone:
            return torch.zeros_like(args["input"])  # the plan does not use the main model at this step
        if not call.main_ran:
            call.main_ran = True
            gen.record.count(GENERAL)
        ride = _ride(call, args) if call.riders else None
        call.riders = {}  # the first chunk of the main call carries them (or nobody does)
        if ride is None:
            return run(apply_model, args)
        extended, rows, entries = ride
        out = run(apply_model, extended)
        _collect(call, out[rows:], entries)
        return out[:rows]
    return wrapper


def _unit_cond(unit, step: int):
    conds_list, tensor = prompt_parser.reconstruct_multicond_batch(unit.conds.c, step)
    return backend.compile_weighted_conditions(tensor, conds_list)


def _ride(call: Call, args):
    """The main call's arguments with the riders' cond rows appended, as Forge's own batching
    would append another cond (its Condition classes concatenate; cross-attention of another
    length repeats to the common multiple). None where they cannot ride: another area, a
    ControlNet's hint computed for the main rows only, conditionings that do not concatenate."""
    x, sigma, c = call.x, call.sigma, args["c"]
    batch, rows = x.shape[0], args["input"].shape[0]
    if "control" in c or rows % batch or args["input"].shape[1:] != x.shape[1:]:
        return None
    entries = []
    for m, conds in call.riders.items():
        for entry in conds:
            prepared = backend.area_and_mult(entry, x, sigma)
            if prepared is not None:
                if prepared.input_x.shape != x.shape or prepared.conditioning.keys() != c.keys() - {"transformer_options"}:
                    return None
                entries.append((m, prepared))
    if not entries:
        return None
    new_c = {}
    for key, value in c.items():
        if key == "transformer_options":
            continue
        parts = [p.conditioning[key] for _, p in entries]
        kind = type(parts[0])
        head = kind(value[:batch] if isinstance(value, torch.Tensor) else value)
        if not all(type(part) is kind and head.can_concat(part) for part in parts):
            return None
        new_c[key] = kind(value).concat(parts)
    options = dict(c.get("transformer_options", {}))
    if "cond_or_uncond" in options:
        order = list(options["cond_or_uncond"]) + [0] * len(entries)
        options["cond_or_uncond"] = order
        options["cond_mark"], options["cond_indices"], options["uncond_indices"] = backend.cond_marks(order, sigma)
    new_c["transformer_options"] = options
    extended = dict(args, input=torch.cat([args["input"]] + [p.input_x for _, p in entries]),
                    timestep=torch.cat([args["timestep"]] + [sigma] * len(entries)), c=new_c,
                    cond_or_uncond=list(args.get("cond_or_uncond", [])) + [0] * len(entries))
    return extended, rows, entries


def _collect(call: Call, out, entries) -> None:
    """Each rider's cond x0 from its rows, summed over its AND-parts with Forge's own weighting."""
    sums: dict = {}
    for (m, prepared), chunk in zip(entries, out.chunk(len(entries))):
        total, count = sums.get(m, (torch.zeros_like(call.x), torch.ones_like(call.x) * 1e-37))
        sums[m] = (total + chunk * prepared.mult, count + prepared.mult)
    for m, (total, count) in sums.items():
        call.ridden[m] = total / count


def _unit_options(model_options: dict, previous) -> dict:
    """The main model's options for a unit on the main checkpoint: its other patches, not our hooks."""
    options = dict(model_options)
    options.pop("model_function_wrapper", None)
    if previous is not None:
        options["model_function_wrapper"] = previous
    options["sampler_post_cfg_function"] = []
    options["conditioning_modifiers"] = []
    return options


def _post_cfg(gen: Generation, previous):
    def post_cfg(args):
        gen.raise_if_failed()
        call = gen.call
        if call is None or call.plan is None or call.plan.models == (GENERAL,):
            return args["denoised"]
        try:
            return _fuse(gen, call, args, previous)
        except MagicFusionError as e:
            gen.fail(e)
            raise
        except Exception as e:
            gen.fail(MagicFusionError(f"fusion failed: {type(e).__name__}: {e}", status_code=500))
            raise gen.error from e
    return post_cfg


def _fuse(gen: Generation, call: Call, args, previous):
    x, sigma, plan = args["input"], args["sigma"], call.plan
    batch = x.shape[0]
    skip = call.skip_uncond
    preds: list = [None] * gen.fusion.n_models
    main_uncond = None if skip or call.alone else args["uncond_denoised"]
    if not call.alone:
        strength = _edit_strength(args["cond"])
        weight = 1.0 if math.isclose(strength, 1.0) else strength
        preds[GENERAL] = Prediction(args["cond_denoised"], main_uncond, [[(i, weight)] for i in range(batch)], call.cond_scale,
                                    result=args["denoised"])
    denoiser = call.denoiser
    for m in plan.models:
        if m == GENERAL:
            continue
        unit = gen.units[m - 1]
        expert = unit.expert
        cond = _unit_cond(unit, denoiser.step)
        shares = expert.is_main and main_uncond is not None and unit.conds.main_negative
        if shares and not call.alone and _same_conds(cond, args["cond"]):
            preds[m] = preds[GENERAL]  # one model, the same prompts: its predictions are the main model's
            continue
        if shares and m in call.ridden:
            c_pred, u_pred = call.ridden[m], main_uncond  # its cond rows rode in the main call
        else:
            uncond = None if skip or shares else backend.compile_conditions(
                prompt_parser.reconstruct_cond_batch(unit.conds.uc, denoiser.step))
            if expert.is_main:
                kmodel, options = args["model"], _unit_options(args["model_options"], previous)
            else:
                kmodel, options = expert.objects.unet.model, expert.objects.unet.model_options
            gen.in_unit = True
            try:
                c_pred, u_pred = backend.calc_cond_uncond_batch(kmodel, cond, uncond, x, sigma, options)
            finally:
                gen.in_unit = False
            gen.record.count(m)  # a call of its own (a ridden unit counts as the main model's)
        if not bool(torch.isfinite(torch.stack([c_pred.sum(dtype=torch.float32), u_pred.sum(dtype=torch.float32)])).all()):
            raise MagicFusionError("the expert produced NaN or infinite values (a corrupt or incompatible checkpoint?)",
                                   unit.field("checkpoint"), status_code=500)
        if shares:
            u_pred = main_uncond
        scale = 1.0 if skip else (unit.params.cfg_scale if unit.params.cfg_scale > 0 else call.cond_scale)
        strength = _edit_strength(cond)
        weight = 1.0 if math.isclose(strength, 1.0) else strength
        preds[m] = Prediction(c_pred, None if skip else u_pred, [[(i, weight)] for i in range(batch)], scale,
                              result=_guided(c_pred, u_pred, scale, strength))
    region = None if getattr(denoiser, "mask", None) is None else denoiser.nmask
    result = gen.fusion.combine(plan, preds, "x0", sigma, step=call.step, region=region)
    fused = result.denoised.to(args["denoised"].dtype)
    if getattr(denoiser, "need_last_noise_uncond", False):
        # DDIM CFG++ steers with the uncond noise: hand it the fused one.
        unconds = [None if p is None else p.reference_uncond() for p in preds]
        fused_uncond = unconds[plan.models[0]] if result.mask is None else blend(unconds, result.mask)
        cfg_pp.hand_over(denoiser, (x - fused_uncond) / sigma.reshape(-1, 1, 1, 1))
    return fused


def _same(a, b) -> bool:
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is not None and b is not None and a.shape == b.shape and torch.equal(a, b)


def _same_conds(a, b) -> bool:
    """Two compiled cond lists (Forge's dicts per AND-part) that ask the model the same thing."""
    keys = ("cross_attn", "pooled_output")
    return len(a) == len(b) and all(x.get("strength", 1) == y.get("strength", 1) and all(_same(x.get(k), y.get(k)) or
                                    (x.get(k) is None and y.get(k) is None) for k in keys) for x, y in zip(a, b))


def install() -> None:
    """Register the callbacks unless they already are (Reload UI clears them and re-imports the script)."""
    hooks = (("callbacks_cfg_denoiser", script_callbacks.on_cfg_denoiser, on_cfg_denoiser),
             ("callbacks_cfg_after_cfg", script_callbacks.on_cfg_after_cfg, cfg_pp.on_cfg_after_cfg))
    host.register_once(hooks)
