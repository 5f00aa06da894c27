"""The fusion step inside real samplers around real tiny UNets."""

import copy

import pytest
import torch

from lib_magicfusion.fusion import Prediction, SNBFusion, StepPlan, to_host_space, window_bounds
from tests.unit.harness import (
    KDIFF_SAMPLERS,
    Conditioning,
    EpsModel,
    Host,
    Model,
    TimestepEps,
    VTwin,
    alphas_cumprod,
    kdiff_wrapper,
    prompt,
    sample_ddim,
    sample_kdiff,
)

SAMPLERS = ["Euler", "Euler a", "DPM++ 2M", "DDIM"]


@pytest.fixture(scope="module")
def eps_models():
    return EpsModel(1), EpsModel(2)


def models_for(space, *modules, parameterizations=None):
    parameterizations = parameterizations or ["eps"] * len(modules)
    if space == "x0":
        return [Model(kdiff_wrapper(m, p)) for m, p in zip(modules, parameterizations)]
    return [Model(TimestepEps(m, p)) for m, p in zip(modules, parameterizations)]


def run(sampler, host, seed=0, batch=1):
    if sampler == "DDIM":
        return sample_ddim(host, seed=seed, batch=batch)
    return sample_kdiff(host, sampler, seed=seed, batch=batch)


def space_of(sampler):
    return "eps" if sampler == "DDIM" else "x0"


def fusion(**kw):
    kw.setdefault("ks", (1.0, 1.0))
    return SNBFusion(**kw)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("baseline", ["general", "own"])
def test_identical_expert_reproduces_plain_sampling_bit_for_bit(eps_models, sampler, baseline):
    general = eps_models[0]
    space = space_of(sampler)
    cond = Conditioning.simple(10, 11, batch=2)
    plain = run(sampler, Host(models_for(space, general), [cond], space=space), batch=2)
    host = Host(models_for(space, general, general), [cond, cond], space=space, fusion=fusion(baseline=baseline))
    fused = run(sampler, host, batch=2)
    assert torch.equal(plain, fused)
    assert host.models[1].calls == host.models[0].calls > 0
    assert all(m is not None and not m.any() for m in host.masks)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_empty_window_runs_one_model_alone(eps_models, sampler):
    space = space_of(sampler)
    c_general, c_expert = Conditioning.simple(10, 11), Conditioning.simple(12, 13, cfg_scale=5.0)
    plain_general = run(sampler, Host(models_for(space, eps_models[0]), [c_general], space=space))
    plain_expert = run(sampler, Host(models_for(space, eps_models[1]), [c_expert], space=space))

    host = Host(models_for(space, *eps_models), [c_general, c_expert], space=space, fusion=fusion(start=0.5, end=0.5, outside=0))
    assert torch.equal(run(sampler, host), plain_general)
    assert host.models[1].calls == 0 and host.models[0].calls > 0

    host = Host(models_for(space, *eps_models), [c_general, c_expert], space=space, fusion=fusion(start=0.5, end=0.5, outside=1))
    assert torch.equal(run(sampler, host), plain_expert)
    assert host.models[0].calls == 0 and host.models[1].calls > 0


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_different_experts_fuse_reproducibly(eps_models, sampler):
    space = space_of(sampler)
    conds = [Conditioning.simple(10, 11, batch=2), Conditioning.simple(12, 11, batch=2)]
    plain_general = run(sampler, Host(models_for(space, eps_models[0]), conds[:1], space=space), batch=2)
    plain_expert = run(sampler, Host(models_for(space, eps_models[1]), conds[1:], space=space), batch=2)
    fused = [run(sampler, Host(models_for(space, *eps_models), conds, space=space, fusion=fusion()), batch=2) for _ in range(2)]
    assert torch.equal(fused[0], fused[1])
    assert not torch.allclose(fused[0], plain_general, atol=1e-3)
    assert not torch.allclose(fused[0], plain_expert, atol=1e-3)
    assert torch.isfinite(fused[0]).all()


def test_window_counts_sampling_steps_not_denoiser_calls(eps_models):
    """Heun evaluates the model twice per step (once on the last): the window is in steps."""
    host = Host(models_for("x0", *eps_models), [Conditioning.simple(1, 2)] * 2, steps=10, fusion=fusion(start=0.0, end=0.5))
    sample_kdiff(host, "Heun")
    fused_steps = sorted({step for step, plan in host.plans if plan.fuse})
    assert fused_steps == [0, 1, 2, 3, 4]
    assert host.models[1].calls == 10  # two calls in each of the five fused steps
    assert host.models[0].calls == 19


def test_official_window_examples():
    assert window_bounds(0.0, 0.4, 100) == (0, 40)      # "600,1,1 mode 2" at 100 DDIM steps
    assert window_bounds(0.15, 1.0, 100) == (15, 100)   # "850,1,1 mode 1", cartoon model first
    f = fusion(start=0.15, end=1.0, outside=1)
    assert [f.plan(i, 100).models for i in (0, 14)] == [(1,), (1,)]
    assert f.plan(15, 100) == StepPlan(True, (0, 1))
    assert fusion(start=0.0, end=0.4).plan(40, 100) == StepPlan(False, (0,))


@pytest.mark.parametrize("seed", range(4))
def test_x0_and_eps_outputs_give_the_same_mask_at_every_sigma(eps_models, seed):
    """Saliency divides x0 differences by sigma, so k means the same in either space."""
    acp = alphas_cumprod().double()
    g = torch.Generator().manual_seed(seed)
    cond, uncond = prompt(seed, 2).double(), prompt(seed + 100, 2).double()
    models = [copy.deepcopy(m).double() for m in eps_models]
    f = fusion(ks=(1.0, 1.7))
    for t in (999, 800, 500, 200, 50, 1):
        a = acp[t]
        sigma_ve = ((1 - a) / a).sqrt()
        x0_true = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64)
        eps_true = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64)
        x_vp = a.sqrt() * x0_true + (1 - a).sqrt() * eps_true
        x_ve = x_vp / a.sqrt()
        tt = torch.full((2,), float(t), dtype=torch.float64)
        eps_preds, x0_preds = [], []
        for m in models:
            c, u = m(x_vp, tt, cond), m(x_vp, tt, uncond)
            eps_preds.append(Prediction(c, u, [[(0, 1.0)], [(1, 1.0)]], 7.5))
            x0_preds.append(Prediction(x_ve - sigma_ve * c, x_ve - sigma_ve * u, [[(0, 1.0)], [(1, 1.0)]], 7.5))
        plan = f.plan(0, 1)
        mask_eps = f.combine(plan, eps_preds, "eps").mask
        mask_x0 = f.combine(plan, x0_preds, "x0", sigma_ve.expand(2)).mask
        assert torch.equal(mask_eps, mask_x0), f"t={t}"
        assert 0 < mask_eps.float().mean() < 1


def test_v_prediction_expert_matches_its_eps_twin(eps_models):
    """A v-model is converted with its own parameterization before saliency and blending."""
    acp = alphas_cumprod()
    general = copy.deepcopy(eps_models[0]).double()
    expert_eps = copy.deepcopy(eps_models[1]).double()
    expert_v = VTwin(expert_eps, acp.double())
    g_wrap = kdiff_wrapper(general).double()
    e_wrap, v_wrap = kdiff_wrapper(expert_eps).double(), kdiff_wrapper(expert_v, "v").double()
    cond = torch.cat([prompt(3).double(), prompt(4).double()])
    f = fusion()
    gen = torch.Generator().manual_seed(5)
    for sigma in g_wrap.get_sigmas(8)[:-1]:
        x = torch.randn(1, 4, 16, 16, generator=gen, dtype=torch.float64) * (sigma ** 2 + 1).sqrt()
        s = sigma.reshape(1).expand(2)
        outs = [w(x.expand(2, -1, -1, -1), s, cond=cond) for w in (g_wrap, e_wrap, v_wrap)]
        preds = [Prediction(o[:1], o[1:], [[(0, 1.0)]], 6.0) for o in outs]
        m_eps = f.combine(f.plan(0, 1), [preds[0], preds[1]], "x0", sigma.reshape(1)).mask
        m_v = f.combine(f.plan(0, 1), [preds[0], preds[2]], "x0", sigma.reshape(1)).mask
        assert torch.equal(m_eps, m_v)
        # The library's own conversion agrees with k-diffusion's v wrapper.
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        raw_v = expert_v(x * c_in, g_wrap.sigma_to_t(sigma).reshape(1), cond[:1])
        torch.testing.assert_close(to_host_space(raw_v, "v", x, sigma.reshape(1), "x0"), outs[2][:1])


def test_v_expert_samples_like_its_eps_twin_on_ddim(eps_models):
    conds = [Conditioning.simple(10, 11), Conditioning.simple(12, 13)]
    twin = VTwin(eps_models[1], alphas_cumprod())
    a = run("DDIM", Host(models_for("eps", *eps_models), conds, space="eps", fusion=fusion()))
    b = run("DDIM", Host(models_for("eps", eps_models[0], twin, parameterizations=["eps", "v"]), conds, space="eps", fusion=fusion()))
    torch.testing.assert_close(a, b, atol=2e-3, rtol=0)


def test_and_prompts_with_weights_and_per_image_masks(eps_models):
    """AND-parts of one image share its uncond; each image's mask depends on that image only."""
    general = Conditioning(prompt(20, 3), prompt(21, 2), [[(0, 0.7), (1, 0.5)], [(2, 1.0)]], 7.0)
    expert = Conditioning(prompt(22, 2), prompt(23, 2), [[(0, 1.0)], [(1, 1.0)]], 9.0)
    host = Host(models_for("x0", *eps_models), [general, expert], fusion=fusion(), steps=6)
    both = sample_kdiff(host, "Euler", batch=2)
    masks_both = host.masks
    # Image 1 alone, with the same starting noise, gives the same result and the same masks.
    solo_general = Conditioning(prompt(20, 3)[2:], prompt(21, 2)[1:], [[(0, 1.0)]], 7.0)
    solo_expert = Conditioning(prompt(22, 2)[1:], prompt(23, 2)[1:], [[(0, 1.0)]], 9.0)
    solo = Host(models_for("x0", *eps_models), [solo_general, solo_expert], fusion=fusion(), steps=6)
    sigmas = solo.models[0].wrapper.get_sigmas(6)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    with torch.no_grad():
        out = KDIFF_SAMPLERS["Euler"](solo, x[1:], sigmas, disable=True)
    # A batch of two and a batch of one round differently in the UNet's matmuls (seen: 2e-4 of
    # a latent near unit scale); a mask leaking between images moves pixels by far more.
    torch.testing.assert_close(out, both[1:], atol=1e-3, rtol=0)
    mismatch = sum(float((a[1:] != b).float().mean()) for a, b in zip(masks_both, solo.masks)) / len(solo.masks)
    assert mismatch < 0.01


def test_skipped_uncond_reuses_the_last_mask_and_never_measures_zeros(eps_models):
    """NGMS drops uncond on odd steps; skip-early-cond drops it at the start."""
    conds = [Conditioning.simple(1, 2), Conditioning.simple(3, 4)]
    ngms = Host(models_for("x0", *eps_models), conds, steps=8, fusion=fusion(), skip_uncond=lambda step, s: step % 2 == 1)
    out = sample_kdiff(ngms, "Euler")
    assert torch.isfinite(out).all()
    for (step, plan), mask, previous in zip(ngms.plans[1:], ngms.masks[1:], ngms.masks[:-1]):
        assert plan.fuse
        if step % 2 == 1:
            assert mask is previous
    assert any(m.any() for m in ngms.masks)

    early = Host(models_for("x0", *eps_models), conds, steps=8, fusion=fusion(), skip_uncond=lambda step, s: step < 3)
    sample_kdiff(early, "Euler")
    assert [plan.models for step, plan in early.plans[:3]] == [(0,), (0,), (0,)]
    assert early.models[1].calls == 5


def test_combine_refuses_missing_outputs(eps_models):
    f = fusion()
    with pytest.raises(ValueError, match="MagicFusion"):
        f.combine(StepPlan(True, (0, 1)), [None, None], "x0", torch.ones(1))
    with pytest.raises(ValueError, match="sigma"):
        p = Prediction(torch.zeros(1, 4, 8, 8), torch.ones(1, 4, 8, 8), [[(0, 1.0)]], 7.0)
        f.combine(StepPlan(True, (0, 1)), [p, p], "x0")


# --------------------------------------------------------------------------- the stable method

@pytest.mark.parametrize("sampler", SAMPLERS)
def test_stable_without_memory_is_the_official_switch_against_each_own_uncond(eps_models, sampler):
    space = space_of(sampler)
    conds = [Conditioning.simple(10, 11, batch=2), Conditioning.simple(12, 13, batch=2)]
    own = Host(models_for(space, *eps_models), conds, space=space, fusion=fusion(baseline="own"))
    stable = Host(models_for(space, *eps_models), conds, space=space, fusion=fusion(method="stable", memory=0.0))
    assert torch.equal(run(sampler, own, batch=2), run(sampler, stable, batch=2))
    assert all(torch.equal(a, b) for a, b in zip(own.masks, stable.masks))
    # the baseline field does not change the stable method: it always measures against its own
    general = Host(models_for(space, *eps_models), conds, space=space,
                   fusion=fusion(method="stable", memory=0.0, baseline="general"))
    assert torch.equal(run(sampler, general, batch=2), run(sampler, own, batch=2))


def test_stable_memory_counts_steps_not_model_calls():
    """A second call within one step (Heun) blends with the average as it stood before that step."""
    f = fusion(method="stable", memory=0.75)
    a, b, c = (torch.full((2, 1, 1, 4, 4), v) for v in (1.0, 2.0, 4.0))
    assert torch.equal(f._remember(a, 0), a)
    assert torch.equal(f._remember(b, 1), 0.75 * a + 0.25 * b)
    assert torch.equal(f._remember(c, 1), 0.75 * a + 0.25 * c)  # the same step again: not 0.75 * (the line above)
    d = torch.full_like(a, 8.0)
    assert torch.allclose(f._remember(d, 2), 0.75 * (0.75 * a + 0.25 * c) + 0.25 * d)
    f.reset()
    assert torch.equal(f._remember(d, 3), d)  # a new pass starts without memory
    other = torch.ones(2, 3, 1, 4, 4)  # another batch: no stale average is mixed in
    assert torch.equal(f._remember(other, 4), other)


def _flips(masks) -> float:
    """The mean share of pixels whose model changes from one fused step to the next."""
    pairs = [(a, b) for a, b in zip(masks[:-1], masks[1:]) if a is not None and b is not None]
    return sum(float((a != b).float().mean()) for a, b in pairs) / len(pairs)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_stable_masks_change_less_over_the_steps_and_reset_between_passes(eps_models, sampler):
    space = space_of(sampler)
    conds = [Conditioning.simple(10, 11, batch=2), Conditioning.simple(12, 13, batch=2)]
    hosts = {m: Host(models_for(space, *eps_models), conds, space=space, steps=16, fusion=fusion(**kw))
             for m, kw in (("own", {"baseline": "own"}), ("stable", {"method": "stable", "memory": 0.9}))}
    outs = {m: run(sampler, h, batch=2) for m, h in hosts.items()}
    assert _flips(hosts["stable"].masks) < 0.5 * _flips(hosts["own"].masks), {m: _flips(h.masks) for m, h in hosts.items()}
    assert not torch.equal(outs["stable"], outs["own"])
    # the same step object, reset, samples the same picture again
    again = Host(models_for(space, *eps_models), conds, space=space, steps=16, fusion=hosts["stable"].fusion)
    hosts["stable"].fusion.reset()
    assert torch.equal(run(sampler, again, batch=2), outs["stable"])


def test_stable_memory_out_of_range_is_refused():
    with pytest.raises(ValueError, match="MagicFusion: mask memory"):
        fusion(method="stable", memory=1.0)
