"""Naming an expert: only the WebUI's installed checkpoints, matched as the WebUI matches names
(the same `modules.sd_models` API on A1111 and Forge)."""

from __future__ import annotations

import re

from modules import sd_models

from ..params import MagicFusionError


def checkpoint_titles() -> list[str]:
    """The installed checkpoints' titles, as the expert pickers and the XYZ axes list them."""
    return sorted(sd_models.checkpoints_list, key=str.casefold)


def resolve(name: str, field_name: str = "expert_checkpoint"):
    """The CheckpointInfo of an installed checkpoint."""
    if not isinstance(name, str) or not name.strip():
        raise MagicFusionError("is required when MagicFusion is enabled", field_name)
    name = name.strip()
    if looks_like_path(name):
        raise MagicFusionError(f"must name an installed checkpoint (title, name or hash), not a path or URL: {name!r}", field_name)
    info = sd_models.checkpoint_aliases.get(name) or sd_models.get_closet_checkpoint_match(name)
    if info is None:
        raise MagicFusionError(f"no installed checkpoint matches {name!r}", field_name)
    return info


def looks_like_path(name: str) -> bool:
    """Absolute paths, drive letters, '..' segments, home dirs and URLs: never a checkpoint title."""
    return ("://" in name or name.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:", name) is not None
            or ".." in re.split(r"[\\/]", name))
