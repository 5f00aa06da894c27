"""Pictures of the fusion mask for the gallery: the final mask and a strip over the steps."""

from __future__ import annotations

import numpy as np
from PIL import Image

from modules import images, shared

GAP = 2


def mask_image(mask: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A (h, w) mask of model indices as a picture: black = general, white = expert."""
    picture = Image.fromarray((mask > 0).astype(np.uint8) * 255, mode="L")
    return picture.resize(size, Image.NEAREST).convert("RGB")


def strip_image(steps: list[np.ndarray], tile: tuple[int, int]) -> Image.Image:
    """The masks of every fused step side by side, in step order."""
    width = len(steps) * tile[0] + (len(steps) - 1) * GAP
    strip = Image.new("RGB", (max(width, 1), tile[1]), (128, 0, 0))
    for i, mask in enumerate(steps):
        strip.paste(mask_image(mask, tile), (i * (tile[0] + GAP), 0))
    return strip


def add_to_gallery(p, processed, batch_masks: list[dict]) -> None:
    """Append, for each generated image, its final mask and its strip of masks."""
    first = getattr(processed, "index_of_first_image", 0)
    made = []
    for batch_index, per_step in enumerate(batch_masks):
        if not per_step:
            continue
        ordered = [per_step[step] for step in sorted(per_step)]
        for i in range(ordered[-1].shape[0]):
            image_index = batch_index * p.batch_size + i
            listed = first + image_index
            if listed >= len(processed.images):
                continue
            size = processed.images[listed].size
            final = mask_image(ordered[-1][i, 0].numpy(), size)
            tile = (max(64, size[0] // 4), max(64, size[1] // 4))
            strip = strip_image([m[i, 0].numpy() for m in ordered], tile)
            infotext = processed.infotexts[listed] if listed < len(processed.infotexts) else ""
            made.append((final, strip, infotext, image_index))
    for final, strip, infotext, image_index in made:
        for picture, suffix in ((final, "-magicfusion-mask"), (strip, "-magicfusion-mask-steps")):
            processed.images.append(picture)
            processed.infotexts.append(infotext)
            if shared.opts.data.get("magicfusion_save_masks", False):
                seed = processed.all_seeds[image_index] if image_index < len(processed.all_seeds) else p.seed
                images.save_image(picture, p.outpath_samples, "", seed, p.prompt, shared.opts.samples_format,
                                  info=infotext, p=p, suffix=suffix)
