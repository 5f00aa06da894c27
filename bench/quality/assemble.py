"""Write the toy models as full A1111 SD1 checkpoints from the committed weights.

    python bench/quality/assemble.py --out DIR

writes ``DIR/checkpoints/toy-general.safetensors``, ``toy-fine.safetensors`` and
``toy-dreambooth.safetensors``, each with its ``.yaml`` (an ldm LatentDiffusion that names
the CLIP folder's absolute path), and ``DIR/clip-toy/`` (a transformers CLIPTextModel
folder: config, weights and the CLIP BPE tokenizer). Pass ``DIR/checkpoints`` as the
WebUI's ``--ckpt-dir``; the CLIP folder is outside it on purpose (A1111 scans that folder
recursively).

It needs torch, safetensors and pyyaml only (it runs under the WebUI's venv); the tokenizer
files are rebuilt from CLIP's ``bpe_simple_vocab_16e6.txt.gz`` as the test bed does
(``tests/webui/make_fixtures.write_tokenizer``, which finds it in an installed open_clip or
clip package; or pass ``--bpe FILE``). The output is deterministic.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import arch  # noqa: E402
import ldm_convert  # noqa: E402
import textenc  # noqa: E402

WEIGHTS = os.path.join(HERE, "weights")
CHECKPOINTS = {"toy-general": "general", "toy-fine": "fine", "toy-dreambooth": "dreambooth"}
CLIP_DIR = "clip-toy"


def schedule_buffers() -> dict[str, torch.Tensor]:
    """The persistent buffers ldm's DDPM.register_schedule makes (linear betas, eps, v_posterior 0)."""
    betas = torch.linspace(arch.LINEAR_START ** 0.5, arch.LINEAR_END ** 0.5, arch.TIMESTEPS, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    b = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(), "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(), "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }
    return {k: v.float() for k, v in b.items()}


def load_meta(weights: str = WEIGHTS) -> dict:
    with open(os.path.join(weights, "meta.json")) as f:
        return json.load(f)


def checkpoint_state_dict(model: str, weights: str = WEIGHTS, position_ids: bool = True) -> dict[str, torch.Tensor]:
    """The full LatentDiffusion state dict of toy model ``model`` ("general", "fine",
    "dreambooth"): weights fp16, schedule buffers fp32, as SD1 checkpoints are."""
    from safetensors.torch import load_file
    sd = dict(schedule_buffers())
    sd.update(load_file(os.path.join(weights, f"unet-{model}.safetensors")))
    sd.update(load_file(os.path.join(weights, "vae.safetensors")))
    sd.update({"cond_stage_model.transformer." + k: v for k, v in load_file(os.path.join(weights, "clip.safetensors")).items()})
    if position_ids:  # a persistent buffer in the WebUI's transformers (4.30)
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(textenc.MAX_TOKENS)[None]
    return {k: v.contiguous() for k, v in sorted(sd.items())}


def write_clip(dst: str, weights: str = WEIGHTS, bpe: str | None = None) -> None:
    """A transformers CLIPTextModel folder with the committed weights and the real tokenizer."""
    from safetensors.torch import load_file, save_file
    sys.path.insert(0, os.path.join(REPO, "tests", "webui"))
    import make_fixtures
    os.makedirs(dst, exist_ok=True)
    if bpe:
        make_fixtures._find_bpe_file = lambda: bpe
    make_fixtures.write_tokenizer(dst)
    sd = {k: v.float().contiguous() for k, v in sorted(load_file(os.path.join(weights, "clip.safetensors")).items())}
    save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(textenc.CLIP_CONFIG, f, indent=1, sort_keys=True)


def write_yaml(path: str, scale_factor: float, clip_dir: str) -> None:
    import yaml
    with open(path, "w") as f:
        yaml.safe_dump(ldm_convert.original_config(scale_factor, clip_dir), f, sort_keys=False)


def assemble(out: str, weights: str = WEIGHTS, bpe: str | None = None, position_ids: bool = True) -> list[str]:
    """Write the checkpoints, yamls and CLIP folder into ``out``; returns the checkpoint paths."""
    from safetensors.torch import save_file
    out = os.path.abspath(out)
    meta = load_meta(weights)
    clip_dir = os.path.join(out, CLIP_DIR)
    write_clip(clip_dir, weights, bpe)
    ck_dir = os.path.join(out, "checkpoints")
    os.makedirs(ck_dir, exist_ok=True)
    paths = []
    for name, model in CHECKPOINTS.items():
        path = os.path.join(ck_dir, name + ".safetensors")
        # one metadata key only: safetensors writes several in no fixed order
        save_file(checkpoint_state_dict(model, weights, position_ids), path, metadata={"format": "pt"})
        write_yaml(os.path.join(ck_dir, name + ".yaml"), meta["scale_factor"], clip_dir)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--weights", default=WEIGHTS)
    ap.add_argument("--bpe", default=None, help="CLIP's bpe_simple_vocab_16e6.txt.gz (default: from open_clip or clip)")
    ap.add_argument("--no-position-ids", action="store_true",
                    help="leave out the text encoder's position_ids buffer (for transformers versions where it is not persistent)")
    args = ap.parse_args(argv)
    paths = assemble(args.out, args.weights, args.bpe, not args.no_position_ids)
    total = sum(os.path.getsize(p) for p in paths)
    print(f"assemble: {len(paths)} checkpoints ({total / 1e6:.1f} MB) in {os.path.join(os.path.abspath(args.out), 'checkpoints')}, "
          f"text encoder in {os.path.join(os.path.abspath(args.out), CLIP_DIR)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
