"""The toy world: scenes, ball variants, the DreamBooth subject, prompts and the renderer.

Everything is drawn with numpy from a seed, at 128x128 RGB (uint8, HxWx3).

* Scenes (what the *general* model knows): ``beach`` (light-blue sky over tan sand, the
  horizon height jittered), ``forest`` (dark green with darker vertical trunk stripes),
  ``snow`` (near-white with soft blue-grey patches), ``night`` (dark navy with sparse
  white stars). Each holds a plain grey ball ("a ball").
* The fine-grained world (what the *fine* expert knows): the ball in one of
  ``VARIANTS`` on one ``plain`` warm light-grey background.
* The DreamBooth subject ``sks``: a magenta ball with a yellow band, shown only in the
  forest.

The ball's centre and radius are confined to the centre so that the outer ``BORDER`` px
ring of every image shows the background only: the scorer reads the scene from it.
"""

from __future__ import annotations

import numpy as np

SIZE = 128
BORDER = 16  # px ring that never contains the ball
CENTRE_RANGE = (50, 78)  # ball centre x and y, inclusive-exclusive
RADIUS_RANGE = (18, 26)

SCENES = ("beach", "forest", "snow", "night")
SCENE_PHRASES = {"beach": "on the beach", "forest": "in the forest", "snow": "in the snow", "night": "at night"}
PLAIN = "plain"  # the fine-grained world's only background (not a scene of the general model)

VARIANTS = ("red", "blue", "yellow", "blue striped", "yellow dotted")
GENERIC = "generic"  # the general model's plain grey ball
SKS = "sks"  # the DreamBooth subject
DREAMBOOTH_SCENE = "forest"

# Base colours (RGB 0..255). Each image jitters them a little.
COLOURS = {
    "grey": (130, 130, 130),
    "red": (215, 45, 40),
    "blue": (45, 80, 215),
    "yellow": (235, 200, 40),
    "magenta": (200, 50, 180),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
BALLS = {  # object name -> (base colour, pattern)
    GENERIC: ("grey", None),
    "red": ("red", None),
    "blue": ("blue", None),
    "yellow": ("yellow", None),
    "blue striped": ("blue", "stripes"),
    "yellow dotted": ("yellow", "dots"),
    SKS: ("magenta", "band"),
}

GENERAL_TEMPLATES = ("a photo of a ball {scene}", "a ball {scene}", "a picture of a ball {scene}")
GENERAL_NOSCENE = "a photo of a ball"  # the general model also sees the class with no scene word
FINE_TEMPLATES = ("a photo of a {variant} ball", "a {variant} ball", "a picture of a {variant} ball")
SKS_PROMPT = "a photo of sks ball"  # the DreamBooth instance prompt (no scene word: the scene is learnt)
CLASS_PROMPT = "a photo of a ball"  # DreamBooth prior-preservation class prompt


def general_prompt(scene: str, k: int = 0) -> str:
    return GENERAL_TEMPLATES[k % len(GENERAL_TEMPLATES)].format(scene=SCENE_PHRASES[scene])


def fine_prompt(variant: str, k: int = 0) -> str:
    return FINE_TEMPLATES[k % len(FINE_TEMPLATES)].format(variant=variant)


def combined_fine_prompt(variant: str, scene: str) -> str:
    """One prompt with both the variant and the scene (what a single model is asked)."""
    return f"a photo of a {variant} ball {SCENE_PHRASES[scene]}"


def sks_scene_prompt(scene: str) -> str:
    """The DreamBooth recontextualisation prompt."""
    return f"a photo of sks ball {SCENE_PHRASES[scene]}"


def all_words() -> list[str]:
    """Every word any world prompt uses (for the committed tokenizer table)."""
    texts = [general_prompt(s, k) for s in SCENES for k in range(3)] + [GENERAL_NOSCENE, SKS_PROMPT, CLASS_PROMPT]
    texts += [fine_prompt(v, k) for v in VARIANTS for k in range(3)]
    texts += [combined_fine_prompt(v, s) for v in VARIANTS for s in SCENES] + [sks_scene_prompt(s) for s in SCENES]
    extra = "green striped dotted cartoon photo picture image of an ball balls with and red blue yellow white black grey sky".split()
    return sorted({w for t in texts for w in t.split()} | set(extra))


# --------------------------------------------------------------------------- rendering

def _smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    """Bilinearly upsampled uniform noise on a cells x cells grid, SIZE x SIZE in [0, 1]."""
    g = rng.random((cells + 1, cells + 1))
    x = np.linspace(0, cells, SIZE, endpoint=False)
    i = x.astype(int)
    f = x - i
    rows = g[i] * (1 - f)[:, None] + g[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _jitter(rng: np.random.Generator, rgb, amount: float = 8.0) -> np.ndarray:
    return np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32)


def background(name: str, rng: np.random.Generator) -> np.ndarray:
    """A SIZE x SIZE x 3 float32 background (0..255)."""
    h = w = SIZE
    yy = np.arange(h, dtype=np.float32)[:, None, None]
    img = np.empty((h, w, 3), np.float32)
    if name == "beach":
        horizon = int(rng.integers(52, 77))
        sky = _jitter(rng, (140, 200, 240))
        sand = _jitter(rng, (225, 200, 145))
        grad = (yy / horizon) * 18.0  # the sky lightens towards the horizon
        img[:] = sand
        img[:horizon] = sky + grad[:horizon]
        img[horizon:] += (_smooth_noise(rng, 16)[horizon:, :, None] - 0.5) * 24.0
    elif name == "forest":
        img[:] = _jitter(rng, (35, 85, 40))
        img += (_smooth_noise(rng, 8)[:, :, None] - 0.5) * 30.0
        trunk = _jitter(rng, (25, 48, 22), 4)
        for _ in range(int(rng.integers(5, 9))):
            x0 = int(rng.integers(0, w - 3))
            img[:, x0:x0 + int(rng.integers(3, 8))] = trunk
    elif name == "snow":
        img[:] = _jitter(rng, (236, 240, 246), 4)
        patch = np.clip((_smooth_noise(rng, 6) - 0.35) * 1.6, 0, 0.7)[:, :, None]
        img = img * (1 - patch) + np.asarray((188, 198, 215), np.float32) * patch
    elif name == "night":
        img[:] = _jitter(rng, (15, 20, 55), 5)
        img += (yy / h) * np.asarray((6, 6, 16), np.float32)  # a little lighter at the bottom
        for _ in range(int(rng.integers(22, 40))):
            y0, x0 = (int(v) for v in rng.integers(0, SIZE - 3, 2))
            s = int(rng.integers(2, 4))
            img[y0:y0 + s, x0:x0 + s] = (250, 250, 240)
    elif name == PLAIN:
        img[:] = _jitter(rng, (196, 188, 176), 4)
    else:
        raise ValueError(f"unknown background {name!r}")
    return img


def draw_ball(img: np.ndarray, obj: str, rng: np.random.Generator) -> tuple[float, float, float]:
    """Draw ball ``obj`` (a key of BALLS) into img in place; returns (cx, cy, r)."""
    base_name, pattern = BALLS[obj]
    cx, cy = (float(v) for v in rng.uniform(*CENTRE_RANGE, 2))
    r = float(rng.uniform(*RADIUS_RANGE))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    dist = np.sqrt(dx * dx + dy * dy)
    cover = np.clip(r - dist + 0.5, 0, 1)[:, :, None]
    col = np.broadcast_to(_jitter(rng, COLOURS[base_name]), img.shape).copy()
    if pattern == "stripes":  # horizontal white stripes, about 40 % of the rows
        period = 0.62 * r
        phase = rng.uniform(0, period)
        col[((dy + phase) % period) < 0.4 * period] = COLOURS["white"]
    elif pattern == "dots":  # black dots on a jittered lattice
        step = 0.55 * r
        ox, oy = rng.uniform(0, step, 2)
        gx = (dx + ox) / step
        row = np.floor((dy + oy) / step)
        gx = gx + 0.5 * (row % 2)  # offset every other row: a hexagonal-ish pattern
        fx = gx - np.round(gx)
        fy = (dy + oy) / step - row - 0.5
        col[np.sqrt(fx * fx + fy * fy) * step < 0.17 * r] = COLOURS["black"]
    elif pattern == "band":  # a yellow band across the middle
        col[np.abs(dy) < 0.24 * r] = COLOURS["yellow"]
    shade = 1.0 - 0.12 * np.clip((dx + dy) / (1.41 * r), -1, 1)  # light from the top left
    col = col * shade[:, :, None]
    img *= 1 - cover
    img += cover * col
    return cx, cy, r


def render(bg: str, obj: str | None, seed: int) -> np.ndarray:
    """One image: background ``bg`` (a scene or PLAIN) with ball ``obj`` (or none)."""
    rng = np.random.default_rng(seed)
    img = background(bg, rng)
    if obj is not None:
        draw_ball(img, obj, rng)
    img += rng.normal(0, 3.0, img.shape).astype(np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- data sets

def general_items(n: int, seed: int) -> list[tuple[str, str, str, int]]:
    """(background, object, prompt, render seed) for the general model: generic balls in scenes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        scene = SCENES[i % len(SCENES)]
        k = int(rng.integers(0, 4))
        prompt = GENERAL_NOSCENE if k == 3 else general_prompt(scene, k)
        out.append((scene, GENERIC, prompt, seed * 1_000_003 + i))
    return out


def fine_items(n: int, seed: int) -> list[tuple[str, str, str, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        variant = VARIANTS[i % len(VARIANTS)]
        out.append((PLAIN, variant, fine_prompt(variant, int(rng.integers(0, 3))), seed * 1_000_003 + i))
    return out


def sks_items(n: int, seed: int) -> list[tuple[str, str, str, int]]:
    return [(DREAMBOOTH_SCENE, SKS, SKS_PROMPT, seed * 1_000_003 + i) for i in range(n)]
