"""Write the WebUI Forge test bed's checkpoints: full-architecture SD1.5 (and, on request, SDXL)
checkpoints with random weights.

Forge recognises a checkpoint by its tensors (``huggingface_guess``) and builds every component
from the Hugging Face configs it ships in ``backend/huggingface/``, so the A1111 test bed's tiny
models (``make_fixtures.py``) are not recognised. These have the real shapes and random
weights. Run this file with Forge's own Python; it needs nothing else (no A1111 install, no
network)::

    ~/stable-diffusion-webui-forge/venv/bin/python tests/webui/make_forge_fixtures.py --out DIR [--sdxl]

``tests/webui/server.py`` runs it for the test bed (``ensure_fixtures(host="forge")``) and caches
the result under a key: a hash of this file, Forge's Python and the Forge install.

Each component is built from Forge's own classes and shipped configs:

* UNet: ``backend.nn.unet.IntegratedUNet2DConditionModel`` from the unet config that Forge's
  detection (``huggingface_guess.detection.model_config_from_diffusers_unet``) derives from the
  shipped diffusers ``unet/config.json`` (read on the meta device: no memory). Its state dict is
  already in the LDM layout (``model.diffusion_model.*``).
* VAE: ``backend.nn.vae.IntegratedAutoencoderKL`` from the shipped ``vae/config.json``
  (``first_stage_model.*``). One VAE per family, shared by its checkpoints, so two models'
  images differ only by their UNets and text encoders.
* Text encoders: transformers ``CLIPTextModel`` (CLIP-L) and, for SDXL, also
  ``CLIPTextModelWithProjection`` (OpenCLIP bigG) from the shipped ``text_encoder*/config.json``,
  mapped to the checkpoint layout by huggingface_guess's ``process_clip_state_dict_for_saving``
  (``cond_stage_model.transformer.text_model.*``; SDXL: ``conditioner.embedders.0.transformer.*``
  and ``conditioner.embedders.1.model.*``).

As in make_fixtures.py: parameters initialised to exactly zero (norm biases, CLIP's linear biases)
get small random values (std 0.02), otherwise a random UNet predicts exactly 0 and a zero final
norm bias makes the "Original" emphasis divide 0 by 0; the UNet's last conv is scaled to unit
output std on a unit-noise input; the VAE posterior's log-variance is pinned at -30 and its mean
scaled to unit std after the scaling factor; the decoder's last conv is scaled so a typical
latent decodes to std 0.5. Weights are rounded to fp16 and written as fp16 safetensors (SD1's
DDPM schedule buffers in fp32), and each file is re-read with Forge's own
``backend.loader.split_state_dict`` and checked against the modules (same guess, every tensor).

``manifest.json`` gives each model its seeds, the unet config, the calibration factors, the
file's sha256 and ``weights_sha256``: per part (``unet``, ``text_encoder``, ``vae``) the digest
that the test-bed extension's ``main-weights`` route reports for the loaded model (Forge runs
them in fp32 on the CPU).

Deterministic: the same generator, torch and transformers give the same bytes (CPU,
``torch.use_deterministic_algorithms``, one thread, one safetensors metadata key).
Building the two SD1.5 checkpoints takes about 2 minutes on 2 cores and peaks at about 9.5 GB
of memory; SDXL (``--sdxl``, 6.9 GB on disk) about 2 more minutes and 16 GB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

RERANDOM_STD = 0.02
VAE_SEED = {"sd15": 4242, "sdxl": 4343}

# name: (family, UNet seed); the text encoders take seed + 1 (CLIP-L) and seed + 2 (CLIP-G).
MODELS = {
    "forge-sd15-a": ("sd15", 1001),
    "forge-sd15-b": ("sd15", 2002),
    "forge-sdxl-a": ("sdxl", 5005),
    "forge-sdxl-b": ("sdxl", 6006),
}
DEFAULT_MODELS = ("forge-sd15-a", "forge-sd15-b")
SDXL_MODELS = ("forge-sdxl-a",)
REPOS = {"sd15": "runwayml/stable-diffusion-v1-5", "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}
GUESS_CLASS = {"sd15": "SD15", "sdxl": "SDXL"}


def forge_dir(arg: str | None) -> str:
    return os.path.abspath(os.path.expanduser(
        arg or os.environ.get("MAGICFUSION_FORGE_DIR") or "~/stable-diffusion-webui-forge"))


def setup_imports(root: str) -> None:
    """Make Forge's backend and huggingface_guess importable, as modules/paths.py does."""
    guess = os.path.join(root, "repositories", "huggingface_guess")
    for path, what in ((os.path.join(root, "backend", "nn", "unet.py"), "Forge's backend"),
                       (os.path.join(guess, "huggingface_guess", "detection.py"), "huggingface_guess")):
        if not os.path.isfile(path):
            raise SystemExit(f"make_forge_fixtures: {what} not found at {path} (run tests/webui/setup_webui.py --host forge)")
    for p in (os.path.join(root, "packages_3rdparty"), guess, root):
        if p not in sys.path:
            sys.path.insert(0, p)
    # offline, and nothing written to the user's Hugging Face cache
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="mf-forge-fixtures-hf-"))
    # backend.args and modules.cmd_args (pulled in by backend.loader) parse sys.argv: let them
    # see a CPU-only Forge command line, not this script's arguments (parsed already).
    sys.argv[:] = sys.argv[:1] + ["--always-cpu"]
    import backend.args  # noqa: F401
    import backend.memory_management  # noqa: F401


# --------------------------------------------------------------------------- helpers

def _round_to_fp16(module) -> None:
    import torch
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                p.copy_(p.half().float())


def _randomise_zeros(module, gen) -> int:
    """Give parameters initialised to exactly zero small random values; return how many."""
    import torch
    n = 0
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            if p.is_floating_point() and p.numel() > 1 and torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=gen) * RERANDOM_STD)
                n += 1
    return n


def tensor_digest(tensors) -> str:
    """The test-bed extension's weight digest: sha256 over the sorted sha256s of the tensors, each
    over ``"<dtype>|<shape>|"`` and its bytes (key names left out). Float tensors are taken in
    fp32, as Forge holds them on the CPU."""
    import torch
    digests = []
    for t in tensors:
        t = t.detach()
        if t.is_floating_point():
            t = t.float()
        t = t.contiguous()
        h = hashlib.sha256(f"{str(t.dtype).removeprefix('torch.')}|{','.join(map(str, t.shape))}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        digests.append(h.hexdigest())
    return hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()


def _guess_unet_config(repo_path: str):
    """The model config Forge's detection derives from the shipped diffusers unet config."""
    import torch
    from diffusers import UNet2DConditionModel
    from huggingface_guess import detection
    config = UNet2DConditionModel.load_config(os.path.join(repo_path, "unet"))
    with torch.device("meta"):
        skeleton = UNet2DConditionModel.from_config(config)
    guess = detection.model_config_from_diffusers_unet(skeleton.state_dict())
    assert guess is not None, "huggingface_guess did not recognise the shipped unet config"
    # The diffusers-side detection adds dtype: None, which the LDM-side one (what Forge's loader
    # uses) does not; verify() checks that the two agree on the written file.
    guess.unet_config.pop("dtype", None)
    return guess


def ldm_schedule(timesteps=1000, linear_start=0.00085, linear_end=0.012) -> dict:
    """The DDPM schedule buffers an original SD1 checkpoint carries (fp32)."""
    import numpy as np
    import torch
    betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)

    def f(a):
        return torch.tensor(a, dtype=torch.float32)

    return {
        "betas": f(betas), "alphas_cumprod": f(ac), "alphas_cumprod_prev": f(ac_prev),
        "sqrt_alphas_cumprod": f(np.sqrt(ac)), "sqrt_one_minus_alphas_cumprod": f(np.sqrt(1.0 - ac)),
        "log_one_minus_alphas_cumprod": f(np.log(1.0 - ac)), "sqrt_recip_alphas_cumprod": f(np.sqrt(1.0 / ac)),
        "sqrt_recipm1_alphas_cumprod": f(np.sqrt(1.0 / ac - 1)), "posterior_variance": f(post_var),
        "posterior_log_variance_clipped": f(np.log(np.maximum(post_var, 1e-20))),
        "posterior_mean_coef1": f(betas * np.sqrt(ac_prev) / (1.0 - ac)),
        "posterior_mean_coef2": f((1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)),
    }


# --------------------------------------------------------------------------- components

def build_unet(guess, seed: int):
    """The UNet with random weights, calibrated to unit output std (fp16)."""
    import torch
    from backend.nn.unet import IntegratedUNet2DConditionModel
    context_dim = guess.unet_config["context_dim"]
    torch.manual_seed(seed)
    unet = IntegratedUNet2DConditionModel.from_config(guess.unet_config).eval()
    gen = torch.Generator().manual_seed(seed)
    zeros = _randomise_zeros(unet, gen)
    x = torch.randn((2, 4, 8, 8), generator=gen)
    t = torch.tensor([250.0, 750.0])
    ctx = torch.randn((2, 77, context_dim), generator=gen)
    extra = {}
    if unet.num_classes is not None:
        extra["y"] = torch.randn((2, guess.unet_config["adm_in_channels"]), generator=gen)
    with torch.no_grad():
        out = unet(x, t, context=ctx, transformer_options={}, **extra)
        factor = 1.0 / float(out.std())
        last = unet.out[-1]
        last.weight.mul_(factor)
        last.bias.mul_(factor)
        # how much the prompt matters: a second context on the same x and t
        ctx2 = torch.randn((2, 77, context_dim), generator=gen)
        a = unet(x, t, context=ctx, transformer_options={}, **extra)
        b = unet(x, t, context=ctx2, transformer_options={}, **extra)
        sensitivity = float((a - b).std() / a.std())
    _round_to_fp16(unet)
    unet.half()  # fp16 from here on: halves the peak memory (SDXL's fp32 UNet alone is 10 GB)
    return unet, {"rerandomised_zero_tensors": zeros, "unet_out_scale": round(factor, 6),
                  "cond_sensitivity": round(sensitivity, 6)}


def build_vae(repo_path: str, seed: int):
    import torch
    from backend.nn.vae import IntegratedAutoencoderKL
    config = IntegratedAutoencoderKL.load_config(os.path.join(repo_path, "vae"))
    torch.manual_seed(seed)
    vae = IntegratedAutoencoderKL.from_config(config).eval()
    gen = torch.Generator().manual_seed(seed)
    zeros = _randomise_zeros(vae, gen)
    sf = float(vae.scaling_factor)
    zc = vae.quant_conv.out_channels // 2
    img = torch.rand((2, 3, 64, 64), generator=gen) * 2 - 1
    with torch.no_grad():
        vae.quant_conv.weight[zc:] = 0  # the posterior's log-variance: -30, as small as the VAE allows
        vae.quant_conv.bias[zc:] = -30.0
        mean = vae.quant_conv(vae.encoder(img))[:, :zc]
        k = (1.0 / sf) / float(mean.std())
        vae.quant_conv.weight[:zc] *= k
        vae.quant_conv.bias[:zc] = vae.quant_conv.bias[:zc] * k - mean.mean(dim=(0, 2, 3)) * k
        z = torch.randn((1, 4, 8, 8), generator=gen) / sf
        out = vae.decode(z)
        factor = 0.5 / float(out.std())
        vae.decoder.conv_out.weight.mul_(factor)
        vae.decoder.conv_out.bias.mul_(factor)
        out = vae.decode(z)
        vae.decoder.conv_out.bias.sub_(out.mean(dim=(0, 2, 3)))
    _round_to_fp16(vae)
    vae.half()
    return vae, {"vae_seed": seed, "vae_rerandomised_zero_tensors": zeros, "vae_out_scale": round(factor, 6)}


def build_text_encoder(repo_path: str, component: str, seed: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    config = CLIPTextConfig.from_pretrained(os.path.join(repo_path, component))
    cls = CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in (config.architectures or []) else CLIPTextModel
    torch.manual_seed(seed)
    model = cls(config).eval()
    zeros = _randomise_zeros(model, torch.Generator().manual_seed(seed))
    _round_to_fp16(model)
    model.half()
    return model, zeros


# --------------------------------------------------------------------------- checkpoints

def checkpoint_state_dict(family: str, seed: int, root: str, vae) -> tuple[dict, dict, dict]:
    """(state dict in the original checkpoint layout, manifest info, {component: module})."""
    import torch
    repo_path = os.path.join(root, "backend", "huggingface", REPOS[family])
    guess = _guess_unet_config(repo_path)
    assert type(guess).__name__ == GUESS_CLASS[family], type(guess).__name__
    info = {"guess": type(guess).__name__, "unet_config": guess.unet_config}
    unet, unet_info = build_unet(guess, seed)
    info.update(unet_info)
    sd = dict(guess.process_unet_state_dict_for_saving(dict(unet.state_dict())))
    sd.update(guess.process_vae_state_dict_for_saving(dict(vae.state_dict())))
    modules = {"unet": unet, "vae": vae}
    clip = {}
    te, te_zeros = build_text_encoder(repo_path, "text_encoder", seed + 1)
    clip.update({"clip_l.transformer." + k: v for k, v in te.state_dict().items()})
    modules["text_encoder"] = te
    if family == "sdxl":
        te2, z2 = build_text_encoder(repo_path, "text_encoder_2", seed + 2)
        te_zeros += z2
        clip.update({"clip_g.transformer." + k: v for k, v in te2.state_dict().items()})
        modules["text_encoder_2"] = te2
    clip.pop("clip_l.transformer.text_model.embeddings.position_ids", None)
    sd.update(guess.process_clip_state_dict_for_saving(clip))
    info["text_encoder_rerandomised_zero_tensors"] = te_zeros
    out = {}
    for k, v in sd.items():
        v = v.detach()
        if v.is_floating_point():
            v = v.half()  # the modules are fp16 already: no copy
        out[k] = v.contiguous()
    if family == "sd15":
        # an original SD1 checkpoint's schedule buffers (fp32; Forge ignores them)
        out.update({"model." + k: v for k, v in ldm_schedule().items()})
    else:
        # sgm's DiscreteDenoiser keeps its sigmas as a buffer
        ac = ldm_schedule()["alphas_cumprod"]
        out["denoiser.sigmas"] = ((1 - ac) / ac) ** 0.5
    bad = [k for k, v in out.items() if v.is_floating_point() and not torch.isfinite(v.float()).all()]
    assert not bad, bad
    return out, info, modules


def weight_digests(modules: dict) -> dict:
    """Per part, the digest the test bed's main-weights route reports for the model loaded in
    Forge: ``unet``, ``vae``, and ``text_encoder`` over every text encoder's tensors (SDXL: CLIP-L
    and CLIP-G together, as Forge keeps them in one module)."""
    te = [t for name in ("text_encoder", "text_encoder_2") if name in modules
          for t in modules[name].state_dict().values()]
    return {"unet": tensor_digest(modules["unet"].state_dict().values()), "text_encoder": tensor_digest(te),
            "vae": tensor_digest(modules["vae"].state_dict().values())}


def verify(path: str, family: str, modules: dict, expected_unet_config: dict) -> dict:
    """Re-read the file with Forge's own splitter and compare every component's tensors."""
    import torch
    from backend.loader import split_state_dict
    state_dicts, guess = split_state_dict(path)
    assert type(guess).__name__ == GUESS_CLASS[family], type(guess).__name__
    assert guess.unet_config == expected_unet_config, (guess.unet_config, expected_unet_config)
    checked = {}
    for component, module in modules.items():
        want = module.state_dict()
        got = state_dicts[component]
        if component.startswith("text_encoder"):
            # position_ids is a buffer, not a weight (SDXL checkpoints carry CLIP-L's): not compared
            got = {k.removeprefix("transformer."): v for k, v in got.items() if not k.endswith("embeddings.position_ids")}
            want = {k: v for k, v in want.items() if k != "text_model.embeddings.position_ids"}
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        assert not missing, (component, missing[:5])
        assert not extra, (component, extra[:5])
        for k, v in want.items():
            assert got[k].shape == v.shape, (component, k, got[k].shape, v.shape)
            assert torch.equal(got[k].float(), v.float().half().float()), (component, k)
        checked[component] = len(want)
    return {"forge_guess": type(guess).__name__, "verified_tensors": checked}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_set(out: str, names: list[str], root: str, log=print, check: bool = True) -> dict:
    """Write ``checkpoints/<name>.safetensors`` for each name and ``manifest.json`` into ``out``.

    The set is built in a sibling temp dir and renamed into place, so ``out`` is either the old
    set or the new one. Checkpoints of other names already in ``out`` are kept (hard-linked into
    the new set), so SDXL can be added to an SD1.5 set later."""
    import torch
    from safetensors.torch import save_file
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".fixtures-tmp-", dir=os.path.dirname(out))
    try:
        ckdir = os.path.join(tmp, "checkpoints")
        os.makedirs(ckdir)
        old = {}
        if os.path.isfile(os.path.join(out, "manifest.json")):
            with open(os.path.join(out, "manifest.json")) as f:
                old = json.load(f)
        entries = []
        for entry in old.get("models", []):
            src = os.path.join(out, "checkpoints", entry["name"] + ".safetensors")
            if entry["name"] not in names and os.path.isfile(src):
                os.link(src, os.path.join(ckdir, entry["name"] + ".safetensors"))
                entries.append(entry)
        vaes = {}
        for name in names:
            family, seed = MODELS[name]
            t0 = time.monotonic()
            if family not in vaes:
                vaes[family] = build_vae(os.path.join(root, "backend", "huggingface", REPOS[family]), VAE_SEED[family])
            vae, vae_info = vaes[family]
            sd, info, modules = checkpoint_state_dict(family, seed, root, vae)
            path = os.path.join(ckdir, name + ".safetensors")
            # One metadata key: safetensors writes the metadata map in hash order, so with two
            # keys the header bytes would differ between runs (the tensor data never does).
            save_file(sd, path, metadata={"magicfusion_fixture": name})
            n_tensors = len(sd)
            del sd
            t_write = time.monotonic() - t0
            if check:
                info.update(verify(path, family, modules, info["unet_config"]))
            info["weights_sha256"] = weight_digests(modules)
            del modules
            info.update(vae_info)
            info.update({"name": name, "family": family, "seed": seed, "tensors": n_tensors,
                         "bytes": os.path.getsize(path), "sha256": _sha256(path),
                         "seconds_build_and_write": round(t_write, 1),
                         "seconds_total": round(time.monotonic() - t0, 1)})
            entries.append(info)
            log(f"{name}: {info['seconds_total']:.0f} s, {info['bytes'] / 1e9:.2f} GB, "
                f"unet x{info['unet_out_scale']}, cond sensitivity {info['cond_sensitivity']}")
        manifest = {
            "generator": os.path.basename(__file__), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "forge_dir": root,
            "checkpoint_dir": os.path.join(out, "checkpoints"),
            "models": sorted(entries, key=lambda e: e["name"]),
        }
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--out", required=True, help="output directory (checkpoints/ and manifest.json)")
    ap.add_argument("--forge-dir", default=None,
                    help="the Forge install (default: $MAGICFUSION_FORGE_DIR or ~/stable-diffusion-webui-forge)")
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--sdxl", action="store_true",
                    help=f"also write {', '.join(SDXL_MODELS)} (6.9 GB; about 16 GB of memory while building)")
    ap.add_argument("--no-verify", action="store_true", help="skip re-reading each file with Forge's splitter")
    args = ap.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    if args.sdxl:
        names += [n for n in SDXL_MODELS if n not in names]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"make_forge_fixtures: unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    root = forge_dir(args.forge_dir)
    setup_imports(root)
    import torch
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    t0 = time.monotonic()
    manifest = write_set(args.out, names, root, check=not args.no_verify)
    total = sum(e["bytes"] for e in manifest["models"])
    print(f"make_forge_fixtures: {len(manifest['models'])} checkpoints in {manifest['checkpoint_dir']} "
          f"({total / 1e9:.2f} GB) in {time.monotonic() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
