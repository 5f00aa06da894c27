"""The sampling hook: the expert's guided prediction on the main model's latent, blended by SNB.

The CFGDenoiser callbacks are registered once (`install`) and act only for the generation
whose `p` the active run was prepared for; the run is replaced at the start of every
generation, so a failed or interrupted one can never leak into the next.

Per denoiser call (A1111's CFGDenoiser.forward):
  on_cfg_denoiser  plan the call; when the expert is the main checkpoint and the uncond rows
                   are shared, append the expert's cond rows to the main model's batch;
  the model call   goes through `Gate`, the main wrapper's stand-in: it raises any error a
                   hook recorded (the WebUI swallows exceptions in hooks, so this is how a
                   fusion that cannot happen fails the generation), hands the call to the
                   expert's model when the expert runs alone, and evaluates the expert's
                   rows in one batched call beside the main one;
  on_cfg_denoised  fuse, and write the fused guided prediction into every row of x_out, so
                   the WebUI's own combine (u + w*s*(c - u)) returns it exactly;
  on_cfg_after_cfg for DDIM CFG++, hand over the fused uncond noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from modules import prompt_parser, script_callbacks, shared
from modules.sd_samplers_cfg_denoiser import catenate_conds

from ..fusion import Prediction, SNBFusion, StepPlan, sampling_step
from ..params import MagicFusionError
from ..snb import blend

GENERAL, EXPERT = 0, 1


@dataclass
class PassConds:
    """The expert's conditioning for one sampling pass, as the prompt parser schedules it."""

    c: Any   # MulticondLearnedConditioning
    uc: Any  # list of ScheduledPromptConditioning lists


@dataclass
class Call:
    denoiser: Any
    conds_list: Any                  # the main model's row layout
    plan: StepPlan
    step: int
    batch: int
    main_rows: int
    x: torch.Tensor
    sigma: torch.Tensor
    image_cond: torch.Tensor
    skip_uncond: bool
    expert_conds_list: Any = None
    expert_tensor: Any = None
    expert_uncond: Any = None
    mode: str = "general"            # general | separate | batched | reuse | alone
    shares_uncond: bool = False      # the expert's uncond rows are the main model's
    expert_pred: Optional[Prediction] = None


@dataclass
class Run:
    """Everything one generation needs; replaced at the start of each generation."""

    p: Any
    params: Any = None
    expert: Any = None                # expert.Expert
    fusion: Optional[SNBFusion] = None
    conds: Optional[PassConds] = None
    active: bool = False              # fusing in the current sampling pass
    call: Optional[Call] = None
    wrappers: dict = field(default_factory=dict)
    batch_masks: list = field(default_factory=list)   # per batch: {step: (B,1,h,w) uint8}
    cfg_pp_uncond: Optional[torch.Tensor] = None
    cfg_pp_denoiser: Any = None
    error: Optional[BaseException] = None

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error if isinstance(error, MagicFusionError) else \
                MagicFusionError(f"fusion failed: {type(error).__name__}: {error}", status_code=500)
            self.error.__cause__ = error if error is not self.error else None


current: Optional[Run] = None


def start(run: Optional[Run]) -> None:
    global current
    current = run


def _space(denoiser) -> str:
    return "eps" if type(denoiser).__name__ == "CFGDenoiserTimesteps" else "x0"


class Gate(torch.nn.Module):
    """Stands in for the main model's wrapper during a MagicFusion generation."""

    def __init__(self, inner: torch.nn.Module, run: Run):
        super().__init__()
        self.inner = inner
        self.run = run

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)

    def forward(self, x, sigma, **kwargs):
        run = self.run
        if run.error is not None:
            raise run.error
        call = run.call if run is current else None
        if call is None or not run.active:
            return self.inner(x, sigma, **kwargs)
        if call.mode == "alone":
            return _checked(run, lambda: _expert_wrapper(run, call.denoiser)(x, sigma, **kwargs))
        out = self.inner(x, sigma, **kwargs)
        if call.mode == "separate" and call.expert_pred is None:
            call.expert_pred = _checked(run, lambda: _evaluate_expert(run, call))
        return out


def _checked(run: Run, evaluate):
    """The expert's forward pass: an exception in it, or a non-finite prediction (a corrupt or
    mismatched expert), fails the generation with an error that names MagicFusion."""
    try:
        out = evaluate()
    except MagicFusionError as e:
        run.fail(e)
        raise
    except Exception as e:  # InterruptedException is a BaseException: it passes through
        run.fail(MagicFusionError(f"the expert's forward pass failed: {type(e).__name__}: {e}", "expert_checkpoint", status_code=500))
        raise run.error from e
    tensors = [out] if isinstance(out, torch.Tensor) else [t for t in (out.cond, out.uncond) if t is not None]
    sums = torch.stack([t.sum(dtype=torch.float32) for t in tensors])  # NaN or inf anywhere shows in its tensor's sum
    if not bool(torch.isfinite(sums).all()):  # one host sync for all of them
        run.fail(MagicFusionError("the expert produced NaN or infinite values (a corrupt or incompatible checkpoint?)",
                                  "expert_checkpoint", status_code=500))
        raise run.error
    return out


def _gate(run: Run, denoiser) -> None:
    inner = denoiser.inner_model  # built lazily by the WebUI
    if not isinstance(inner, Gate) or inner.run is not run:
        if isinstance(inner, Gate):
            inner = inner.inner
        denoiser.model_wrap = Gate(inner, run)


def _expert_wrapper(run: Run, denoiser):
    """The kind of wrapper the WebUI puts around the main model, for the expert's own parameterization."""
    wrapper = denoiser.model_wrap.inner if isinstance(denoiser.model_wrap, Gate) else denoiser.inner_model
    if run.expert.is_main:
        return wrapper
    key = type(wrapper).__name__
    if key not in run.wrappers:
        model = run.expert.model
        v = run.expert.parameterization == "v"
        if _space(denoiser) == "eps":
            from modules import sd_samplers_timesteps as ts
            run.wrappers[key] = (ts.CompVisTimestepsVDenoiser if v else ts.CompVisTimestepsDenoiser)(model)
        elif getattr(model, "create_denoiser", None) is not None:
            run.wrappers[key] = model.create_denoiser()
        else:
            import k_diffusion
            cls = k_diffusion.external.CompVisVDenoiser if v else k_diffusion.external.CompVisDenoiser
            run.wrappers[key] = cls(model, quantize=shared.opts.enable_quantization)
    return run.wrappers[key]


def _host_skips_uncond(denoiser, sigma0) -> bool:
    """The rule CFGDenoiser.forward applies right after on_cfg_denoiser (A1111 1.10)."""
    opts = shared.opts
    if opts.skip_early_cond != 0.0 and denoiser.step / denoiser.total_steps <= opts.skip_early_cond:
        return True
    s_min_uncond = (getattr(denoiser.sampler, "sampler_extra_args", None) or {}).get("s_min_uncond", 0.0) or 0.0
    return bool((denoiser.step % 2 or opts.s_min_uncond_all) and s_min_uncond > 0 and float(sigma0) < s_min_uncond)


def _main_scale(denoiser) -> float:
    scale = (getattr(denoiser.sampler, "sampler_extra_args", None) or {}).get("cond_scale", denoiser.p.cfg_scale)
    return float(scale) * float(getattr(denoiser, "cond_scale_miltiplier", 1.0))


def _expert_scale(run: Run, denoiser) -> float:
    if run.params.expert_cfg_scale > 0:
        return run.params.expert_cfg_scale * float(getattr(denoiser, "cond_scale_miltiplier", 1.0))
    return _main_scale(denoiser)


def _token_len(cond) -> int:
    return (cond["crossattn"] if isinstance(cond, dict) else cond).shape[1]


def _rows(x, conds_list):
    return torch.cat([torch.stack([x[i] for _ in range(len(parts))]) for i, parts in enumerate(conds_list)])


def _condition(cond, image_cond):
    if isinstance(cond, dict):
        return {**cond, "c_concat": [image_cond]}
    return {"c_crossattn": [cond], "c_concat": [image_cond]}


def _same(a, b) -> bool:
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a.shape == b.shape and torch.equal(a, b)


def _same_layout(a, b) -> bool:
    return [[(i, float(w)) for i, w in parts] for parts in a] == [[(i, float(w)) for i, w in parts] for parts in b]


def _same_repeats(a, b) -> bool:
    return [len(parts) for parts in a] == [len(parts) for parts in b]


def on_cfg_denoiser(params: script_callbacks.CFGDenoiserParams) -> None:
    run = current
    denoiser = params.denoiser
    if run is None or getattr(denoiser, "p", None) is not run.p:
        return
    try:
        _gate(run, denoiser)
        run.call = None
        if run.error is not None or not run.active:
            return
        run.call = _plan_call(run, params)
    except Exception as e:  # the gate raises it in the model call that follows
        run.fail(e)


def _plan_call(run: Run, params) -> Call:
    denoiser = params.denoiser
    uncond = params.text_uncond
    batch = (uncond["crossattn"] if isinstance(uncond, dict) else uncond).shape[0]
    main_rows = params.x.shape[0] - batch
    x, sigma, image_cond = params.x[-batch:], params.sigma[-batch:], params.image_cond[-batch:]
    steps = denoiser.steps
    step = sampling_step(denoiser.step, denoiser.total_steps, steps)
    skip = _host_skips_uncond(denoiser, sigma[0])
    plan = run.fusion.plan(step, steps, uncond_skipped=skip)
    conds_list, _ = prompt_parser.reconstruct_multicond_batch(denoiser.sampler.sampler_extra_args["cond"], denoiser.step)
    call = Call(denoiser, conds_list, plan, step, batch, main_rows, x, sigma, image_cond, skip)
    if EXPERT not in plan.models:
        return call
    e_conds_list, tensor = prompt_parser.reconstruct_multicond_batch(run.conds.c, denoiser.step)
    e_uncond = prompt_parser.reconstruct_cond_batch(run.conds.uc, denoiser.step)
    if len(e_conds_list) != batch:
        raise MagicFusionError(f"the expert prompts cover {len(e_conds_list)} images, the batch has {batch}", "expert_prompt")
    call.expert_conds_list, call.expert_tensor, call.expert_uncond = e_conds_list, tensor, e_uncond
    call.mode = "separate"
    shares_uncond = call.shares_uncond = run.expert.is_main and _same(e_uncond, params.text_uncond)
    if plan.models == (EXPERT,) and _same_repeats(e_conds_list, conds_list):
        # The expert runs alone: the main model is not evaluated at all.
        call.mode = "alone"
        params.text_cond, params.text_uncond = tensor, e_uncond
    elif shares_uncond and _same_layout(e_conds_list, conds_list) and _same(tensor, params.text_cond):
        call.mode = "reuse"  # the same model with the same prompts: its rows are the main rows
    elif shares_uncond and _token_len(tensor) == _token_len(params.text_cond):
        # One model, two prompts, one negative prompt: the expert's cond rows join the main call.
        call.mode = "batched"
        params.x = torch.cat([params.x[:main_rows], _rows(x, e_conds_list), params.x[main_rows:]])
        params.sigma = torch.cat([params.sigma[:main_rows], _rows(sigma, e_conds_list), params.sigma[main_rows:]])
        params.image_cond = torch.cat([params.image_cond[:main_rows], _rows(image_cond, e_conds_list), params.image_cond[main_rows:]])
        params.text_cond = _joined([params.text_cond, tensor])
    return call


def _joined(conds):
    """Cond batches joined row-wise, as the WebUI hands them on: SDXL's dict conds keep the
    `shape` its CFG denoiser reads (prompt_parser.DictWithShape)."""
    out = catenate_conds(conds)
    return prompt_parser.DictWithShape(out) if isinstance(out, dict) else out


def _evaluate_expert(run: Run, call: Call) -> Prediction:
    """The expert's cond (and uncond) rows on the same latent and noise level, in one call."""
    wrapper = _expert_wrapper(run, call.denoiser)
    scale = _expert_scale(run, call.denoiser)
    x_rows, s_rows = _rows(call.x, call.expert_conds_list), _rows(call.sigma, call.expert_conds_list)
    i_rows = _rows(call.image_cond, call.expert_conds_list)
    n = x_rows.shape[0]
    tensor, uncond = call.expert_tensor, call.expert_uncond
    if call.skip_uncond or call.shares_uncond:  # a shared uncond is filled in from the main rows once they exist
        out = wrapper(x_rows, s_rows, cond=_condition(tensor, i_rows))
        return Prediction(out, None, call.expert_conds_list, scale)
    if _token_len(tensor) == _token_len(uncond):
        out = wrapper(torch.cat([x_rows, call.x]), torch.cat([s_rows, call.sigma]),
                      cond=_condition(catenate_conds([tensor, uncond]), torch.cat([i_rows, call.image_cond])))
        return Prediction(out[:n], out[n:], call.expert_conds_list, scale)
    cond_out = wrapper(x_rows, s_rows, cond=_condition(tensor, i_rows))
    uncond_out = wrapper(call.x, call.sigma, cond=_condition(uncond, call.image_cond))
    return Prediction(cond_out, uncond_out, call.expert_conds_list, scale)


def on_cfg_denoised(params: script_callbacks.CFGDenoisedParams) -> None:
    run = current
    call = run.call if run is not None else None
    if call is None:
        return
    run.call = None
    try:
        _fuse_rows(run, call, params.x)
    except Exception as e:
        run.fail(e)
        params.x[:] = float("nan")  # fails this generation at the WebUI's NaN check; the gate fails the next call


def _fuse_rows(run: Run, call: Call, x_out: torch.Tensor) -> None:
    if call.plan.models == (GENERAL,):
        return  # the WebUI's own result, untouched
    denoiser, batch, rows = call.denoiser, call.batch, call.main_rows
    main_uncond = None if call.skip_uncond else x_out[-batch:]
    main = Prediction(x_out[:rows], main_uncond, call.conds_list, _main_scale(denoiser))
    if call.mode in ("alone", "reuse", "batched"):  # the expert's rows are in x_out
        first = rows if call.mode == "batched" else 0
        n = sum(len(parts) for parts in call.expert_conds_list)
        expert = Prediction(x_out[first:first + n], main_uncond, call.expert_conds_list, _expert_scale(run, denoiser))
        if call.mode == "alone":
            main = None
    else:
        expert = call.expert_pred
        if expert is None:
            raise MagicFusionError("the expert was not evaluated for this step")
        if call.shares_uncond:
            expert.uncond = main_uncond
    space = _space(denoiser)
    result = run.fusion.combine(call.plan, [main, expert], space, call.sigma if space == "x0" else None, step=call.step)
    fused = result.denoised.to(x_out.dtype)
    if getattr(denoiser, "need_last_noise_uncond", False):
        # DDIM CFG++ steers with the uncond noise: hand it the fused one (before the rows,
        # which the predictions view, are overwritten).
        e_uncond = expert.reference_uncond().to(fused.dtype)
        run.cfg_pp_uncond = e_uncond.clone() if result.mask is None else blend([main.reference_uncond(), e_uncond], result.mask)
        run.cfg_pp_denoiser = denoiser
    # Every row of image i becomes its fused prediction: u + w*s*(F - F) == F exactly. The
    # cond rows are laid out as the WebUI built x_in: image by image, its rows together.
    x_out[:rows] = _rows(fused, call.conds_list)
    x_out[-batch:] = fused


def on_cfg_after_cfg(params: script_callbacks.AfterCFGCallbackParams) -> None:
    run = current
    if run is not None and run.cfg_pp_uncond is not None:
        run.cfg_pp_denoiser.last_noise_uncond = run.cfg_pp_uncond
        run.cfg_pp_uncond = run.cfg_pp_denoiser = None


def install() -> None:
    """Register the callbacks unless they already are (Reload UI clears them and re-imports the script)."""
    hooks = (("callbacks_cfg_denoiser", script_callbacks.on_cfg_denoiser, on_cfg_denoiser),
             ("callbacks_cfg_denoised", script_callbacks.on_cfg_denoised, on_cfg_denoised),
             ("callbacks_cfg_after_cfg", script_callbacks.on_cfg_after_cfg, on_cfg_after_cfg))
    for key, register, fn in hooks:
        if not any(c.callback is fn for c in script_callbacks.callback_map[key]):
            register(fn, name=f"magicfusion_{fn.__name__}")
