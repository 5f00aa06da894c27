"""MagicFusion on WebUI Forge: what the Forge adapter must do beyond the host-independent
invariants of test_hosts.py (samplers, window, hires with its masks, img2img, infotext, units,
LoRA experts), in the real Forge test bed.

Forge runs full-size SD1.5 checkpoints with random weights on the CPU (about 3 s a step at
64x64), so every test makes few, small generations (64x64, 3 steps).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from tests.webui.loras import write_lora

MAIN, EXPERT = "forge-sd15-a", "forge-sd15-b"
PROMPT = "a photo of a cat, sharp focus"
ALONE = {"fusion_start": 1.0, "fusion_end": 1.0, "outside_window": "expert"}


def body(forge, *, main=MAIN, fused=None, **payload):
    out = {**forge.TXT2IMG_DEFAULTS, "prompt": PROMPT, "width": 64, "height": 64, "steps": 3, "seed": 77, "cfg_scale": 5.0,
           **forge.checkpoint(main), **payload}
    if fused is not None:
        out["alwayson_scripts"] = {"MagicFusion": {"args": [{"enabled": True, "expert_checkpoint": EXPERT, **fused}]}}
    return out


def gen(forge, **kw):
    return forge.txt2img(**body(forge, **kw))


def report(forge):
    return forge.mf_status()["last_generation"]


@pytest.mark.parametrize("sampler", ["DPM++ 2M", "UniPC", "DDIM CFG++"])
def test_every_sampler_family_keeps_the_identity_and_fuses(forge, sampler):
    plain = forge.pixels(gen(forge, sampler_name=sampler))
    same = forge.pixels(gen(forge, sampler_name=sampler, fused={"expert_checkpoint": MAIN}))
    assert np.array_equal(plain, same)
    fused = forge.pixels(gen(forge, sampler_name=sampler, fused={}))
    assert forge.differs(fused, plain, threshold=0.5)


def test_the_window_runs_only_the_model_in_use(forge):
    gen(forge, fused={"fusion_start": 0.33, "outside_window": "expert"})  # steps 1 and 2 of 3 fuse
    record = report(forge)["passes"][0]
    assert record["fused_steps"] == [1, 2], record
    assert record["model_calls"] == {"general": 2, "expert 1": 3}, record  # step 0: the expert alone, the main UNet skipped


def test_hires_fuses_both_passes_and_shows_their_masks(forge):
    resp = forge.txt2img(**forge.hires_payload(**body(forge, fused={"show_mask": True}), hr_scale=2.0, hr_second_pass_steps=2))
    assert len(resp["images"]) == 3
    assert forge.decode(resp["images"][0]).shape == (128, 128, 3)
    passes = report(forge)["passes"]
    assert [(p["hires"], p["fused"]) for p in passes] == [(False, True), (True, True)], passes
    assert all(p["model_calls"].get("expert 1") for p in passes)


def test_img2img_and_the_infotext_round_trip(forge):
    first = gen(forge, fused={"k_expert": 1.5, "fusion_end": 0.67, "expert_prompt": "a cartoon lion"})
    text = forge.info(first)["infotexts"][0]
    assert "MagicFusion expert: forge-sd15-b" in text and "MagicFusion k expert: 1.5" in text
    again = forge.txt2img(**body(forge, **{"alwayson_scripts": {"MagicFusion": {"args": [{"infotext": text}]}}}))
    assert np.array_equal(forge.pixels(again), forge.pixels(first))
    init = forge.pixels(first).astype(np.uint8)
    i2i = {k: v for k, v in body(forge).items() if k not in ("width", "height")}
    plain = forge.pixels(forge.img2img(init, **i2i, denoising_strength=0.7))
    fused = forge.pixels(forge.img2img(init, **i2i, denoising_strength=0.7,
                                       alwayson_scripts={"MagicFusion": {"args": [{"enabled": True, "expert_checkpoint": EXPERT}]}}))
    assert forge.differs(fused, plain, threshold=0.5)


def test_a_separate_expert_and_a_main_checkpoint_unit(forge):
    units = [{"checkpoint": EXPERT}, {"checkpoint": MAIN, "prompt": "a watercolor lion"}]
    resp = forge.txt2img(**{**body(forge), "alwayson_scripts": {"MagicFusion": {"args": [{"enabled": True, "units": units}]}}})
    calls = report(forge)["passes"][0]["model_calls"]
    assert calls == {"general": 3, "expert 1": 3}, calls  # unit 2 rode in the main model's calls
    assert forge.differs(forge.pixels(resp), forge.pixels(gen(forge, fused={})), threshold=0.5)


def _copy_with_other_hash(src: str, dst: str) -> None:
    """The same tensors with one more metadata entry: a file of another hash (the WebUI maps a
    hash to one file, so an identical copy would stand in for the main checkpoint)."""
    with open(src, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header.setdefault("__metadata__", {})["magicfusion_test_copy"] = "1"
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(dst, "wb") as out:
            out.write(len(raw).to_bytes(8, "little") + raw)
            shutil.copyfileobj(f, out, 16 << 20)


@pytest.fixture()
def main_copy(forge):
    """The main checkpoint under a second name: the same weights, loaded as a separate expert."""
    folder = os.path.join(forge.fixtures_dir, "checkpoints")
    copy = os.path.join(folder, f"{MAIN}-copy.safetensors")
    _copy_with_other_hash(os.path.join(folder, f"{MAIN}.safetensors"), copy)
    assert forge.post("/sdapi/v1/refresh-checkpoints", {}).status_code == 200
    try:
        yield f"{MAIN}-copy"
    finally:
        forge.mf_unload()
        os.remove(copy)
        forge.post("/sdapi/v1/refresh-checkpoints", {})


@pytest.mark.parametrize("expert_prompt", ["a watercolor lion", "a watercolor lion AND a red ball :0.6"])
def test_a_main_checkpoint_unit_rides_in_the_main_call_and_equals_a_separate_copy(forge, main_copy, expert_prompt):
    """A unit on the main checkpoint with another prompt and the main negative prompt adds its
    cond rows to the main model's own call (one UNet call a step, as on A1111); its prediction
    is the one the same weights give in a call of their own (a copy of the checkpoint under
    another name is a separate expert), up to the rounding of a larger batch."""
    fused = {"expert_checkpoint": MAIN, "expert_prompt": expert_prompt, "k_expert": 2.0}
    ridden = forge.pixels(gen(forge, fused=fused))
    assert report(forge)["passes"][0]["model_calls"] == {"general": 3}
    separate = forge.pixels(gen(forge, fused={**fused, "expert_checkpoint": main_copy}))
    assert report(forge)["passes"][0]["model_calls"] == {"general": 3, "expert 1": 3}
    diff = np.abs(ridden.astype(int) - separate.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())
    assert forge.differs(ridden, forge.pixels(gen(forge)), threshold=0.5)


@pytest.fixture(scope="module")
def lora(forge):
    ckpt = os.path.join(forge.fixtures_dir, "checkpoints", f"{MAIN}.safetensors")
    write_lora(ckpt, os.path.join(forge.server.data_dir, "models", "Lora", "mf-forge.safetensors"), seed=9, strength=2.0)
    assert forge.post("/sdapi/v1/refresh-loras", {}).status_code == 200
    return "mf-forge"


@pytest.mark.parametrize("expert", [EXPERT, MAIN])
def test_an_expert_prompt_lora_acts_on_that_expert_only(forge, lora, expert):
    """A separate expert, and the main checkpoint as the expert (Forge merges a LoRA into the one
    model's weights, so that unit gets a copy of its own): alone, each equals that checkpoint with
    the LoRA in the main prompt."""
    forge.mf_unload()
    tag = f"{PROMPT} <lora:{lora}:1>"
    as_main = forge.pixels(gen(forge, main=expert, prompt=tag))
    alone = forge.pixels(gen(forge, fused={"expert_checkpoint": expert, "expert_prompt": tag, **ALONE}))
    assert np.array_equal(alone, as_main)
    assert forge.differs(as_main, forge.pixels(gen(forge, main=expert)), threshold=0.5)  # the LoRA acts
    forge.mf_unload()
