"""The one parameter model behind the UI, the API, the infotext and the XYZ axes.

Pure Python: no torch, no WebUI import. `FusionParams` is a frozen dataclass whose fields
carry their own spec (label, infotext key, range, choices, hint); every front end reads the
same spec, so a new field is added in one place.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

__all__ = ["MagicFusionError", "FusionParams", "FIELDS", "FIELD_NAMES"]

# Controls that are not fields, by the text they show, with their hover hints.
UNLOAD_SYMBOL = "\u23cf\ufe0f"  # the eject symbol
BUTTON_HINTS = {UNLOAD_SYMBOL: "MagicFusion: unload the expert checkpoint now (it is loaded again when needed)"}
MAX_TEXT = 20_000


class MagicFusionError(ValueError):
    """Invalid MagicFusion input or a fusion that cannot run; names the offending field."""

    def __init__(self, message: str, field: str | None = None, status_code: int = 422):
        self.field = field
        self.status_code = status_code  # read by the WebUI's API error handler
        where = f" {field}" if field else ""
        super().__init__(f"MagicFusion{where}: {message}")


def _spec(default, *, label, kind, hint, infotext=None, lo=None, hi=None, choices=None, xyz=False):
    return field(default=default, metadata=dict(label=label, kind=kind, hint=hint, infotext=infotext,
                                                lo=lo, hi=hi, choices=choices, xyz=xyz))


@dataclass(frozen=True)
class FusionParams:
    enabled: bool = _spec(False, label="Enable MagicFusion", kind="bool",
                          hint="Fuse the main checkpoint (general model) with an expert checkpoint at every sampling step.")
    expert_checkpoint: str = _spec("", label="Expert checkpoint", kind="str", infotext="MagicFusion expert", xyz=True,
                                   hint="An installed checkpoint (title, name or hash). The same as the main checkpoint fuses one model with two prompts.")
    expert_prompt: str = _spec("", label="Expert prompt", kind="str", infotext="MagicFusion expert prompt", xyz=True,
                               hint="Prompt for the expert model; empty uses the main prompt.")
    expert_negative_prompt: str = _spec("", label="Expert negative prompt", kind="str", infotext="MagicFusion expert negative prompt",
                                        hint="Negative prompt for the expert model; empty uses the main negative prompt.")
    k_general: float = _spec(1.0, label="k general", kind="float", lo=0.0, hi=100.0, infotext="MagicFusion k general", xyz=True,
                             hint="Focus of the general model's claim: higher concentrates it on its most salient pixels, so it usually wins fewer of them.")
    k_expert: float = _spec(1.0, label="k expert", kind="float", lo=0.0, hi=100.0, infotext="MagicFusion k expert", xyz=True,
                            hint="Focus of the expert model's claim: higher concentrates it on its most salient pixels, so it usually wins fewer of them.")
    expert_cfg_scale: float = _spec(0.0, label="Expert CFG scale", kind="float", lo=0.0, hi=100.0, infotext="MagicFusion expert CFG", xyz=True,
                                    hint="Guidance scale of the expert model; 0 uses the main CFG scale.")
    fusion_start: float = _spec(0.0, label="Fusion start", kind="float", lo=0.0, hi=1.0, infotext="MagicFusion start", xyz=True,
                                hint="Fraction of the sampling steps at which fusion begins.")
    fusion_end: float = _spec(1.0, label="Fusion end", kind="float", lo=0.0, hi=1.0, infotext="MagicFusion end", xyz=True,
                              hint="Fraction of the sampling steps at which fusion ends.")
    outside_window: str = _spec("general", label="Outside the window", kind="choice", choices=("general", "expert"),
                                infotext="MagicFusion outside",
                                hint="Which model runs alone before and after the fusion window; the other one is not evaluated there.")
    blur: int = _spec(4, label="Blur size", kind="int", lo=0, hi=64, infotext="MagicFusion blur",
                      hint="Box blur of the saliency maps, in latent pixels (4 as in the paper; 0 or 1 = none).")
    saliency_baseline: str = _spec("general", label="Saliency baseline", kind="choice", choices=("general", "own"),
                                   infotext="MagicFusion baseline",
                                   hint="general: the expert's guidance is measured against the general model's uncond (official code); own: against its own (paper).")
    expert_text_encoder: str = _spec("expert", label="Expert text encoder", kind="choice", choices=("expert", "general"),
                                     infotext="MagicFusion expert text encoder",
                                     hint="Which text encoder encodes the expert prompts: the expert's own, or the main model's (official code).")
    apply_in_hires: bool = _spec(True, label="Apply in hires fix pass", kind="bool", infotext="MagicFusion hires",
                                 hint="Also fuse during the hires fix second pass.")
    show_mask: bool = _spec(False, label="Show fusion mask", kind="bool",
                            hint="Add the final fusion mask and a strip of masks over the steps to the gallery (white = expert).")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f, getattr(self, f.name)))
        if self.enabled and not self.expert_checkpoint.strip():
            raise MagicFusionError("is required when MagicFusion is enabled", "expert_checkpoint")
        if self.fusion_start > self.fusion_end:
            raise MagicFusionError(f"must not be after fusion_end ({self.fusion_start} > {self.fusion_end})", "fusion_start")

    # ---- constructors -----------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FusionParams":
        if not isinstance(data, Mapping):
            raise MagicFusionError(f"expected an object of named fields, got {type(data).__name__}", "args")
        unknown = [key for key in data if key not in FIELD_NAMES]
        if unknown:
            raise MagicFusionError(f"unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(FIELD_NAMES)}", str(unknown[0]))
        return cls(**data)

    @classmethod
    def from_args(cls, args: Sequence[Any]) -> "FusionParams":
        """From a script's argument tuple: the UI's positional values, or one dict of named fields."""
        if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
            raise MagicFusionError(f"args must be a list, got {type(args).__name__}", "args")
        if len(args) >= 1 and isinstance(args[0], Mapping):
            # The named form: the WebUI fills the remaining slots with the UI's defaults.
            return cls.from_dict(args[0])
        if len(args) != len(FIELD_NAMES):
            raise MagicFusionError(f"expected {len(FIELD_NAMES)} positional values ({', '.join(FIELD_NAMES)}) "
                                   f"or one object of named fields, got {len(args)}", "args")
        return cls(**dict(zip(FIELD_NAMES, args)))

    @classmethod
    def from_infotext(cls, params: Mapping[str, str]) -> "FusionParams | None":
        """From a parsed infotext dict; None when the image was not made with MagicFusion."""
        if INFOTEXT_KEYS["expert_checkpoint"] not in params:
            return None
        values: dict[str, Any] = {"enabled": True}
        for f in dataclasses.fields(cls):
            key = f.metadata["infotext"]
            if key and key in params:
                values[f.name] = parse_infotext_value(f, params[key])
        return cls(**values)

    # ---- views ------------------------------------------------------------------------

    def to_args(self) -> list:
        return [getattr(self, name) for name in FIELD_NAMES]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "FusionParams":
        return dataclasses.replace(self, **changes)

    def infotext(self) -> dict[str, Any]:
        """Infotext entries for an enabled fusion; defaults are left out, the expert always written."""
        if not self.enabled:
            return {}
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            key = f.metadata["infotext"]
            value = getattr(self, f.name)
            if key and (f.name == "expert_checkpoint" or value != f.default):
                out[key] = value
        return out

    @classmethod
    def json_schema(cls) -> dict:
        props = {}
        for f in dataclasses.fields(cls):
            m = f.metadata
            prop: dict[str, Any] = {"title": m["label"], "description": m["hint"], "default": f.default}
            prop["type"] = {"bool": "boolean", "str": "string", "float": "number", "int": "integer", "choice": "string"}[m["kind"]]
            if m["choices"]:
                prop["enum"] = list(m["choices"])
            if m["lo"] is not None:
                prop["minimum"], prop["maximum"] = m["lo"], m["hi"]
            if m["kind"] == "str":
                prop["maxLength"] = MAX_TEXT
            props[f.name] = prop
        return {"title": "MagicFusion", "type": "object", "properties": props, "additionalProperties": False}


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    m, name = f.metadata, f.name
    kind = m["kind"]
    if kind == "bool":
        if not isinstance(value, bool):
            raise MagicFusionError(f"must be true or false, got {value!r}", name)
        return value
    if kind in ("str", "choice"):
        if not isinstance(value, str):
            raise MagicFusionError(f"must be a string, got {type(value).__name__}", name)
        if len(value) > MAX_TEXT:
            raise MagicFusionError(f"is longer than {MAX_TEXT} characters", name)
        if "\x00" in value:
            raise MagicFusionError("must not contain NUL characters", name)
        if kind == "choice" and value not in m["choices"]:
            raise MagicFusionError(f"must be one of {', '.join(m['choices'])}, got {value!r}", name)
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MagicFusionError(f"must be a number, got {type(value).__name__} {value!r}", name)
    if not math.isfinite(value):
        raise MagicFusionError(f"must be finite, got {value!r}", name)
    if kind == "int":
        if value != int(value):
            raise MagicFusionError(f"must be a whole number, got {value!r}", name)
        value = int(value)
    else:
        value = float(value)
    if not m["lo"] <= value <= m["hi"]:
        raise MagicFusionError(f"must be between {m['lo']} and {m['hi']}, got {value!r}", name)
    return value


def parse_infotext_value(f: dataclasses.Field, text: Any) -> Any:
    """Parse one infotext value (a string) into the field's type."""
    kind = f.metadata["kind"]
    if not isinstance(text, str):
        return text
    try:
        if kind == "bool":
            if text.strip() not in ("True", "False"):
                raise ValueError(text)
            return text.strip() == "True"
        if kind == "float":
            return float(text)
        if kind == "int":
            return int(float(text))
    except ValueError:
        raise MagicFusionError(f"cannot read {text!r} from the infotext", f.name) from None
    return text


FIELDS = dataclasses.fields(FusionParams)
FIELD_NAMES = tuple(f.name for f in FIELDS)
INFOTEXT_KEYS = {f.name: f.metadata["infotext"] for f in FIELDS if f.metadata["infotext"]}
