#!/usr/bin/env python3
"""MagicFusion side by side: general alone | expert alone | fused | mask, from a running WebUI.

    python tools/compare.py --url http://127.0.0.1:7860 --expert anything-v3 \\
        --prompt "a lion with a crown on his head" --seed 6854 --out lion.png

Talks to the WebUI's HTTP API (start it with --api); needs only Python and Pillow. All
three pictures come from the same seed, prompt and settings: "expert alone" is the expert
model run on the main model's latents with no fusion window (what the expert contributes),
"fused" is MagicFusion, and "mask" shows where the expert won (white) at the last fused
step. The PNG carries the fused image's infotext plus a line describing the grid.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import urllib.error
import urllib.request

from PIL import Image, ImageDraw, PngImagePlugin

LABELS = ("general alone", "expert alone", "MagicFusion", "mask (white = expert)")


class ApiError(RuntimeError):
    pass


def post(url: str, path: str, payload: dict, auth: str | None, timeout: float) -> dict:
    request = urllib.request.Request(url.rstrip("/") + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        try:
            body = json.loads(body).get("errors") or body
        except ValueError:
            pass
        raise ApiError(f"{path} answered {e.code}: {body}") from None
    except urllib.error.URLError as e:
        raise ApiError(f"cannot reach the WebUI at {url}: {e.reason}") from None


def decode(b64: str) -> Image.Image:
    with Image.open(io.BytesIO(base64.b64decode(b64.split(",", 1)[-1]))) as im:
        return im.convert("RGB")


def build_payloads(args) -> dict[str, dict]:
    base = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "seed": args.seed, "steps": args.steps,
            "cfg_scale": args.cfg_scale, "width": args.width, "height": args.height, "sampler_name": args.sampler,
            "batch_size": 1, "n_iter": 1, "save_images": False}
    if args.main:
        base["override_settings"] = {"sd_model_checkpoint": args.main}
        base["override_settings_restore_afterwards"] = True
    fusion = {"enabled": True, "expert_checkpoint": args.expert, "expert_prompt": args.expert_prompt,
              "k_general": args.k_general, "k_expert": args.k_expert, "fusion_start": args.start, "fusion_end": args.end,
              "outside_window": args.outside}

    def with_fusion(**fields):
        return {**base, "alwayson_scripts": {"MagicFusion": {"args": [{**fusion, **fields}]}}}

    return {
        "general": base,
        "expert": with_fusion(fusion_start=0.0, fusion_end=0.0, outside_window="expert"),
        "fused": with_fusion(show_mask=True),
    }


def make_grid(tiles: list[Image.Image], labels=LABELS) -> Image.Image:
    width, height = tiles[0].size
    band = max(14, height // 12)
    grid = Image.new("RGB", (width * len(tiles), height + band), "white")
    draw = ImageDraw.Draw(grid)
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        grid.paste(tile.resize((width, height), Image.NEAREST), (i * width, band))
        draw.text((i * width + 3, 1), label, fill="black")
    return grid


def compare(args) -> tuple[Image.Image, str]:
    payloads = build_payloads(args)
    results = {name: post(args.url, "/sdapi/v1/txt2img", body, args.auth, args.timeout) for name, body in payloads.items()}
    fused = results["fused"]
    if len(fused["images"]) < 2:
        raise ApiError("the fused generation returned no mask: is the MagicFusion extension installed?")
    info = json.loads(fused["info"]) if isinstance(fused["info"], str) else fused["info"]
    infotext = info["infotexts"][0]
    if "MagicFusion expert" not in infotext:
        raise ApiError("the WebUI did not apply MagicFusion (no MagicFusion keys in the infotext)")
    tiles = [decode(results["general"]["images"][0]), decode(results["expert"]["images"][0]),
             decode(fused["images"][0]), decode(fused["images"][1])]
    text = infotext + "\nMagicFusion comparison: " + " | ".join(LABELS)
    return make_grid(tiles), text


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:7860", help="the WebUI's address (started with --api)")
    ap.add_argument("--auth", default=None, help="user:password, for a WebUI started with --api-auth")
    ap.add_argument("--main", default=None, help="the general checkpoint (default: the WebUI's current one)")
    ap.add_argument("--expert", required=True, help="the expert checkpoint (an installed checkpoint's name, title or hash)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--expert-prompt", default="", help="the expert's prompt (default: the main prompt)")
    ap.add_argument("--negative-prompt", default="")
    ap.add_argument("--seed", type=int, default=6854)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cfg-scale", type=float, default=7.0)
    ap.add_argument("--sampler", default="DPM++ 2M")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--k-general", type=float, default=1.0)
    ap.add_argument("--k-expert", type=float, default=1.0)
    ap.add_argument("--start", type=float, default=0.0, help="fusion window start (fraction of the steps)")
    ap.add_argument("--end", type=float, default=1.0, help="fusion window end (fraction of the steps)")
    ap.add_argument("--outside", choices=("general", "expert"), default="general", help="model used alone outside the window")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--out", default="magicfusion-compare.png")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        grid, text = compare(args)
    except ApiError as e:
        print(f"MagicFusion compare: {e}", file=sys.stderr)
        return 1
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", text)
    grid.save(args.out, pnginfo=meta)
    print(f"wrote {args.out} ({grid.size[0]}x{grid.size[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
