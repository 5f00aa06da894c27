"""A unit's own networks on Forge (its built-in `sd_forge_lora`).

Forge applies a LoRA by patching clones of an engine's UnetPatcher and CLIP (patches that its
memory manager merges into the weights when the patcher is loaded). A unit's networks are
patched onto clones of its own engine's original objects; the main prompt's stay on the main
model's. Since the merge lands in the one set of weights an engine has, two network sets on one
engine cannot run in one step: a unit whose checkpoint is already used with other networks gets
an engine of its own (expert.py, slots).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import network_tags


@dataclass(frozen=True)
class NetworkSet:
    items: tuple = field(default=())   # (name, filename, unet multiplier, text-encoder multiplier)

    @property
    def key(self) -> tuple:
        return tuple((filename, unet, te) for _, filename, unet, te in self.items)


def resolve(tags: dict, field_name: str) -> NetworkSet:
    return NetworkSet(tuple((t.name, t.on_disk.filename, t.unet, t.te) for t in network_tags.read(tags, field_name)))


def of_main_prompt(p) -> NetworkSet:
    """The main prompt's networks for this batch, as Forge activated them."""
    data = getattr(p, "extra_network_data", None) or {}
    tags = {t: data.get(t, []) for t in network_tags.NETWORK_TYPES if data.get(t)}
    return resolve(tags, "prompt") if tags else NetworkSet()


def of_prompt(prompt) -> NetworkSet:
    """The networks a prompt names (the first of a list), as the WebUI will activate them; a
    network it cannot find counts as one, so that prompt matches no unit's set."""
    from modules import extra_networks

    from ...params import MagicFusionError
    _, tags = extra_networks.parse_prompt(prompt[0] if isinstance(prompt, list) and prompt else str(prompt or ""))
    tags = {t: v for t, v in tags.items() if t in network_tags.NETWORK_TYPES and v}
    try:
        return resolve(tags, "prompt") if tags else NetworkSet()
    except MagicFusionError:
        return NetworkSet((("?", None, None, None),))


def patched(engine, nets: NetworkSet):
    """The engine's original objects with `nets` patched on (clones; nothing of the engine changes)."""
    objects = engine.forge_objects_original.shallow_copy()
    if not nets.items:
        return objects
    nw = network_tags.networks_module()
    for _, filename, unet, te in nets.items:
        objects.unet, objects.clip = nw.load_lora_for_models(objects.unet, objects.clip, nw.load_lora_state_dict(filename),
                                                             unet, te, filename=filename, online_mode=False)
    return objects
