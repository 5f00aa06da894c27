"""Reading the network tags of an expert prompt, the same on both hosts: `<lora:name:te:unet:dyn>`
(and `<lyco:…>`) as the WebUI's own Lora extension reads them, each name found among the
installed networks. The hosts apply them differently (a1111/networks.py, forge/networks.py)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from ..params import MagicFusionError

NETWORK_TYPES = ("lora", "lyco")  # the extra-network tags the built-in networks extension handles


@dataclass(frozen=True)
class Tag:
    name: str
    te: float
    unet: float
    dyn: int | None
    on_disk: Any  # the extension's NetworkOnDisk


def networks_module():
    """The built-in Lora extension's `networks` module (A1111's or Forge's), or None."""
    return sys.modules.get("networks")


def _multipliers(params) -> tuple[str, float, float, int | None]:
    # The extension's own reading (extra_networks_lora.ExtraNetworkLora.activate).
    name = params.positional[0]
    te = float(params.positional[1]) if len(params.positional) > 1 else 1.0
    te = float(params.named.get("te", te))
    unet = float(params.positional[2]) if len(params.positional) > 2 else te
    unet = float(params.named.get("unet", unet))
    dyn = int(params.positional[3]) if len(params.positional) > 3 else None
    dyn = int(params.named["dyn"]) if "dyn" in params.named else dyn
    return name, te, unet, dyn


def _on_disk(nw, name: str):
    def look():
        if name.lower() in nw.forbidden_network_aliases:
            return nw.available_networks.get(name)
        return nw.available_network_aliases.get(name)

    found = look()
    if found is None:
        nw.update_available_networks_by_names([name])
        found = look()
    if found is None:
        nw.list_available_networks()
        found = look()
    return found


def read(tags: dict, field_name: str) -> list[Tag]:
    """The prompt's network tags, each found on disk; an unknown name, a tag type an expert cannot
    apply, or no Lora extension: an error naming the field (a missing expert network would give
    an unfused-looking result, so it is never just a warning)."""
    other = sorted(t for t in tags if t not in NETWORK_TYPES)
    if other:
        raise MagicFusionError(f"<{other[0]}:…> networks cannot be applied to an expert (only {', '.join(NETWORK_TYPES)})", field_name)
    params_list = [p for t in NETWORK_TYPES for p in tags.get(t, [])]
    if not params_list:
        return []
    nw = networks_module()
    if nw is None:
        raise MagicFusionError("has networks, but the WebUI's built-in Lora extension is not enabled", field_name)
    out = []
    for params in params_list:
        try:
            name, te, unet, dyn = _multipliers(params)
        except (ValueError, IndexError) as e:
            raise MagicFusionError(f"cannot read the network tag {params.items!r}: {e}", field_name) from None
        on_disk = _on_disk(nw, name)
        if on_disk is None:
            raise MagicFusionError(f"no network named {name!r} is installed (see the Lora tab)", field_name)
        out.append(Tag(name, te, unet, dyn, on_disk))
    return out
