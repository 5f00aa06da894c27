"""A small real sampling host for the core library's tests.

Real tiny UNets (diffusers' UNet2DConditionModel, random non-zero weights) behind the real
k-diffusion wrappers and samplers, and a DDIM loop for the epsilon (timestep) path. The
host batches cond and uncond rows and combines them with classifier-free guidance the way
the WebUI's CFGDenoiser does, so the fusion step is exercised as the extension uses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel
from k_diffusion import external, sampling

from lib_magicfusion.fusion import Prediction, SNBFusion, sampling_step, to_host_space

CONTEXT_DIM = 32
TOKENS = 8


def alphas_cumprod() -> torch.Tensor:
    """Stable Diffusion's scaled-linear schedule."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def tiny_unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CONTEXT_DIM,
        attention_head_dim=8, norm_num_groups=32,
    )
    with torch.no_grad():
        for p in unet.parameters():
            if not torch.any(p):  # zero-initialised output layers would make the model predict 0
                p.normal_(0.0, 0.05)
    return unet.eval().requires_grad_(False)


class EpsModel(torch.nn.Module):
    """A UNet that predicts epsilon, called as model(x, t, cond=...) like an LDM apply_model."""

    def __init__(self, seed: int):
        super().__init__()
        self.unet = tiny_unet(seed)

    def forward(self, x, t, cond):
        return self.unet(x, t, encoder_hidden_states=cond).sample


class VTwin(torch.nn.Module):
    """The v-prediction twin of an epsilon model: the same denoiser, v-parameterised."""

    def __init__(self, eps_model: EpsModel, acp: torch.Tensor):
        super().__init__()
        self.eps_model = eps_model
        self.register_buffer("acp", acp)

    def forward(self, x, t, cond):
        eps = self.eps_model(x, t, cond)
        a = self.acp[t.round().long()].reshape(-1, 1, 1, 1)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0


def kdiff_wrapper(model: torch.nn.Module, parameterization: str = "eps"):
    """The k-diffusion wrapper the WebUI puts around a checkpoint: takes sigma, returns x0."""
    cls = external.DiscreteVDDPMDenoiser if parameterization == "v" else external.DiscreteEpsDDPMDenoiser
    return cls(model, alphas_cumprod(), quantize=False)


def prompt(seed: int, batch: int = 1, parts: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch * parts, TOKENS, CONTEXT_DIM, generator=g)


@dataclass
class Conditioning:
    """One model's prompts for a batch, laid out as the WebUI lays them out."""

    cond: torch.Tensor          # (R, T, D)
    uncond: torch.Tensor        # (B, T, D)
    conds_list: list            # per image [(row, weight)]
    cfg_scale: float

    @classmethod
    def simple(cls, cond_seed: int, uncond_seed: int, batch: int = 1, cfg_scale: float = 7.0):
        return cls(prompt(cond_seed, batch), prompt(uncond_seed, batch), [[(i, 1.0)] for i in range(batch)], cfg_scale)


@dataclass
class Model:
    """A model as the host sees it: a wrapper returning the host's space, plus how it was built."""

    wrapper: torch.nn.Module
    calls: int = 0
    rows: int = 0

    def __call__(self, x, sigma, cond):
        self.calls += 1
        self.rows += x.shape[0]
        return self.wrapper(x, sigma, cond=cond)


@dataclass
class Host:
    """A CFG denoiser: one call per sampler evaluation, as the WebUI's CFGDenoiser.

    With `fusion` None it is plain single-model sampling of models[0] (its own guidance
    code, independent of the library); with a fusion it evaluates what `plan` asks for.
    `skip_uncond(step, sigma)` says when the host drops the uncond rows (NGMS).
    """

    models: Sequence[Model]
    conds: Sequence[Conditioning]
    space: str = "x0"
    steps: int = 10
    fusion: SNBFusion | None = None
    skip_uncond: callable | None = None
    total_calls: int | None = None
    call: int = 0
    masks: list = field(default_factory=list)
    plans: list = field(default_factory=list)

    @property
    def step(self) -> int:
        return sampling_step(self.call, self.total_calls or self.steps, self.steps)

    def _run(self, index: int, x, sigma, skip: bool) -> Prediction:
        c = self.conds[index]
        repeats = [len(parts) for parts in c.conds_list]
        rows = [x[i] for i, n in enumerate(repeats) for _ in range(n)]
        sig = [sigma[i] for i, n in enumerate(repeats) for _ in range(n)]
        if skip:
            x_in, s_in, cond_in = torch.stack(rows), torch.stack(sig), c.cond
        else:
            x_in = torch.cat([torch.stack(rows), x])
            s_in = torch.cat([torch.stack(sig), sigma])
            cond_in = torch.cat([c.cond, c.uncond])
        out = self.models[index](x_in, s_in, cond_in)
        n = c.cond.shape[0]
        return Prediction(out[:n], None if skip else out[n:], c.conds_list, c.cfg_scale)

    def __call__(self, x, sigma, **_):
        sigma = sigma.reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma
        step = self.step
        self.call += 1
        skip = bool(self.skip_uncond and self.skip_uncond(step, sigma))
        if self.fusion is None:
            pred = self._run(0, x, sigma, skip)
            uncond = pred.reference_uncond()
            scale = 1.0 if skip else pred.cfg_scale
            out = uncond.clone()
            for i, parts in enumerate(pred.conds_list):
                for row, weight in parts:
                    out[i] += (pred.cond[row] - uncond[i]) * (weight * scale)
            return out
        plan = self.fusion.plan(step, self.steps, uncond_skipped=skip)
        self.plans.append((step, plan))
        preds = [None] * len(self.models)
        for m in plan.models:
            preds[m] = self._run(m, x, sigma, skip)
        vp_sigma = sigma if self.space == "x0" else self.timestep_sigma(sigma)
        result = self.fusion.combine(plan, preds, self.space, vp_sigma, step=step)
        self.masks.append(result.mask)
        return result.denoised

    @staticmethod
    def timestep_sigma(t: torch.Tensor) -> torch.Tensor:
        a = alphas_cumprod()[t.round().long()]
        return ((1 - a) / a).sqrt()


KDIFF_SAMPLERS = {
    "Euler": sampling.sample_euler,
    "Euler a": sampling.sample_euler_ancestral,
    "DPM++ 2M": sampling.sample_dpmpp_2m,
    "Heun": sampling.sample_heun,
}
SECOND_ORDER = {"Heun"}


def sample_kdiff(host: Host, sampler: str, seed: int = 0, batch: int = 1, size: int = 16) -> torch.Tensor:
    """Run a real k-diffusion sampler through the host, Karras-free default schedule."""
    wrapper = host.models[0].wrapper
    sigmas = wrapper.get_sigmas(host.steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g) * sigmas[0]
    host.call = 0
    host.total_calls = 2 * host.steps - 1 if sampler in SECOND_ORDER else host.steps
    torch.manual_seed(seed + 1)  # ancestral samplers draw from the global generator
    with torch.no_grad():
        return KDIFF_SAMPLERS[sampler](host, x, sigmas, disable=True)


def sample_ddim(host: Host, seed: int = 0, batch: int = 1, size: int = 16) -> torch.Tensor:
    """Deterministic DDIM (eta 0) on a uniform timestep grid; the host returns epsilon."""
    acp = alphas_cumprod()
    timesteps = torch.arange(0, 1000, 1000 // host.steps) + 1
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    host.call = 0
    with torch.no_grad():
        for t in reversed(timesteps.tolist()):
            a = acp[t]
            a_prev = acp[t - 1000 // host.steps] if t - 1000 // host.steps >= 0 else torch.tensor(1.0)
            eps = host(x, torch.full((batch,), float(t)))
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


class TimestepEps(torch.nn.Module):
    """The timestep wrapper the WebUI uses for DDIM/PLMS/UniPC: takes t, returns epsilon."""

    def __init__(self, model: torch.nn.Module, parameterization: str = "eps"):
        super().__init__()
        self.model = model
        self.parameterization = parameterization

    def forward(self, x, t, cond):
        out = self.model(x, t, cond)
        if self.parameterization == "v":
            return to_host_space(out, "v", x, Host.timestep_sigma(t), "eps")
        return out
