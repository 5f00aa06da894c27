"""Load the committed toy models as diffusers modules and sample them.

    import toy
    m = toy.load_models()                       # general, fine, dreambooth UNets + VAE + text encoder
    cond = m.encode(["a photo of a ball on the beach"]); uncond = m.encode([""])
    lat = toy.ddim(m.unets["general"], toy.noise([1, 2]), cond.repeat(2, 1, 1), uncond.repeat(2, 1, 1),
                   m.alphas_cumprod, steps=25, cfg=7.0)
    images = m.decode(lat)                       # (N, 128, 128, 3) uint8
    images = toy.generate(m, "general", ["a photo of a ball on the beach"] * 2, seeds=[1, 2])

The committed files are in the LDM (original SD1) key layout; they are turned into diffusers
modules by diffusers' own single-file converters (ldm_convert.unet_from_ldm / vae_from_ldm).
Latents are the *scaled* latents (std ~1), as the UNets see them; ``decode`` divides by the
scale factor. Everything runs in float32 on the CPU unless a device is given.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import arch  # noqa: E402
import ldm_convert  # noqa: E402
import textenc  # noqa: E402

WEIGHTS = os.environ.get("MAGICFUSION_TOY_WEIGHTS") or os.path.join(HERE, "weights")  # env: another weights folder
MODELS = ("general", "fine", "dreambooth")
LATENT_SHAPE = (4, 16, 16)


@dataclass
class Toy:
    unets: dict  # name -> diffusers UNet2DConditionModel (eval, float32)
    vae: object  # diffusers AutoencoderKL
    conditioner: textenc.Conditioner
    alphas_cumprod: torch.Tensor  # (1000,) float64, SD1's schedule
    scale_factor: float
    meta: dict = field(default_factory=dict)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """A1111-style SD1 conditioning, (N, 77, 32) float32; "" is the unconditional prompt."""
        return self.conditioner(list(prompts))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Scaled latents (N, 4, 16, 16) -> (N, 128, 128, 3) uint8 images."""
        x = self.vae.decode(latents.float().to(next(self.vae.parameters()).device) / self.scale_factor).sample
        x = torch.clamp((x + 1.0) / 2.0, 0.0, 1.0)
        return (x * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    @torch.no_grad()
    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        """(N, 128, 128, 3) uint8 -> scaled latents (the posterior mean)."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return self.vae.encode(x.to(next(self.vae.parameters()).device)).latent_dist.mean * self.scale_factor


def load_models(weights_dir: str | None = None, names=MODELS, device: str = "cpu") -> Toy:
    """The committed toy models (see the module docstring)."""
    from safetensors.torch import load_file
    w = weights_dir or WEIGHTS
    with open(os.path.join(w, "meta.json")) as f:
        meta = json.load(f)
    sf = float(meta["scale_factor"])
    unets = {n: ldm_convert.unet_from_ldm(load_file(os.path.join(w, f"unet-{n}.safetensors")), sf).to(device) for n in names}
    vae = ldm_convert.vae_from_ldm(load_file(os.path.join(w, "vae.safetensors")), sf).to(device)
    cond = textenc.Conditioner(os.path.join(w, "clip.safetensors"), os.path.join(w, "clip-words.json"))
    return Toy(unets, vae, cond, arch.alphas_cumprod(), sf, meta)


def noise(seeds, device: str = "cpu") -> torch.Tensor:
    """One (4, 16, 16) standard-normal latent per seed (CPU generator, so seeds are portable)."""
    return torch.stack([torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


def ddim_timesteps(steps: int) -> list[int]:
    """ldm's "uniform" DDIM schedule, high to low (e.g. 25 steps: 961, 921, ..., 1)."""
    c = arch.TIMESTEPS // steps
    return [1 + i * c for i in range(steps)][::-1]


def guided_eps(unet, x: torch.Tensor, t: int, cond: torch.Tensor, uncond: torch.Tensor, cfg: float) -> torch.Tensor:
    """Classifier-free guided epsilon (one batched call: uncond rows, then cond rows)."""
    n = x.shape[0]
    tt = torch.full((2 * n,), t, dtype=torch.long, device=x.device)
    out = unet(torch.cat([x, x]), tt, encoder_hidden_states=torch.cat([uncond, cond])).sample
    u, c = out[:n], out[n:]
    return u + cfg * (c - u)


@torch.no_grad()
def ddim(unet, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, alphas_cumprod: torch.Tensor,
         steps: int = 25, cfg: float = 7.0, eps_fn=None) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from pure noise ``x`` (the sigma-1 initial latent).

    ``eps_fn(x, t, i) -> eps`` replaces the guided UNet call (for fusion methods); ``i`` is
    the step index from 0."""
    ac = alphas_cumprod.to(x.device, torch.float64)
    ts = ddim_timesteps(steps)
    x = x.double()
    for i, t in enumerate(ts):
        a = ac[t]
        a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else ac[0]
        e = (eps_fn(x.float(), t, i) if eps_fn else guided_eps(unet, x.float(), t, cond, uncond, cfg)).double()
        x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
    return x.float()


@torch.no_grad()
def euler_ancestral(unet, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, alphas_cumprod: torch.Tensor,
                    steps: int = 25, cfg: float = 7.0, seed: int = 0, eps_fn=None) -> torch.Tensor:
    """Euler ancestral on the k-diffusion sigmas of the schedule (``x`` is unit noise; it is
    multiplied by the first sigma). Timesteps are the sigmas' nearest integer steps."""
    ac = alphas_cumprod.to(torch.float64)
    sigmas_all = ((1 - ac) / ac).sqrt()
    t_grid = torch.linspace(arch.TIMESTEPS - 1, 0, steps, dtype=torch.float64)
    sig = torch.cat([sigmas_all[t_grid.round().long()], torch.zeros(1, dtype=torch.float64)])
    g = torch.Generator().manual_seed(seed)
    x = x.double().cpu() * sig[0]
    for i in range(steps):
        t = int(t_grid[i].round())
        s, s_next = sig[i], sig[i + 1]
        xin = (x / (s * s + 1).sqrt()).float().to(uncond.device)
        e = (eps_fn(xin, t, i) if eps_fn else guided_eps(unet, xin, t, cond, uncond, cfg)).double().cpu()
        s_up = min(float(s_next), float((s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2).sqrt()))
        s_down = (s_next ** 2 - s_up ** 2).sqrt()
        x = x + e * (s_down - s)
        if s_next > 0:
            x = x + torch.randn(x.shape, generator=g, dtype=torch.float64) * s_up
    return x.float().to(uncond.device)


def generate(models: Toy, name: str, prompts: list[str], seeds, steps: int = 25, cfg: float = 7.0,
             sampler: str = "ddim", batch: int = 16) -> np.ndarray:
    """Images of model ``name`` for ``prompts`` (one per seed), uint8 (N, 128, 128, 3)."""
    unet = models.unets[name]
    dev = next(unet.parameters()).device
    out = []
    for i in range(0, len(prompts), batch):
        p, s = list(prompts[i:i + batch]), list(seeds[i:i + batch])
        cond = models.encode(p).to(dev)
        uncond = models.encode([""] * len(p)).to(dev)
        x = noise(s, dev)
        if sampler == "ddim":
            lat = ddim(unet, x, cond, uncond, models.alphas_cumprod, steps, cfg)
        elif sampler == "euler_a":
            lat = euler_ancestral(unet, x, cond, uncond, models.alphas_cumprod, steps, cfg, seed=int(s[0]))
        else:
            raise ValueError(sampler)
        out.append(models.decode(lat))
    return np.concatenate(out)
