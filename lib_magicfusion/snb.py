"""Saliency-aware Noise Blending (SNB), the per-pixel selection at the heart of MagicFusion.

Pure tensor code: torch only, no WebUI import. Everything here works on any latent size,
any batch and any number of models (index 0 is the general model and wins ties).

The operators follow the official MagicFusion code exactly:

    S = channel_mean( bilinear_resize_to_HW( avg_pool(|delta|, kernel=blur, stride=1, padding=1) ) )
    P = softmax over the H*W positions of k * S        (per sample)
    mask = argmax over models of P                     (first maximum wins)

`delta` is a model's guidance term in epsilon space, s * (eps_cond - eps_uncond).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["saliency", "saliency_maps", "stacked_saliency", "k_column", "fusion_mask", "blend", "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype saliency is computed in: float32 at least, float64 kept."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_blur(blur: int, height: int, width: int) -> None:
    if isinstance(blur, bool) or not isinstance(blur, int) or blur < 0:
        raise ValueError(f"MagicFusion: blur must be a non-negative integer, got {blur!r}")
    if blur > 1 and min(height, width) + 3 <= blur:
        raise ValueError(f"MagicFusion: blur {blur} is too large for a {height}x{width} latent")


def _blurred_abs(delta: torch.Tensor, blur: int) -> torch.Tensor:
    """|delta| box-blurred as the official code does, then averaged over channels -> (N,1,H,W)."""
    height, width = delta.shape[-2:]
    _check_blur(blur, height, width)
    magnitude = delta.to(compute_dtype(delta.dtype)).abs()
    if blur > 1:
        # AvgPool2d(kernel, stride=1, padding=1) with the zero padding counted, then a
        # bilinear resize back to the latent's own size (align_corners=False, no antialias).
        magnitude = F.avg_pool2d(magnitude, kernel_size=blur, stride=1, padding=1, count_include_pad=True)
        if magnitude.shape[-2:] != (height, width):
            magnitude = F.interpolate(magnitude, size=(height, width), mode="bilinear", align_corners=False, antialias=False)
    return magnitude.mean(dim=1, keepdim=True)


def saliency(delta: torch.Tensor, k: float, blur: int = 4) -> torch.Tensor:
    """Normalised saliency map of one model's guidance term.

    delta: (B, C, H, W) guidance term s*(eps_cond - eps_uncond) in epsilon space.
    Returns (B, 1, H, W) in float32 (float64 for float64 input); each sample sums to 1.
    """
    return saliency_maps([delta], [k], blur)[0]


@functools.lru_cache(maxsize=64)
def k_column(ks: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Temperatures (a tuple of floats) as an (N, 1, 1) tensor, made once per device and dtype
    (no host-to-device copy per step)."""
    return torch.tensor(ks, dtype=dtype, device=device).reshape(-1, 1, 1)


def stacked_saliency(deltas: torch.Tensor, temperatures: torch.Tensor, blur: int = 4,
                     region: torch.Tensor | None = None) -> torch.Tensor:
    """Saliency of N models' guidance terms stacked as (N, B, C, H, W) -> (N, B, 1, H, W).

    temperatures: k per model, (N, 1, 1), or per model and sample, (N, B, 1). The blur, the
    resize and the channel mean are linear, so the saliency of c * delta (c >= 0) is that of
    delta with k * c: a caller may fold a scale into the temperature instead of multiplying
    the whole delta (the fusion step folds the guidance scale and 1/sigma in this way).
    Computed in `compute_dtype` of the input.

    region: where the image is being generated, (B or 1, 1, H, W) weights in [0, 1] (an
    inpainting mask); None = everywhere. The saliency outside the region counts as zero
    (like the padding beyond the image's border) and the softmax runs over the region only,
    weighted by it, so who wins inside depends on the region alone. A sample whose region is
    empty is treated as having none.
    """
    if deltas.dim() != 5:
        raise ValueError(f"MagicFusion: stacked guidance terms must have shape (N, B, C, H, W), got {tuple(deltas.shape)}")
    n, batch, channels, height, width = deltas.shape
    dtype = compute_dtype(deltas.dtype)
    flat = deltas.reshape(n * batch, channels, height, width).to(dtype)
    weights = None
    if region is not None:
        weights = _region_weights(region, batch, height, width, dtype)
        flat = flat * weights.repeat(n, 1, 1, 1)
    maps = _blurred_abs(flat, blur)
    scaled = maps.reshape(n, batch, height * width) * temperatures.to(dtype)
    if weights is not None:
        scaled = scaled + torch.log(weights.reshape(1, batch, height * width))
    return torch.softmax(scaled, dim=2).reshape(n, batch, 1, height, width)


def _region_weights(region: torch.Tensor, batch: int, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    weights = region.to(dtype)
    if weights.dim() == 3:
        weights = weights[:1].unsqueeze(0)
    weights = weights[:, :1].clamp(0, 1).expand(batch, 1, height, width)
    empty = weights.reshape(batch, -1).amax(dim=1) <= 0
    return torch.where(empty.reshape(batch, 1, 1, 1), torch.ones_like(weights), weights)


def saliency_maps(deltas: Sequence[torch.Tensor], ks: Sequence[float], blur: int = 4) -> torch.Tensor:
    """Saliency of several models at once -> (N_models, B, 1, H, W).

    The models are stacked into one batch so the blur and softmax run once; every row is
    computed independently, so the result equals calling `saliency` per model.
    """
    if len(deltas) != len(ks):
        raise ValueError(f"MagicFusion: got {len(deltas)} guidance terms but {len(ks)} k values")
    if len(deltas) < 1:
        raise ValueError("MagicFusion: no guidance terms to compare")
    shape = deltas[0].shape
    for d in deltas:
        if d.shape != shape:
            raise ValueError(f"MagicFusion: guidance terms differ in shape: {tuple(shape)} vs {tuple(d.shape)}")
    if len(shape) != 4:
        raise ValueError(f"MagicFusion: delta must have shape (B, C, H, W), got {tuple(shape)}")
    dtype = compute_dtype(deltas[0].dtype)
    stacked = torch.stack([d.to(dtype) for d in deltas])
    return stacked_saliency(stacked, k_column(tuple(float(k) for k in ks), dtype, stacked.device), blur)


def fusion_mask(deltas: Sequence[torch.Tensor], ks: Sequence[float], blur: int = 4) -> torch.Tensor:
    """Index of the most salient model per pixel -> LongTensor (B, 1, H, W).

    Index 0 is the general (main) model; on ties the lowest index wins.
    """
    if len(deltas) < 2:
        raise ValueError("MagicFusion: fusion needs at least two models")
    return torch.argmax(saliency_maps(deltas, ks, blur), dim=0)


def blend(preds: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Per pixel, all channels of the winning model's prediction, exactly.

    preds: N tensors (B, C, H, W) of one dtype; mask: (B, 1, H, W) integer indices into preds.
    """
    if len(preds) < 1:
        raise ValueError("MagicFusion: nothing to blend")
    out = preds[0]
    for index in range(1, len(preds)):
        if preds[index].shape != out.shape:
            raise ValueError(f"MagicFusion: predictions differ in shape: {tuple(out.shape)} vs {tuple(preds[index].shape)}")
        out = torch.where(mask == index, preds[index], out)
    return out.clone() if out is preds[0] else out
