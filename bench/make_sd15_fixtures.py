"""Random checkpoints with the full SD1.5 UNet architecture, for the WebUI benchmarks.

Reuses tests/webui/make_fixtures.py (by import, nothing copied): the same tokenizer, the
same ldm classes, the same zero re-randomisation and calibration; only the sizes change:

* UNet: SD1.5's own (model_channels 320, channel_mult [1, 2, 4, 4], 2 res-blocks per
  level, attention at 4/2/1, 8 heads, context_dim 768): 859.5 M parameters;
* text encoder: a transformers CLIPTextModel with hidden size 768 (what the UNet's
  cross-attention needs), 1 layer, 12 heads, intermediate size 256;
* VAE: the tiny one of the test bed (8x downsampling, 4 latent channels).

Run it with the WebUI's Python (bench/webui_bench.py does this for you, once)::

    ~/stable-diffusion-webui/venv/bin/python bench/make_sd15_fixtures.py --out DIR

It writes DIR/checkpoints/bench-sd15-{a,b,c}.safetensors (+ .yaml; weights in fp16,
about 1.8 GB each), DIR/clip-768/ and DIR/manifest.json.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests", "webui"))

import make_fixtures as mf  # noqa: E402 - the test bed's generator, found through the path above

VERSION = 1  # bump when the output changes (part of the cache key)
MODELS = [("bench-sd15-a", 11, "eps", "sd1"), ("bench-sd15-b", 22, "eps", "sd1"), ("bench-sd15-c", 33, "eps", "sd1")]
SD15_UNET = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
    "num_heads": 8, "use_spatial_transformer": True, "transformer_depth": 1,
    "context_dim": 768, "use_checkpoint": False, "legacy": False,
}


def configure() -> None:
    """Point the test bed's generator at the SD1.5 sizes (module globals it reads at call time)."""
    mf.CLIP_HIDDEN, mf.CLIP_LAYERS, mf.CLIP_HEADS, mf.CLIP_INTERMEDIATE = 768, 1, 12, 256
    base = mf.model_config

    def model_config(name, parameterization, clip_dir):
        cfg = base(name, parameterization, clip_dir)
        cfg["model"]["params"]["unet_config"]["params"] = dict(SD15_UNET)
        return cfg

    mf.model_config = model_config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--webui-dir", default=mf.webui_dir())
    args = ap.parse_args(argv)
    mf.setup_imports(os.path.abspath(args.webui_dir))
    configure()
    import torch
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    manifest = {"version": VERSION, "unet": SD15_UNET,
                "clip": {"hidden_size": 768, "layers": 1, "heads": 12, "intermediate": 256}}
    mf.write_set(args.out, "clip-768", MODELS, manifest, log=lambda line: print(f"make_sd15_fixtures: {line}", flush=True))
    print(f"make_sd15_fixtures: wrote {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
