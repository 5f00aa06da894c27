"""An expert unit's own networks (LoRA, LyCORIS …) on A1111's built-in networks extension.

Rule: `<lora:name:weight>` tags in a unit's prompt act on that unit's evaluations only, its
UNet and its text encoder; the main prompt's networks act on the main model only. A unit
with an empty prompt takes the main prompt, networks included.

The WebUI applies networks by merging them into the weights of every layer that carries a
`network_layer_name`, whenever the set in `networks.loaded_networks` differs from the set the
layer last merged. Three ways follow from that, each chosen where it is exact or cheap:

* **A model of its own** (a separate expert checkpoint): its layers are named like the main
  model's, and `loaded_networks` holds the unit's set while it encodes and runs (`using`).
  Its layers merge once and stay merged; the main model's layers never see the unit's set.
* **The main checkpoint, every row the unit's** (the unit runs alone, or encodes its prompt):
  the same swap; the main model's layers merge the unit's set, and `restore` puts the main
  prompt's set back when the batch ends.
* **The main checkpoint, the unit's rows inside the main model's call** (fused steps): the
  layers keep the main set, and forward hooks add, on the unit's rows only, the unit's
  networks minus the main prompt's (`RowDeltas`), low-rank for LoRA. No weight is touched,
  so the per-step cost is the low-rank products on those rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ...params import MagicFusionError
from .. import network_tags


def module():
    """The built-in networks extension's module, or None when it is not loaded."""
    return network_tags.networks_module()


@dataclass
class NetworkSet:
    """A unit's networks: the WebUI's Network objects, its own instances (own multipliers)."""

    nets: list = field(default_factory=list)

    @property
    def key(self) -> tuple:
        return tuple((n.name, n.te_multiplier, n.unet_multiplier, n.dyn_dim) for n in self.nets)


_loaded: dict = {}  # (file, mtime, te, unet, dyn) -> Network


def resolve(tags: dict, field_name: str) -> NetworkSet:
    """The networks named by a unit prompt's tags, loaded as the unit's own instances."""
    import os
    out = []
    for tag in network_tags.read(tags, field_name):
        key = (tag.on_disk.filename, os.path.getmtime(tag.on_disk.filename), tag.te, tag.unet, tag.dyn)
        net = _loaded.get(key)
        if net is None:
            try:
                net = module().load_network(tag.name, tag.on_disk)
            except Exception as e:
                raise MagicFusionError(f"could not load the network {tag.name!r}: {type(e).__name__}: {e}", field_name) from e
            net.te_multiplier, net.unet_multiplier, net.dyn_dim = tag.te, tag.unet, tag.dyn
            net.mentioned_name = tag.name
            if len(_loaded) > 32:
                _loaded.clear()
            _loaded[key] = net
        out.append(net)
    return NetworkSet(out)


def current() -> list | None:
    """The main prompt's networks as the WebUI activated them for this batch (None: no extension)."""
    nw = module()
    return None if nw is None else list(nw.loaded_networks)


@contextlib.contextmanager
def using(nets: Sequence | None):
    """`loaded_networks` holds `nets` meanwhile (a list of Network objects; None changes nothing)."""
    nw = module()
    if nets is None or nw is None:
        yield
        return
    saved = list(nw.loaded_networks)
    nw.loaded_networks[:] = list(nets)
    try:
        yield
    finally:
        nw.loaded_networks[:] = saved


def name_layers(model) -> None:
    """Name a model's layers as the networks extension names the main model's (it names only
    `shared.sd_model`), so that a unit's networks can be merged into an expert of its own."""
    if module() is None:
        return
    mapping = {}
    if getattr(model, "is_sdxl", False):
        for i, embedder in enumerate(model.conditioner.embedders):
            if hasattr(embedder, "wrapped"):
                for name, layer in embedder.wrapped.named_modules():
                    mapping[f"{i}_{name.replace('.', '_')}"] = layer
    else:
        encoder = getattr(model.cond_stage_model, "wrapped", model.cond_stage_model)
        for name, layer in encoder.named_modules():
            mapping[name.replace(".", "_")] = layer
    for name, layer in model.model.named_modules():
        mapping[name.replace(".", "_")] = layer
    for name, layer in mapping.items():
        layer.network_layer_name = name
    model.network_layer_mapping = mapping


def restore(model, nets: Sequence | None) -> None:
    """Make every named layer of `model` hold exactly `nets` again (after a unit's set was merged
    into it). Layers that already do are not touched."""
    nw = module()
    if nw is None or nets is None:
        return
    wanted = tuple((n.name, n.te_multiplier, n.unet_multiplier, n.dyn_dim) for n in nets)
    with using(nets), torch.no_grad():
        for layer in getattr(model, "network_layer_mapping", {}).values():
            if getattr(layer, "network_current_names", ()) != wanted and hasattr(layer, "weight"):
                nw.network_apply_weights(layer)


class RowDeltas:
    """Forward hooks on the main model's UNet layers that add `unit − main` network deltas to
    chosen rows of one call. `rows` is set by the caller around each model call: a list of
    (first, end, unit NetworkSet) in the call's own row numbers."""

    def __init__(self, model, main_nets: Sequence, units: Sequence[NetworkSet]):
        self.main = list(main_nets)
        mapping = getattr(model, "network_layer_mapping", {})
        touched = set()
        for net in [*self.main, *(n for u in units for n in u.nets)]:
            touched.update(k for k in net.modules if k.startswith("diffusion_model"))
        self.layers = {name: mapping[name] for name in sorted(touched) if name in mapping}
        self.rows: list = []
        self._handles: list = []

    def __enter__(self):
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.rows = []

    def _hook(self, name: str):
        def hook(layer, inputs, output):
            if not self.rows:
                return None
            x = inputs[0]
            for first, end, unit in self.rows:
                delta = _delta(unit.nets, name, x[first:end], +1.0)
                delta = _delta(self.main, name, x[first:end], -1.0, delta)
                if delta is not None:
                    output[first:end] += delta.to(output.dtype)
            return output
        return hook


def _delta(nets: Sequence, name: str, x: torch.Tensor, sign: float, acc: Any = None):
    for net in nets:
        m = net.modules.get(name)
        if m is None:
            continue
        d = m.forward(x, torch.zeros((), dtype=x.dtype, device=x.device))
        acc = sign * d if acc is None else acc + sign * d
    return acc
