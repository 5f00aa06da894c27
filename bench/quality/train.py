"""Train the toy world's models from scratch: the VAE, the general UNet, the fine-grained
expert UNet and the DreamBooth fine-tune of the general UNet; write the committed weights.

    python bench/quality/train.py --work /tmp/toyworld               # everything (about 60 min on 2 free cores)
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

STAGES = ("clip", "vae", "vae_mix", "latents", "unets", "general_more", "dreambooth", "export")
SEED = 1234
STEPS = {"vae": 3600, "vae_full": 400, "vae_mix": 2000, "vae_mix_full": 200, "unets": 3000, "general_more": 4000, "dreambooth": 600}
BATCH = 48
DROPOUT = 0.1  # prompt dropout (-> "" ) for classifier-free guidance
LOG_EVERY = 50
OFFSET_NOISE = 0.0  # (--offset-noise) std of a per-image, per-channel constant added to the training noise

T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------- text encoder

def stage_clip(work: str, weights: str) -> None:
    """The test bed's tiny CLIP (make_fixtures.write_text_encoder), its weights and the
    word table for textenc.Tokenizer; checks textenc against transformers."""
    sys.path.insert(0, os.path.join(REPO, "tests", "webui"))
    import make_fixtures
    import textenc
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel, CLIPTokenizer
    clip_dir = os.path.join(work, "clip-tiny")
    make_fixtures.write_text_encoder(clip_dir)
    sd = load_file(os.path.join(clip_dir, "model.safetensors"))
    # The classic layout ("text_model." prefix, as in SD checkpoints); transformers 5 saves without it.
    sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items() if "position_ids" not in k}
    assert all(torch.equal(v.half().float(), v.float()) for v in sd.values()), "CLIP weights are not fp16-exact"
    sd = {k: v.half().contiguous() for k, v in sorted(sd.items())}
    os.makedirs(weights, exist_ok=True)
    save_file(sd, os.path.join(weights, "clip.safetensors"), metadata={"format": "pt"})
    save_file(sd, os.path.join(work, "clip_base.safetensors"), metadata={"format": "pt"})  # the random start
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
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / total))))

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


def import_vae(work: str, weights: str) -> None:
    """work/vae.pt from the committed weights/vae.safetensors (retrain the UNets on the committed VAE)."""
    import ldm_convert
    from safetensors.torch import load_file
    with open(os.path.join(weights, "meta.json")) as f:
        meta = json.load(f)
    vae = ldm_convert.vae_from_ldm(load_file(os.path.join(weights, "vae.safetensors")), meta["scale_factor"])
    torch.save({"state": vae.state_dict(), "final": meta["vae_final_l1_mse_kl"]}, os.path.join(work, "vae.pt"))
    log("vae: imported from the committed weights")


def import_unets(work: str, weights: str) -> None:
    """work/unet_{general,fine}.pt, te_table.pt and clip_base.safetensors from the committed weights,
    so that the later stages (general_more, dreambooth, export) continue the committed run. The
    committed text encoder differs from the random start only in its token table, which every
    stage replaces with te_table.pt."""
    import shutil

    import ldm_convert
    from safetensors.torch import load_file
    with open(os.path.join(weights, "meta.json")) as f:
        meta = json.load(f)
    for which in ("general", "fine"):
        unet = ldm_convert.unet_from_ldm(load_file(os.path.join(weights, f"unet-{which}.safetensors")), meta["scale_factor"])
        m = meta["unets"][which]
        torch.save({"state": {k: v.float() for k, v in unet.state_dict().items()}, "final_loss": m["final_loss"],
                    "steps": m["steps"], "seconds": m["train_seconds"], "curve": m["loss_curve"]},
                   os.path.join(work, f"unet_{which}.pt"))
    clip = os.path.join(weights, "clip.safetensors")
    shutil.copyfile(clip, os.path.join(work, "clip_base.safetensors"))
    table = load_file(clip)["text_model.embeddings.token_embedding.weight"].float()
    torch.save({"table": table}, os.path.join(work, "te_table.pt"))
    log("unets: general, fine and the token table imported from the committed weights")


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

def new_unet():
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(**arch.diffusers_unet_config())


class TextEncoder:
    """The tiny CLIP with a trainable token table (every other weight stays the frozen random
    init): with a frozen random table the prompts differ by about a tenth of the embedding's norm
    and the UNets learnt to ignore them (cond and uncond predictions 0.3-3 % apart after 1,100
    steps); a learnt table lets them follow the prompts in a few hundred steps."""

    def __init__(self, base_path: str, words_path: str):
        import textenc
        from safetensors.torch import load_file
        self.textenc = textenc
        self.state = load_file(base_path)
        self.model = textenc.TinyCLIPText(self.state)
        self.tokenizer = textenc.Tokenizer(words_path)
        self.table = torch.nn.Parameter(self.model.w["embeddings.token_embedding.weight"].clone())

    def ids(self, prompts: list[str]) -> torch.Tensor:
        return self.textenc.token_ids(self.tokenizer, prompts)

    def __call__(self, ids: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        self.model.w["embeddings.token_embedding.weight"] = self.table if table is None else table
        return self.model(ids)

    def state_with(self, table: torch.Tensor) -> dict:
        out = dict(self.state)
        key = "text_model.embeddings.token_embedding.weight"
        out[key] = table.detach().to(self.state[key].dtype)
        return out


def train_unets(models: dict, te: TextEncoder, steps: int, lr: float, seed: int, ema_decay: float,
                trainable_rows: torch.Tensor | None = None, batch: int = BATCH) -> tuple[dict, torch.Tensor, dict]:
    """Epsilon-prediction training on SD1's schedule of one or more UNets at once, sharing the
    text encoder's token table. models: name -> (unet, latents, token ids, prior or None); each
    step every model gets batch / len(models) samples (a DreamBooth model: half of them from its
    prior, (latents, ids)). trainable_rows: the table rows that learn (None: all that the prompts
    use). Returns the EMA UNets, the EMA table and the loss curves."""
    g = torch.Generator().manual_seed(seed)
    ac = arch.alphas_cumprod().float()
    un_ids = te.ids([""])[0]
    params = [p for unet, *_ in models.values() for p in unet.parameters()]
    opt = torch.optim.AdamW([{"params": params, "lr": lr}, {"params": [te.table], "lr": 20 * lr, "weight_decay": 0.0}],
                            weight_decay=0.01)
    if trainable_rows is not None:
        keep = torch.ones(te.table.shape[0], dtype=torch.bool)
        keep[trainable_rows] = False
        te.table.register_hook(lambda grad: grad.masked_fill(keep[:, None], 0.0))
    warm = max(1, min(100, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    emas = {n: copy.deepcopy(u).eval().requires_grad_(False) for n, (u, *_) in models.items()}
    table_ema = te.table.detach().clone()
    runs = {n: [] for n in models}
    share = batch // len(models)
    for unet, *_ in models.values():
        unet.train()
    for step in range(steps):
        total = 0.0
        for name, (unet, lat, ids, prior) in models.items():
            if prior is None:
                idx = torch.randint(0, len(lat), (share,), generator=g)
                x0, tok = lat[idx], ids[idx].clone()
            else:
                h = share // 2
                i1 = torch.randint(0, len(lat), (h,), generator=g)
                i2 = torch.randint(0, len(prior[0]), (share - h,), generator=g)
                x0, tok = torch.cat([lat[i1], prior[0][i2]]), torch.cat([ids[i1], prior[1][i2]])
            drop = torch.rand(len(tok), generator=g) < DROPOUT
            tok[drop] = un_ids
            t = torch.randint(0, arch.TIMESTEPS, (len(tok),), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            if OFFSET_NOISE:
                noise = noise + OFFSET_NOISE * torch.randn((*x0.shape[:2], 1, 1), generator=g)
            a = ac[t].view(-1, 1, 1, 1)
            loss = (unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=te(tok)).sample - noise).pow(2).mean()
            total = total + loss
            runs[name].append(float(loss.detach()))
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params + [te.table], 1.0)
        opt.step()
        sched.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, (unet, *_) in models.items():
                for pe, p in zip(emas[name].parameters(), unet.parameters()):
                    pe.lerp_(p, 1 - d)
            table_ema.lerp_(te.table.detach(), 1 - d)
        if (step + 1) % LOG_EVERY == 0:
            log(f"step {step + 1}/{steps}: " + ", ".join(f"{n} {np.mean(r[-LOG_EVERY:]):.4f}" for n, r in runs.items())
                + f" lr {sched.get_last_lr()[0]:.2e}")
    return emas, table_ema, runs


def _general_path(work: str) -> str:
    """The general UNet: the continued one when that stage ran."""
    more = os.path.join(work, "unet_general_more.pt")
    return more if os.path.exists(more) else os.path.join(work, "unet_general.pt")


def _save(work: str, name: str, unet, run: list, seconds: float) -> None:
    torch.save({"state": unet.state_dict(), "final_loss": float(np.mean(run[-200:])), "steps": len(run), "seconds": seconds,
                "curve": [float(np.mean(run[i:i + LOG_EVERY])) for i in range(0, len(run), LOG_EVERY)]},
               os.path.join(work, f"unet_{name}.pt"))


def _training_inputs(work: str, weights: str, data: dict, learnt_table: bool = True):
    """What every UNet stage trains on: the scaled latents, the text encoder (with the token table
    an earlier stage learnt, when `learnt_table`) and the token ids of every prompt."""
    L = torch.load(os.path.join(work, "latents.pt"))
    te = TextEncoder(os.path.join(work, "clip_base.safetensors"), os.path.join(weights, "clip-words.json"))
    if learnt_table:
        te.table.data.copy_(torch.load(os.path.join(work, "te_table.pt"))["table"])
    return L["latents"] * L["scale_factor"], te, te.ids(data["prompt"].tolist())


def stage_unets(work: str, weights: str, data: dict) -> None:
    """The general and the fine expert UNets, trained together with the shared token table."""
    lat_all, te, ids_all = _training_inputs(work, weights, data, learnt_table=False)
    sets = data["set"]
    models = {}
    for i, which in enumerate(("general", "fine")):
        sel = torch.from_numpy(np.nonzero(sets == which)[0])
        torch.manual_seed(SEED + 1 + i)
        models[which] = (new_unet(), lat_all[sel], ids_all[sel], None)
        log(f"{which}: {sum(p.numel() for p in models[which][0].parameters()) / 1e6:.3f} M parameters, {len(sel)} latents")
    t0 = time.monotonic()
    emas, table, runs = train_unets(models, te, STEPS["unets"], 5e-4, SEED + 10, 0.999)
    for which in models:
        _save(work, which, emas[which], runs[which], time.monotonic() - t0)
    torch.save({"table": table}, os.path.join(work, "te_table.pt"))


def stage_general_more(work: str, weights: str, data: dict) -> None:
    """The general UNet alone, continued from the joint stage: its scenes are the harder task
    (four textured backgrounds against the expert's one plain one) and were still mixtures
    after the joint steps. The token table stays frozen, so the fine expert's words keep the
    embeddings it learnt."""
    lat_all, te, ids_all = _training_inputs(work, weights, data)
    sel = torch.from_numpy(np.nonzero(data["set"] == "general")[0])
    ck = torch.load(os.path.join(work, "unet_general.pt"))
    unet = new_unet()
    unet.load_state_dict(ck["state"])
    t0 = time.monotonic()
    emas, _, runs = train_unets({"general": (unet, lat_all[sel], ids_all[sel], None)}, te, STEPS["general_more"], 3e-4,
                                SEED + 20, 0.999, trainable_rows=torch.zeros(0, dtype=torch.long), batch=32)
    _save(work, "general_more", emas["general"], runs["general"], time.monotonic() - t0)


def stage_dreambooth(work: str, weights: str, data: dict) -> None:
    """The general model fine-tuned on the sks images (all in the forest), with prior
    preservation ("a photo of a ball" class images); only the table rows of "sks" learn."""
    lat_all, te, ids_all = _training_inputs(work, weights, data)
    sets = data["set"]
    unet = new_unet()
    unet.load_state_dict(torch.load(_general_path(work))["state"])
    inst = torch.from_numpy(np.nonzero(sets == "sks")[0])
    cls = torch.from_numpy(np.nonzero((sets == "general") & (data["prompt"] == W.CLASS_PROMPT))[0])
    log(f"dreambooth: {len(inst)} instance images, {len(cls)} class images")
    rows = torch.tensor(sorted(set(te.tokenizer("sks"))))
    t0 = time.monotonic()
    emas, table, runs = train_unets({"dreambooth": (unet, lat_all[inst], ids_all[inst], (lat_all[cls], ids_all[cls]))}, te,
                                    STEPS["dreambooth"], 2e-4, SEED + 30, 0.0, trainable_rows=rows, batch=16)
    # DreamBooth keeps the last weights (ema_decay 0: the EMA is the last step)
    _save(work, "dreambooth", emas["dreambooth"], runs["dreambooth"], time.monotonic() - t0)
    torch.save({"table": table}, os.path.join(work, "te_table.pt"))


# --------------------------------------------------------------------------- export

def stage_export(work: str, weights: str) -> None:
    import ldm_convert
    from safetensors.torch import save_file
    vae, vck = load_vae(work)
    L = torch.load(os.path.join(work, "latents.pt"))
    save_file(ldm_convert.half(ldm_convert.vae_to_ldm(vae.state_dict())), os.path.join(weights, "vae.safetensors"),
              metadata={"format": "pt"})
    meta = {"scale_factor": L["scale_factor"], "vae_recon_mean_abs_err_255": round(L["recon_err"], 3),
            "vae_final_l1_mse_kl": [round(v, 5) for v in vck["final"]], "unets": {}}
    for which in ("general", "fine", "dreambooth"):
        ck = torch.load(_general_path(work) if which == "general" else os.path.join(work, f"unet_{which}.pt"))
        save_file(ldm_convert.half(ldm_convert.unet_to_ldm(ck["state"])), os.path.join(weights, f"unet-{which}.safetensors"),
                  metadata={"format": "pt"})
        meta["unets"][which] = {"final_loss": round(ck["final_loss"], 5), "steps": ck["steps"],
                                "train_seconds": round(ck["seconds"], 1), "loss_curve": [round(v, 4) for v in ck["curve"]]}
    te = TextEncoder(os.path.join(work, "clip_base.safetensors"), os.path.join(weights, "clip-words.json"))
    state = te.state_with(torch.load(os.path.join(work, "te_table.pt"))["table"].half())
    save_file({k: v.half().contiguous() for k, v in sorted(state.items())}, os.path.join(weights, "clip.safetensors"),
              metadata={"format": "pt"})
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
    ap.add_argument("--vae-from-weights", action="store_true",
                    help="skip the VAE stages: start from the committed weights/vae.safetensors")
    ap.add_argument("--unets-from-weights", action="store_true",
                    help="also skip the joint UNet stage: continue from the committed general and fine UNets and token "
                         "table (implies --vae-from-weights)")
    ap.add_argument("--offset-noise", type=float, default=0.0,
                    help="add a per-channel constant of this std to the training noise of the UNet stages")
    args = ap.parse_args(argv)
    global OFFSET_NOISE
    OFFSET_NOISE = args.offset_noise
    args.vae_from_weights = args.vae_from_weights or args.unets_from_weights
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
        "latents": os.path.join(args.work, "latents.pt"), "unets": os.path.join(args.work, "unet_fine.pt"),
        "general_more": os.path.join(args.work, "unet_general_more.pt"),
        "dreambooth": os.path.join(args.work, "unet_dreambooth.pt"),
        "export": None,
    }
    only = {s for s in args.only.split(",") if s}
    if args.vae_from_weights:
        if not os.path.exists(done["vae_mix"]) or "vae_mix" in force:
            import_vae(args.work, args.weights)
        only = (only or set(STAGES)) - {"vae", "vae_mix"}
    if args.unets_from_weights:
        if not os.path.exists(done["unets"]) or "unets" in force:
            import_unets(args.work, args.weights)
        only -= {"clip", "unets"}
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
        elif stage == "unets":
            stage_unets(args.work, args.weights, data)
        elif stage == "general_more":
            stage_general_more(args.work, args.weights, data)
        else:
            stage_dreambooth(args.work, args.weights, data)
        log(f"{stage}: {time.monotonic() - t0:.0f} s")
    log("all done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
