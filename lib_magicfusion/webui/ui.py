"""The MagicFusion accordion, built from the params model's specs.

Layout: the method, then one tab per expert unit (its switch, checkpoint, prompts, k and CFG
scale), then the window, blur, baseline and the rest. Elements are named
`magicfusion_<tab>_<flat name>`, so unit 1's controls keep the first release's names.

`build` must stay cheap and free of side effects: the API builds it twice per tab at start-up
to read the defaults.
"""

from __future__ import annotations

import gradio as gr
from modules import sd_models, shared
from modules.ui_common import create_refresh_button
from modules.ui_components import FormRow, InputAccordion, ToolButton

from ..params import MEMORY_METHODS, UNLOAD_SYMBOL, FusionParams, MagicFusionError, Spec, is_fused_infotext, specs, unit_flat_name
from .checkpoints import checkpoint_titles

SLIDERS = {  # the UI's ranges by spec attribute; the API accepts the params model's wider ones
    "k_general": (0.0, 10.0, 0.05),
    "k": (0.0, 10.0, 0.05),
    "cfg_scale": (0.0, 30.0, 0.5),
    "fusion_start": (0.0, 1.0, 0.01),
    "fusion_end": (0.0, 1.0, 0.01),
    "blur": (0, 16, 1),
    "mask_memory": (0.0, 0.99, 0.01),
}
ROWS = (  # the global controls below the unit tabs, row by row
    ("k_general", "fusion_start", "fusion_end"),
    ("outside_window", "blur"),
    ("saliency_baseline", "expert_text_encoder"),
    ("apply_in_hires", "show_mask"),
)


def unit_count() -> int:
    return max(1, min(4, int(shared.opts.data.get("magicfusion_units", 2) or 2)))


def build(tab: str):
    """Returns (components in positional order, infotext_fields, paste_field_names)."""
    layout = specs(unit_count())
    by_name = {s.name: s for s in layout}
    comps = {}

    def eid(name):
        return f"magicfusion_{tab}_{name}"

    def control(s: Spec, visible: bool = True):
        common = {"value": s.default, "label": s.label, "elem_id": eid(s.name), "visible": visible}
        if s.kind == "bool":
            return gr.Checkbox(**common)
        if s.kind == "choice":
            return gr.Radio(choices=list(s.choices), **common)
        if s.attr in SLIDERS:
            lo, hi, step = SLIDERS[s.attr]
            return gr.Slider(minimum=lo, maximum=hi, step=step, **common)
        return gr.Textbox(lines=2, placeholder="Empty: the main one", **common)

    with InputAccordion(False, label="MagicFusion", elem_id=eid("enabled")) as enabled:
        comps["enabled"] = enabled
        with FormRow():
            comps["method"] = control(by_name["method"])
            # Shown only for a method that uses it; hidden, it still holds (and pastes) its value.
            comps["mask_memory"] = control(by_name["mask_memory"], visible=by_name["method"].default in MEMORY_METHODS)
            comps["method"].change(fn=_memory_control, inputs=[comps["method"]], outputs=[comps["mask_memory"]],
                                   show_progress="hidden")
            unload = ToolButton(value=UNLOAD_SYMBOL, elem_id=eid("unload_expert"))
            unload.click(fn=_unload_experts, inputs=[], outputs=[])
        with gr.Tabs(elem_id=eid("units")):
            for unit in range(unit_count()):
                with gr.Tab(f"Expert {unit + 1}", elem_id=eid(f"unit{unit + 1}")):
                    name = unit_flat_name
                    with FormRow():
                        comps[name(unit, "enabled")] = control(by_name[name(unit, "enabled")])
                    with FormRow():
                        picker = gr.Dropdown(choices=checkpoint_titles(), value="", label=by_name[name(unit, "checkpoint")].label,
                                             elem_id=eid(name(unit, "checkpoint")), allow_custom_value=True)
                        comps[name(unit, "checkpoint")] = picker
                        create_refresh_button(picker, sd_models.list_models, lambda: {"choices": checkpoint_titles()},
                                              eid(name(unit, "checkpoint") + "_refresh"))
                    for attr in ("prompt", "negative_prompt"):
                        comps[name(unit, attr)] = control(by_name[name(unit, attr)])
                    with FormRow():
                        for attr in ("k", "cfg_scale"):
                            comps[name(unit, attr)] = control(by_name[name(unit, attr)])
        for row in ROWS:
            with FormRow():
                for key in row:
                    comps[key] = control(by_name[key])

    missing = set(by_name) - set(comps)
    assert not missing, f"MagicFusion UI lacks controls for {missing}"
    components = [comps[s.name] for s in layout]

    # One set of paste functions shared by both tabs: the WebUI matches the controls that
    # "Send to img2img" copies by these functions, so they must be the same objects.
    fields = [(enabled, _is_fused)] + [(comps[s.name], PASTERS[s.name]) for s in layout if s.name in PASTERS]
    return components, fields, [_is_fused, *(PASTERS[s.name] for s in layout if s.name in PASTERS)]


def _memory_control(method: str):
    return gr.update(visible=method in MEMORY_METHODS)


def _unload_experts() -> None:
    from .extension import unload
    unload()  # under the WebUI's queue lock: waits for a generation in progress


def _is_fused(d) -> bool:
    return is_fused_infotext(d)


def _parsed(d):
    """The params an infotext describes (one rule with the API's {"infotext": …}), cached per paste."""
    key = id(d)
    if _parsed.cache[0] != key or _parsed.cache[1] is not d:
        try:
            params = FusionParams.from_infotext(d)
        except MagicFusionError:
            params = None
        _parsed.cache = (key, d, params.to_flat(4) if params is not None else None)
    return _parsed.cache[2]


_parsed.cache = (None, None, None)


def _paster(s: Spec):
    """Restore one control from a pasted infotext (an image made without MagicFusion leaves it alone)."""
    def paste(d):
        flat = _parsed(d) if is_fused_infotext(d) else None
        if flat is None:
            return gr.update()
        value = flat[s.name]
        if s.attr == "checkpoint" and value:
            info = sd_models.get_closet_checkpoint_match(value)
            return info.title if info is not None else value
        return value
    return paste


PASTERS = {s.name: _paster(s) for s in specs(4) if s.name != "enabled" and (s.infotext or s.attr == "enabled")}
