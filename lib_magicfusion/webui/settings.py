"""The MagicFusion section of the WebUI's settings."""

from __future__ import annotations

import gradio as gr

from modules import shared

SECTION = ("magicfusion", "MagicFusion")


def register() -> None:
    shared.opts.add_option("magicfusion_keep_expert_loaded", shared.OptionInfo(
        True, "Keep the expert checkpoint loaded between generations", section=SECTION))
    shared.opts.add_option("magicfusion_unload_after_minutes", shared.OptionInfo(
        0.0, "Unload the expert after this many minutes without fusion (0 = never)", gr.Number, section=SECTION))
    shared.opts.add_option("magicfusion_save_masks", shared.OptionInfo(
        False, "Save the fusion mask pictures with the images", section=SECTION))
