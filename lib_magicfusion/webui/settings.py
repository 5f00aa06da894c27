"""The MagicFusion section of the WebUI's settings."""

from __future__ import annotations

import gradio as gr
from modules import shared

from ..params import MAX_UNITS

SECTION = ("magicfusion", "MagicFusion")


def register() -> None:
    shared.opts.add_option("magicfusion_units", shared.OptionInfo(
        2, f"Expert unit tabs in the accordion (1-{MAX_UNITS}; the API always takes up to {MAX_UNITS})", gr.Slider,
        {"minimum": 1, "maximum": MAX_UNITS, "step": 1}, section=SECTION).needs_reload_ui())
    shared.opts.add_option("magicfusion_keep_expert_loaded", shared.OptionInfo(
        True, "Keep expert checkpoints loaded between generations", section=SECTION))
    shared.opts.add_option("magicfusion_max_resident_experts", shared.OptionInfo(
        2, "At most this many expert checkpoints stay loaded between generations (each costs its UNet's and text "
        "encoder's weights; a generation loads all it needs)", gr.Slider, {"minimum": 1, "maximum": MAX_UNITS, "step": 1},
        section=SECTION))
    shared.opts.add_option("magicfusion_unload_after_minutes", shared.OptionInfo(
        0.0, "Unload the experts after this many minutes without fusion (0 = never)", gr.Number, section=SECTION))
    shared.opts.add_option("magicfusion_save_masks", shared.OptionInfo(
        False, "Save the fusion mask pictures with the images", section=SECTION))
