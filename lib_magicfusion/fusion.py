"""The MagicFusion step: one call per denoiser evaluation, host-agnostic.

A host (the WebUI adapter, or the test harness) evaluates the models that `SNBFusion.plan`
asks for on the same latent and noise level, hands their cond/uncond outputs to
`SNBFusion.combine`, and gets back the guided prediction to use, in its own space:

* ``"x0"``  k-diffusion samplers: the wrapper takes ``x = x0 + sigma * eps`` and returns x0;
* ``"eps"`` timestep samplers (DDIM/PLMS/UniPC): the wrapper returns epsilon.

Saliency is always measured on epsilon-space guidance terms (x0 differences divided by
sigma), so k means the same thing at every step and for every sampler. The blend itself is
a per-pixel choice, which is the same in either space for one x and sigma.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from . import snb
from .params import MEMORY_METHODS, METHODS

Space = Literal["x0", "eps"]
Kind = Literal["x0", "eps", "v"]
CondsList = Sequence[Sequence[tuple[int, float]]]

__all__ = ["Prediction", "StepPlan", "FusionResult", "SNBFusion", "guided", "guidance_term", "to_host_space", "window_bounds",
           "sampling_step"]


@dataclass
class Prediction:
    """One model's outputs for one denoiser call, in the host's space.

    cond: (R, C, H, W) rows, one per (image, AND-part); conds_list[i] lists image i's
    (row, weight) pairs as A1111's prompt parser builds them. uncond: (B, C, H, W), or None
    when the host skipped the unconditional pass on this call (NGMS, skip-early-cond).
    cfg_scale: the effective guidance scale for this model. result: the guided prediction the
    host computed itself with its own arithmetic (Forge's CFG); guided() then returns it unchanged,
    so a model that wins a pixel gives exactly the host's own value there.
    """

    cond: torch.Tensor
    uncond: torch.Tensor | None
    conds_list: CondsList
    cfg_scale: float
    result: torch.Tensor | None = None  # the host's own guided prediction, when it made one: used as is

    @property
    def batch(self) -> int:
        return len(self.conds_list)

    @functools.cached_property
    def uniform_weight(self) -> float | None:
        """The common weight when image i's only cond row is row i (no AND-prompts), else None."""
        weights = set()
        for i, conds in enumerate(self.conds_list):
            if len(conds) != 1 or conds[0][0] != i:
                return None
            weights.add(conds[0][1])
        return weights.pop() if len(weights) == 1 and self.cond.shape[0] == len(self.conds_list) else None

    def reference_uncond(self) -> torch.Tensor:
        """The uncond the host combines with: the real one, or each image's first cond row."""
        if self.uncond is not None:
            return self.uncond
        return torch.stack([self.cond[conds[0][0]] for conds in self.conds_list])


def guided(pred: Prediction) -> torch.Tensor:
    """Classifier-free guidance with A1111's arithmetic, operation for operation.

    denoised[i] = u[i] + sum_j (c_j - u[i]) * (w_j * s); with a skipped uncond the host
    uses each image's first cond row as u and a scale of 1. Element-wise, so the batched
    form for one cond row per image gives the same bits as the per-row loop.
    """
    if pred.result is not None:
        return pred.result
    uncond = pred.reference_uncond()
    scale = pred.cfg_scale if pred.uncond is not None else 1.0
    weight = pred.uniform_weight
    if weight is not None:
        return uncond + (pred.cond - uncond) * (weight * scale)
    out = torch.clone(uncond)
    for i, conds in enumerate(pred.conds_list):
        for row, weight in conds:
            out[i] += (pred.cond[row] - uncond[i]) * (weight * scale)
    return out


def guidance_term(pred: Prediction, reference: torch.Tensor) -> torch.Tensor:
    """sum_j w_j * s * (c_j - reference[i]) per image, in float32 at least."""
    dtype = snb.compute_dtype(pred.cond.dtype)
    cond = pred.cond.to(dtype)
    reference = reference.to(dtype)
    weight = pred.uniform_weight
    if weight is not None:
        return (cond - reference) * (weight * pred.cfg_scale)
    out = torch.zeros_like(reference)
    for i, conds in enumerate(pred.conds_list):
        for row, weight in conds:
            out[i] += (cond[row] - reference[i]) * (weight * pred.cfg_scale)
    return out


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device).reshape(-1)
    if sigma.numel() == 1:
        sigma = sigma.expand(like.shape[0])
    return sigma.reshape(-1, *([1] * (like.dim() - 1)))


def to_host_space(output: torch.Tensor, kind: Kind, x: torch.Tensor, sigma: torch.Tensor, space: Space) -> torch.Tensor:
    """Convert a model output of parameterization `kind` into the host's space.

    sigma is the variance-exploding noise level sqrt((1 - alpha_bar) / alpha_bar), per sample.
    In the "x0" space x is x0 + sigma * eps; in the "eps" space x is the variance-preserving
    latent sqrt(alpha_bar) * x0 + sqrt(1 - alpha_bar) * eps.
    """
    if kind == space:
        return output
    s = _per_sample(sigma, x)
    norm = torch.sqrt(s * s + 1)
    if space == "x0":
        if kind == "eps":
            return x - s * output
        if kind == "v":
            return x / (s * s + 1) - output * (s / norm)
    elif space == "eps":
        if kind == "v":
            return (output + s * x) / norm
        if kind == "x0":
            return (x - output / norm) * (norm / s)
    raise ValueError(f"MagicFusion: cannot convert a {kind!r} output into the {space!r} space")


def window_bounds(start: float, end: float, total: int) -> tuple[int, int]:
    """First and one-past-last step index of the fusion window, start*N <= i < end*N."""
    eps = 1e-9  # 0.15 * 100 is 15.000000000000002 in binary floating point
    return math.ceil(start * total - eps), math.ceil(end * total - eps)


def sampling_step(call: int, total_calls: int, steps: int) -> int:
    """The sampling step a denoiser call belongs to.

    Samplers spread `total_calls` model evaluations over `steps` steps (Heun: 2 per step and
    1 on the last, 2N - 1 in all); the window counts steps, whatever the sampler's order.
    """
    if total_calls <= 0 or steps <= 0:
        return 0
    return max(0, min(steps - 1, call * steps // total_calls))


@dataclass(frozen=True)
class StepPlan:
    """What one denoiser call needs: fuse or not, and which models to evaluate."""

    fuse: bool
    models: tuple[int, ...]


@dataclass
class FusionResult:
    denoised: torch.Tensor
    mask: torch.Tensor | None


@dataclass
class SNBFusion:
    """Saliency-aware noise blending of N >= 2 models (index 0 = general, 1.. = experts).

    ks: one temperature per model. baseline: "general" measures every expert's guidance
    against the general model's uncond (the official code), "own" against its own (the
    paper). Fusion runs at sampling steps start*N <= i < end*N; outside the window only
    model `outside` (0 = general, 1 = expert) is evaluated and used.

    method: "official" (the paper's code), "average" (the mean of the guided predictions) or
    "stable": every model's guidance measured against its own uncond (whatever `baseline`
    says) and the saliency maps averaged over the sampling steps with decay `memory`, so a
    pixel keeps the model it chose unless the evidence turns for several steps.
    """

    ks: tuple[float, ...]
    blur: int = 4
    baseline: Literal["general", "own"] = "general"
    start: float = 0.0
    end: float = 1.0
    outside: int = 0
    record_masks: bool = False
    method: str = "official"
    memory: float = 0.9            # "stable": the decay per step of the saliency maps' moving average
    last_mask: torch.Tensor | None = field(default=None, init=False)
    masks: dict = field(default_factory=dict, init=False)
    _ema: torch.Tensor | None = field(default=None, init=False, repr=False)
    _ema_prev: torch.Tensor | None = field(default=None, init=False, repr=False)
    _ema_step: int | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_params(cls, params) -> SNBFusion:
        """The step for a `FusionParams`: model 0 is the general model, model m >= 1 the m-th
        enabled expert unit (params.active_units[m - 1])."""
        active = params.active_units
        outside = 0 if params.outside_unit is None else 1 + active.index(params.outside_unit)
        return cls(ks=(params.k_general, *(params.units[i].k for i in active)), blur=params.blur,
                   baseline=params.saliency_baseline, start=params.fusion_start, end=params.fusion_end,
                   outside=outside, record_masks=params.show_mask, method=params.method, memory=params.mask_memory)

    def __post_init__(self) -> None:
        self.ks = tuple(float(k) for k in self.ks)
        if self.method not in METHODS:
            raise ValueError(f"MagicFusion: unknown fusion method {self.method!r}")
        if not 0.0 <= self.memory < 1.0:
            raise ValueError(f"MagicFusion: mask memory must be in [0, 1), got {self.memory!r}")
        if len(self.ks) < 2:
            raise ValueError("MagicFusion: fusion needs at least two models")
        if self.baseline not in ("general", "own"):
            raise ValueError(f"MagicFusion: unknown saliency baseline {self.baseline!r}")
        if not 0 <= self.outside < len(self.ks):
            raise ValueError(f"MagicFusion: outside-window model index {self.outside} out of range")

    @property
    def n_models(self) -> int:
        return len(self.ks)

    def reset(self) -> None:
        """Forget the masks (and any state carried over the steps) of a previous sampling pass."""
        self.last_mask = None
        self.masks = {}
        self._ema = None
        self._ema_prev = None
        self._ema_step = None

    def in_window(self, step: int, total: int) -> bool:
        lo, hi = window_bounds(self.start, self.end, total)
        return lo <= step < hi

    def plan(self, step: int, total: int, uncond_skipped: bool = False) -> StepPlan:
        """Which models the host must evaluate for a call at sampling step `step` of `total`.

        Outside the window one model runs alone. A call whose uncond the host skipped has no
        guidance term to measure: it reuses the last mask of this pass, or, before any mask
        exists, runs the general model alone (never a saliency of zeros).
        """
        if not self.in_window(step, total):
            return StepPlan(False, (self.outside,))
        if uncond_skipped and self.last_mask is None:
            return StepPlan(False, (0,))
        return StepPlan(True, tuple(range(self.n_models)))

    def _saliency_inputs(self, preds: Sequence[Prediction], space: Space,
                         sigma: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The models' guidance terms stacked (N, B, C, H, W) and their temperatures.

        The saliency of |w * s * (c - u)| / sigma is that of |c - u| at temperature
        k * |w * s| / sigma (snb.stacked_saliency), so with one cond row per image the terms
        are one subtraction for all models, and the scale and sigma go into N x B numbers
        rather than full-size tensors. AND-prompts sum their weighted rows (guidance_term).
        In the x0 space an x0 difference is -sigma times the eps difference.
        """
        general = preds[0]
        dtype = snb.compute_dtype(general.cond.dtype)
        own = self.baseline == "own" or self.method == "stable"
        weights = [p.uniform_weight for p in preds]
        if None not in weights:
            reference = torch.stack([p.uncond for p in preds]) if own else general.uncond
            # The subtraction promotes the reference to `dtype` as it reads it: no separate cast.
            deltas = torch.stack([p.cond for p in preds]).to(dtype) - reference
            factors = [abs(w * p.cfg_scale) for w, p in zip(weights, preds)]
        else:
            deltas = torch.stack([guidance_term(p, p.uncond if own else general.uncond) for p in preds])
            factors = [1.0] * len(preds)
        temperatures = snb.k_column(tuple(k * f for k, f in zip(self.ks, factors)), dtype, deltas.device)
        if space == "x0":
            if sigma is None:
                raise ValueError("MagicFusion: the x0 space needs sigma to measure saliency")
            sigma = torch.as_tensor(sigma, device=deltas.device).to(dtype).reshape(1, -1, 1)
            temperatures = temperatures / sigma.clamp_min(torch.finfo(dtype).tiny)
        return deltas, temperatures

    def combine(self, plan: StepPlan, preds: Sequence[Prediction | None], space: Space,
                sigma: torch.Tensor | None = None, step: int | None = None,
                region: torch.Tensor | None = None) -> FusionResult:
        """The guided prediction for this call. preds[m] must be given for m in plan.models.
        region: where the image is being generated (an inpainting mask, 1 = generated), see
        snb.stacked_saliency; None = everywhere."""
        if not plan.fuse:
            return FusionResult(guided(preds[plan.models[0]]), None)
        if len(preds) != self.n_models or any(p is None for p in preds):
            raise ValueError(f"MagicFusion: fusion needs the outputs of all {self.n_models} models")
        general = preds[0]
        dtype = general.cond.dtype
        outputs = [guided(p).to(dtype) for p in preds]
        if self.method == "average":
            return FusionResult(torch.stack(outputs).mean(dim=0), None)
        if all(p.uncond is not None for p in preds):
            deltas, temperatures = self._saliency_inputs(preds, space, sigma)
            maps = snb.stacked_saliency(deltas, temperatures, self.blur, region)
            if self.method in MEMORY_METHODS:
                maps = self._remember(maps, step)
            mask = torch.argmax(maps, dim=0)
            self.last_mask = mask
            if self.record_masks and step is not None:
                self.masks[step] = mask.to("cpu", torch.uint8)
        else:
            mask = self.last_mask
        return FusionResult(snb.blend(outputs, mask), mask)

    def _remember(self, maps: torch.Tensor, step: int | None) -> torch.Tensor:
        """The saliency maps averaged over the steps: an exponential moving average with decay
        `memory` per sampling step. Calls within one step (second-order samplers) blend with
        the average as it stood before that step, so the decay counts steps, not model calls.
        A call with another batch layout (a new pass that was not reset) starts afresh."""
        if self.memory <= 0:
            return maps
        if step is None or self._ema_step != step:
            self._ema_prev = self._ema
            self._ema_step = step
        prev = self._ema_prev
        if prev is not None and prev.shape == maps.shape:
            maps = self.memory * prev + (1 - self.memory) * maps
        self._ema = maps
        return maps
