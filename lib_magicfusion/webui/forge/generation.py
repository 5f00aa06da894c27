"""The Forge side of a generation: engines, compatibility, networks and encoding (see
webui/generation.py for the lifecycle, sampling.py for the hook)."""

from __future__ import annotations

import contextlib

from modules import shared

from ..generation import Generation, Unit
from . import expert as experts
from . import networks, sampling


class ForgeGeneration(Generation):
    def __init__(self, p, params):
        super().__init__(p, params)
        self.denoiser = None          # the CFG denoiser of the pass (seen in on_cfg_denoiser)
        self.in_unit = False          # a unit's own model call is running (the wrapper lets it through)
        self.armed = None             # the UnetPatcher clone that carries our hooks in this pass
        self._slots: dict = {}        # checkpoint file -> the network keys of its engines, by slot

    def resolve_networks(self, tags, field_name):
        return networks.resolve(tags, field_name)

    def load(self, unit: Unit):
        # Per checkpoint file, one engine per network set, in order of first use; the main file's
        # slot 0 is the main model itself, with the main prompt's networks (key None): a unit
        # whose prompt names the same networks as the main prompt (none, most often) is that one.
        key = None if unit.nets is None else unit.nets.key
        if unit.is_main and key == networks.of_prompt(self.p.prompt).key:
            key = None
        keys = self._slots.setdefault(unit.info.filename, [None] if unit.is_main else [])
        if key not in keys:
            keys.append(key)
        expert = experts.get(unit.info, unit.field("checkpoint"), keys.index(key))
        experts.check_compatible(shared.sd_model, expert, text_encoder=self.params.expert_text_encoder,
                                 field_name=unit.field("checkpoint"), encoder_field="expert_text_encoder")
        return expert

    def refresh(self, unit: Unit, main) -> None:
        expert = unit.expert
        if expert.is_main:
            if expert.engine is not main:
                unit.expert = self.load(unit)
            return
        nets = unit.nets if unit.nets is not None else networks.of_main_prompt(self.p)
        expert.objects = networks.patched(expert.engine, nets)

    def check(self, main, unit: Unit) -> None:
        experts.check_compatible(main, unit.expert, text_encoder=self.params.expert_text_encoder,
                                 field_name=unit.field("checkpoint"), encoder_field="expert_text_encoder")

    @contextlib.contextmanager
    def encoding(self, unit: Unit):
        expert = unit.expert
        if self.params.expert_text_encoder == "expert":
            engine, objects = expert.engine, expert.objects
        else:
            engine = shared.sd_model
            objects = networks.patched(engine, unit.nets) if unit.nets is not None else None
        if objects is None:
            yield engine
            return
        saved, engine.forge_objects = engine.forge_objects, objects
        try:
            yield engine
        finally:
            engine.forge_objects = saved

    def reuses_pass(self) -> bool:
        return True  # Forge calls process_before_every_sampling twice for a hires pass

    def arm(self) -> None:
        sampling.arm(self)

    def released(self) -> None:
        sampling.disarm(self)

    def network_names(self, unit: Unit) -> list[str]:
        return [name for name, *_ in (unit.nets.items if unit.nets is not None else ())]
