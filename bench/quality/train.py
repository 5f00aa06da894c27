"""Train the toy world's models from scratch: the VAE, the general UNet, the fine-grained
expert UNet and the DreamBooth fine-tune of the general UNet; write the committed weights.

    python bench/quality/train.py --work /tmp/toyworld --threads 1   # everything (~100 min on 2 shared cores)
    python bench/quality/train.py --work /tmp/toyworld --stages dreambooth,export

Needs torch, diffusers, transformers, safetensors, numpy and (for the tokenizer the test bed
rebuilds) open_clip_torch. Each stage saves its result under --work and is skipped when
that file exists (delete it, or name the stage in --stages, to redo it). ``export`` writes
``weights/`` (LDM key layout, fp16) and ``weights/meta.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import arch  # noqa: E402
import make_data  # noqa: E402
import world as W  # noqa: E402

STAGES = ("clip", "vae", "vae_mix", "latents", "general", "general_more", "fine", "fine_more", "dreambooth", "export")
SEED = 1234
STEPS = {"vae": 3600, "vae_full": 400, "vae_mix": 2000, "vae_mix_full": 200, "general": 1100, "general_more": 0,  # 0: skipped (the committed run has none)
         "fine": 600, "fine_more": 600, "dreambooth": 200}
BATCH = 48
DROPOUT = 0.1  # prompt dropout (-> "" ) for classifier-free guidance
LOG_EVERY = 50

T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------- text encoder

def stage_clip(work: str, weights: str) -> None:
    """The test bed's tiny CLIP (make_fixtures.write_text_encoder), its weights and the
    word table for textenc.Tokenizer; checks textenc against transformers."""
    sys.path.insert(0, os.path.join(REPO, "tests", "webui"))
    import make_fixtures
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel, CLIPTokenizer

    import textenc
    clip_dir = os.path.join(work, "clip-tiny")
    make_fixtures.write_text_encoder(clip_dir)
    sd = load_file(os.path.join(clip_dir, "model.safetensors"))
    # The classic layout ("text_model." prefix, as in SD checkpoints); transformers 5 saves without it.
    sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items() if "position_ids" not in k}
    assert all(torch.equal(v.half().float(), v.float()) for v in sd.values()), "CLIP weights are not fp16-exact"
    sd = {k: v.half().contiguous() for k, v in sorted(sd.items())}
    os.makedirs(weights, exist_ok=True)
    save_file(sd, os.path.join(weights, "clip.safetensors"), metadata={"format": "pt"})
    tok = CLIPTokenizer.from_pretrained(clip_dir)
    words = sorted(set(W.all_words()) | set(",.!"))
    table = {w: tok(w, add_special_tokens=False)["input_ids"] for w in words}
    with open(os.path.join(weights, "clip-words.json"), "w") as f:
        json.dump(table, f, indent=0, sort_keys=True)
    # textenc must reproduce the real tokenizer and CLIPTextModel.last_hidden_state.
    cond = textenc.Conditioner(os.path.join(weights, "clip.safetensors"), os.path.join(weights, "clip-words.json"))
    model = CLIPTextModel.from_pretrained(clip_dir).eval()
    prompts = sorted(set(make_data.build(os.path.join(work, "data.npz"))["prompt"].tolist())) + [
        "", W.combined_fine_prompt("red", "beach"), W.sks_scene_prompt("beach")]
    for p in prompts:
        ids = tok(p, add_special_tokens=False, truncation=False)["input_ids"]
        assert ids == cond.tokenizer(p), (p, ids)
    ids = textenc.token_ids(cond.tokenizer, prompts)
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
    err = float((ref - cond(prompts)).abs().max())
    log(f"clip: {len(table)} words; textenc vs transformers max |diff| {err:.2e}")
    assert err < 1e-4, err


# --------------------------------------------------------------------------- VAE

def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def stage_vae(work: str, data: dict, mix: bool = False) -> None:
    """``vae``: from scratch on the UNets' training images -> vae_base.pt. ``vae_mix``: that
    VAE fine-tuned with the VAE-only images (every background with every ball) mixed in, at a
    lower learning rate -> vae.pt (the VAE every model uses)."""
    from diffusers import AutoencoderKL
    torch.manual_seed(SEED + (5 if mix else 0))
    vae = AutoencoderKL(**arch.diffusers_vae_config())
    if mix:
        vae.load_state_dict(torch.load(os.path.join(work, "vae_base.pt"))["state"])
    log(f"vae{'_mix' if mix else ''}: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M parameters")
    images = data["images"]
    extra = np.nonzero(data["set"] == "vae")[0]
    base = np.nonzero(data["set"] != "vae")[0]
    rng = np.random.default_rng(SEED + (5 if mix else 0))
    lr = 5e-4 if mix else 1e-3
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    crops, full = (STEPS["vae_mix"], STEPS["vae_mix_full"]) if mix else (STEPS["vae"], STEPS["vae_full"])
    total = crops + full
    warm = 20 if mix else 100
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / total))))

    def pick(n):
        if not mix:
            return base[rng.integers(0, len(base), n)]
        k = n // 2  # half VAE-only images, half the UNets' images
        return np.concatenate([extra[rng.integers(0, len(extra), k)], base[rng.integers(0, len(base), n - k)]])

    run = []
    for step in range(total):
        if step < crops:  # 48 px crops on the latent grid (cheap), then whole images
            idx = pick(12)
            y0, x0 = rng.integers(0, 81, 2) // 8 * 8
            x = to_tensor(images[idx, y0:y0 + 48, x0:x0 + 48])
        else:
            x = to_tensor(images[pick(4)])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        l1 = (rec - x).abs().mean()
        l2 = (rec - x).pow(2).mean()
        grad = ((rec[..., 1:] - rec[..., :-1]) - (x[..., 1:] - x[..., :-1])).abs().mean() + \
               ((rec[..., 1:, :] - rec[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])).abs().mean()
        kl = post.kl().mean() / x[0].numel()
        loss = l1 + l2 + 0.5 * grad + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        run.append([float(l1.detach()), float(l2.detach()), float(kl.detach())])
        if (step + 1) % LOG_EVERY == 0:
            m = np.mean(run[-LOG_EVERY:], axis=0)
            log(f"vae{'_mix' if mix else ''} step {step + 1}/{total} ({x.shape[-1]} px): l1 {m[0]:.4f} mse {m[1]:.5f} kl/dim {m[2]:.3f}")
    torch.save({"state": vae.state_dict(), "final": np.mean(run[-100:], axis=0).tolist()},
               os.path.join(work, "vae.pt" if mix else "vae_base.pt"))


def load_vae(work: str):
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(**arch.diffusers_vae_config())
    ck = torch.load(os.path.join(work, "vae.pt"))
    vae.load_state_dict(ck["state"])
    return vae.eval(), ck


@torch.no_grad()
def stage_latents(work: str, data: dict) -> None:
    vae, _ = load_vae(work)
    images = data["images"]
    use = np.nonzero(data["set"] != "vae")[0]  # the UNets' images only
    lat = torch.zeros((len(images), 4, 16, 16))
    for i in range(0, len(use), 32):
        lat[use[i:i + 32]] = vae.encode(to_tensor(images[use[i:i + 32]])).latent_dist.mean
    lat_used = lat[use]
    scale = float(f"{1.0 / float(lat_used.std()):.5g}")
    rec = vae.decode(lat[:64]).sample
    err = float((rec - to_tensor(images[:64])).abs().mean() * 127.5)
    log(f"latents: {tuple(lat_used.shape)} mean {float(lat_used.mean()):.3f} std {float(lat_used.std()):.3f} -> scale_factor {scale}; "
        f"recon mean |err| {err:.2f}/255")
    torch.save({"latents": lat, "scale_factor": scale, "recon_err": err}, os.path.join(work, "latents.pt"))


# --------------------------------------------------------------------------- UNets

def conditioning(weights: str, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    import textenc
    cond = textenc.Conditioner(os.path.join(weights, "clip.safetensors"), os.path.join(weights, "clip-words.json"))
    return cond(prompts), cond([""])[0]


def new_unet():
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(**arch.diffusers_unet_config())


def train_unet(unet, lat: torch.Tensor, ctx: torch.Tensor, uncond: torch.Tensor, steps: int, lr: float, name: str,
               ema_decay: float, seed: int, prior: tuple[torch.Tensor, torch.Tensor] | None = None,
               batch: int = BATCH) -> tuple[object, list[float]]:
    """Epsilon-prediction training on SD1's schedule. ``prior`` (latents, contexts): half of
    each batch comes from it (DreamBooth prior preservation)."""
    g = torch.Generator().manual_seed(seed)
    ac = arch.alphas_cumprod().float()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, min(100, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    run = []
    unet.train()
    for step in range(steps):
        if prior is None:
            idx = torch.randint(0, len(lat), (batch,), generator=g)
            x0, c = lat[idx], ctx[idx]
        else:
            h = batch // 2
            i1 = torch.randint(0, len(lat), (h,), generator=g)
            i2 = torch.randint(0, len(prior[0]), (batch - h,), generator=g)
            x0, c = torch.cat([lat[i1], prior[0][i2]]), torch.cat([ctx[i1], prior[1][i2]])
        drop = torch.rand(batch, generator=g) < DROPOUT
        c = torch.where(drop[:, None, None], uncond[None], c)
        t = torch.randint(0, arch.TIMESTEPS, (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = (unet(xt, t, encoder_hidden_states=c).sample - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - d)
        run.append(float(loss.detach()))
        if (step + 1) % LOG_EVERY == 0:
            log(f"{name} step {step + 1}/{steps}: loss {np.mean(run[-LOG_EVERY:]):.4f} lr {sched.get_last_lr()[0]:.2e}")
    return ema, run


def stage_unet(work: str, weights: str, data: dict, which: str) -> None:
    L = torch.load(os.path.join(work, "latents.pt"))
    lat_all = L["latents"] * L["scale_factor"]
    prompts = data["prompt"].tolist()
    sets = data["set"]
    ctx_all, uncond = conditioning(weights, prompts)
    t0 = time.monotonic()
    if which in ("general", "fine"):
        sel = torch.from_numpy(np.nonzero(sets == which)[0])
        torch.manual_seed(SEED + (1 if which == "general" else 2))
        unet = new_unet()
        log(f"{which}: {sum(p.numel() for p in unet.parameters()) / 1e6:.3f} M parameters, {len(sel)} latents")
        ema, run = train_unet(unet, lat_all[sel], ctx_all[sel], uncond, STEPS[which], 5e-4, which, 0.999,
                              SEED + (10 if which == "general" else 20))
    elif which in ("general_more", "fine_more"):  # trained on from the EMA weights (prompt following comes late)
        base = which.removesuffix("_more")
        sel = torch.from_numpy(np.nonzero(sets == base)[0])
        unet = new_unet()
        unet.load_state_dict(torch.load(os.path.join(work, f"unet_{base}.pt"))["state"])
        ema, run = train_unet(unet, lat_all[sel], ctx_all[sel], uncond, STEPS[which], 3e-4, which, 0.995,
                              SEED + (21 if base == "fine" else 11))
    else:  # DreamBooth: the general model fine-tuned on the sks images, prior = general class images
        unet = new_unet()
        gen = "unet_general_more.pt" if os.path.exists(os.path.join(work, "unet_general_more.pt")) else "unet_general.pt"
        unet.load_state_dict(torch.load(os.path.join(work, gen))["state"])
        inst = torch.from_numpy(np.nonzero(sets == "sks")[0])
        cls = torch.from_numpy(np.nonzero((sets == "general") & (data["prompt"] == W.CLASS_PROMPT))[0])
        log(f"dreambooth: {len(inst)} instance images, {len(cls)} class images")
        ema, run = train_unet(unet, lat_all[inst], ctx_all[inst], uncond, STEPS["dreambooth"], 2e-4, which, 0.0,
                              SEED + 30, prior=(lat_all[cls], ctx_all[cls]), batch=16)
        ema = unet.eval()  # DreamBooth keeps the last weights (no EMA)
    torch.save({"state": ema.state_dict(), "final_loss": float(np.mean(run[-200:])), "steps": len(run),
                "seconds": time.monotonic() - t0, "curve": [float(np.mean(run[i:i + LOG_EVERY])) for i in range(0, len(run), LOG_EVERY)]},
               os.path.join(work, f"unet_{which}.pt"))


# --------------------------------------------------------------------------- export

def stage_export(work: str, weights: str) -> None:
    from safetensors.torch import save_file

    import ldm_convert
    vae, vck = load_vae(work)
    L = torch.load(os.path.join(work, "latents.pt"))
    save_file(ldm_convert.half(ldm_convert.vae_to_ldm(vae.state_dict())), os.path.join(weights, "vae.safetensors"),
              metadata={"format": "pt"})
    meta = {"scale_factor": L["scale_factor"], "vae_recon_mean_abs_err_255": round(L["recon_err"], 3),
            "vae_final_l1_mse_kl": [round(v, 5) for v in vck["final"]], "unets": {}}
    for which in ("general", "fine", "dreambooth"):
        ck = torch.load(os.path.join(work, f"unet_{which}.pt"))
        if which in ("general", "fine") and os.path.exists(os.path.join(work, f"unet_{which}_more.pt")):
            more = torch.load(os.path.join(work, f"unet_{which}_more.pt"))
            ck = {**more, "steps": ck["steps"] + more["steps"], "seconds": ck["seconds"] + more["seconds"],
                  "curve": ck["curve"] + more["curve"]}
        save_file(ldm_convert.half(ldm_convert.unet_to_ldm(ck["state"])), os.path.join(weights, f"unet-{which}.safetensors"),
                  metadata={"format": "pt"})
        meta["unets"][which] = {"final_loss": round(ck["final_loss"], 5), "steps": ck["steps"],
                                "train_seconds": round(ck["seconds"], 1), "loss_curve": [round(v, 4) for v in ck["curve"]]}
    with open(os.path.join(weights, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    log(f"export: {json.dumps({k: v for k, v in meta.items() if k != 'unets'})}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="scratch folder (data, stage results)")
    ap.add_argument("--weights", default=os.path.join(HERE, "weights"), help="where the committed weights go")
    ap.add_argument("--stages", default="", help="comma-separated stages to (re)do even if done: " + ",".join(STAGES))
    ap.add_argument("--only", default="", help="comma-separated stages: run just these (e.g. to train fine in a second process)")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads (use 1 when other jobs share the cores: 2 contended threads can be 10x slower)")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's steps (smoke runs)")
    ap.add_argument("--steps", default="", help="override steps, e.g. general=2000,fine=1000 (keys: " + ",".join(STEPS) + ")")
    args = ap.parse_args(argv)
    for kv in filter(None, args.steps.split(",")):
        k, v = kv.split("=")
        if k not in STEPS:
            ap.error(f"unknown steps key {k}")
        STEPS[k] = int(v)
    for k in STEPS:
        STEPS[k] = max(2, int(STEPS[k] * args.steps_scale)) if STEPS[k] else 0
    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    force = {s for s in args.stages.split(",") if s}
    unknown = force - set(STAGES)
    if unknown:
        ap.error(f"unknown stages {sorted(unknown)}")
    data = make_data.build(os.path.join(args.work, "data.npz"))
    log(f"data: {len(data['images'])} images")
    done = {
        "clip": os.path.join(args.weights, "clip-words.json"), "vae": os.path.join(args.work, "vae_base.pt"),
        "vae_mix": os.path.join(args.work, "vae.pt"),
        "latents": os.path.join(args.work, "latents.pt"), "general": os.path.join(args.work, "unet_general.pt"),
        "general_more": os.path.join(args.work, "unet_general_more.pt"),
        "fine": os.path.join(args.work, "unet_fine.pt"), "fine_more": os.path.join(args.work, "unet_fine_more.pt"),
        "dreambooth": os.path.join(args.work, "unet_dreambooth.pt"),
        "export": None,
    }
    only = {s for s in args.only.split(",") if s}
    for stage in STAGES:
        if only and stage not in only:
            continue
        if STEPS.get(stage) == 0:
            continue
        if stage not in force and done[stage] and os.path.exists(done[stage]):
            log(f"{stage}: done before, skipped")
            continue
        t0 = time.monotonic()
        if stage == "clip":
            stage_clip(args.work, args.weights)
        elif stage in ("vae", "vae_mix"):
            stage_vae(args.work, data, mix=stage == "vae_mix")
        elif stage == "latents":
            stage_latents(args.work, data)
        elif stage == "export":
            stage_export(args.work, args.weights)
        else:
            stage_unet(args.work, args.weights, data, stage)
        log(f"{stage}: {time.monotonic() - t0:.0f} s")
    log("all done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
