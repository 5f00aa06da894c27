"""The one parameter model behind the UI, the API, the infotext and the XYZ axes.

Pure Python: no torch, no WebUI import.

`FusionParams` holds the global settings and a tuple of expert units (`UnitParams`). Every
value also has a **flat name** — the namespace that the UI's positional arguments, the API's
named fields, the XYZ overrides and the error messages share:

* global fields by their own names (``k_general``, ``fusion_end``, ``method`` …);
* unit 1 by the one-expert names of the first release (``expert_checkpoint``,
  ``expert_prompt``, ``expert_negative_prompt``, ``k_expert``, ``expert_cfg_scale``) plus
  ``expert_enabled``, so requests, infotext and XYZ axes written for one expert keep working;
* unit n >= 2 by the same names with n inserted (``expert2_checkpoint``, ``k_expert2`` …).

Each flat name has one `Spec` (label, kind, range, choices, hint, infotext key, XYZ flag);
every front end reads the same specs, so a new field is added in one place.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MagicFusionError", "FusionParams", "UnitParams", "Spec", "specs", "spec", "MAX_UNITS", "METHODS", "MEMORY_METHODS",
           "GLOBAL_SPECS", "UNIT_FIELDS", "LEGACY_NAMES", "flat_names", "unit_flat_name"]

# Controls that are not fields, by the text they show, with their hover hints.
UNLOAD_SYMBOL = "\u23cf\ufe0f"  # the eject symbol
BUTTON_HINTS = {UNLOAD_SYMBOL: "MagicFusion: unload the expert checkpoints now (they are loaded again when needed)"}
MAX_TEXT = 20_000
MAX_UNITS = 4
METHODS = ("official", "average", "stable")
MEMORY_METHODS = ("stable",)  # the methods that use mask_memory


class MagicFusionError(ValueError):
    """Invalid MagicFusion input or a fusion that cannot run; names the offending field."""

    def __init__(self, message: str, field: str | None = None, status_code: int = 422):
        self.field = field
        self.status_code = status_code  # read by the WebUI's API error handler
        where = f" {field}" if field else ""
        super().__init__(f"MagicFusion{where}: {message}")


@dataclass(frozen=True)
class Spec:
    """One flat value: how it is shown, checked, written and read."""

    name: str                     # the flat name
    attr: str                     # the attribute in FusionParams, or in UnitParams for a unit field
    unit: int | None           # the unit's index (0 = unit 1) for a unit field, None for a global one
    default: Any
    label: str
    kind: str                     # bool | str | float | int | choice
    hint: str
    infotext: str | None = None
    lo: float | None = None
    hi: float | None = None
    choices: tuple | None = None
    xyz: bool = False


def _outside_choices() -> tuple:
    return ("general", "expert") + tuple(f"expert {n}" for n in range(2, MAX_UNITS + 1))


def _g(name, default, label, kind, hint, **kw) -> Spec:
    return Spec(name=name, attr=name, unit=None, default=default, label=label, kind=kind, hint=hint, **kw)


# The global fields, in the order of the UI's positional arguments. The first release's
# positional layout was: enabled, the five unit-1 fields (interleaved as below), then the rest;
# `_LEGACY_ORDER` keeps that order at the front of every layout.
GLOBAL_SPECS = (
    _g("enabled", False, "Enable MagicFusion", "bool",
       "Fuse the main checkpoint (general model) with expert checkpoints at every sampling step."),
    _g("k_general", 1.0, "k general", "float",
       "Focus of the general model's claim: higher concentrates it on its most salient pixels, so it usually wins fewer of them.",
       infotext="MagicFusion k general", lo=0.0, hi=100.0, xyz=True),
    _g("fusion_start", 0.0, "Fusion start", "float", "Fraction of the sampling steps at which fusion begins.",
       infotext="MagicFusion start", lo=0.0, hi=1.0, xyz=True),
    _g("fusion_end", 1.0, "Fusion end", "float", "Fraction of the sampling steps at which fusion ends.",
       infotext="MagicFusion end", lo=0.0, hi=1.0, xyz=True),
    _g("outside_window", "general", "Outside the window", "choice",
       "Which model runs alone before and after the fusion window; the others are not evaluated there.",
       infotext="MagicFusion outside", choices=_outside_choices()),
    _g("blur", 4, "Blur size", "int", "Box blur of the saliency maps, in latent pixels (4 as in the paper; 0 or 1 = none).",
       infotext="MagicFusion blur", lo=0, hi=64),
    _g("saliency_baseline", "general", "Saliency baseline", "choice",
       "general: each expert's guidance is measured against the general model's uncond (official code); own: against its own (paper).",
       infotext="MagicFusion baseline", choices=("general", "own")),
    _g("expert_text_encoder", "expert", "Expert text encoder", "choice",
       "Which text encoder encodes the expert prompts: each expert's own, or the main model's (official code).",
       infotext="MagicFusion expert text encoder", choices=("expert", "general")),
    _g("apply_in_hires", True, "Apply in hires fix pass", "bool", "Also fuse during the hires fix second pass.",
       infotext="MagicFusion hires"),
    _g("show_mask", False, "Show fusion mask", "bool",
       "Add the final fusion mask and a strip of masks over the steps to the gallery (one colour per model)."),
    _g("method", "official", "Fusion method", "choice",
       "official: the paper's code, a hard per-pixel switch of whole guided predictions. stable: each model's guidance "
       "against its own uncond, and masks that keep their choice over the steps (see Mask memory). average: the mean "
       "of the guided predictions, a baseline.",
       infotext="MagicFusion method", choices=METHODS, xyz=True),
    _g("mask_memory", 0.9, "Mask memory", "float",
       "stable method: how much of the earlier steps' saliency each step's mask keeps (a moving average over the steps; "
       "0 = each step decides afresh, as the official code does).",
       infotext="MagicFusion mask memory", lo=0.0, hi=0.99, xyz=True),
)

# The unit fields: attribute, unit-1 flat name, label, kind, default for unit 1, hint, unit-1 infotext key, range, xyz.
UNIT_FIELDS = (
    ("enabled", "expert_enabled", "Enable expert 1", "bool", True,
     "Use this expert unit. Unit 1 is on by default, the others off.", None, None, False),
    ("checkpoint", "expert_checkpoint", "Expert checkpoint", "str", "",
     "An installed checkpoint (title, name or hash). The same as the main checkpoint fuses one model with two prompts.",
     "MagicFusion expert", None, True),
    ("prompt", "expert_prompt", "Expert prompt", "str", "",
     "Prompt for this expert; empty uses the main prompt.", "MagicFusion expert prompt", None, True),
    ("negative_prompt", "expert_negative_prompt", "Expert negative prompt", "str", "",
     "Negative prompt for this expert; empty uses the main negative prompt.", "MagicFusion expert negative prompt", None, False),
    ("k", "k_expert", "k expert", "float", 1.0,
     "Focus of this expert's claim: higher concentrates it on its most salient pixels, so it usually wins fewer of them.",
     "MagicFusion k expert", (0.0, 100.0), True),
    ("cfg_scale", "expert_cfg_scale", "Expert CFG scale", "float", 0.0,
     "Guidance scale of this expert; 0 uses the main CFG scale.", "MagicFusion expert CFG", (0.0, 100.0), True),
)
LEGACY_NAMES = {legacy: attr for attr, legacy, *_ in UNIT_FIELDS}  # unit 1's flat name -> UnitParams attribute
UNIT_ATTRS = tuple(attr for attr, *_ in UNIT_FIELDS)


def unit_flat_name(unit: int, attr: str) -> str:
    """The flat name of `attr` of unit `unit` (0-based): expert_checkpoint, expert2_checkpoint, k_expert3 …"""
    legacy = next(name for a, name, *_ in UNIT_FIELDS if a == attr)
    if unit == 0:
        return legacy
    n = unit + 1
    return f"k_expert{n}" if legacy == "k_expert" else legacy.replace("expert", f"expert{n}", 1)


def _unit_infotext(unit: int, key: str | None) -> str | None:
    if key is None or unit == 0:
        return key
    n = unit + 1
    return f"MagicFusion k expert {n}" if key == "MagicFusion k expert" else key.replace("MagicFusion expert", f"MagicFusion expert {n}", 1)


def _unit_label(unit: int, attr: str, label: str) -> str:
    """Unit 1 keeps the first release's labels; unit n says so ("Expert 2 checkpoint", "k expert 2").
    Labels are unique: the WebUI keys saved UI defaults, and hints, by a control's label."""
    if attr == "enabled":
        return f"Enable expert {unit + 1}"
    if unit == 0:
        return label
    n = unit + 1
    return f"k expert {n}" if attr == "k" else label.replace("Expert", f"Expert {n}", 1)


def unit_specs(unit: int) -> tuple[Spec, ...]:
    out = []
    for attr, _legacy, label, kind, default, hint, infotext, bounds, xyz in UNIT_FIELDS:
        if attr == "enabled" and unit > 0:
            default = False
        lo, hi = bounds if bounds else (None, None)
        out.append(Spec(name=unit_flat_name(unit, attr), attr=attr, unit=unit, default=default, label=_unit_label(unit, attr, label),
                        kind=kind, hint=hint, infotext=_unit_infotext(unit, infotext), lo=lo, hi=hi, xyz=xyz))
    return tuple(out)


_UNIT_SPECS = tuple(unit_specs(i) for i in range(MAX_UNITS))
_ALL_SPECS = {s.name: s for s in GLOBAL_SPECS + tuple(s for group in _UNIT_SPECS for s in group)}
_LEGACY_ORDER = ("enabled", "expert_checkpoint", "expert_prompt", "expert_negative_prompt", "k_general", "k_expert",
                 "expert_cfg_scale", "fusion_start", "fusion_end", "outside_window", "blur", "saliency_baseline",
                 "expert_text_encoder", "apply_in_hires", "show_mask")


def spec(name: str) -> Spec:
    return _ALL_SPECS[name]


def specs(n_units: int) -> tuple[Spec, ...]:
    """Every flat value of a layout with `n_units` unit tabs, in positional-argument order:
    the first release's 15 values, the newer global fields, unit 1's enabled flag, then
    units 2..n (each: enabled, checkpoint, prompt, negative prompt, k, CFG scale)."""
    if not 1 <= n_units <= MAX_UNITS:
        raise ValueError(f"MagicFusion: between 1 and {MAX_UNITS} units, got {n_units}")
    front = [_ALL_SPECS[name] for name in _LEGACY_ORDER]
    rest = [s for s in GLOBAL_SPECS if s.name not in _LEGACY_ORDER] + [_ALL_SPECS["expert_enabled"]]
    for unit in range(1, n_units):
        rest.extend(_UNIT_SPECS[unit])
    return tuple(front + rest)


def flat_names(n_units: int = MAX_UNITS) -> tuple[str, ...]:
    return tuple(s.name for s in specs(n_units))


def _coerce(s: Spec, value: Any) -> Any:
    name, kind = s.name, s.kind
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
        if kind == "choice" and value not in s.choices:
            raise MagicFusionError(f"must be one of {', '.join(s.choices)}, got {value!r}", name)
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
    if not s.lo <= value <= s.hi:
        raise MagicFusionError(f"must be between {s.lo} and {s.hi}, got {value!r}", name)
    return value


@dataclass(frozen=True)
class UnitParams:
    """One expert: which checkpoint, with which prompts, how focused its claim is."""

    enabled: bool = False
    checkpoint: str = ""
    prompt: str = ""
    negative_prompt: str = ""
    k: float = 1.0
    cfg_scale: float = 0.0


def _default_units() -> tuple[UnitParams, ...]:
    return (UnitParams(enabled=True),)


@dataclass(frozen=True)
class FusionParams:
    enabled: bool = False
    k_general: float = 1.0
    fusion_start: float = 0.0
    fusion_end: float = 1.0
    outside_window: str = "general"
    blur: int = 4
    saliency_baseline: str = "general"
    expert_text_encoder: str = "expert"
    apply_in_hires: bool = True
    show_mask: bool = False
    method: str = "official"
    mask_memory: float = 0.9
    units: tuple = field(default_factory=_default_units)

    def __post_init__(self) -> None:
        for s in GLOBAL_SPECS:
            object.__setattr__(self, s.attr, _coerce(s, getattr(self, s.attr)))
        units = self.units
        if isinstance(units, (str, bytes)) or not isinstance(units, Sequence) or not all(isinstance(u, UnitParams) for u in units):
            raise MagicFusionError("must be a list of expert units", "units")
        if not 1 <= len(units) <= MAX_UNITS:
            raise MagicFusionError(f"must hold between 1 and {MAX_UNITS} expert units, got {len(units)}", "units")
        checked = []
        for i, unit in enumerate(units):
            values = {s.attr: _coerce(s, getattr(unit, s.attr)) for s in _UNIT_SPECS[i]}
            checked.append(UnitParams(**values))
        object.__setattr__(self, "units", tuple(checked))
        if self.enabled:
            active = [i for i, u in enumerate(self.units) if u.enabled]
            if not active:
                raise MagicFusionError("no expert unit is enabled", "expert_enabled")
            for i in active:
                if not self.units[i].checkpoint.strip():
                    raise MagicFusionError("is required when MagicFusion is enabled", unit_flat_name(i, "checkpoint"))
            outside = self.outside_unit
            if outside is not None and (outside >= len(self.units) or not self.units[outside].enabled):
                raise MagicFusionError(f"names {self.outside_window!r}, which is not an enabled expert unit", "outside_window")
        if self.fusion_start > self.fusion_end:
            raise MagicFusionError(f"must not be after fusion_end ({self.fusion_start} > {self.fusion_end})", "fusion_start")

    # ---- derived views ----------------------------------------------------------------

    @property
    def outside_unit(self) -> int | None:
        """The unit (0-based) that runs alone outside the window, or None for the general model."""
        if self.outside_window == "general":
            return None
        if self.outside_window == "expert":
            return 0
        return int(self.outside_window.split()[1]) - 1

    @property
    def active_units(self) -> tuple[int, ...]:
        """The enabled units' indices, in unit order: fusion model m >= 1 is unit active_units[m - 1]."""
        return tuple(i for i, u in enumerate(self.units) if u.enabled)

    def unit(self, index: int) -> UnitParams:
        return self.units[index]

    # The first release's one-expert names, read from unit 1.
    @property
    def expert_checkpoint(self) -> str:
        return self.units[0].checkpoint

    @property
    def k_expert(self) -> float:
        return self.units[0].k

    # ---- constructors -----------------------------------------------------------------

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> FusionParams:
        """From flat names (every one optional); unknown names are an error."""
        unknown = [key for key in values if key not in _ALL_SPECS]
        if unknown:
            raise MagicFusionError(f"unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(flat_names())} "
                                   "and units", str(unknown[0]))
        globals_ = {s.attr: values[s.name] for s in GLOBAL_SPECS if s.name in values}
        n = max([1] + [_ALL_SPECS[k].unit + 1 for k in values if _ALL_SPECS[k].unit is not None])
        units = []
        for i in range(n):
            units.append(UnitParams(**{s.attr: values.get(s.name, s.default) for s in _UNIT_SPECS[i]}))
        return cls(**globals_, units=tuple(units))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FusionParams:
        """The API's named form: flat names, and/or `units`, a list of objects with the unit fields
        (enabled, checkpoint, prompt, negative_prompt, k, cfg_scale) for units 1, 2, … (a listed unit is
        enabled unless it says otherwise). A unit may not be given both ways."""
        if not isinstance(data, Mapping):
            raise MagicFusionError(f"expected an object of named fields, got {type(data).__name__}", "args")
        flat = {k: v for k, v in data.items() if k != "units"}
        if "units" in data:
            units = data["units"]
            if isinstance(units, (str, bytes)) or not isinstance(units, Sequence):
                raise MagicFusionError(f"must be a list of objects, got {type(units).__name__}", "units")
            if len(units) > MAX_UNITS:
                raise MagicFusionError(f"must hold at most {MAX_UNITS} expert units, got {len(units)}", "units")
            for i, unit in enumerate(units):
                where = f"units[{i}]"
                if not isinstance(unit, Mapping):
                    raise MagicFusionError(f"must be an object of unit fields, got {type(unit).__name__}", where)
                unknown = [k for k in unit if k not in UNIT_ATTRS]
                if unknown:
                    raise MagicFusionError(f"unknown unit field(s) {', '.join(map(repr, unknown))}; known: {', '.join(UNIT_ATTRS)}",
                                           f"{where}.{unknown[0]}")
                for attr, value in {"enabled": True, **unit}.items():
                    name = unit_flat_name(i, attr)
                    if name in flat and attr in unit:
                        raise MagicFusionError(f"is given both as {name} and as {where}.{attr}", name)
                    flat.setdefault(name, value)
        return cls.from_flat(flat)

    @classmethod
    def from_args(cls, args: Sequence[Any]) -> FusionParams:
        """From a script's argument tuple: the UI's positional values (any unit count, or the first
        release's 15 values), or one dict of named fields."""
        if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
            raise MagicFusionError(f"args must be a list, got {type(args).__name__}", "args")
        if len(args) >= 1 and isinstance(args[0], Mapping):
            # The named form: the WebUI fills the remaining slots with the UI's defaults.
            return cls.from_dict(args[0])
        layouts = {len(_LEGACY_ORDER): _LEGACY_ORDER, **{len(specs(n)): flat_names(n) for n in range(1, MAX_UNITS + 1)}}
        if len(args) not in layouts:
            raise MagicFusionError(f"expected the positional values of GET /sdapi/v1/script-info ({', '.join(flat_names(1))}, "
                                   f"then 6 per extra unit: {sorted(layouts)} values) or one object of named fields, "
                                   f"got {len(args)}", "args")
        return cls.from_flat(dict(zip(layouts[len(args)], args)))

    @classmethod
    def from_infotext(cls, params: Mapping[str, str]) -> FusionParams | None:
        """From a parsed infotext dict; None when the image was not made with MagicFusion.

        A unit is on when its checkpoint key is there. An infotext without a method key was
        written before methods existed, by the official method."""
        values: dict[str, Any] = {}
        for i in range(MAX_UNITS):
            if _UNIT_SPECS[i][1].infotext in params:
                values[unit_flat_name(i, "enabled")] = True
            elif i == 0:
                values["expert_enabled"] = False
        if not any(values.get(unit_flat_name(i, "enabled")) for i in range(MAX_UNITS)):
            return None
        values["enabled"] = True
        values.setdefault("method", "official")
        for s in _ALL_SPECS.values():
            if s.infotext and s.infotext in params and (s.unit is None or values.get(unit_flat_name(s.unit, "enabled"))):
                values[s.name] = parse_infotext_value(s, params[s.infotext])
        return cls.from_flat(values)

    # ---- views ------------------------------------------------------------------------

    def to_flat(self, n_units: int | None = None) -> dict[str, Any]:
        n = len(self.units) if n_units is None else n_units
        out = {}
        for s in specs(max(1, n)):
            if s.unit is None:
                out[s.name] = getattr(self, s.attr)
            elif s.unit < len(self.units):
                out[s.name] = getattr(self.units[s.unit], s.attr)
            else:
                out[s.name] = s.default
        return out

    def to_args(self, n_units: int | None = None) -> list:
        return list(self.to_flat(n_units).values())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> FusionParams:
        return dataclasses.replace(self, **changes)

    def replace_unit(self, index: int, **changes) -> FusionParams:
        units = list(self.units)
        units[index] = dataclasses.replace(units[index], **changes)
        return self.replace(units=tuple(units))

    def infotext(self) -> dict[str, Any]:
        """Infotext entries for an enabled fusion. Defaults are left out, except each enabled unit's
        checkpoint (it marks the unit as on), the method and the stable method's mask memory (a
        later default must not change what an old infotext means)."""
        if not self.enabled:
            return {}
        out: dict[str, Any] = {}
        for s in GLOBAL_SPECS:
            value = getattr(self, s.attr)
            if s.infotext and (value != s.default or s.name == "method" or (s.name == "mask_memory" and self.method in MEMORY_METHODS)):
                out[s.infotext] = value
        for i in self.active_units:
            for s in _UNIT_SPECS[i]:
                value = getattr(self.units[i], s.attr)
                if s.infotext and (s.attr == "checkpoint" or value != s.default):
                    out[s.infotext] = value
        return out

    @classmethod
    def json_schema(cls) -> dict:
        def prop(s: Spec) -> dict:
            out: dict[str, Any] = {"title": s.label, "description": s.hint, "default": s.default}
            out["type"] = {"bool": "boolean", "str": "string", "float": "number", "int": "integer", "choice": "string"}[s.kind]
            if s.choices:
                out["enum"] = list(s.choices)
            if s.lo is not None:
                out["minimum"], out["maximum"] = s.lo, s.hi
            if s.kind == "str":
                out["maxLength"] = MAX_TEXT
            return out

        props = {name: prop(s) for name, s in _ALL_SPECS.items()}
        unit_props = {s.attr: prop(s) for s in _UNIT_SPECS[1]}
        unit_props["enabled"] = {**unit_props["enabled"], "default": True, "description": "Use this unit (default when listed)."}
        props["units"] = {"title": "Expert units", "type": "array", "maxItems": MAX_UNITS,
                          "description": "The expert units 1, 2, … as objects; another way to give the expert*_ fields.",
                          "items": {"type": "object", "properties": unit_props, "additionalProperties": False}}
        return {"title": "MagicFusion", "type": "object", "properties": props, "additionalProperties": False}


def parse_infotext_value(s: Spec, text: Any) -> Any:
    """Parse one infotext value (a string) into the field's type."""
    if not isinstance(text, str):
        return text
    try:
        if s.kind == "bool":
            if text.strip() not in ("True", "False"):
                raise ValueError(text)
            return text.strip() == "True"
        if s.kind == "float":
            return float(text)
        if s.kind == "int":
            return int(float(text))
    except ValueError:
        raise MagicFusionError(f"cannot read {text!r} from the infotext", s.name) from None
    return text


def infotext_keys() -> dict[str, str]:
    """Flat name -> infotext key, for every value that the infotext can carry."""
    return {name: s.infotext for name, s in _ALL_SPECS.items() if s.infotext}


def is_fused_infotext(params: Mapping[str, Any]) -> bool:
    return any(_UNIT_SPECS[i][1].infotext in params for i in range(MAX_UNITS))
