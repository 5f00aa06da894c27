"""Every Forge backend call the adapter makes, in one place.

These are the Forge2 backend's (`backend/`, as Forge 2.0.1 and Forge Neo have it). Hosts that
share the UnetPatcher API but keep the older `ldm_patched` backend (Forge Classic, reForge)
name the same operations elsewhere (`ldm_patched.modules.samplers`, `modules_forge.forge_loader`);
supporting one means giving this module their imports, not changing the adapter."""

from __future__ import annotations


def memory_management():
    from backend import memory_management as mm
    return mm


def load_engine(filename: str):
    """A diffusion engine built from a checkpoint file by Forge's own loader (nothing global changes)."""
    from backend.loader import forge_loader
    return forge_loader(filename)


def calc_cond_uncond_batch(model, cond, uncond, x, sigma, model_options):
    from backend.sampling.sampling_function import calc_cond_uncond_batch as calc
    return calc(model, cond, uncond, x, sigma, model_options)


def compile_conditions(cond):
    from backend.sampling.condition import compile_conditions as compile_
    return compile_(cond)


def compile_weighted_conditions(cond, conds_list):
    from backend.sampling.condition import compile_weighted_conditions as compile_
    return compile_(cond, conds_list)


def area_and_mult(cond, x, sigma):
    """One compiled cond entry prepared for a batch as Forge prepares it (None: outside its timesteps)."""
    from backend.sampling.sampling_function import get_area_and_mult
    return get_area_and_mult(cond, x, sigma)


def cond_marks(cond_or_uncond, sigma):
    """The transformer options that tell attention patches which rows are cond and which uncond."""
    from backend.sampling.sampling_function import compute_cond_indices, compute_cond_mark
    marks = compute_cond_mark(cond_or_uncond=cond_or_uncond, sigmas=sigma)
    return marks, *compute_cond_indices(cond_or_uncond=cond_or_uncond, sigmas=sigma)
