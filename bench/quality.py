"""Fusion quality as a success rate on the trained toy world (issue #10).

Each method makes the same pictures (fixed tasks, prompts and seeds), and the rule-based scorer
(bench/quality/scorer.py) says per picture whether the scene AND the fine object (or the
DreamBooth subject) are right. Two ways to run the very same methods:

    python bench/quality.py harness [--n 160] [--sampler ddim,euler_a]   # the fusion step in a plain
                                                                          # sampling loop (fast)
    python bench/quality.py webui   [--n 160] [--sampler "DDIM,Euler a"]  # the real WebUI, through its API

Methods: the general model alone and the expert alone (each with the one prompt that asks for
both), the 0.5/0.5 average of the two guided predictions, the official SNB (the paper's code:
k 1/1, blur 4, the general model's uncond as the saliency reference, fusion at every step), and
the stable method with its defaults (METHODS below). Results go to bench/results/quality_<mode>.json (per task, per
method, per sampler), picture grids to bench/results/quality/ (one column per task, its first seed;
one row per method, then the fused methods' final masks, white = expert).

Tasks: "fine" (a general model that knows 4 scenes and a grey ball, an expert that knows 5
ball variants on a plain background: the scene from one, the variant from the other) and
"dreambooth" (the general model with the DreamBooth expert "sks ball", trained in the forest
only, asked for the other three scenes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "quality"))
sys.path.insert(0, REPO)

import scorer  # noqa: E402

RESULTS = os.path.join(HERE, "results")
CFG = 7.0
STEPS = 25
EXPERT_OF = {"fine": "fine", "dreambooth": "dreambooth"}


@dataclass(frozen=True)
class Method:
    name: str
    single: str | None = None         # "general" / "expert": that model alone with the combined prompt
    fields: dict | None = None        # MagicFusion fields (the API's named form) for a fused method
    knobs: dict | None = None         # (harness only) attributes set on the fusion step, for research


OFFICIAL = {"method": "official", "k_general": 1.0, "k_expert": 1.0, "blur": 4, "saliency_baseline": "general"}
METHODS = [
    Method("general alone", single="general"),
    Method("expert alone", single="expert"),
    Method("average", fields={"method": "average"}),
    Method("official", fields=OFFICIAL),
    Method("stable", fields={"method": "stable"}),
]


def tasks(kind: str) -> list:
    return scorer.fine_tasks() if kind == "fine" else scorer.dreambooth_tasks()


def plan(kind: str, n: int) -> list[tuple]:
    """(task, seed) pairs, grouped by task (the WebUI makes a task's pictures in one batch): every
    task gets ceil(n / tasks) consecutive seeds from its own fixed start."""
    ts = tasks(kind)
    per = -(-n // len(ts))
    return [(t, 1000 + 100 * i + j) for i, t in enumerate(ts) for j in range(per)]


def groups(pairs, size: int):
    """Consecutive runs of pairs with one task, at most `size` long."""
    out, cur = [], []
    for pair in pairs:
        if cur and (pair[0] != cur[0][0] or len(cur) == size):
            out.append(cur)
            cur = []
        cur.append(pair)
    return out + ([cur] if cur else [])


# --------------------------------------------------------------------------- the unit harness

def harness_images(models, kind: str, method: Method, pairs, sampler: str, steps: int = STEPS, batch: int = 16):
    """Pictures of `method` for (task, seed) pairs, by the fusion step in toy.py's loops."""
    import torch
    import toy

    from lib_magicfusion.fusion import Prediction, SNBFusion
    from lib_magicfusion.params import FusionParams

    expert = EXPERT_OF[kind]
    out, masks = [], []
    for chunk in groups(pairs, batch):
        seeds = [s for _, s in chunk]
        x = toy.noise(seeds)
        if method.single:
            name = "general" if method.single == "general" else expert
            prompts = [t.combined_prompt for t, _ in chunk]
            cond, uncond = models.encode(prompts), models.encode([""] * len(prompts))
            unet = models.unets[name]
            eps_fn = None
        else:
            params = FusionParams.from_dict({"enabled": True, "expert_checkpoint": "toy", **method.fields})
            fusion = SNBFusion.from_params(params)
            fusion.record_masks = True
            for key, value in (method.knobs or {}).items():
                setattr(fusion, key, value)
            conds = [models.encode([t.general_prompt for t, _ in chunk]), models.encode([t.expert_prompt for t, _ in chunk])]
            uncond = models.encode([""] * len(chunk))
            unets = [models.unets["general"], models.unets[expert]]
            layout = [[(j, 1.0)] for j in range(len(chunk))]

            def eps_fn(xin, t, step, fusion=fusion, conds=conds, unets=unets, uncond=uncond, layout=layout):
                p = fusion.plan(step, steps)
                preds = [None, None]
                for m in p.models:
                    n = xin.shape[0]
                    tt = torch.full((2 * n,), t, dtype=torch.long)
                    o = unets[m](torch.cat([xin, xin]), tt, encoder_hidden_states=torch.cat([uncond, conds[m]])).sample
                    preds[m] = Prediction(o[n:], o[:n], layout, CFG)
                return fusion.combine(p, preds, "eps", step=step).denoised

            unet, cond = None, None
        if sampler == "ddim":
            lat = toy.ddim(unet, x, cond, uncond, models.alphas_cumprod, steps, CFG, eps_fn=eps_fn)
        else:
            lat = toy.euler_ancestral(unet, x, cond, uncond, models.alphas_cumprod, steps, CFG, seed=seeds[0], eps_fn=eps_fn)
        out.append(models.decode(lat))
        if not method.single and fusion.masks:
            masks.append(np.stack([fusion.masks[s][:, 0].numpy() for s in sorted(fusion.masks)], axis=1))  # (B, steps, h, w)
    return np.concatenate(out), (np.concatenate(masks) if masks else None)


# --------------------------------------------------------------------------- the real WebUI

SAMPLER_NAMES = {"ddim": "DDIM", "euler_a": "Euler a"}


def webui_images(client, kind: str, method: Method, pairs, sampler: str, steps: int = STEPS):
    """The same pictures through the real WebUI's txt2img API, one request per image."""
    import base64
    import io

    from PIL import Image
    expert = f"toy-{EXPERT_OF[kind]}"
    out, masks = [], []
    for chunk in groups(pairs, 8):
        task, seed = chunk[0]
        body = {"prompt": task.combined_prompt if method.single else task.general_prompt, "negative_prompt": "",
                "width": 128, "height": 128, "steps": steps, "cfg_scale": CFG, "seed": seed, "batch_size": len(chunk),
                "sampler_name": SAMPLER_NAMES[sampler], "save_images": False, "send_images": True}
        main = expert if method.single == "expert" else "toy-general"
        body["override_settings"] = {"sd_model_checkpoint": main}
        body["override_settings_restore_afterwards"] = False
        if not method.single:
            body["alwayson_scripts"] = {"MagicFusion": {"args": [{"enabled": True, "expert_checkpoint": expert,
                                                                  "expert_prompt": task.expert_prompt, "show_mask": True,
                                                                  **method.fields}]}}
        r = client.post("/sdapi/v1/txt2img", body)
        if r.status_code != 200:
            raise RuntimeError(f"{method.name}: {r.status_code} {r.text[:500]}")
        images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB")) for b in r.json()["images"]]
        out.extend(images[:len(chunk)])
        if not method.single:  # then a final mask and a strip per image
            masks.extend(im[..., 0] > 127 for im in images[len(chunk)::2][:len(chunk)])
    return np.stack(out), (np.stack(masks) if masks else None)


# --------------------------------------------------------------------------- scoring and pictures

def score(images, pairs) -> dict:
    ok = [scorer.success(img, t) for img, (t, _) in zip(images, pairs)]
    scene = [scorer.scene(img) == t.scene for img, (t, _) in zip(images, pairs)]
    obj = [scorer.fine_object(img) == t.obj for img, (t, _) in zip(images, pairs)]
    n = len(ok)
    return {"n": n, "success": sum(ok) / n, "scene": sum(scene) / n, "object": sum(obj) / n, "per_image": [int(v) for v in ok]}


def grid(rows: list[np.ndarray], path: str, pad: int = 2) -> None:
    """Rows of equally sized uint8 pictures (a list of (k, H, W, 3) arrays) into one PNG."""
    from PIL import Image
    h, w = rows[0].shape[1:3]
    k = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h + pad), k * (w + pad), 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            canvas[i * (h + pad):i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = im
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(canvas).save(path)


def mask_pictures(masks: np.ndarray, size: int = 128) -> np.ndarray:
    """(n, h, w) or (n, steps, h, w) model indices -> (n, size, size, 3): the last step, white = expert."""
    last = masks[:, -1] if masks.ndim == 4 else masks
    up = np.kron(last.astype(np.uint8), np.ones((size // last.shape[-2], size // last.shape[-1]), np.uint8))
    return np.repeat((up > 0)[..., None] * 255, 3, axis=-1).astype(np.uint8)


def examples(kind: str) -> list:
    """The tasks of the README's example figure: every scene once, each with another object."""
    ts = tasks(kind)
    if kind != "fine":
        return ts
    variants = list(dict.fromkeys(t.obj for t in ts))
    scenes = list(dict.fromkeys(t.scene for t in ts))
    return [next(t for t in ts if t.scene == sc and t.obj == variants[(i + 1) % len(variants)]) for i, sc in enumerate(scenes)]


def labelled(rows: list[np.ndarray], labels: list[str], path: str, pad: int = 2, head: int = 14) -> None:
    """A figure: one column per label (a method's pictures or masks), one row per example."""
    from PIL import Image, ImageDraw
    h, w = rows[0].shape[1:3]
    canvas = np.full((head + len(rows[0]) * (h + pad), len(rows) * (w + pad), 3), 255, np.uint8)
    for j, col in enumerate(rows):
        for i, im in enumerate(col):
            canvas[head + i * (h + pad):head + i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = im
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    for j, text in enumerate(labels):
        draw.text((j * (w + pad) + 3, 1), text, fill=(0, 0, 0))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path)


def picks(pairs) -> list[int]:
    """Indices of one picture per task (its first seed), for the grids."""
    seen, out = set(), []
    for i, (t, _) in enumerate(pairs):
        if t not in seen:
            seen.add(t)
            out.append(i)
    return out


def run(mode: str, kinds, samplers, n: int, methods=None, out_name: str | None = None, client=None) -> dict:
    methods = methods or METHODS
    result = {"mode": mode, "n_per_method": n, "steps": STEPS, "cfg": CFG, "machine": platform.processor() or platform.machine(),
              "tasks": {}}
    models = None
    if mode == "harness":
        import toy
        models = toy.load_models()
    for kind in kinds:
        pairs = plan(kind, n)
        shown = picks(pairs)
        first = {pairs[i][0]: i for i in shown}
        example = [first[t] for t in examples(kind) if t in first]
        result["tasks"][kind] = {}
        for sampler in samplers:
            rows, cols, per = {}, {}, {}
            for method in methods:
                t0 = time.monotonic()
                if mode == "harness":
                    images, masks = harness_images(models, kind, method, pairs, sampler)
                else:
                    images, masks = webui_images(client, kind, method, pairs, sampler)
                s = score(images, pairs)
                s["seconds"] = round(time.monotonic() - t0, 1)
                per[method.name] = s
                rows[method.name] = (images[shown], None if masks is None else mask_pictures(masks[shown]))
                cols[method.name] = (images[example], None if masks is None else mask_pictures(masks[example]))
                print(f"[{mode}] {kind:10s} {sampler:8s} {method.name:22s} success {s['success']:.3f} "
                      f"(scene {s['scene']:.2f}, object {s['object']:.2f}; n={s['n']}, {s['seconds']} s)", flush=True)
            result["tasks"][kind][sampler] = per
            # One column per task (its first seed), one row per method, then the fused methods' final masks.
            picture_rows = [imgs for imgs, _ in rows.values()] + [m for _, m in rows.values() if m is not None]
            grid(picture_rows, os.path.join(RESULTS, "quality", f"{mode}-{kind}-{sampler}.png"))
            # The README's figure: a few tasks (rows) by method, then the fused methods' masks (columns).
            masks_of = {f"{name} mask": m for name, (_, m) in cols.items() if m is not None and name != "average"}
            labelled([imgs for imgs, _ in cols.values()] + list(masks_of.values()), list(cols) + list(masks_of),
                     os.path.join(RESULTS, "quality", f"{mode}-{kind}-{sampler}-examples.png"))
    path = os.path.join(RESULTS, out_name or f"quality_{mode}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=("harness", "webui"))
    ap.add_argument("--n", type=int, default=160, help="pictures per method, task and sampler")
    ap.add_argument("--tasks", default="fine,dreambooth")
    ap.add_argument("--sampler", default="ddim,euler_a")
    ap.add_argument("--methods", default="", help="comma-separated method names (default: all)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the harness (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    methods = [m for m in METHODS if not args.methods or m.name in args.methods.split(",")]
    client = None
    if args.mode == "webui":
        client = _webui()
        with client:
            run("webui", args.tasks.split(","), args.sampler.split(","), args.n, methods, args.out, client.client)
        return 0
    run("harness", args.tasks.split(","), args.sampler.split(","), args.n, methods, args.out)
    return 0


class _webui:
    """The test bed's A1111 WebUI, with the toy checkpoints (assembled into the fixture cache)."""

    def __enter__(self):
        sys.path.insert(0, os.path.join(REPO, "tests", "webui"))
        import server
        webui_dir, python = server.find_install()
        self.server = server.WebUIServer(webui_dir, python, ckpt_dir=server.toy_world_checkpoints(python), testbed=False)
        self.server.start()
        self.client = server.WebUIClient(self.server)
        return self

    def __exit__(self, *exc):
        self.server.stop()


if __name__ == "__main__":
    sys.exit(main())
