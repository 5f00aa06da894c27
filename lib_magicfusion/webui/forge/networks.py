"""A unit's own networks on Forge (its built-in `sd_forge_lora`).

Forge applies a LoRA by patching clones of an engine's UnetPatcher and CLIP (patches that its
memory manager merges into the weights when the patcher is loaded). A unit's networks are
patched onto clones of its own engine's original objects; the main prompt's stay on the main
model's. Since the merge lands in the one set of weights an engine has, two network sets on one
engine cannot run in one step: a unit whose checkpoint is already used with other networks gets
an engine of its own (expert.py, slots).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from ...params import MagicFusionError

NETWORK_TYPES = ("lora", "lyco")


@dataclass(frozen=True)
class NetworkSet:
    items: tuple = field(default=())   # (name, filename, unet multiplier, text-encoder multiplier)

    @property
    def key(self) -> tuple:
        return tuple((filename, unet, te) for _, filename, unet, te in self.items)


def module():
    return sys.modules.get("networks") if "network" in sys.modules else None


def _multipliers(params) -> tuple[str, float, float]:
    # Forge reads <lora:name:te:unet> as A1111 does (extra_networks_lora.py).
    name = params.positional[0]
    te = float(params.positional[1]) if len(params.positional) > 1 else 1.0
    te = float(params.named.get("te", te))
    unet = float(params.positional[2]) if len(params.positional) > 2 else te
    unet = float(params.named.get("unet", unet))
    return name, te, unet


def resolve(tags: dict, field_name: str) -> NetworkSet:
    other = sorted(t for t in tags if t not in NETWORK_TYPES)
    if other:
        raise MagicFusionError(f"<{other[0]}:…> networks cannot be applied to an expert (only {', '.join(NETWORK_TYPES)})", field_name)
    params_list = [p for t in NETWORK_TYPES for p in tags.get(t, [])]
    if not params_list:
        return NetworkSet()
    nw = module()
    if nw is None:
        raise MagicFusionError("has networks, but Forge's built-in LoRA extension is not enabled", field_name)
    items = []
    for params in params_list:
        try:
            name, te, unet = _multipliers(params)
        except (ValueError, IndexError) as e:
            raise MagicFusionError(f"cannot read the network tag {params.items!r}: {e}", field_name) from None
        on_disk = _on_disk(nw, name)
        if on_disk is None:
            raise MagicFusionError(f"no network named {name!r} is installed (see the Lora tab)", field_name)
        items.append((name, on_disk.filename, unet, te))
    return NetworkSet(tuple(items))


def _on_disk(nw, name):
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


def of_main_prompt(p) -> NetworkSet:
    """The main prompt's networks for this batch, as Forge activated them."""
    data = getattr(p, "extra_network_data", None) or {}
    tags = {t: data.get(t, []) for t in NETWORK_TYPES if data.get(t)}
    return resolve(tags, "prompt") if tags else NetworkSet()


def patched(engine, nets: NetworkSet):
    """The engine's original objects with `nets` patched on (clones; nothing of the engine changes)."""
    objects = engine.forge_objects_original.shallow_copy()
    if not nets.items:
        return objects
    nw = module()
    for _, filename, unet, te in nets.items:
        objects.unet, objects.clip = nw.load_lora_for_models(objects.unet, objects.clip, nw.load_lora_state_dict(filename),
                                                             unet, te, filename=filename, online_mode=False)
    return objects
