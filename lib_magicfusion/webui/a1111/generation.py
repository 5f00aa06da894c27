"""The A1111 side of a generation: loading, compatibility, networks and encoding (see
webui/generation.py for the lifecycle)."""

from __future__ import annotations

import contextlib

from modules import sd_models, shared

from ..generation import Generation, Unit
from . import expert as experts
from . import networks


class A1111Generation(Generation):
    def __init__(self, p, params):
        super().__init__(p, params)
        self.main_nets: list | None = None   # the main prompt's networks in this pass
        self.main_flipped = False               # a unit's networks were merged into the main model's layers

    def resolve_networks(self, tags, field_name):
        return networks.resolve(tags, field_name)

    def load(self, unit: Unit):
        expert = experts.get(unit.info, unit.field("checkpoint"))
        if not expert.is_main:
            sd_models.apply_alpha_schedule_override(expert.model)
        self.check(shared.sd_model, unit, expert)
        return expert

    def refresh(self, unit: Unit, main) -> None:
        if unit.expert.is_main and unit.expert.model is not main:
            unit.expert = self.load(unit)  # the main model changed (a hires checkpoint)

    def check(self, main, unit: Unit, expert=None) -> None:
        experts.check_compatible(main, expert or unit.expert, text_encoder=self.params.expert_text_encoder,
                                 field_name=unit.field("checkpoint"), encoder_field="expert_text_encoder")

    @contextlib.contextmanager
    def encoding(self, unit: Unit):
        own = self.params.expert_text_encoder == "expert"
        model = unit.expert.model if own else shared.sd_model
        if model is shared.sd_model and unit.nets is not None:
            self.main_flipped = True
        ready = experts.text_encoder_ready(unit.expert) if own else contextlib.nullcontext()
        with ready, networks.using(unit_nets(unit)):
            yield model

    def pass_started(self) -> None:
        self.main_nets = networks.current()

    def batch_ended(self) -> None:
        """The main model's layers hold the main prompt's networks again."""
        if self.main_flipped:
            try:
                networks.restore(shared.sd_model, self.main_nets)
            finally:
                self.main_flipped = False

    def network_names(self, unit: Unit) -> list[str]:
        return [n.name for n in (unit_nets(unit) or [])]

    def same_networks_as_main(self, unit: Unit) -> bool:
        if unit.nets is None:
            return True
        return unit.nets.key == networks.NetworkSet(list(self.main_nets or [])).key


def unit_nets(unit: Unit) -> list | None:
    """The unit's Network objects, or None for "the main prompt's"."""
    return None if unit.nets is None else unit.nets.nets
