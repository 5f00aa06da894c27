"""One MagicFusion generation in the A1111 WebUI: all of its state, from `process` to `postprocess`.

A `Generation` is created by the script's `process` hook and kept on the generation's own
processing object `p` (never in a module global), so a generation started inside another one
(ADetailer and other extensions run always-on scripts in an inner `process_images`) has its
own state and leaves the outer one's alone. Its life:

    start(p, params)   process: resolve every unit's checkpoint and networks, load the experts
    begin_pass()       process_before_every_sampling: first pass, hires pass, img2img; check the
                       pairing with the main model now loaded and encode the units' prompts
    (sampling)         sampling.py drives the calls through the state kept here
    end_batch()        post_sample: the main model's layers get the main prompt's networks back
    end(processed)     postprocess: the mask pictures, then every reference to an expert dropped
                       (the cache decides what stays resident)

A failure at any point is recorded (`fail`) and raised by the sampling gate at the next model
call, so the generation fails with an error that names MagicFusion; the WebUI skips
`postprocess` then, and the object goes away with `p`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from modules import devices, prompt_parser, sd_models, sd_samplers, shared

from ..fusion import SNBFusion
from ..params import FusionParams, MagicFusionError, UnitParams, spec, unit_flat_name
from . import expert as experts
from . import networks

ATTR = "magicfusion_generation"


@dataclass
class PassConds:
    """A unit's conditioning for one sampling pass, as the prompt parser schedules it."""

    c: Any   # MulticondLearnedConditioning
    uc: Any  # list of ScheduledPromptConditioning lists


@dataclass
class Unit:
    """One enabled expert unit in this generation (fusion model `model`, >= 1)."""

    index: int                           # the unit (0 = unit 1), for the names of its fields
    model: int                           # its index in the fusion step
    params: UnitParams
    info: Any                            # the checkpoint
    prompt: str                          # its prompt without network tags ("" = the main prompts)
    nets: Optional[networks.NetworkSet]  # its networks; None = the main prompt's (empty unit prompt)
    expert: Optional[experts.Expert] = None
    conds: Optional[PassConds] = None
    is_main: bool = False                # its checkpoint is the main one (set when prepared)

    def field(self, attr: str) -> str:
        return unit_flat_name(self.index, attr)

    @property
    def net_list(self) -> Optional[list]:
        return None if self.nets is None else self.nets.nets

    def same_networks_as_main(self, main_nets: Optional[list]) -> bool:
        if self.nets is None:
            return True
        main_key = tuple((n.name, n.te_multiplier, n.unet_multiplier, n.dyn_dim) for n in (main_nets or []))
        return self.nets.key == main_key


@dataclass
class PassRecord:
    """One sampling pass of one batch: what it fused, for the mask pictures and the status route."""

    batch: int
    hires: bool
    fused: bool
    masks: dict = field(default_factory=dict)         # step -> (B, 1, h, w) uint8 model indices
    calls: dict = field(default_factory=dict)         # model index -> model evaluations
    fused_steps: set = field(default_factory=set)
    skip_mismatches: int = 0                          # calls where our uncond-skip rule disagreed with the WebUI's
    skipped_calls: int = 0


class Generation:
    """See the module docstring."""

    def __init__(self, p, params: FusionParams):
        self.p = p
        self.params = params
        self.fusion = SNBFusion.from_params(params)
        self.units: list[Unit] = []
        self.error: Optional[BaseException] = None
        self.active = False                 # fusing in the current sampling pass
        self.call = None                    # the denoiser call in flight (sampling.Call)
        self.passes: list[PassRecord] = []
        self.main_nets: Optional[list] = None
        self.main_flipped = False           # a unit's networks were merged into the main model's layers
        self.cfg_pp: Optional[tuple] = None

    # ---- lookup -----------------------------------------------------------------------

    @staticmethod
    def of(p) -> Optional["Generation"]:
        gen = getattr(p, ATTR, None) if p is not None else None
        return gen if isinstance(gen, Generation) and gen.p is p else None

    @classmethod
    def start(cls, p, params: FusionParams) -> "Generation":
        gen = cls(p, params)
        setattr(p, ATTR, gen)
        try:
            gen._prepare()
        except Exception as e:
            gen.fail(e)
        return gen

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error if isinstance(error, MagicFusionError) else \
                MagicFusionError(f"fusion failed: {type(error).__name__}: {error}", status_code=500)
            if error is not self.error:
                self.error.__cause__ = error

    @property
    def record(self) -> Optional[PassRecord]:
        return self.passes[-1] if self.passes else None

    # ---- process ----------------------------------------------------------------------

    def _prepare(self) -> None:
        p, params = self.p, self.params
        if getattr(p, "refiner_checkpoint", None) not in (None, "", "None", "none") and (p.refiner_switch_at or 1) < 1:
            raise MagicFusionError("cannot run together with the refiner; turn one of them off", "enabled")
        needs_experts = params.fusion_start < params.fusion_end or params.outside_unit is not None
        for model, index in enumerate(params.active_units, start=1):
            unit_params = params.units[index]
            info = experts.resolve(unit_params.checkpoint, unit_flat_name(index, "checkpoint"))
            prompt, tags = networks.split_prompt(unit_params.prompt) if unit_params.prompt.strip() else ("", {})
            nets = networks.resolve(tags, unit_flat_name(index, "prompt")) if unit_params.prompt.strip() else None
            main_info = getattr(shared.sd_model, "sd_checkpoint_info", None)
            is_main = main_info is not None and main_info.filename == info.filename
            self.units.append(Unit(index, model, unit_params, info, prompt, nets, is_main=is_main))
        # An empty window with the general model outside it never needs an expert: none is loaded.
        if needs_experts:
            for unit in self.units:
                unit.expert = _checked_load(unit)
                if not unit.expert.is_main:
                    sd_models.apply_alpha_schedule_override(unit.expert.model)
        resolved = params
        for unit in self.units:
            resolved = resolved.replace_unit(unit.index, checkpoint=unit.info.name_for_extra)
        infotext = resolved.infotext()
        for unit in self.units:
            if getattr(unit.info, "shorthash", None):
                infotext[spec(unit.field("checkpoint")).infotext + " hash"] = unit.info.shorthash
        p.extra_generation_params.update(infotext)

    # ---- sampling passes --------------------------------------------------------------

    def begin_pass(self) -> None:
        """Before each sampling pass: the pass's record, the pairing check, the units' prompts."""
        if self.error is not None:
            return
        p = self.p
        hires = bool(getattr(p, "is_hr_pass", False))
        self._close_pass()
        self.active = not hires or self.params.apply_in_hires
        self.passes.append(PassRecord(batch=getattr(p, "iteration", 0), hires=hires, fused=self.active))
        self.fusion.reset()
        try:
            self.main_nets = networks.current()
            if not self.active or not any(u.expert is not None for u in self.units):
                return
            main = shared.sd_model
            for unit in self.units:
                if unit.expert.is_main and unit.expert.model is not main:
                    unit.expert = _checked_load(unit)  # the main model changed (hires checkpoint)
                experts.check_compatible(main, unit.expert, text_encoder=self.params.expert_text_encoder,
                                         field_name=unit.field("checkpoint"), encoder_field="expert_text_encoder")
                unit.conds = self._encode(unit, hires)
        except Exception as e:
            self.fail(e)

    def _encode(self, unit: Unit, hires: bool) -> PassConds:
        """A unit's prompts through the WebUI's prompt machinery (weights, BREAK, long prompts,
        prompt editing and embeddings all apply), with the unit's networks on the text encoder."""
        p = self.p
        own = self.params.expert_text_encoder == "expert"
        model = unit.expert.model if own else shared.sd_model
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
        if unit.prompt.strip():
            prompts = [unit.prompt] * len(prompts)
        if unit.params.negative_prompt.strip():
            negatives = [unit.params.negative_prompt] * len(negatives)
        ready = experts.text_encoder_ready(unit.expert) if own else contextlib.nullcontext()
        if model is shared.sd_model and unit.nets is not None:
            self.main_flipped = True
        with ready, networks.using(unit.net_list), devices.autocast(), torch.no_grad():
            c = prompt_parser.get_multicond_learned_conditioning(
                model, prompt_parser.SdConditioning(prompts, width=width, height=height), p.firstpass_steps, hires_steps,
                shared.opts.use_old_scheduling)
            uc = prompt_parser.get_learned_conditioning(
                model, prompt_parser.SdConditioning(negatives, width=width, height=height, is_negative_prompt=True),
                p.firstpass_steps, hires_steps, shared.opts.use_old_scheduling)
        return PassConds(c, uc)

    def _close_pass(self) -> None:
        record = self.record
        if record is not None and record.fused and self.params.show_mask and not record.masks:
            record.masks = dict(self.fusion.masks)

    def end_batch(self) -> None:
        """After a batch is sampled: the main model's layers hold the main prompt's networks again."""
        self._close_pass()
        if self.main_flipped:
            try:
                networks.restore(shared.sd_model, self.main_nets)
            finally:
                self.main_flipped = False

    def end(self) -> None:
        """The end of the generation: drop every reference to an expert model."""
        self.end_batch()
        for unit in self.units:
            unit.expert = None
            unit.conds = None
        self.call = None
        self.cfg_pp = None
        self.active = False

    # ---- reporting --------------------------------------------------------------------

    def report(self) -> dict:
        """What this generation did, for GET /magicfusion/v1/status."""
        return {
            "units": [{"unit": u.index + 1, "checkpoint": u.info.title, "is_main": u.is_main,
                       "networks": [n.name for n in (u.net_list or [])]} for u in self.units],
            "passes": [{"batch": r.batch, "hires": r.hires, "fused": r.fused, "fused_steps": sorted(r.fused_steps),
                        "model_calls": {("general" if m == 0 else f"expert {self._unit_number(m)}"): n for m, n in sorted(r.calls.items())},
                        "skipped_uncond_calls": r.skipped_calls, "skip_mismatches": r.skip_mismatches} for r in self.passes],
            "error": str(self.error) if self.error is not None else None,
        }

    def _unit_number(self, model: int) -> int:
        return self.units[model - 1].index + 1


def _checked_load(unit: Unit) -> experts.Expert:
    return experts.cache.get(unit.info, unit.field("checkpoint"))
