"""Check the assembled checkpoints against the original ldm code (what A1111 builds).

    ~/stable-diffusion-webui/venv/bin/python bench/quality/check_ldm.py --out DIR \
        [--ldm-repo ~/stable-diffusion-webui/repositories/stable-diffusion-stability-ai]

For each toy checkpoint it builds the yaml's ``LatentDiffusion`` with ``ldm`` and loads the
checkpoint with ``load_state_dict(strict=True)``, then compares, on fixed inputs, the ldm
UNet with the diffusers UNet that toy.py makes from the committed weights, the ldm VAE
decoder with diffusers', and ``get_learned_conditioning`` with textenc's A1111-style
conditioning. Without diffusers in this Python, pass ``--reference FILE`` written by
``check_ldm.py --write-reference FILE`` in a Python that has diffusers.
It runs assemble.py into DIR first when DIR has no checkpoints.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import assemble  # noqa: E402

PROMPTS = ["", "a photo of a ball on the beach", "a photo of a red ball", "a photo of sks ball in the snow"]
TIMESTEPS = [1, 261, 501, 981]


def inputs():
    g = torch.Generator().manual_seed(123)
    return torch.randn(4, 4, 16, 16, generator=g), torch.tensor(TIMESTEPS)


def reference(weights: str = assemble.WEIGHTS) -> dict:
    """diffusers-side outputs (toy.py's models) on the fixed inputs."""
    import toy
    m = toy.load_models(weights)
    x, t = inputs()
    ctx = m.encode(PROMPTS)
    ref = {"ctx": ctx}
    with torch.no_grad():
        for name, unet in m.unets.items():
            ref[f"unet-{name}"] = unet(x, t, encoder_hidden_states=ctx).sample
        ref["vae-decode"] = m.vae.decode(x / m.scale_factor).sample
    return ref


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="assembled folder (assemble.py --out)")
    ap.add_argument("--ldm-repo", default=os.path.expanduser("~/stable-diffusion-webui/repositories/stable-diffusion-stability-ai"))
    ap.add_argument("--reference", help="outputs written by --write-reference (when this Python has no diffusers)")
    ap.add_argument("--write-reference", help="write the diffusers-side outputs to FILE and exit")
    ap.add_argument("--weights", default=assemble.WEIGHTS)
    args = ap.parse_args(argv)
    if args.write_reference:
        torch.save(reference(args.weights), args.write_reference)
        return 0
    if not args.out:
        ap.error("--out is required")
    ck_dir = os.path.join(args.out, "checkpoints")
    if not os.path.isdir(ck_dir):
        assemble.assemble(args.out, args.weights)
    ref = torch.load(args.reference) if args.reference else reference(args.weights)
    sys.path.insert(0, os.path.abspath(args.ldm_repo))
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf
    from safetensors.torch import load_file
    x, t = inputs()
    worst = 0.0
    for name, model_name in assemble.CHECKPOINTS.items():
        cfg = OmegaConf.load(os.path.join(ck_dir, name + ".yaml"))
        model = instantiate_from_config(cfg.model).eval()
        sd = {k: v.float() if v.is_floating_point() else v for k, v in load_file(os.path.join(ck_dir, name + ".safetensors")).items()}
        model.load_state_dict(sd, strict=True)
        model.cond_stage_model.device = "cpu"  # FrozenCLIPEmbedder defaults to cuda
        with torch.no_grad():
            ctx = model.get_learned_conditioning(PROMPTS)
            eps = model.model.diffusion_model(x, t, context=ctx)
            dec = model.decode_first_stage(x)
        d_ctx = float((ctx - ref["ctx"]).abs().max())
        d_unet = float((eps - ref[f"unet-{model_name}"]).abs().max())
        d_vae = float((dec - ref["vae-decode"]).abs().max())
        worst = max(worst, d_ctx, d_unet, d_vae)
        print(f"{name}: strict load ok; max |ldm - diffusers|: conditioning {d_ctx:.2e}, UNet eps {d_unet:.2e} "
              f"(eps std {float(eps.std()):.2f}), VAE decode {d_vae:.2e}; scale_factor {model.scale_factor}")
    ok = worst < 1e-3
    print("check_ldm:", "OK" if ok else "MISMATCH", f"(worst {worst:.2e})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
