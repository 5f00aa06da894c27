"""Validate the scorer and measure each toy model alone (issue #10, part 1).

    python bench/quality/validate.py [--n 24] [--steps 25] [--cfg 7] [--out bench/quality/results/validation.json]

1. The scorer on clean renders of every background x object (should be ~100 %), and on
   the same renders after a VAE round trip (what the VAE keeps).
2. Each model on its own prompts: the general on the scene prompts (scene right, generic
   ball), the fine expert on the variant prompts, the DreamBooth model on "a photo of sks
   ball" and on the forest prompt.
3. Each single model on the fusion tasks (why fusion is needed): the general and the fine
   expert with the combined prompt ("a photo of a red ball on the beach"), the fine
   expert also with its own variant prompt, the DreamBooth model with "a photo of sks
   ball on the beach" (its overfit: how often the forest comes back).

Sampling: toy.generate (DDIM, eta 0), CPU, seeds 1000 + i.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import scorer as S  # noqa: E402
import toy  # noqa: E402
import world as W  # noqa: E402


def seeds(n: int, offset: int = 0) -> list[int]:
    return [1000 + offset + i for i in range(n)]


def tally(images) -> dict:
    sc = collections.Counter(str(S.scene(im)) for im in images)
    ob = collections.Counter(str(S.fine_object(im)) for im in images)
    return {"scene": dict(sc.most_common()), "object": dict(ob.most_common())}


def clean_table(models, per: int = 10) -> dict:
    rows = {}
    for bg in (*W.SCENES, W.PLAIN):
        for obj in W.BALLS:
            ims = np.stack([W.render(bg, obj, 50_000 + 97 * i) for i in range(per)])
            rt = models.decode(models.encode_images(ims))
            rows[f"{bg}/{obj}"] = {
                "clean": float(np.mean([S.scene(im) == bg and S.fine_object(im) == obj for im in ims])),
                "vae_roundtrip": float(np.mean([S.scene(im) == bg and S.fine_object(im) == obj for im in rt])),
            }
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=24, help="images per prompt set")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "validation.json"))
    ap.add_argument("--weights", default=None, help="weights folder (default: the committed ones)")
    ap.add_argument("--save-grid", default=None, help="write a PNG contact sheet of some samples")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    m = toy.load_models(args.weights)
    res = {"settings": {"n": args.n, "steps": args.steps, "cfg": args.cfg, "sampler": "ddim eta 0",
                        "torch": torch.__version__, "machine": platform.processor() or platform.machine()}}
    res["clean"] = clean_table(m)
    clean = [v["clean"] for v in res["clean"].values()]
    rt = [v["vae_roundtrip"] for v in res["clean"].values()]
    print(f"scorer on clean renders: {np.mean(clean):.3f} (min {min(clean):.2f}); after the VAE: {np.mean(rt):.3f} (min {min(rt):.2f})")
    grid = []

    def run(model, prompts, offset, label, check):
        ims = toy.generate(m, model, prompts, seeds(len(prompts), offset), args.steps, args.cfg)
        ok = float(np.mean([check(im) for im in ims]))
        res.setdefault("own" if label.startswith("own") else "fusion_tasks", {})[label] = {"rate": ok, **tally(ims)}
        print(f"{label}: {ok:.2f}  {tally(ims)}")
        grid.append(ims[:8])
        return ims

    n = args.n
    # 2. own prompts
    for s in W.SCENES:
        run("general", [W.general_prompt(s, i) for i in range(n)], 0, f"own general '{W.general_prompt(s)}' (scene {s} + generic)",
            lambda im, s=s: S.scene(im) == s and S.fine_object(im) == W.GENERIC)
    for v in W.VARIANTS:
        run("fine", [W.fine_prompt(v, i) for i in range(n)], 100, f"own fine '{W.fine_prompt(v)}' (variant {v})",
            lambda im, v=v: S.fine_object(im) == v)
    run("dreambooth", [W.SKS_PROMPT] * n, 200, f"own dreambooth '{W.SKS_PROMPT}' (sks)", lambda im: S.fine_object(im) == W.SKS)
    run("dreambooth", [W.sks_scene_prompt(W.DREAMBOOTH_SCENE)] * n, 300,
        f"own dreambooth '{W.sks_scene_prompt(W.DREAMBOOTH_SCENE)}' (forest + sks)",
        lambda im: S.scene(im) == W.DREAMBOOTH_SCENE and S.fine_object(im) == W.SKS)
    for s in W.SCENES:  # the DreamBooth model still knows the scenes with the class word
        run("dreambooth", [W.general_prompt(s)] * (n // 2), 400, f"own dreambooth '{W.general_prompt(s)}' (scene {s} + generic)",
            lambda im, s=s: S.scene(im) == s and S.fine_object(im) == W.GENERIC)

    # 3. single models on the fusion tasks
    per = max(4, n // 4)
    agg = collections.defaultdict(list)
    for task in S.fine_tasks():
        for model, prompt in (("general", task.combined_prompt), ("fine", task.combined_prompt), ("fine", task.expert_prompt)):
            ims = toy.generate(m, model, [prompt] * per, seeds(per, 500), args.steps, args.cfg)
            agg[(model, "combined" if prompt == task.combined_prompt else "expert")].append(
                [S.score(ims, task)["success"], S.score(ims, task)["scene"], S.score(ims, task)["object"]]
                + [float(np.mean([S.fine_object(im) == W.GENERIC for im in ims]))])
    for task in S.dreambooth_tasks():
        ims = toy.generate(m, "dreambooth", [task.general_prompt] * n, seeds(n, 600), args.steps, args.cfg)
        sc = S.score(ims, task)
        forest = float(np.mean([S.scene(im) == W.DREAMBOOTH_SCENE for im in ims]))
        res.setdefault("fusion_tasks", {})[f"dreambooth alone '{task.general_prompt}'"] = {
            "success": sc["success"], "scene_right": sc["scene"], "sks": sc["object"], "forest": forest, **tally(ims)}
        print(f"dreambooth alone '{task.general_prompt}': success {sc['success']:.2f} scene {sc['scene']:.2f} "
              f"sks {sc['object']:.2f} forest {forest:.2f}")
        grid.append(ims[:8])
    for (model, kind), rows in agg.items():
        a = np.mean(rows, axis=0)
        key = f"{model} alone, {'combined prompt' if kind == 'combined' else 'its variant prompt'} (20 fine tasks x {per})"
        res.setdefault("fusion_tasks", {})[key] = {"success": float(a[0]), "scene_right": float(a[1]),
                                                   "variant_right": float(a[2]), "generic_ball": float(a[3])}
        print(f"{key}: success {a[0]:.2f} scene {a[1]:.2f} variant {a[2]:.2f} generic {a[3]:.2f}")
    res["seconds"] = round(time.monotonic() - t0, 1)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    if args.save_grid:
        from PIL import Image
        rows = [np.concatenate(list(g) + [np.zeros_like(g[0])] * (8 - len(g)), 1) for g in grid]
        Image.fromarray(np.concatenate(rows, 0)).save(args.save_grid)
    print(f"validate: {res['seconds']} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
