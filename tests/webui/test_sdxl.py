"""MagicFusion with SDXL-architecture checkpoints (sgm DiffusionEngine, dict conditioning with
a cross-attention and a size "vector" part), in the real WebUI.

The tiny-xl fixtures share the SD1 fixtures' VAE, so every difference below comes from the
UNets and their conditioning.
"""

from __future__ import annotations

import numpy as np
import pytest

MAIN, EXPERT, SD1 = "tiny-xl-a", "tiny-xl-b", "tiny-eps-a"
PROMPT = "a photo of a cat, sharp focus"


def gen(webui, *, main=MAIN, fused=None, init=None, **payload):
    """txt2img, or img2img from the uint8 picture `init`."""
    body = {"prompt": PROMPT, "steps": 6, "sampler_name": "Euler a", **webui.checkpoint(main), **payload}
    if fused is not None:
        body["alwayson_scripts"] = {"MagicFusion": {"args": [{"enabled": True, "expert_checkpoint": EXPERT, **fused}]}}
    return webui.txt2img(**body) if init is None else webui.img2img(init, **body)


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "DDIM"])
def test_sdxl_expert_fuses_reproducibly(webui, sampler):
    plain = webui.pixels(gen(webui, seed=31, sampler_name=sampler))
    expert_alone = webui.pixels(gen(webui, main=EXPERT, seed=31, sampler_name=sampler))
    first = gen(webui, seed=31, sampler_name=sampler, fused={"k_expert": 1.5})
    second = gen(webui, seed=31, sampler_name=sampler, fused={"k_expert": 1.5})
    a, b = webui.pixels(first), webui.pixels(second)
    assert np.array_equal(a, b)
    assert webui.differs(a, plain) and webui.differs(a, expert_alone)
    info = webui.info(first)
    assert info["sd_model_name"] == MAIN and f"MagicFusion expert: {EXPERT}" in info["infotexts"][0]
    assert np.array_equal(webui.pixels(gen(webui, seed=31, sampler_name=sampler)), plain)


def test_sdxl_expert_alone_equals_the_expert_model_alone(webui):
    """The expert's own SDXL conditioning (text and size vector) is built right: run alone on
    the main model's latents it gives exactly the expert checkpoint's own image."""
    expert_plain = webui.pixels(gen(webui, main=EXPERT, seed=32, width=64, height=96))
    resp = gen(webui, seed=32, width=64, height=96,
               fused={"fusion_start": 1.0, "fusion_end": 1.0, "outside_window": "expert"})
    assert np.array_equal(webui.pixels(resp), expert_plain)


def test_sdxl_main_as_expert_with_the_same_prompt_changes_nothing(webui):
    plain = webui.pixels(gen(webui, seed=33))
    fused = webui.pixels(gen(webui, seed=33, fused={"expert_checkpoint": MAIN}))
    assert np.array_equal(plain, fused)
    other_prompt = webui.pixels(gen(webui, seed=33, fused={"expert_checkpoint": MAIN,
                                                            "expert_prompt": "a watercolor painting of a lion"}))
    assert webui.differs(other_prompt, plain, threshold=0.5)


def test_sdxl_img2img(webui):
    init = webui.decode(gen(webui, seed=34)["images"][0])
    plain = webui.pixels(gen(webui, init=init, denoising_strength=0.7, seed=35))
    fused = webui.pixels(gen(webui, init=init, denoising_strength=0.7, seed=35, fused={}))
    assert webui.differs(fused, plain)


def test_sdxl_batch(webui):
    fused = gen(webui, seed=39, batch_size=2, fused={})
    plain = gen(webui, seed=39, batch_size=2)
    single = webui.pixels(gen(webui, seed=40, fused={}))  # image 1 of the batch has seed 39 + 1
    assert len(fused["images"]) == 2
    for i in range(2):
        assert webui.differs(webui.pixels(fused, i), webui.pixels(plain, i))
    assert float(np.abs(webui.pixels(fused, 1) - single).mean()) < 1.0


def test_sdxl_hires_fix(webui):
    """The hires pass encodes the expert's prompts at the upscaled size (SDXL's size vector)."""
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.6, "hr_second_pass_steps": 4}
    plain = webui.pixels(gen(webui, seed=37, **hires))
    on = webui.pixels(gen(webui, seed=37, **hires, fused={"apply_in_hires": True}))
    off = webui.pixels(gen(webui, seed=37, **hires, fused={"apply_in_hires": False}))
    assert on.shape == (96, 96, 3)
    assert webui.differs(on, plain) and webui.differs(on, off, threshold=0.5)
    # Run alone through both passes, the expert gives its own checkpoint's hires picture: its
    # second-pass conds carry the upscaled size in SDXL's size vector, as the main model's do.
    expert_hires = webui.pixels(gen(webui, main=EXPERT, seed=37, **hires))
    alone = webui.pixels(gen(webui, seed=37, **hires, fused={"fusion_start": 1.0, "fusion_end": 1.0, "outside_window": "expert"}))
    assert np.array_equal(alone, expert_hires)


@pytest.mark.parametrize(("main", "expert", "kinds"), [
    (MAIN, SD1, "the expert is an SD1 model and the main checkpoint an SDXL model"),
    (SD1, EXPERT, "the expert is an SDXL model and the main checkpoint an SD1 model"),
])
def test_sd1_and_sdxl_are_refused_together(webui, main, expert, kinds):
    body = {"prompt": PROMPT, "steps": 4, "seed": 36, **webui.checkpoint(main),
            "alwayson_scripts": {"MagicFusion": {"args": [{"enabled": True, "expert_checkpoint": expert}]}}}
    r = webui.post("/sdapi/v1/txt2img", body)
    assert r.status_code == 422, r.text
    assert "MagicFusion expert_checkpoint" in r.text and kinds in r.text
    assert webui.txt2img(prompt=PROMPT, steps=4, seed=36, **webui.checkpoint(main))["images"]


def test_the_builtin_refiner_is_refused_with_fusion_but_works_without(webui):
    refiner = {"refiner_checkpoint": EXPERT, "refiner_switch_at": 0.5}
    r = webui.post("/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 4, "seed": 38, **webui.checkpoint(MAIN), **refiner,
                                         "alwayson_scripts": {"MagicFusion": {"args": [{"enabled": True, "expert_checkpoint": EXPERT}]}}})
    assert r.status_code == 422, r.text
    assert "MagicFusion enabled" in r.text and "refiner" in r.text
    assert webui.txt2img(prompt=PROMPT, steps=4, seed=38, **webui.checkpoint(MAIN), **refiner)["images"]
