"""Rule-based scoring of decoded toy-world images (uint8 HxWx3, 128x128).

* ``scene(img)``: the background, read from the outer ring of ``world.BORDER`` px that never
  holds the ball: one of ``world.SCENES``, ``"plain"`` (the fine expert's background) or None.
* ``fine_object(img)``: the ball: a variant of ``world.VARIANTS``, ``"generic"`` (the
  general model's grey ball), ``"sks"`` (the DreamBooth subject) or None (no clear ball).
* ``success(img, task)`` for a ``Task``: fine-grained = scene right and variant right;
  DreamBooth = scene right and the ball is sks.

Each pixel gets a colour class from fixed RGB rules (``pixel_classes``). The scene is the
class that covers most of the ring; the ball is found from the pixels of the ball colours
(red, blue, yellow, magenta, grey) in the centre, fitted as a disc, and named from the
colour shares inside the disc (patterns by light / dark pixel shares, which survive a
decoder's blur).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

try:
    from . import world as W
except ImportError:  # run as a script / imported with bench/quality on sys.path
    import world as W

RING = 12  # px read for the scene (inside world.BORDER)
# pixel classes
NONE, SKY, SAND, LEAF, SNOW, NAVY, PLAIN, RED, BLUE, YELLOW, MAGENTA, GREY, WHITE, BLACK = range(14)
BALL_CLASSES = (RED, BLUE, YELLOW, MAGENTA, GREY)
MIN_BALL_PX = 150  # a ball of radius ~7 px; the world's smallest has radius 18


def pixel_classes(img: np.ndarray) -> np.ndarray:
    """HxW int array of colour classes (later rules win; unmatched pixels are NONE)."""
    x = img.astype(np.int32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    mx, mn = x.max(-1), x.min(-1)
    spread = mx - mn
    c = np.full(r.shape, NONE, np.int8)
    c[(b > r + 30) & (b > 175) & (g > 150) & (b - g < 70)] = SKY
    c[(r > b + 40) & (r > 170) & (g > 150) & (b > 90)] = SAND
    c[(mx < 140) & (g >= r + 10) & (g >= b + 8)] = LEAF
    c[(mn > 170) & (b >= r + 4) & (b > 215)] = SNOW
    c[(mx < 100) & (b > r + 15) & (b > g + 10)] = NAVY
    c[(mn > 160) & (mx < 215) & (r >= b + 6) & (spread < 35)] = PLAIN
    c[(spread < 24) & (mx >= 85) & (mx < 175)] = GREY
    c[(r > 140) & (g < 110) & (b < 100) & (r - g > 80)] = RED
    c[(b > 120) & (b - r > 80) & (b - g > 80) & (g < 150)] = BLUE
    c[(r > 170) & (g > 130) & (b < 100) & (r - b > 100)] = YELLOW
    c[(r > 130) & (b > 110) & (g < 110) & (r - g > 60) & (b - g > 40)] = MAGENTA
    c[(mn > 200) & (spread < 30) & ~(c == SNOW)] = WHITE
    c[(mx < 75) & (spread < 30) & ~(c == NAVY) & ~(c == LEAF)] = BLACK
    return c


def _ring(a: np.ndarray, w: int = RING) -> np.ndarray:
    return np.concatenate([a[:w].ravel(), a[-w:].ravel(), a[w:-w, :w].ravel(), a[w:-w, -w:].ravel()])


def scene_shares(img: np.ndarray) -> dict[str, float]:
    c = pixel_classes(img)
    ring = _ring(c)
    top, bottom = c[:RING].ravel(), c[-RING:].ravel()
    frac = {k: float(np.mean(ring == v)) for k, v in
            (("sky", SKY), ("sand", SAND), ("forest", LEAF), ("snow", SNOW), ("night", NAVY), ("plain", PLAIN),
             ("white", WHITE))}
    return {
        # the beach: sky above, sand below
        "beach": frac["sky"] + frac["sand"] if np.mean(top == SKY) > 0.5 and np.mean(bottom == SAND) > 0.5 else 0.0,
        "forest": frac["forest"],
        "snow": frac["snow"] + frac["white"],
        "night": frac["night"] + frac["white"],  # stars are white
        "plain": frac["plain"],
    }


def scene(img: np.ndarray) -> str | None:
    """The background: a scene name, "plain" or None (no rule covers 60 % of the ring)."""
    shares = scene_shares(img)
    best = max(shares, key=shares.get)
    if best == "night" and shares["night"] - float(np.mean(_ring(pixel_classes(img)) == WHITE)) < 0.4:
        return None  # white alone is not a night sky
    return best if shares[best] >= 0.6 else None


def ball_stats(img: np.ndarray) -> dict:
    """The fitted disc (cx, cy, r) and the colour shares inside it (or ``found: False``)."""
    c = pixel_classes(img)
    b = W.BORDER // 2  # search a little beyond the ball's allowed area
    centre = np.zeros(c.shape, bool)
    centre[b:-b, b:-b] = True
    fg = np.isin(c, BALL_CLASSES) & centre
    # Drop stray pixels: keep those with at least 6 ball-coloured pixels among their 3x3.
    p = np.pad(fg, 1).astype(np.int16)
    near = sum(p[1 + dy:p.shape[0] - 1 + dy, 1 + dx:p.shape[1] - 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    fg &= near >= 6
    if fg.sum() < MIN_BALL_PX:
        return {"found": False, "pixels": int(fg.sum())}
    ys, xs = np.nonzero(fg)
    # Robust extent: central 96 % of the ball-coloured pixels (stray pixels do not count).
    x0, x1 = np.percentile(xs, [2, 98])
    y0, y1 = np.percentile(ys, [2, 98])
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    r = max((x1 - x0) / 2, 1.0)  # stripes are horizontal: the x extent is whole
    yy, xx = np.mgrid[0:c.shape[0], 0:c.shape[1]]
    inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= (0.85 * r) ** 2
    n = max(int(inside.sum()), 1)
    share = {name: float(np.sum((c == v) & inside)) / n for name, v in
             (("red", RED), ("blue", BLUE), ("yellow", YELLOW), ("magenta", MAGENTA), ("grey", GREY),
              ("white", WHITE), ("black", BLACK))}
    # Pattern pixels by brightness, tolerant of a decoder's blur: light (whitish, possibly
    # tinted) and dark (any hue) pixels inside the disc.
    x = img.astype(np.int32)
    mn, mx = x.min(-1), x.max(-1)
    share["light"] = float(np.sum((mn > 150) & (mx - mn < 70) & inside)) / n
    share["dark"] = float(np.sum((x.mean(-1) < 90) & inside)) / n
    # How much of the disc is ball-coloured or pattern: a lone blob of colour is not a ball.
    light = (mn > 150) & (mx - mn < 70)
    fill = float(np.sum(inside & (np.isin(c, BALL_CLASSES) | (c == WHITE) | (c == BLACK) | light))) / n
    return {"found": True, "cx": float(cx), "cy": float(cy), "r": float(r), "share": share, "fill": fill,
            "pixels": int(fg.sum())}


def fine_object(img: np.ndarray) -> str | None:
    """The ball: a variant name, "generic", "sks" or None."""
    st = ball_stats(img)
    if not st["found"] or st["fill"] < 0.6 or st["r"] < 8:
        return None
    s = st["share"]
    if s["magenta"] >= 0.15 and s["yellow"] >= 0.05 and s["magenta"] + s["yellow"] >= 0.45:
        return W.SKS  # magenta with a yellow band (no other ball has magenta)
    base = max(("red", "blue", "yellow", "magenta", "grey"), key=s.get)
    if s[base] < 0.3:
        return None
    if base == "magenta":
        return None  # magenta without the band
    if base == "grey":
        return W.GENERIC
    if base == "red":
        return "red"
    if base == "blue":
        return "blue striped" if s["light"] >= 0.10 else "blue"
    return "yellow dotted" if s["dark"] >= 0.06 else "yellow"


@dataclass(frozen=True)
class Task:
    """A fusion task: the scene and the object (a variant or "sks") both asked for."""
    kind: str  # "fine" or "dreambooth"
    scene: str
    obj: str  # a variant (fine) or world.SKS (dreambooth)

    @property
    def general_prompt(self) -> str:
        """The general model's (main) prompt: the scene."""
        return W.general_prompt(self.scene) if self.kind == "fine" else W.sks_scene_prompt(self.scene)

    @property
    def expert_prompt(self) -> str:
        """The expert's prompt: the object."""
        return W.fine_prompt(self.obj) if self.kind == "fine" else W.SKS_PROMPT

    @property
    def combined_prompt(self) -> str:
        """Both in one prompt (for a single model)."""
        return W.combined_fine_prompt(self.obj, self.scene) if self.kind == "fine" else W.sks_scene_prompt(self.scene)


def fine_tasks() -> list[Task]:
    return [Task("fine", s, v) for s in W.SCENES for v in W.VARIANTS]


def dreambooth_tasks() -> list[Task]:
    """Recontextualisation: sks in every scene but its training scene."""
    return [Task("dreambooth", s, W.SKS) for s in W.SCENES if s != W.DREAMBOOTH_SCENE]


def success(img: np.ndarray, task: Task) -> bool:
    return scene(img) == task.scene and fine_object(img) == task.obj


def score(images, task: Task) -> dict:
    """Rates over a batch: success, scene right, object right."""
    sc = [scene(im) for im in images]
    ob = [fine_object(im) for im in images]
    n = max(len(sc), 1)
    return {"n": len(sc), "success": sum(a == task.scene and b == task.obj for a, b in zip(sc, ob)) / n,
            "scene": sum(a == task.scene for a in sc) / n, "object": sum(b == task.obj for b in ob) / n}
