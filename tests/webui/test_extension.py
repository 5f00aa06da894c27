"""MagicFusion end to end in the real WebUI, through its HTTP API, with the tiny checkpoints.

Pixels are compared after decoding, never PNG bytes (the PNG carries the infotext).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

SAMPLERS = ["Euler a", "DDIM", "DPM++ 2M"]
MAIN, EXPERT, V_EXPERT = "tiny-eps-a", "tiny-eps-b", "tiny-sd2-v"
PROMPT = "a photo of a cat, sharp focus"


def fusion(**fields):
    return {"alwayson_scripts": {"MagicFusion": {"args": [{"enabled": True, "expert_checkpoint": EXPERT, **fields}]}}}


def gen(webui, *, main=MAIN, fused=None, **payload):
    body = {"prompt": PROMPT, "steps": 6, **webui.checkpoint(main), **payload}
    if fused is not None:
        body.update(fusion(**fused))
    return webui.txt2img(**body)


@pytest.fixture(scope="module")
def baseline(webui):
    """A plain generation made before any fusion: every later plain one must equal it."""
    return webui.pixels(gen(webui, sampler_name="Euler a", seed=77))


def assert_webui_still_plain(webui, baseline):
    assert np.array_equal(webui.pixels(gen(webui, sampler_name="Euler a", seed=77)), baseline)


def test_script_and_routes(webui):
    info = webui.get("/sdapi/v1/script-info").json()
    mine = [s for s in info if s["name"] == "magicfusion"]
    assert {s["is_img2img"] for s in mine} == {False, True}
    assert all(s["is_alwayson"] for s in mine)
    assert [a["label"] for a in mine[0]["args"]][:2] == ["MagicFusion", "Expert checkpoint"]
    schema = webui.get("/magicfusion/v1/schema").json()
    assert schema["title"] == "MagicFusion" and "k_expert" in schema["properties"]
    assert webui.get("/magicfusion/v1/version").json()["version"]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_expert_is_main_with_the_same_prompt_changes_nothing(webui, baseline, sampler):
    plain = webui.pixels(gen(webui, sampler_name=sampler, seed=5))
    fused = webui.pixels(gen(webui, sampler_name=sampler, seed=5, fused={"expert_checkpoint": MAIN}))
    assert np.array_equal(plain, fused)
    status = webui.mf_status()
    assert not any(title.startswith(MAIN) for title in status["experts_loaded"])  # the main model is never loaded twice
    assert status["last_generation"]["units"][0]["is_main"]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_empty_window_changes_nothing_and_loads_no_expert(webui, sampler):
    webui.mf_unload()
    plain = webui.pixels(gen(webui, sampler_name=sampler, seed=6))
    resp = gen(webui, sampler_name=sampler, seed=6, fused={"fusion_start": 0.5, "fusion_end": 0.5})
    assert np.array_equal(plain, webui.pixels(resp))
    assert webui.mf_status()["expert_loaded"] is None
    assert "MagicFusion expert: tiny-eps-b" in webui.info(resp)["infotexts"][0]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_different_expert_fuses_reproducibly_with_infotext(webui, baseline, sampler):
    plain = webui.pixels(gen(webui, sampler_name=sampler, seed=7))
    expert_alone = webui.pixels(gen(webui, main=EXPERT, sampler_name=sampler, seed=7))
    first = gen(webui, sampler_name=sampler, seed=7, fused={"k_expert": 1.5})
    second = gen(webui, sampler_name=sampler, seed=7, fused={"k_expert": 1.5})
    a, b = webui.pixels(first), webui.pixels(second)
    assert np.array_equal(a, b)
    assert webui.differs(a, plain) and webui.differs(a, expert_alone)
    text = webui.info(first)["infotexts"][0]
    assert "MagicFusion expert: tiny-eps-b" in text and "MagicFusion k expert: 1.5" in text
    assert "MagicFusion expert hash: " in text
    assert_webui_still_plain(webui, baseline)


def test_infotext_round_trip_reproduces_the_pixels(webui):
    fields = {"k_expert": 2.0, "k_general": 0.5, "fusion_end": 0.7, "blur": 2, "saliency_baseline": "own",
              "expert_prompt": "a cartoon cat, bold lines", "expert_cfg_scale": 9.0}
    first = gen(webui, sampler_name="DPM++ 2M", seed=8, fused=fields)
    text = webui.info(first)["infotexts"][0]
    body = {"prompt": PROMPT, "steps": 6, "sampler_name": "DPM++ 2M", "seed": 8, **webui.checkpoint(MAIN),
            "alwayson_scripts": {"MagicFusion": {"args": [{"infotext": text}]}}}
    again = webui.txt2img(**body)
    assert np.array_equal(webui.pixels(first), webui.pixels(again))
    assert webui.info(again)["infotexts"][0] == text


def test_positional_args_as_the_ui_sends_them(webui):
    info = webui.get("/sdapi/v1/script-info").json()
    args = [a["value"] for a in next(s for s in info if s["name"] == "magicfusion" and not s["is_img2img"])["args"]]
    args[0], args[1], args[5] = True, EXPERT, 1.5  # enabled, expert_checkpoint, k_expert
    named = webui.pixels(gen(webui, seed=9, fused={"k_expert": 1.5}))
    resp = webui.txt2img(prompt=PROMPT, steps=6, seed=9, **webui.checkpoint(MAIN),
                         alwayson_scripts={"MagicFusion": {"args": args}})
    assert np.array_equal(named, webui.pixels(resp))


def test_batch_size_and_count(webui, baseline):
    plain = gen(webui, seed=10, batch_size=2, n_iter=2)
    fused = gen(webui, seed=10, batch_size=2, n_iter=2, fused={})
    again = gen(webui, seed=10, batch_size=2, n_iter=2, fused={})
    single = gen(webui, seed=11, fused={})  # image 1 of batch 1 has seed 10 + 1
    assert len(fused["images"]) == len(plain["images"]) == 4  # the API sends no grid
    for i in range(4):
        a = webui.pixels(fused, i)
        assert np.array_equal(a, webui.pixels(again, i))
        assert webui.differs(a, webui.pixels(plain, i))
    # Each image's mask depends on that image only: batching changes only float rounding.
    assert float(np.abs(webui.pixels(fused, 1) - webui.pixels(single)).mean()) < 1.0
    infos = webui.info(fused)["infotexts"]
    assert all("MagicFusion expert: tiny-eps-b" in t for t in infos)
    assert_webui_still_plain(webui, baseline)


def test_img2img_and_inpainting_with_a_normal_model(webui, baseline):
    init = webui.pixels(gen(webui, seed=12)).astype(np.uint8)
    body = {"prompt": PROMPT, "steps": 8, "seed": 13, "denoising_strength": 0.7, **webui.checkpoint(MAIN)}
    plain = webui.pixels(webui.img2img(init, **body))
    fused = webui.pixels(webui.img2img(init, **body, **fusion()))
    again = webui.pixels(webui.img2img(init, **body, **fusion()))
    assert np.abs(fused - again).max() <= 1  # the WebUI's VAE encode draws unseeded noise
    assert webui.differs(fused, plain)
    mask = np.zeros((64, 64, 3), np.uint8)
    mask[16:48, 16:48] = 255
    inpaint = {**body, "mask": webui.encode_png(mask), "inpainting_fill": 1, "inpaint_full_res": False}
    plain_inpaint = webui.pixels(webui.img2img(init, **inpaint))
    fused_inpaint = webui.pixels(webui.img2img(init, **inpaint, **fusion()))
    outside = np.ones((64, 64), bool)
    outside[8:56, 8:56] = False
    assert np.abs(fused_inpaint[outside] - plain_inpaint[outside]).mean() < 3  # the unmasked area is kept
    assert webui.differs(fused_inpaint[24:40, 24:40], plain_inpaint[24:40, 24:40])
    assert_webui_still_plain(webui, baseline)


@pytest.mark.parametrize("apply_in_hires", [True, False])
def test_hires_fix(webui, baseline, apply_in_hires):
    hires = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "denoising_strength": 0.6, "hr_second_pass_steps": 4}
    plain = gen(webui, seed=14, **hires)
    fused = gen(webui, seed=14, **hires, fused={"apply_in_hires": apply_in_hires})
    a = webui.pixels(fused)
    assert a.shape == (128, 128, 3)
    assert webui.differs(a, webui.pixels(plain))
    text = webui.info(fused)["infotexts"][0]
    assert ("MagicFusion hires: False" in text) is (not apply_in_hires)
    assert_webui_still_plain(webui, baseline)


def test_hires_pass_fusion_matters(webui):
    hires = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "denoising_strength": 0.6, "hr_second_pass_steps": 4}
    on = webui.pixels(gen(webui, seed=15, **hires, fused={"apply_in_hires": True}))
    off = webui.pixels(gen(webui, seed=15, **hires, fused={"apply_in_hires": False}))
    assert webui.differs(on, off, threshold=0.5)


@pytest.mark.parametrize("sampler", ["Euler a", "DDIM"])
def test_v_prediction_expert_with_an_eps_main_model(webui, baseline, sampler):
    plain = webui.pixels(gen(webui, sampler_name=sampler, seed=16))
    fused = webui.pixels(gen(webui, sampler_name=sampler, seed=16, fused={"expert_checkpoint": V_EXPERT}))
    assert webui.differs(fused, plain)
    assert fused.std() > 10  # a picture, not NaNs decoded to black
    assert webui.mf_status()["expert_loaded"].startswith(V_EXPERT)
    assert_webui_still_plain(webui, baseline)


def test_outside_window_expert_alone_equals_the_expert_model_alone(webui):
    expert_plain = webui.pixels(gen(webui, main=EXPERT, seed=17, sampler_name="Euler a"))
    resp = gen(webui, seed=17, sampler_name="Euler a", fused={"fusion_start": 1.0, "fusion_end": 1.0, "outside_window": "expert"})
    assert np.array_equal(webui.pixels(resp), expert_plain)


LONG = ", ".join(f"detail {i}" for i in range(60))  # about 180 tokens: three 75-token chunks
SYNTAX = ["a lion", "(a lion:1.6), [crown]", "a lion BREAK a crown", "[a lion:a tiger:3]", f"a lion, {LONG}"]


@pytest.mark.parametrize("expert", [EXPERT, MAIN])
def test_expert_prompt_syntax_goes_through_the_webui_prompt_machinery(webui, baseline, expert):
    """Weights, BREAK, prompt editing and long prompts in the expert prompt (and a long expert
    negative prompt) mean what they mean in the main prompt: the expert run alone with
    prompt X gives exactly the picture of that checkpoint as the main model with prompt X."""
    pictures = []
    for i, prompt in enumerate(SYNTAX):
        negative = LONG if i == len(SYNTAX) - 1 else ""
        as_main = webui.pixels(gen(webui, main=expert, seed=23, prompt=prompt, negative_prompt=negative))
        alone = gen(webui, seed=23, prompt="a photo of a dog", fused={
            "expert_checkpoint": expert, "expert_prompt": prompt, "expert_negative_prompt": negative,
            "fusion_start": 1.0, "fusion_end": 1.0, "outside_window": "expert"})
        assert np.array_equal(webui.pixels(alone), as_main), prompt
        pictures.append(as_main)
    assert all(not np.array_equal(pictures[0], other) for other in pictures[1:])  # the syntax does something
    fused = gen(webui, seed=23, fused={"expert_checkpoint": expert, "expert_prompt": SYNTAX[-1], "expert_negative_prompt": LONG})
    assert webui.differs(webui.pixels(fused), webui.pixels(gen(webui, seed=23)), threshold=0.5)
    assert_webui_still_plain(webui, baseline)


def test_an_embedding_in_the_expert_prompt(webui, baseline):
    """A textual-inversion embedding in the expert prompt works as in the main prompt."""
    import torch
    from safetensors.torch import save_file
    path = os.path.join(webui.server.data_dir, "embeddings", "mf-test-emb.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({"emb_params": torch.randn((2, 32), generator=torch.Generator().manual_seed(3)) * 2}, path)
    assert webui.post("/sdapi/v1/refresh-embeddings", {}).status_code == 200
    assert "mf-test-emb" in webui.get("/sdapi/v1/embeddings").json()["loaded"]
    prompt = "a photo of mf-test-emb"
    as_main = webui.pixels(gen(webui, main=EXPERT, seed=24, prompt=prompt))
    assert webui.differs(as_main, webui.pixels(gen(webui, main=EXPERT, seed=24, prompt="a photo of")), threshold=0.5)
    alone = gen(webui, seed=24, fused={"expert_prompt": prompt, "fusion_start": 1.0, "fusion_end": 1.0, "outside_window": "expert"})
    assert np.array_equal(webui.pixels(alone), as_main)
    assert_webui_still_plain(webui, baseline)


def test_one_model_two_prompts_loads_nothing(webui, baseline):
    webui.mf_unload()
    plain = webui.pixels(gen(webui, seed=18))
    fused = gen(webui, seed=18, fused={"expert_checkpoint": MAIN, "expert_prompt": "a watercolor painting of a lion"})
    assert webui.differs(webui.pixels(fused), plain, threshold=0.5)
    s = webui.mf_status()
    assert s["expert_loaded"] is None and s["expert_bytes"] == 0
    assert_webui_still_plain(webui, baseline)


def test_and_prompts_and_skipped_uncond_steps(webui, baseline):
    settings = {"override_settings": {"sd_model_checkpoint": MAIN, "skip_early_cond": 0.25, "s_min_uncond": 2.0},
                "override_settings_restore_afterwards": True}
    body = {"prompt": "a cat AND a dog:0.6", "steps": 8, "seed": 19, "sampler_name": "Euler a", **settings}
    expert_prompt = "a lion AND a crown:0.8 AND a throne:0.3"
    try:
        plain = webui.pixels(webui.txt2img(**body))
        fused = webui.pixels(webui.txt2img(**body, **fusion(expert_prompt=expert_prompt)))
        passes = webui.mf_status()["last_generation"]["passes"]
        # The expert alone under the same skips is exactly that checkpoint's own picture: its
        # calls skip the uncond exactly where the WebUI skips it for a main model.
        as_main = webui.pixels(webui.txt2img(**{**body, "prompt": expert_prompt,
                                                "override_settings": {**settings["override_settings"], "sd_model_checkpoint": EXPERT}}))
        alone = webui.pixels(webui.txt2img(**body, **fusion(expert_prompt=expert_prompt, fusion_start=1.0, fusion_end=1.0,
                                                              outside_window="expert")))
        alone_passes = webui.mf_status()["last_generation"]["passes"]
    finally:  # the WebUI restores only overridden options that were ever saved
        webui.post("/sdapi/v1/options", {"skip_early_cond": 0.0, "s_min_uncond": 0.0})
    assert webui.differs(fused, plain) and fused.std() > 10
    for record in passes + alone_passes:  # our skip plan agreed with the WebUI's own decision at every call
        assert record["skip_mismatches"] == 0 and record["skipped_uncond_calls"] >= 3, record
    assert np.array_equal(alone, as_main)
    assert_webui_still_plain(webui, baseline)


def test_mask_pictures_join_the_gallery(webui):
    resp = gen(webui, seed=20, batch_size=2, fused={"show_mask": True})
    images = [webui.decode(b) for b in resp["images"]]
    assert len(images) == 2 + 2 * 2  # two images, then a mask and a strip for each
    final_mask, strip = images[2], images[3]
    assert final_mask.shape == (64, 64, 3) and set(np.unique(final_mask)) <= {0, 255}
    assert 0 < (final_mask > 127).mean() < 1  # both models win somewhere
    assert strip.shape[1] > strip.shape[0]


@pytest.mark.parametrize("fields, field", [
    ({"k_expert": -1}, "k_expert"),
    ({"fusion_start": 0.9, "fusion_end": 0.1}, "fusion_start"),
    ({"outside_window": "both"}, "outside_window"),
    ({"expert_checkpoint": "../../etc/passwd"}, "expert_checkpoint"),
    ({"expert_checkpoint": "/root/stable-diffusion-webui/model.ckpt"}, "expert_checkpoint"),
    ({"k_exprt": 1.0}, "k_exprt"),
    ({"blur": "4"}, "blur"),
])
def test_bad_args_fail_loudly_and_leave_the_webui_healthy(webui, baseline, fields, field):
    r = webui.post("/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 4, **webui.checkpoint(MAIN), **fusion(**fields)})
    assert r.status_code == 422, r.text
    assert f"MagicFusion {field}" in r.json()["errors"]
    assert_webui_still_plain(webui, baseline)


@pytest.mark.parametrize("sampler", ["Euler", "Heun", "DPM++ SDE", "DPM2", "LMS", "Restart", "DDIM CFG++", "PLMS", "UniPC"])
def test_every_sampler_family(webui, baseline, sampler):
    plain = webui.pixels(gen(webui, sampler_name=sampler, seed=21, steps=5))
    same = webui.pixels(gen(webui, sampler_name=sampler, seed=21, steps=5, fused={"expert_checkpoint": MAIN}))
    assert np.array_equal(plain, same)
    fused = webui.pixels(gen(webui, sampler_name=sampler, seed=21, steps=5, fused={}))
    again = webui.pixels(gen(webui, sampler_name=sampler, seed=21, steps=5, fused={}))
    assert np.array_equal(fused, again) and webui.differs(fused, plain, threshold=0.5) and fused.std() > 10
    assert_webui_still_plain(webui, baseline)


@pytest.mark.parametrize("sampler, steps", [("Euler a", 8), ("DPM++ 2M", 8), ("Heun", 8), ("DPM2", 8), ("DPM++ SDE", 8),
                                            ("Restart", 8), ("DDIM", 8), ("UniPC", 8)])
def test_the_window_counts_sampling_steps_for_every_sampler(webui, sampler, steps):
    """start*N <= i < end*N in sampling steps, whatever a sampler's order or extra (restart) calls."""
    gen(webui, sampler_name=sampler, steps=steps, seed=22, fused={"fusion_start": 0.25, "fusion_end": 0.75})
    record = webui.mf_status()["last_generation"]["passes"][0]
    assert record["fused_steps"] == [2, 3, 4, 5], (sampler, record)
    calls = record["model_calls"]
    assert calls["expert 1"] < calls["general"], calls  # outside the window only the general model runs


@pytest.mark.parametrize("sampler", ["Euler a", "DDIM", "Heun"])
def test_the_stable_method(webui, baseline, sampler):
    """stable = the switch against each model's own uncond, plus masks averaged over the steps."""
    def make(**fields):
        return gen(webui, sampler_name=sampler, seed=31, steps=6, fused=fields)

    own = webui.pixels(make(saliency_baseline="own"))
    assert np.array_equal(webui.pixels(make(method="stable", mask_memory=0.0)), own)
    first = make(method="stable")
    stable = webui.pixels(first)
    assert np.array_equal(stable, webui.pixels(make(method="stable", saliency_baseline="general")))  # always its own
    assert webui.differs(stable, own, threshold=0.2)
    text = webui.info(first)["infotexts"][0]
    assert "MagicFusion method: stable" in text and "MagicFusion mask memory: 0.9" in text
    body = {"prompt": PROMPT, "steps": 6, "sampler_name": sampler, "seed": 31, **webui.checkpoint(MAIN),
            "alwayson_scripts": {"MagicFusion": {"args": [{"infotext": text}]}}}
    assert np.array_equal(webui.pixels(webui.txt2img(**body)), stable)
    # hires fix: both passes fuse the same way each time (the memory is per pass), and with memory 0 as the own switch
    hires = {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5, "hr_upscaler": "Latent"}

    def make_hr(**fields):
        return webui.pixels(gen(webui, sampler_name=sampler, seed=32, steps=6, fused=fields, **hires))

    assert np.array_equal(make_hr(method="stable", mask_memory=0.0), make_hr(saliency_baseline="own"))
    stable_hr = make_hr(method="stable")
    assert np.array_equal(stable_hr, make_hr(method="stable"))
    assert webui.differs(stable_hr, webui.pixels(gen(webui, sampler_name=sampler, seed=32, steps=6, **hires)), threshold=0.2)
    assert_webui_still_plain(webui, baseline)
