"""Render the toy world's training images (deterministic) into one .npz.

    python bench/quality/make_data.py --out /tmp/toyworld/data.npz

Arrays: ``images`` (N, 128, 128, 3) uint8; ``set`` ("general", "fine", "sks"), ``bg``,
``obj`` and ``prompt`` (N strings each; ``obj`` "None" for no ball). The "vae" set is
for the VAE only. train.py calls ``build`` itself.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import world as W  # noqa: E402

N_GENERAL = 4000  # 1000 per scene; a quarter with the scene-less prompt "a photo of a ball"
N_FINE = 2500  # 500 per variant
N_SKS = 8  # the DreamBooth subject, in the forest only
N_VAE = 2000  # VAE-only images: any background with any ball (or none), empty prompt
SEEDS = {"general": 11, "fine": 22, "sks": 33, "vae": 44}


def items() -> list[tuple[str, str, str, str, int]]:
    out = [("general", *it) for it in W.general_items(N_GENERAL, SEEDS["general"])]
    out += [("fine", *it) for it in W.fine_items(N_FINE, SEEDS["fine"])]
    out += [("sks", *it) for it in W.sks_items(N_SKS, SEEDS["sks"])]
    # The VAE is a generic codec (as SD's is trained on far more than any fine-tune sees): it
    # also gets every background with every ball, which the UNets never see together.
    rng = np.random.default_rng(SEEDS["vae"])
    bgs, objs = (*W.SCENES, W.PLAIN), (*W.BALLS, None)
    for i in range(N_VAE):
        out.append(("vae", bgs[int(rng.integers(len(bgs)))], objs[int(rng.integers(len(objs)))], "",
                    SEEDS["vae"] * 1_000_003 + i))
    return out


def build(path: str | None = None) -> dict[str, np.ndarray]:
    """Render every item; save to ``path`` (.npz) when given, or load it when it exists."""
    if path and os.path.exists(path):
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    its = items()
    data = {
        "images": np.stack([W.render(bg, obj, seed) for _, bg, obj, _, seed in its]),
        "set": np.array([s for s, *_ in its]),
        "bg": np.array([bg for _, bg, *_ in its]),
        "obj": np.array([str(obj) for _, _, obj, *_ in its]),
        "prompt": np.array([p for *_, p, _ in its]),
    }
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, **data)
        os.replace(tmp, path)
    return data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output .npz")
    args = ap.parse_args(argv)
    if os.path.exists(args.out):
        os.remove(args.out)
    d = build(args.out)
    print(f"make_data: {len(d['images'])} images -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
