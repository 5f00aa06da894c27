"""The sampling hook: the experts' guided predictions on the main model's latent, blended by SNB.

The CFGDenoiser callbacks are registered once (`install`) and act only for a generation that
asked for fusion: each finds its `Generation` on the denoiser's own `p`.

Per denoiser call (A1111's CFGDenoiser.forward):
  on_cfg_denoiser  plan the call (which models this step evaluates); the rows of units that run
                   on the main checkpoint with the main negative prompt join the main model's
                   batch (their uncond is the main one);
  the model call   goes through `Gate`, the main wrapper's stand-in: it raises any error a hook
                   recorded (the WebUI swallows exceptions in callbacks, so this is how a fusion
                   that cannot happen fails the generation); it evaluates every other unit once
                   per call, on its own rows, laid out, padded and batched by the WebUI's own
                   rules (rows.evaluate); when a unit runs alone, the main model is not called;
  on_cfg_denoised  fuse, and write the fused guided prediction into every row of x_out, so
                   the WebUI's own combine (u + w*s*(c - u)) returns it exactly;
  on_cfg_after_cfg for DDIM CFG++, hand over the fused uncond noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from modules import prompt_parser, script_callbacks, shared

from ...fusion import Prediction, StepPlan, sampling_step
from ...params import MagicFusionError
from ...snb import blend
from .. import cfg_pp, host
from ..generation import Generation, Unit
from . import networks, rows
from .generation import unit_nets

GENERAL = 0


@dataclass
class UnitCall:
    """How one unit is evaluated in this call."""

    unit: Unit
    conds_list: Any
    tensor: Any
    uncond: Any
    mode: str                      # reuse: the main rows are its rows | rows: its cond rows ride in the main call | own: a call of its own
    shares_uncond: bool            # its uncond is the main model's (one checkpoint, one negative prompt)
    first: int = 0                 # mode rows: its first row in the main call
    outputs: rows.Outputs | None = None

    @property
    def n(self) -> int:
        return rows.n_rows(self.conds_list)


@dataclass
class Call:
    denoiser: Any
    conds_list: Any                  # the main model's row layout
    plan: StepPlan
    step: int
    batch: int
    main_rows: int
    x: torch.Tensor                  # per image (B rows)
    sigma: torch.Tensor
    image_cond: torch.Tensor
    skip_uncond: bool
    units: dict = field(default_factory=dict)   # fusion model index -> UnitCall
    seen_rows: int = 0               # rows the WebUI sent through the gate in this call
    deltas: networks.RowDeltas | None = None

    @property
    def alone(self) -> bool:
        return GENERAL not in self.plan.models


def _space(denoiser) -> str:
    return "eps" if type(denoiser).__name__ == "CFGDenoiserTimesteps" else "x0"


class Gate(torch.nn.Module):
    """Stands in for the main model's wrapper during a MagicFusion generation."""

    def __init__(self, inner: torch.nn.Module, generation: Generation, denoiser):
        super().__init__()
        self.inner = inner
        self.generation = generation
        self.denoiser = denoiser

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)

    def forward(self, x, sigma, **kwargs):
        gen = self.generation
        if gen.error is not None:
            raise gen.error
        call = gen.call
        if call is None or call.denoiser is not self.denoiser:
            return self.inner(x, sigma, **kwargs)
        first = call.seen_rows
        call.seen_rows += x.shape[0]
        if call.alone:
            if first == 0:
                _evaluate_units(gen, call, self.inner)
            return torch.zeros_like(x)  # not the main model's: on_cfg_denoised writes every row
        if call.deltas is not None:
            call.deltas.rows = [(max(u.first, first) - first, min(u.first + u.n, first + x.shape[0]) - first, u.unit.nets)
                                for u in call.units.values() if u.mode == "rows" and u.unit.nets is not None
                                and max(u.first, first) < min(u.first + u.n, first + x.shape[0])]
            with call.deltas:
                out = self.inner(x, sigma, **kwargs)
        else:
            out = self.inner(x, sigma, **kwargs)
        if first == 0:
            gen.record.count(GENERAL)
            _evaluate_units(gen, call, self.inner)
        return out


def _checked(gen: Generation, evaluate, field_name: str):
    """An expert's forward pass: an exception in it, or a non-finite prediction (a corrupt or
    mismatched expert), fails the generation with an error that names MagicFusion."""
    try:
        out = evaluate()
    except MagicFusionError as e:
        gen.fail(e)
        raise
    except Exception as e:  # InterruptedException is a BaseException: it passes through
        gen.fail(MagicFusionError(f"the expert's forward pass failed: {type(e).__name__}: {e}", field_name, status_code=500))
        raise gen.error from e
    tensors = [t for t in (out.cond, out.uncond) if t is not None]
    sums = torch.stack([t.sum(dtype=torch.float32) for t in tensors])  # NaN or inf anywhere shows in its tensor's sum
    if not bool(torch.isfinite(sums).all()):  # one host sync for all of them
        gen.fail(MagicFusionError("the expert produced NaN or infinite values (a corrupt or incompatible checkpoint?)",
                                  field_name, status_code=500))
        raise gen.error
    return out


def _gate(gen: Generation, denoiser) -> None:
    inner = denoiser.inner_model  # built lazily by the WebUI
    if not isinstance(inner, Gate) or inner.generation is not gen:
        if isinstance(inner, Gate):
            inner = inner.inner
        denoiser.model_wrap = Gate(inner, gen, denoiser)


def _wrapper(unit: Unit, denoiser, main_wrapper):
    """The kind of wrapper the WebUI puts around the main model, for the unit's own model and
    parameterization."""
    if unit.expert.is_main:
        return main_wrapper
    key = type(main_wrapper).__name__
    cache = unit.expert.wrappers
    if key not in cache:
        model = unit.expert.model
        v = unit.expert.parameterization == "v"
        if _space(denoiser) == "eps":
            from modules import sd_samplers_timesteps as ts
            cache[key] = (ts.CompVisTimestepsVDenoiser if v else ts.CompVisTimestepsDenoiser)(model)
        elif getattr(model, "create_denoiser", None) is not None:
            cache[key] = model.create_denoiser()
        else:
            import k_diffusion
            cls = k_diffusion.external.CompVisVDenoiser if v else k_diffusion.external.CompVisDenoiser
            cache[key] = cls(model, quantize=shared.opts.enable_quantization)
    return cache[key]


def _main_scale(denoiser) -> float:
    scale = (getattr(denoiser.sampler, "sampler_extra_args", None) or {}).get("cond_scale", denoiser.p.cfg_scale)
    return float(scale) * float(getattr(denoiser, "cond_scale_miltiplier", 1.0))


def _unit_scale(unit: Unit, denoiser) -> float:
    if unit.params.cfg_scale > 0:
        return unit.params.cfg_scale * float(getattr(denoiser, "cond_scale_miltiplier", 1.0))
    return _main_scale(denoiser)


def _condition(cond, image_cond):
    if isinstance(cond, dict):
        return {**cond, "c_concat": [image_cond]}
    return {"c_crossattn": [cond], "c_concat": [image_cond]}


def _joined(conds):
    """Cond batches joined row-wise, as the WebUI hands them on: SDXL's dict conds keep the
    `shape` its CFG denoiser reads (prompt_parser.DictWithShape)."""
    out = rows.catenate(conds)
    return prompt_parser.DictWithShape(out) if isinstance(out, dict) and not isinstance(out, prompt_parser.DictWithShape) else out


def _skips(denoiser, sigma0) -> bool:
    """The WebUI's uncond-skip rule for this call (decided right after on_cfg_denoiser)."""
    opts = shared.opts
    s_min_uncond = (getattr(denoiser.sampler, "sampler_extra_args", None) or {}).get("s_min_uncond", 0.0) or 0.0
    return rows.skip_uncond(denoiser.step, denoiser.total_steps, float(sigma0), skip_early_cond=opts.skip_early_cond,
                            s_min_uncond=s_min_uncond, s_min_uncond_all=opts.s_min_uncond_all)


def on_cfg_denoiser(params: script_callbacks.CFGDenoiserParams) -> None:
    denoiser = params.denoiser
    gen = Generation.of(getattr(denoiser, "p", None))
    if gen is None:
        return
    try:
        _gate(gen, denoiser)
        gen.call = None
        if gen.error is not None or not gen.active:
            return
        gen.call = _plan_call(gen, params)
    except Exception as e:  # the gate raises it in the model call that follows
        gen.fail(e)


def _plan_call(gen: Generation, params) -> Call:
    denoiser = params.denoiser
    uncond = params.text_uncond
    batch = (uncond["crossattn"] if isinstance(uncond, dict) else uncond).shape[0]
    main_rows = params.x.shape[0] - batch
    x, sigma, image_cond = params.x[-batch:], params.sigma[-batch:], params.image_cond[-batch:]
    steps = denoiser.steps
    step = sampling_step(denoiser.step, denoiser.total_steps, steps)
    skip = _skips(denoiser, sigma[0])
    plan = gen.fusion.plan(step, steps, uncond_skipped=skip)
    conds_list, _ = prompt_parser.reconstruct_multicond_batch(denoiser.sampler.sampler_extra_args["cond"], denoiser.step)
    call = Call(denoiser, conds_list, plan, step, batch, main_rows, x, sigma, image_cond, skip)
    record = gen.record
    record.skipped_calls += int(skip)
    if plan.fuse:
        record.fused_steps.add(step)
    cond_rows = main_rows
    with_deltas = []
    for m in plan.models:
        if m == GENERAL:
            continue
        unit = gen.units[m - 1]
        e_conds_list, tensor = prompt_parser.reconstruct_multicond_batch(unit.conds.c, denoiser.step)
        e_uncond = prompt_parser.reconstruct_cond_batch(unit.conds.uc, denoiser.step)
        if len(e_conds_list) != batch:
            raise MagicFusionError(f"the expert prompts cover {len(e_conds_list)} images, the batch has {batch}", unit.field("prompt"))
        # One checkpoint, one negative prompt: the unit's uncond is the main model's (evaluated once,
        # with the main prompt's networks; README: a unit's networks act on its cond rows then).
        shares = unit.expert.is_main and unit.conds.main_negative
        uc = UnitCall(unit, e_conds_list, tensor, e_uncond, mode="own", shares_uncond=shares and not call.alone)
        if uc.shares_uncond and gen.same_networks_as_main(unit) and rows.same_layout(e_conds_list, conds_list) \
                and rows.same_cond(tensor, prompt_parser_tensor(params.text_cond, main_rows)):
            uc.mode = "reuse"  # the same model with the same prompts and networks: its rows are the main rows
        elif uc.shares_uncond and rows.token_len(tensor) == rows.token_len(params.text_cond):
            # One model, another prompt, one negative prompt: its cond rows join the main call.
            uc.mode, uc.first = "rows", cond_rows
            params.x = torch.cat([params.x[:cond_rows], rows.repeat_rows(x, e_conds_list), params.x[cond_rows:]])
            params.sigma = torch.cat([params.sigma[:cond_rows], rows.repeat_rows(sigma, e_conds_list), params.sigma[cond_rows:]])
            params.image_cond = torch.cat([params.image_cond[:cond_rows], rows.repeat_rows(image_cond, e_conds_list),
                                           params.image_cond[cond_rows:]])
            params.text_cond = _joined([params.text_cond, tensor])
            cond_rows += uc.n
            if not gen.same_networks_as_main(unit):
                with_deltas.append(unit)
        call.units[m] = uc
    if with_deltas:
        call.deltas = networks.RowDeltas(shared.sd_model, gen.main_nets or [], [u.nets for u in with_deltas])
    return call


def prompt_parser_tensor(text_cond, n: int):
    """The first n rows of a (joined) cond batch."""
    return rows.subscript(text_cond, 0, n)


def _evaluate_units(gen: Generation, call: Call, main_wrapper) -> None:
    """Every unit of this call that needs a model call of its own, once per denoiser call."""
    opts = shared.opts
    for m, uc in call.units.items():
        if uc.mode != "own":
            continue
        unit = uc.unit
        wrapper = _wrapper(unit, call.denoiser, main_wrapper)
        skip = call.skip_uncond or uc.shares_uncond  # a shared uncond comes from the main rows
        tensor, uncond = rows.pad(uc.tensor, uc.uncond, unit.expert.empty_cond, v0=opts.pad_cond_uncond_v0,
                                  pad_cond_uncond=opts.pad_cond_uncond)

        def evaluate(wrapper=wrapper, tensor=tensor, uncond=uncond, skip=skip, uc=uc):
            return rows.evaluate(wrapper, call.x, call.sigma, call.image_cond, tensor, uncond, uc.conds_list, skip=skip,
                                 batch_cond_uncond=opts.batch_cond_uncond, make_condition=_condition)

        with _networks_for(gen, call, uc):
            uc.outputs = _checked(gen, evaluate, unit.field("checkpoint"))
        gen.record.count(m)


def _networks_for(gen: Generation, call: Call, uc: UnitCall):
    """The unit's networks around its own call: a model of its own, or the main model with all
    rows the unit's (alone), holds the unit's set; the main model inside a fused step keeps the
    main set and takes the difference on the unit's rows."""
    unit = uc.unit
    if unit.nets is None or not unit.expert.is_main:
        return networks.using(unit_nets(unit))
    if call.alone:
        gen.main_flipped = True
        return networks.using(unit_nets(unit))
    deltas = networks.RowDeltas(shared.sd_model, gen.main_nets or [], [unit.nets])
    deltas.rows = [(0, 10 ** 9, unit.nets)]
    return deltas


def on_cfg_denoised(params: script_callbacks.CFGDenoisedParams) -> None:
    gate = params.inner_model
    gen = gate.generation if isinstance(gate, Gate) else None
    call = gen.call if gen is not None else None
    if call is None:
        return
    gen.call = None
    try:
        webui_skipped = call.seen_rows == params.x.shape[0] - call.batch
        gen.record.skip_mismatches += int(webui_skipped != call.skip_uncond)
        _fuse_rows(gen, call, params.x)
    except Exception as e:
        gen.fail(e)
        params.x[:] = float("nan")  # fails this generation at the WebUI's NaN check; the gate fails the next call


def _fuse_rows(gen: Generation, call: Call, x_out: torch.Tensor) -> None:
    if call.plan.models == (GENERAL,):
        return  # the WebUI's own result, untouched
    denoiser, batch, main_rows = call.denoiser, call.batch, call.main_rows
    main_uncond = None if call.skip_uncond or call.alone else x_out[-batch:]
    preds: list = [None] * gen.fusion.n_models
    if not call.alone:
        preds[GENERAL] = Prediction(x_out[:main_rows], main_uncond, call.conds_list, _main_scale(denoiser))
    for m, uc in call.units.items():
        scale = _unit_scale(uc.unit, denoiser)
        if uc.mode == "reuse":
            preds[m] = Prediction(x_out[:main_rows], main_uncond, uc.conds_list, scale)
        elif uc.mode == "rows":
            preds[m] = Prediction(x_out[uc.first:uc.first + uc.n], main_uncond, uc.conds_list, scale)
        else:
            if uc.outputs is None:
                raise MagicFusionError("the expert was not evaluated for this step", uc.unit.field("checkpoint"))
            preds[m] = Prediction(uc.outputs.cond, main_uncond if uc.shares_uncond else uc.outputs.uncond, uc.conds_list, scale)
    space = _space(denoiser)
    region = None if getattr(denoiser, "mask", None) is None else denoiser.nmask
    result = gen.fusion.combine(call.plan, preds, space, call.sigma if space == "x0" else None, step=call.step, region=region)
    fused = result.denoised.to(x_out.dtype)
    if getattr(denoiser, "need_last_noise_uncond", False):
        # DDIM CFG++ steers with the uncond noise: hand it the fused one (before the rows,
        # which the predictions view, are overwritten).
        unconds = [p.reference_uncond().to(fused.dtype) if p is not None else None for p in preds]
        if result.mask is None:
            fused_uncond = unconds[call.plan.models[0]].clone()
        else:
            fused_uncond = blend(unconds, result.mask)
        cfg_pp.hand_over(denoiser, fused_uncond)
    # Every row of image i becomes its fused prediction: u + w*s*(F - F) == F exactly. The
    # cond rows are laid out as the WebUI built x_in: image by image, its rows together.
    x_out[:main_rows] = rows.repeat_rows(fused, call.conds_list)
    x_out[-batch:] = fused


def install() -> None:
    """Register the callbacks unless they already are (Reload UI clears them and re-imports the script)."""
    hooks = (("callbacks_cfg_denoiser", script_callbacks.on_cfg_denoiser, on_cfg_denoiser),
             ("callbacks_cfg_denoised", script_callbacks.on_cfg_denoised, on_cfg_denoised),
             ("callbacks_cfg_after_cfg", script_callbacks.on_cfg_after_cfg, cfg_pp.on_cfg_after_cfg))
    host.register_once(hooks)
