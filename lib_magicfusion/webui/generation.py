"""One MagicFusion generation: all of its state, from the script's `process` to `postprocess`.

A `Generation` is created by the script's `process` hook and kept on the generation's own
processing object `p` (never in a module global), so a generation started inside another one
(ADetailer and other extensions run always-on scripts in an inner `process_images`) has its
own state and leaves the outer one's alone. Its life:

    start(p, params)   process: resolve every unit's checkpoint and networks, load the experts
    begin_pass()       process_before_every_sampling: first pass, hires pass, img2img; check the
                       pairing with the main model now loaded, encode the units' prompts, arm
                       the host's sampling hook
    (sampling)         the host's sampling module drives the calls through the state kept here
    end_batch()        post_sample: whatever the host must undo after a batch
    end()              postprocess: every reference to an expert dropped (the cache decides what
                       stays resident)

A failure at any point is recorded (`fail`) and raised by the host's sampling hook at the next
model call, so the generation fails with an error that names MagicFusion; the WebUI skips
`postprocess` then, and the object goes away with `p`.

This module is the same for every host; `a1111.generation` and `forge.generation` fill in
loading, compatibility, networks, encoding and the sampling hook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from modules import devices, prompt_parser, sd_samplers, shared

from ..fusion import SNBFusion
from ..params import FusionParams, MagicFusionError, UnitParams, spec, unit_flat_name
from . import checkpoints

ATTR = "magicfusion_generation"


@dataclass
class PassConds:
    """A unit's conditioning for one sampling pass, as the prompt parser schedules it."""

    c: Any   # MulticondLearnedConditioning
    uc: Any  # list of ScheduledPromptConditioning lists
    main_negative: bool = False  # its negative prompts are the main ones (by text)


@dataclass
class Unit:
    """One enabled expert unit in this generation (fusion model `model`, >= 1)."""

    index: int                           # the unit (0 = unit 1), for the names of its fields
    model: int                           # its index in the fusion step
    params: UnitParams
    info: Any                            # the checkpoint
    prompt: str                          # its prompt without network tags ("" = the main prompts)
    nets: Any                            # its networks (host-specific); None = the main prompt's (empty unit prompt)
    expert: Any = None                   # the host's expert (a model and how to run it)
    conds: PassConds | None = None
    is_main: bool = False                # its checkpoint is the main one

    def field(self, attr: str) -> str:
        return unit_flat_name(self.index, attr)


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

    def count(self, model: int) -> None:
        self.calls[model] = self.calls.get(model, 0) + 1


class Generation:
    """See the module docstring. Hosts override the methods marked "host"."""

    def __init__(self, p, params: FusionParams):
        self.p = p
        self.params = params
        self.fusion = SNBFusion.from_params(params)
        self.units: list[Unit] = []
        self.error: BaseException | None = None
        self.active = False                 # fusing in the current sampling pass
        self.call = None                    # the denoiser call in flight (the host's)
        self.passes: list[PassRecord] = []

    # ---- lookup -----------------------------------------------------------------------

    @staticmethod
    def of(p) -> Generation | None:
        gen = getattr(p, ATTR, None) if p is not None else None
        return gen if isinstance(gen, Generation) and gen.p is p else None

    @classmethod
    def start(cls, p, params: FusionParams) -> Generation:
        gen = cls(p, params)
        setattr(p, ATTR, gen)
        try:
            gen._prepare()
        except Exception as e:
            gen.fail(e)
        return gen

    @classmethod
    def failed(cls, p, error: BaseException) -> Generation:
        """A generation that asked for fusion but cannot have it: it fails at its first model call."""
        gen = cls(p, FusionParams())
        setattr(p, ATTR, gen)
        gen.fail(error)
        return gen

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error if isinstance(error, MagicFusionError) else \
                MagicFusionError(f"fusion failed: {type(error).__name__}: {error}", status_code=500)
            if error is not self.error:
                self.error.__cause__ = error

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    @property
    def record(self) -> PassRecord | None:
        return self.passes[-1] if self.passes else None

    # ---- process ----------------------------------------------------------------------

    def _prepare(self) -> None:
        p, params = self.p, self.params
        if getattr(p, "refiner_checkpoint", None) not in (None, "", "None", "none") and (p.refiner_switch_at or 1) < 1:
            raise MagicFusionError("cannot run together with the refiner; turn one of them off", "enabled")
        main_info = getattr(shared.sd_model, "sd_checkpoint_info", None)
        for model, index in enumerate(params.active_units, start=1):
            unit_params = params.units[index]
            info = checkpoints.resolve(unit_params.checkpoint, unit_flat_name(index, "checkpoint"))
            prompt, nets = "", None
            if unit_params.prompt.strip():
                from modules import extra_networks
                prompt, tags = extra_networks.parse_prompt(unit_params.prompt)
                nets = self.resolve_networks(tags, unit_flat_name(index, "prompt"))
            is_main = main_info is not None and main_info.filename == info.filename
            self.units.append(Unit(index, model, unit_params, info, prompt, nets, is_main=is_main))
        # An empty window with the general model outside it never needs an expert: none is loaded.
        if params.fusion_start < params.fusion_end or params.outside_unit is not None:
            for unit in self.units:
                unit.expert = self.load(unit)
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
        """Before each sampling pass: the pass's record, the pairing check, the units' prompts, the hook."""
        if self.error is not None:
            self.arm()  # a host whose hook is per pass must still raise the failure there
            return
        p = self.p
        hires = bool(getattr(p, "is_hr_pass", False))
        batch = getattr(p, "iteration", 0)
        try:
            record = self.record
            if record is not None and (record.batch, record.hires) == (batch, hires) and self.reuses_pass():
                self.arm()  # the host asked again for the same pass (Forge does, in the hires pass)
                return
            self._close_pass()
            self.active = not hires or self.params.apply_in_hires
            self.passes.append(PassRecord(batch=batch, hires=hires, fused=self.active))
            self.fusion.reset()
            self.pass_started()
            if not self.active or not any(u.expert is not None for u in self.units):
                return
            main = shared.sd_model
            for unit in self.units:
                self.refresh(unit, main)
                self.check(main, unit)
                unit.conds = self._encode(unit, hires)
            self.arm()
        except Exception as e:
            self.fail(e)
            self.arm()

    def _encode(self, unit: Unit, hires: bool) -> PassConds:
        """A unit's prompts through the WebUI's prompt machinery (weights, BREAK, long prompts,
        prompt editing and embeddings all apply), with the unit's networks on the text encoder."""
        p = self.p
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
        own_negative = unit.params.negative_prompt.strip() and any(n != unit.params.negative_prompt for n in negatives)
        if own_negative:
            negatives = [unit.params.negative_prompt] * len(negatives)
        with self.encoding(unit) as model, devices.autocast(), torch.no_grad():
            c = prompt_parser.get_multicond_learned_conditioning(
                model, prompt_parser.SdConditioning(prompts, width=width, height=height), p.firstpass_steps, hires_steps,
                shared.opts.use_old_scheduling)
            uc = prompt_parser.get_learned_conditioning(
                model, prompt_parser.SdConditioning(negatives, width=width, height=height, is_negative_prompt=True),
                p.firstpass_steps, hires_steps, shared.opts.use_old_scheduling)
        return PassConds(c, uc, main_negative=not own_negative)

    def _close_pass(self) -> None:
        record = self.record
        if record is not None and record.fused and self.params.show_mask and not record.masks:
            record.masks = dict(self.fusion.masks)

    def end_batch(self) -> None:
        """After a batch is sampled."""
        self._close_pass()
        self.batch_ended()

    def end(self) -> None:
        """The end of the generation: drop every reference to an expert model."""
        self.end_batch()
        for unit in self.units:
            unit.expert = None
            unit.conds = None
        self.call = None
        self.active = False
        self.released()

    # ---- host -------------------------------------------------------------------------

    def resolve_networks(self, tags: dict, field_name: str):  # host
        """The networks named by a unit prompt's tags (an error naming the field when one is not installed)."""
        if tags:
            raise MagicFusionError("networks in an expert prompt are not supported on this WebUI", field_name)
        return None

    def load(self, unit: Unit):  # host
        raise NotImplementedError

    def refresh(self, unit: Unit, main) -> None:  # host
        """Before a pass: bring the unit's expert up to date with the main model now loaded."""

    def check(self, main, unit: Unit) -> None:  # host
        """Refuse before sampling what cannot fuse with the main model."""

    def encoding(self, unit: Unit):  # host
        """A context manager giving the model whose text encoder encodes the unit's prompts,
        ready, with the unit's networks on it."""
        raise NotImplementedError

    def reuses_pass(self) -> bool:  # host
        return False

    def pass_started(self) -> None:  # host
        pass

    def arm(self) -> None:  # host
        """Install the sampling hook for this pass (A1111's callbacks are global: nothing)."""

    def batch_ended(self) -> None:  # host
        pass

    def released(self) -> None:  # host
        pass

    # ---- reporting --------------------------------------------------------------------

    def report(self) -> dict:
        """What this generation did, for GET /magicfusion/v1/status."""
        return {
            "units": [{"unit": u.index + 1, "checkpoint": u.info.title, "is_main": u.is_main,
                       "networks": self.network_names(u)} for u in self.units],
            "passes": [{"batch": r.batch, "hires": r.hires, "fused": r.fused, "fused_steps": sorted(r.fused_steps),
                        "model_calls": {("general" if m == 0 else f"expert {self.units[m - 1].index + 1}"): n
                                        for m, n in sorted(r.calls.items())},
                        "skipped_uncond_calls": r.skipped_calls, "skip_mismatches": r.skip_mismatches} for r in self.passes],
            "error": str(self.error) if self.error is not None else None,
        }

    def network_names(self, unit: Unit) -> list[str]:  # host
        return []
