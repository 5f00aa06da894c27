"""X/Y/Z plot axes. Overrides travel on p as p.magicfusion_<flat name>, since the grid shares
script args across its cells; `extension.parse` reads them back (an axis over a unit's field
turns that unit on)."""

from __future__ import annotations

from modules import scripts

from ..params import MAX_UNITS, Spec, specs
from .checkpoints import checkpoint_titles
from .extension import XYZ_PREFIX

LABEL = "[MagicFusion] "


def axis_label(s: Spec) -> str:
    """The spec's own label: unit 1 keeps the first release's ("Expert checkpoint"), unit n says "Expert n …"."""
    return LABEL + s.label


def _xyz_module():
    for data in scripts.scripts_data:
        if data.script_class.__module__ in ("xyz_grid.py", "scripts.xyz_grid"):
            return data.module
    return None


def register() -> None:
    """Append the axes once; the UI can be reloaded, and axis types are referenced by index."""
    xyz = _xyz_module()
    if xyz is None:
        return
    existing = {getattr(axis, "label", "") for axis in xyz.axis_options}
    for s in specs(MAX_UNITS):
        label = axis_label(s)
        if not s.xyz or label in existing:
            continue
        if s.attr == "checkpoint":
            axis = xyz.AxisOption(label, str, xyz.apply_field(XYZ_PREFIX + s.name), format_value=xyz.format_remove_path,
                                  confirm=xyz.confirm_checkpoints, cost=1.0, choices=checkpoint_titles)
        elif s.kind == "choice":
            axis = xyz.AxisOption(label, str, xyz.apply_field(XYZ_PREFIX + s.name), choices=lambda s=s: list(s.choices))
        else:
            kind = {"float": float, "int": int, "str": str}[s.kind]
            axis = xyz.AxisOption(label, kind, xyz.apply_field(XYZ_PREFIX + s.name))
        xyz.axis_options.append(axis)
