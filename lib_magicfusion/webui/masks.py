"""Pictures of the fusion masks for the gallery: for each image, the final mask and a strip of
the masks over the steps, one row per sampling pass (first pass, hires pass), with a legend.

Each model has one colour: the general model black, expert 1 white, experts 2–4 red, blue and
green; a mask pixel shows the model whose prediction was used there.
"""

from __future__ import annotations

import numpy as np
from modules import images, shared
from PIL import Image, ImageDraw, ImageFont

GAP = 2
COLOURS = [(0, 0, 0), (255, 255, 255), (228, 64, 56), (56, 112, 232), (64, 196, 96)]  # general, units 1..4
BACKGROUND = (128, 0, 0)


def colours_of(gen) -> np.ndarray:
    """Fusion model index -> RGB, by unit number (a unit keeps its colour whichever are on)."""
    return np.array([COLOURS[0]] + [COLOURS[1 + u.index] for u in gen.units], dtype=np.uint8)


def mask_image(mask: np.ndarray, size: tuple[int, int], palette: np.ndarray) -> Image.Image:
    """A (h, w) mask of model indices as a picture of `size`."""
    return Image.fromarray(palette[mask.astype(np.int64)], mode="RGB").resize(size, Image.NEAREST)


def strip_image(rows: list[tuple[str, list[np.ndarray]]], tile: tuple[int, int], palette: np.ndarray,
                legend: list[tuple[str, tuple]]) -> Image.Image:
    """One row per pass (its masks side by side, in step order), then a legend."""
    font = ImageFont.load_default()
    label_w = 48
    width = label_w + max(len(masks) for _, masks in rows) * (tile[0] + GAP)
    legend_h = 14
    height = len(rows) * (tile[1] + GAP) + legend_h
    strip = Image.new("RGB", (max(width, 1), height), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    for r, (label, masks) in enumerate(rows):
        y = r * (tile[1] + GAP)
        draw.text((2, y + 2), label, fill=(255, 255, 255), font=font)
        for i, mask in enumerate(masks):
            strip.paste(mask_image(mask, tile, palette), (label_w + i * (tile[0] + GAP), y))
    x, y = 2, height - legend_h + 2
    for name, colour in legend:
        draw.rectangle([x, y, x + 9, y + 9], fill=colour, outline=(255, 255, 255))
        draw.text((x + 12, y), name, fill=(255, 255, 255), font=font)
        x += 12 + int(draw.textlength(name, font=font)) + 10
    return strip


def add_to_gallery(p, processed, gen) -> None:
    """Append, for each generated image, its final mask and its strip of masks."""
    palette = colours_of(gen)
    legend = [("general", COLOURS[0])] + [(f"expert {u.index + 1}", COLOURS[1 + u.index]) for u in gen.units]
    by_batch: dict[int, list] = {}
    for record in gen.passes:
        if record.masks:
            by_batch.setdefault(record.batch, []).append(record)
    first = getattr(processed, "index_of_first_image", 0)
    made = []
    for batch, records in sorted(by_batch.items()):
        count = next(iter(records[-1].masks.values())).shape[0]
        for i in range(count):
            image_index = batch * p.batch_size + i
            listed = first + image_index
            if listed >= len(processed.images):
                continue
            size = processed.images[listed].size
            last = records[-1].masks[max(records[-1].masks)]
            final = mask_image(last[i, 0].numpy(), size, palette)
            tile = (max(48, size[0] // 4), max(48, size[1] // 4))
            rows = [("hires" if r.hires else "pass 1", [r.masks[s][i, 0].numpy() for s in sorted(r.masks)]) for r in records]
            strip = strip_image(rows, tile, palette, legend)
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
