"""X/Y/Z plot axes. Overrides travel on p as p.magicfusion_<field>, since the grid shares
script args across its cells; `extension.parse` reads them back."""

from __future__ import annotations

from modules import scripts

from ..params import FIELDS
from .expert import checkpoint_titles
from .extension import XYZ_PREFIX

LABEL = "[MagicFusion] "


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
    for f in FIELDS:
        if not f.metadata["xyz"]:
            continue
        label = LABEL + f.metadata["label"]
        if label in existing:
            continue
        if f.name == "expert_checkpoint":
            axis = xyz.AxisOption(label, str, xyz.apply_field(XYZ_PREFIX + f.name), format_value=xyz.format_remove_path,
                                  confirm=xyz.confirm_checkpoints, cost=1.0,
                                  choices=checkpoint_titles)
        else:
            kind = {"float": float, "int": int, "str": str}[f.metadata["kind"]]
            axis = xyz.AxisOption(label, kind, xyz.apply_field(XYZ_PREFIX + f.name))
        xyz.axis_options.append(axis)
