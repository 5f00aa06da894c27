"""A LoRA as the expert (issue #13): networks in a unit's prompt act on that unit only.

Rule: `<lora:name:w>` in an expert prompt acts on that expert's evaluations (UNet and text
encoder); networks in the main prompt act on the main model only; an empty expert prompt is
the main prompt, networks included. Exactness is checked pixel for pixel in the real WebUI,
with LoRA files written for the tiny fixtures (tests/webui/loras.py).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.webui.loras import write_lora

MAIN, EXPERT = "tiny-eps-a", "tiny-eps-b"
PROMPT = "a photo of a dog on the beach"
ALONE = {"fusion_start": 1.0, "fusion_end": 1.0, "outside_window": "expert"}
GENERAL_ONLY = {"fusion_start": 1.0, "fusion_end": 1.0}


def gen(webui, *, main=MAIN, fused=None, **payload):
    body = {"prompt": PROMPT, "steps": 5, "seed": 31, **webui.checkpoint(main), **payload}
    if fused is not None:
        body["alwayson_scripts"] = {"MagicFusion": {"args": [{"enabled": True, "expert_checkpoint": EXPERT, **fused}]}}
    return webui.txt2img(**body)


def px(webui, **kw):
    return webui.pixels(gen(webui, **kw))


@pytest.fixture(scope="module")
def loras(webui):
    """Two LoRAs per fixture family (UNet attention and convolutions, and the text encoder)."""
    ckpts = os.path.join(webui.fixtures_dir, "checkpoints")
    lora_dir = os.path.join(webui.server.data_dir, "models", "Lora")
    for name, ckpt, seed in (("mf-a", MAIN, 1), ("mf-b", MAIN, 2), ("mf-xl", "tiny-xl-a", 3)):
        assert write_lora(os.path.join(ckpts, ckpt + ".safetensors"), os.path.join(lora_dir, name + ".safetensors"), seed=seed) > 4
    assert webui.post("/sdapi/v1/refresh-loras", {}).status_code == 200
    names = {item["name"] for item in webui.get("/sdapi/v1/loras").json()}
    assert {"mf-a", "mf-b", "mf-xl"} <= names
    return names


def main_weights(webui):
    r = webui.get("/magicfusion-testbed/v1/main-weights")
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("expert", [EXPERT, MAIN])
def test_an_expert_alone_with_a_lora_equals_that_checkpoint_with_the_lora(webui, loras, expert):
    with_lora = px(webui, main=expert, prompt=f"{PROMPT} <lora:mf-a:0.8>")
    without = px(webui, main=expert)
    assert webui.differs(with_lora, without)  # the LoRA is found and acts
    alone = px(webui, fused={"expert_checkpoint": expert, "expert_prompt": f"{PROMPT} <lora:mf-a:0.8>", **ALONE})
    assert np.array_equal(alone, with_lora)
    # Text-encoder-only and UNet-only multipliers act as in the main prompt too.
    for tag in ("<lora:mf-a:0.8:0>", "<lora:mf-a:0:1>"):
        as_main = px(webui, main=expert, prompt=f"{PROMPT} {tag}")
        assert np.array_equal(px(webui, fused={"expert_checkpoint": expert, "expert_prompt": f"{PROMPT} {tag}", **ALONE}), as_main)


def test_main_prompt_networks_act_on_the_main_model_only(webui, loras):
    main_lora = px(webui, prompt=f"{PROMPT} <lora:mf-a:1>")
    # The main model's evaluations are a plain generation's with the main prompt's networks ...
    fused = px(webui, prompt=f"{PROMPT} <lora:mf-a:1>", fused={"expert_prompt": f"{PROMPT} <lora:mf-b:1>", **GENERAL_ONLY})
    assert np.array_equal(fused, main_lora)
    # ... and a separate expert with its own prompt sees none of them.
    expert_plain = px(webui, main=EXPERT)
    alone = px(webui, prompt=f"{PROMPT} <lora:mf-a:1>", fused={"expert_prompt": PROMPT, **ALONE})
    assert np.array_equal(alone, expert_plain)
    # An empty expert prompt is the main prompt, networks included.
    expert_lora = px(webui, main=EXPERT, prompt=f"{PROMPT} <lora:mf-a:1>")
    assert np.array_equal(px(webui, prompt=f"{PROMPT} <lora:mf-a:1>", fused=ALONE), expert_lora)


def test_one_checkpoint_with_a_lora_expert_loads_nothing_and_leaves_the_main_weights(webui, loras):
    """The headline case: "my checkpoint" fused with "my checkpoint + my subject LoRA"."""
    webui.mf_unload()
    plain = px(webui)  # a plain generation: every main layer holds no network now
    before = main_weights(webui)
    fields = {"expert_checkpoint": MAIN, "expert_prompt": "a photo of sks dog <lora:mf-a:1>"}
    first = gen(webui, fused=fields)
    again = px(webui, fused=fields)
    assert np.array_equal(webui.pixels(first), again)
    no_lora = px(webui, fused={**fields, "expert_prompt": "a photo of sks dog"})
    assert webui.differs(again, no_lora, threshold=0.5) and webui.differs(again, plain, threshold=0.5)
    zero = px(webui, fused={**fields, "expert_prompt": "a photo of sks dog <lora:mf-a:0>"})
    assert np.array_equal(zero, no_lora)  # a zero-weight network adds nothing to the expert's rows
    status = webui.mf_status()
    assert status["experts_loaded"] == [] and status["expert_bytes"] == 0
    report = status["last_generation"]
    assert report["units"][0]["is_main"] and report["units"][0]["networks"] == ["mf-a"]
    assert report["passes"][0]["model_calls"] == {"general": 5}  # the expert's rows rode in the main model's calls
    assert main_weights(webui) == before
    assert np.array_equal(px(webui), plain)


def test_a_separate_expert_with_its_own_lora(webui, loras):
    px(webui)
    before = main_weights(webui)
    plain_fused = px(webui, fused={"expert_prompt": "a photo of sks dog"})
    lora_fused = px(webui, fused={"expert_prompt": "a photo of sks dog <lora:mf-b:1>"})
    assert webui.differs(lora_fused, plain_fused, threshold=0.5)
    assert np.array_equal(px(webui, fused={"expert_prompt": "a photo of sks dog <lora:mf-b:1>"}), lora_fused)
    assert np.array_equal(px(webui, fused={"expert_prompt": "a photo of sks dog"}), plain_fused)  # it left the expert
    assert main_weights(webui) == before


def test_batches_hires_and_the_second_pass_use_the_unit_networks(webui, loras):
    tag = f"{PROMPT} <lora:mf-a:0.7>"
    batch = gen(webui, main=EXPERT, prompt=tag, batch_size=2, n_iter=2)
    alone = gen(webui, prompt=PROMPT, batch_size=2, n_iter=2, fused={"expert_prompt": tag, **ALONE})
    for i in range(4):
        assert np.array_equal(webui.pixels(alone, i), webui.pixels(batch, i))
    hires = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "denoising_strength": 0.6, "hr_second_pass_steps": 3}
    as_main = px(webui, main=EXPERT, prompt=tag, **hires)
    assert np.array_equal(px(webui, fused={"expert_prompt": tag, **ALONE}, **hires), as_main)


def test_sdxl_loras_on_sdxl(webui, loras):
    tag = "a photo of a dog <lora:mf-xl:1>"
    as_main = px(webui, main="tiny-xl-b", prompt=tag)
    assert webui.differs(as_main, px(webui, main="tiny-xl-b", prompt="a photo of a dog"))
    alone = px(webui, main="tiny-xl-a", prompt="a photo of a dog",
               fused={"expert_checkpoint": "tiny-xl-b", "expert_prompt": tag, **ALONE})
    assert np.array_equal(alone, as_main)
    fused = px(webui, main="tiny-xl-a", fused={"expert_checkpoint": "tiny-xl-a", "expert_prompt": tag})
    assert webui.differs(fused, px(webui, main="tiny-xl-a", fused={"expert_checkpoint": "tiny-xl-a", "expert_prompt": "a photo of a dog"}),
                         threshold=0.5)


@pytest.mark.parametrize("prompt, message", [
    ("a dog <lora:no-such-lora:1>", "no network named 'no-such-lora'"),
    ("a dog <hypernet:anything:1>", "cannot be applied to an expert"),
])
def test_unknown_or_unsupported_networks_are_refused(webui, loras, prompt, message):
    r = webui.post("/sdapi/v1/txt2img", {**webui.TXT2IMG_DEFAULTS, "prompt": PROMPT, **webui.checkpoint(MAIN),
                                         "alwayson_scripts": {"MagicFusion": {"args": [
                                             {"enabled": True, "expert_checkpoint": EXPERT, "expert_prompt": prompt}]}}})
    assert r.status_code == 422, r.text[:300]
    assert "MagicFusion expert_prompt:" in r.json()["errors"] and message in r.json()["errors"]
