"""The MagicFusion accordion, built from the params model's field specs.

`build` must stay cheap and free of side effects: the API builds it twice per tab at start-up
to read the defaults.
"""

from __future__ import annotations

import gradio as gr

from modules import sd_models
from modules.ui_common import create_refresh_button
from modules.ui_components import FormRow, InputAccordion, ToolButton

from ..params import FIELD_NAMES, FIELDS, INFOTEXT_KEYS, UNLOAD_SYMBOL, MagicFusionError, parse_infotext_value
from .expert import checkpoint_titles

SLIDERS = {  # the UI's ranges; the API accepts the params model's wider ones
    "k_general": (0.0, 10.0, 0.05),
    "k_expert": (0.0, 10.0, 0.05),
    "expert_cfg_scale": (0.0, 30.0, 0.5),
    "fusion_start": (0.0, 1.0, 0.01),
    "fusion_end": (0.0, 1.0, 0.01),
    "blur": (0, 16, 1),
}
MARKER = INFOTEXT_KEYS["expert_checkpoint"]
ROWS = (  # the controls below the prompts, row by row
    ("k_general", "k_expert", "expert_cfg_scale"),
    ("fusion_start", "fusion_end", "outside_window"),
    ("blur", "saliency_baseline", "expert_text_encoder"),
    ("apply_in_hires", "show_mask"),
)


def build(tab: str):
    """Returns (components in FIELD_NAMES order, infotext_fields, paste_field_names)."""
    spec = {f.name: f for f in FIELDS}
    comps = {}

    def eid(name):
        return f"magicfusion_{tab}_{name}"

    def control(name):
        f, m = spec[name], spec[name].metadata
        if m["kind"] == "bool":
            return gr.Checkbox(value=f.default, label=m["label"], elem_id=eid(name))
        if m["kind"] == "choice":
            return gr.Radio(choices=list(m["choices"]), value=f.default, label=m["label"], elem_id=eid(name))
        if name in SLIDERS:
            lo, hi, step = SLIDERS[name]
            return gr.Slider(minimum=lo, maximum=hi, step=step, value=f.default, label=m["label"], elem_id=eid(name))
        return gr.Textbox(value=f.default, label=m["label"], lines=2, elem_id=eid(name),
                          placeholder="Empty: the main one")

    with InputAccordion(False, label="MagicFusion", elem_id=eid("enabled")) as enabled:
        comps["enabled"] = enabled
        with FormRow():
            comps["expert_checkpoint"] = gr.Dropdown(
                choices=checkpoint_titles(), value="", label=spec["expert_checkpoint"].metadata["label"],
                elem_id=eid("expert_checkpoint"), allow_custom_value=True)
            create_refresh_button(comps["expert_checkpoint"], sd_models.list_models,
                                  lambda: {"choices": checkpoint_titles()}, eid("expert_checkpoint_refresh"))
            unload = ToolButton(value=UNLOAD_SYMBOL, elem_id=eid("unload_expert"))
            unload.click(fn=_unload_expert, inputs=[], outputs=[])
        for name in ("expert_prompt", "expert_negative_prompt"):
            comps[name] = control(name)
        for row in ROWS:
            with FormRow():
                for name in row:
                    comps[name] = control(name)

    missing = set(FIELD_NAMES) - set(comps)
    assert not missing, f"MagicFusion UI lacks controls for {missing}"
    components = [comps[name] for name in FIELD_NAMES]

    # One set of paste functions shared by both tabs: the WebUI matches the controls that
    # "Send to img2img" copies by these functions, so they must be the same objects.
    infotext_fields = [(enabled, _is_fused)] + [(comps[name], paster) for name, paster in PASTERS.items()]
    return components, infotext_fields, [_is_fused, *PASTERS.values()]


def _unload_expert() -> None:
    from .extension import unload
    unload()


def _is_fused(d) -> bool:
    return MARKER in d


def _paster(f, key):
    """Restore one control from a pasted infotext; controls the infotext omits get their default."""
    def paste(d):
        if MARKER not in d:
            return gr.update()
        if key not in d:
            return f.default
        if f.name == "expert_checkpoint":
            info = sd_models.get_closet_checkpoint_match(d[key])
            return info.title if info is not None else d[key]
        try:
            return parse_infotext_value(f, d[key])
        except MagicFusionError:
            return gr.update()
    return paste


PASTERS = {f.name: _paster(f, INFOTEXT_KEYS[f.name]) for f in FIELDS if f.name in INFOTEXT_KEYS}
