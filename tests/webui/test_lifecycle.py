"""The generation lifecycle and the defects a line-by-line review found (issue #11), in the real WebUI.

Every test here failed against the first release's adapter: an unload during a generation,
nested generations, hires masks, mismatched text encoders, an expert alone with another AND
structure, padding of the expert's rows, inpainting masks, which VAE decodes, freeing memory
and loading without exposing the expert as the main model.
"""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

MAIN, EXPERT, SD2 = "tiny-eps-a", "tiny-eps-b", "tiny-sd2-v"
PROMPT = "a photo of a cat, sharp focus"
ALONE = {"fusion_start": 1.0, "fusion_end": 1.0, "outside_window": "expert"}


def fusion(**fields):
    return {"alwayson_scripts": {"MagicFusion": {"args": [{"enabled": True, "expert_checkpoint": EXPERT, **fields}]}}}


def body(webui, *, main=MAIN, fused=None, **payload):
    out = {**webui.TXT2IMG_DEFAULTS, "prompt": PROMPT, "steps": 6, **webui.checkpoint(main), **payload}
    if fused is not None:
        out.update(fusion(**fused))
    return out


def gen(webui, **kw):
    return webui.txt2img(**body(webui, **kw))


def px(webui, **kw):
    return webui.pixels(gen(webui, **kw))


def report(webui):
    return webui.mf_status()["last_generation"]


def options(webui, **values):
    r = webui.post("/sdapi/v1/options", values)
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------- 1. unload during a generation

def test_unloading_waits_for_the_generation_in_progress(webui):
    fields = {"k_expert": 1.3}
    reference = px(webui, fused=fields, steps=30, seed=3)
    done = {}

    def generate():
        done["image"] = px(webui, fused=fields, steps=30, seed=3)

    worker = threading.Thread(target=generate)
    worker.start()
    deadline = time.monotonic() + 60
    while not webui.get("/sdapi/v1/progress").json().get("state", {}).get("sampling_step"):
        assert time.monotonic() < deadline and worker.is_alive(), "the generation never started sampling"
        time.sleep(0.02)
    unloaded = webui.mf_unload()
    # The WebUI ends the job before it frees the queue lock, but encodes the response's images
    # after: the generation's answer may arrive after the unload's, so ask the job state instead.
    state = webui.get("/sdapi/v1/progress").json()["state"]
    worker.join(120)
    assert unloaded["unloaded"] and unloaded["experts_loaded"] == []
    assert state["job"] == "" and state["job_count"] == 0, f"the unload returned during the generation: {state}"
    assert np.array_equal(done["image"], reference), "the generation lost its expert half-way"


# --------------------------------------------------------------------------- 2. nested generations

@pytest.mark.parametrize("inner_fused", [True, False])
def test_a_nested_generation_leaves_the_outer_one_fused(webui, inner_fused):
    """An always-on test script starts a nested process_images from postprocess_image of the
    outer image 0 (as ADetailer does); the outer batch 2 must still be fused."""
    outer = body(webui, fused={"k_expert": 1.2}, n_iter=2, seed=40)
    reference = webui.txt2img(**outer)
    nested = dict(outer)
    nested["alwayson_scripts"] = {**outer["alwayson_scripts"], **webui.nested(
        after_image=0, magicfusion="outer" if inner_fused else "disabled", prompt="a dog", seed=41, steps=4)}
    resp = webui.txt2img(**nested)
    for i in range(2):
        assert np.array_equal(webui.pixels(resp, i), webui.pixels(reference, i)), f"outer image {i} changed"
    inner = webui.pixels(resp, 2)  # the test script returns the inner image after the outer ones
    alone = body(webui, prompt="a dog", seed=41, steps=4, fused={"k_expert": 1.2} if inner_fused else None)
    assert np.array_equal(inner, webui.pixels(webui.txt2img(**alone)))


# --------------------------------------------------------------------------- 3. hires masks

HIRES = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "denoising_strength": 0.6, "hr_second_pass_steps": 3}


@pytest.mark.parametrize("apply_in_hires, rows", [(True, 2), (False, 1)])
def test_masks_of_both_passes_are_shown(webui, apply_in_hires, rows):
    resp = gen(webui, fused={"show_mask": True, "apply_in_hires": apply_in_hires}, **HIRES)
    assert len(resp["images"]) == 3, "the image, its final mask and its strip"
    strip = webui.decode(resp["images"][2])
    passes = report(webui)["passes"]
    assert [p["hires"] for p in passes] == [False, True] and [p["fused"] for p in passes] == [True, apply_in_hires]
    tile = max(48, 128 // 4)  # a quarter of the 128x128 image, at least 48 px
    assert strip.shape[0] == rows * (tile + 2) + 14, strip.shape  # one row of tiles per fused pass, then the legend


# --------------------------------------------------------------------------- 4. text encoders that do not fit

def test_a_foreign_text_encoder_is_refused_before_sampling(webui):
    r = webui.post("/sdapi/v1/txt2img", body(webui, fused={"expert_checkpoint": SD2, "expert_text_encoder": "general"}))
    assert r.status_code == 422, r.text[:500]
    assert "MagicFusion expert_text_encoder:" in r.json()["errors"], r.json()["errors"]
    ok = px(webui, fused={"expert_checkpoint": SD2})  # its own encoder: fine
    assert webui.differs(ok, px(webui))


# --------------------------------------------------------------------------- 5. alone with another AND structure

def test_an_expert_alone_with_other_and_parts_never_runs_the_main_model(webui):
    expert_prompt = "a lion AND a crown:0.7 AND a throne:0.4"
    as_main = px(webui, main=EXPERT, prompt=expert_prompt, seed=50)
    alone = px(webui, prompt="a cat AND a dog:0.5", seed=50, fused={"expert_prompt": expert_prompt, **ALONE})
    assert np.array_equal(alone, as_main)
    calls = report(webui)["passes"][0]["model_calls"]
    assert calls == {"expert 1": 6}, calls


# --------------------------------------------------------------------------- 6. padding of the expert's rows

LONG = ", ".join(f"detail {i}" for i in range(40))  # over 75 tokens: two chunks


@pytest.mark.parametrize("option", ["pad_cond_uncond", "pad_cond_uncond_v0"])
def test_the_experts_rows_are_padded_like_the_main_rows(webui, option):
    try:
        options(webui, **{option: True})
        as_main = px(webui, main=EXPERT, prompt=f"a lion, {LONG}", negative_prompt="blurry", seed=51)
        alone = px(webui, seed=51, negative_prompt="x", fused={"expert_prompt": f"a lion, {LONG}", "expert_negative_prompt": "blurry",
                                                                 **ALONE})
        assert np.array_equal(alone, as_main)
        unpadded_main = None
        options(webui, **{option: False})
        unpadded_main = px(webui, main=EXPERT, prompt=f"a lion, {LONG}", negative_prompt="blurry", seed=51)
        assert not np.array_equal(unpadded_main, as_main)  # the option matters for these prompts
    finally:
        options(webui, pad_cond_uncond=False, pad_cond_uncond_v0=False)


# --------------------------------------------------------------------------- 7. inpainting

def test_inpainting_decides_the_mask_on_the_area_being_generated(webui):
    init = px(webui, seed=60).astype(np.uint8)
    mask = np.zeros((64, 64, 3), np.uint8)
    mask[16:48, 16:48] = 255
    resp = webui.img2img(init, prompt=PROMPT, steps=8, seed=61, denoising_strength=0.9, mask=webui.encode_png(mask),
                         inpainting_fill=1, inpaint_full_res=False, mask_blur=0, **webui.checkpoint(MAIN), **fusion(show_mask=True))
    final = webui.decode(resp["images"][1])
    expert = final[..., 0] > 127
    outside = np.ones((64, 64), bool)
    outside[16:48, 16:48] = False
    assert not expert[outside].any(), "the expert won pixels that the WebUI keeps anyway"
    assert 0 < expert[16:48, 16:48].mean() < 1


# --------------------------------------------------------------------------- 8. which VAE decodes

def test_the_main_models_vae_decodes(webui):
    """tiny-eps-b-vae2 is tiny-eps-b with another VAE: run alone on tiny-eps-a's latents it gives
    tiny-eps-b's picture (the main model's VAE, which tiny-eps-b shares), not its own."""
    own_vae = px(webui, main="tiny-eps-b-vae2", seed=70)
    shared_vae = px(webui, main=EXPERT, seed=70)
    assert webui.differs(own_vae, shared_vae)
    alone = px(webui, seed=70, fused={"expert_checkpoint": "tiny-eps-b-vae2", **ALONE})
    assert np.array_equal(alone, shared_vae)


# --------------------------------------------------------------------------- 9. memory

BIG = "tiny-zz-big"


def rss(webui):
    return webui.testbed("rss", trim="true")["VmRSS"]


def test_unloading_returns_the_memory(webui):
    webui.mf_unload()
    before = rss(webui)
    px(webui, fused={"expert_checkpoint": BIG})
    status = webui.mf_status()
    loaded = rss(webui)
    assert loaded - before > 0.8 * status["expert_bytes"] > 100e6, (before, loaded, status["expert_bytes"])
    webui.mf_unload()
    after = rss(webui)
    assert after - before < 0.2 * status["expert_bytes"], (before, loaded, after)


def test_keep_loaded_off_frees_the_expert_after_the_generation(webui):
    webui.mf_unload()
    before = rss(webui)
    try:
        options(webui, magicfusion_keep_expert_loaded=False)
        a = px(webui, fused={"expert_checkpoint": BIG}, seed=80)
        status = webui.mf_status()
        assert status["experts_loaded"] == [] and status["expert_bytes"] == 0
        assert rss(webui) - before < 60e6
        assert np.array_equal(px(webui, fused={"expert_checkpoint": BIG}, seed=80), a)  # loaded again, same picture
    finally:
        options(webui, magicfusion_keep_expert_loaded=True)


def test_the_idle_timer_frees_the_experts_without_a_later_generation(webui):
    try:
        options(webui, magicfusion_unload_after_minutes=0.02)  # 1.2 s
        px(webui, fused={})
        assert webui.mf_status()["experts_loaded"]
        deadline = time.monotonic() + 30
        while webui.mf_status()["experts_loaded"]:
            assert time.monotonic() < deadline, "the idle timer never fired"
            time.sleep(0.3)
    finally:
        options(webui, magicfusion_unload_after_minutes=0)


def test_experts_that_cannot_fuse_with_a_new_main_model_are_freed(webui):
    px(webui, fused={})
    assert any(t.startswith(EXPERT) for t in webui.mf_status()["experts_loaded"])
    r = webui.post("/sdapi/v1/options", {"sd_model_checkpoint": "tiny-xl-a"})  # SDXL: no shared latent space
    assert r.status_code == 200
    try:
        assert not any(t.startswith(EXPERT) for t in webui.mf_status()["experts_loaded"])
        px(webui, main="tiny-xl-a", fused={"expert_checkpoint": "tiny-xl-b"})
        webui.post("/sdapi/v1/options", {"sd_model_checkpoint": "tiny-xl-b"})  # the expert became the main model
        assert not any(t.startswith("tiny-xl-b") for t in webui.mf_status()["experts_loaded"])
    finally:
        webui.post("/sdapi/v1/options", {"sd_model_checkpoint": MAIN})


# --------------------------------------------------------------------------- 10. loading without exposing the expert

def test_the_main_model_stays_the_main_model_while_an_expert_loads(webui):
    webui.mf_unload()
    main = webui.get("/sdapi/v1/options").json()
    plain_ref = px(webui, seed=90)
    seen, errors = [], []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            try:
                o = webui.get("/sdapi/v1/options").json()
                seen.append((o["sd_model_checkpoint"], o["sd_checkpoint_hash"]))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

    poller = threading.Thread(target=poll)
    poller.start()
    second = {}
    t = threading.Thread(target=lambda: second.update(image=px(webui, seed=90)))
    try:
        fused = threading.Thread(target=lambda: second.update(fused=px(webui, fused={"expert_checkpoint": BIG})))
        fused.start()
        time.sleep(0.2)
        t.start()  # a second request during the load: it waits its turn and is a plain picture
        fused.join(300)
        t.join(300)
    finally:
        stop.set()
        poller.join(30)
    assert not errors and len(seen) > 5
    # Only the main checkpoint is ever seen (the requests' own override_settings may spell its name two ways).
    assert {h for _, h in seen} == {main["sd_checkpoint_hash"]} and all(name.startswith(MAIN) for name, _ in seen), set(seen)
    assert np.array_equal(second["image"], plain_ref)


# --------------------------------------------------------------------------- 11. the guard

def test_an_escaped_script_name_is_still_checked(webui):
    raw = ('{"prompt": "a cat", "steps": 3, "width": 64, "height": 64, '
           '"alwayson_scripts": {"\\u004dagicFusion": {"args": [{"enabled": true, "k_expert": -1}]}}}')
    r = webui.session.post(webui.url + "/sdapi/v1/txt2img", data=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "MagicFusion k_expert:" in r.json()["errors"], r.text[:300]


def _png(b64):
    import base64
    return Image.open(io.BytesIO(base64.b64decode(b64)))
