"""DDIM CFG++ steers with the uncond noise of each call (the denoiser's `last_noise_uncond`,
which the WebUI sets from the main model's uncond after the guidance is composed). A fused call
hands over its own: the host's sampling hook leaves it here, and `on_cfg_after_cfg`, which the
WebUI fires next in the same denoiser call on the same thread, sets it."""

from __future__ import annotations

import threading

_pending = threading.local()


def hand_over(denoiser, uncond_noise) -> None:
    _pending.value = (denoiser, uncond_noise)


def on_cfg_after_cfg(params) -> None:
    pending = getattr(_pending, "value", None)
    if pending is not None:
        denoiser, uncond = pending
        denoiser.last_noise_uncond = uncond
        _pending.value = None
