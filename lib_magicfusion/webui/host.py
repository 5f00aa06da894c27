"""The host adapter for the WebUI this extension runs in, chosen at run time.

Nothing host-only is imported at module level anywhere in the extension: A1111 has no
`backend`, Forge has no `ldm` on the path, and an extension that imports either at top level
crashes at load on the other host. Forge is recognised by its `modules_forge` package."""

from __future__ import annotations

import functools
import importlib


@functools.lru_cache(maxsize=1)
def name() -> str:
    try:
        importlib.import_module("modules_forge")
    except ImportError:
        return "a1111"
    return "forge"


def adapter():
    """The host's package: a1111 or forge, each with `Generation`, `cache`, `install()`,
    `on_main_changed(model)`, `memory_bytes(expert)`."""
    return importlib.import_module(f"{__package__}.{name()}")


def register_once(hooks) -> None:
    """Register script callbacks unless they already are (Reload UI clears them and re-imports
    the script): hooks are (callback_map key, registrar, function)."""
    from modules import script_callbacks
    for key, register, fn in hooks:
        if not any(c.callback is fn for c in script_callbacks.callback_map[key]):
            register(fn, name=f"magicfusion_{fn.__name__}")
