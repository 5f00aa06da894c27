"""The first release's behaviour is kept: its requests and infotexts give the same pixels.

A second WebUI runs the extension as it was at the first release (the repository's own commit
FIRST_RELEASE, written out with `git archive`), beside the session's WebUI running this tree;
both use the same fixtures. The official method must be bit-identical to it, a one-unit
request must equal its one-expert request, and an infotext it wrote must paste back to the
same image. Without the commit (a shallow clone) the tests are skipped, saying so.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
import tempfile

import numpy as np
import pytest

from tests.webui.conftest import WEBUI_DIR, WEBUI_PYTHON, webui_server

FIRST_RELEASE = "53a2163993751bb8120bb06f1a6025ef8c88ed22"  # 0.1.0, the last commit of the first release
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAIN, EXPERT = "tiny-eps-a", "tiny-eps-b"
PROMPT = "a photo of a cat, sharp focus"


@pytest.fixture(scope="module")
def first_release(webui):
    has = subprocess.run(["git", "-C", REPO, "cat-file", "-e", f"{FIRST_RELEASE}^{{commit}}"], capture_output=True)
    if has.returncode != 0:
        pytest.skip(f"the first release's commit {FIRST_RELEASE[:10]} is not in this clone (shallow?)")
    with tempfile.TemporaryDirectory(prefix="mf-first-release-") as tmp:
        archive = os.path.join(tmp, "tree.tar")
        subprocess.run(["git", "-C", REPO, "archive", "-o", archive, FIRST_RELEASE], check=True)
        root = os.path.join(tmp, "sd-webui-magicfusion")
        with tarfile.open(archive) as t:
            t.extractall(root, filter="data")
        with webui_server.running(WEBUI_DIR, WEBUI_PYTHON, extension=root, log=lambda m: None) as old:
            yield old


def request(**fields):
    return {"alwayson_scripts": {"MagicFusion": {"args": [{"enabled": True, "expert_checkpoint": EXPERT, **fields}]}}}


def gen(client, fields=None, **payload):
    body = {"prompt": PROMPT, "steps": 6, "seed": 101, **client.checkpoint(MAIN), **payload}
    if fields is not None:
        body.update(request(**fields))
    return client.txt2img(**body)


CASES = [
    ("Euler a", {}, {}),
    ("DDIM", {"k_expert": 1.5, "fusion_start": 0.2, "fusion_end": 0.8}, {}),
    ("DPM++ 2M", {"saliency_baseline": "own", "blur": 2, "k_general": 0.5, "expert_prompt": "a cartoon lion"}, {}),
    ("Heun", {"outside_window": "expert", "fusion_start": 0.3, "expert_cfg_scale": 9.0}, {}),
    ("Euler a", {"expert_checkpoint": MAIN, "expert_prompt": "a watercolor lion"}, {}),
    ("Euler a", {"expert_text_encoder": "general", "expert_prompt": "a lion AND a crown:0.6"}, {"prompt": "a cat AND a dog:0.5"}),
    ("DPM++ 2M", {}, {"batch_size": 2, "n_iter": 2}),
    ("Euler a", {"apply_in_hires": True}, {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "denoising_strength": 0.6,
                                           "hr_second_pass_steps": 3}),
]


@pytest.mark.parametrize("sampler, fields, payload", CASES)
def test_the_official_method_is_bit_identical_to_the_first_release(webui, first_release, sampler, fields, payload):
    old = gen(first_release, fields, sampler_name=sampler, **payload)
    new = gen(webui, {**fields, "method": "official"}, sampler_name=sampler, **payload)
    assert len(old["images"]) == len(new["images"])
    for i in range(len(old["images"])):
        assert np.array_equal(webui.pixels(new, i), first_release.pixels(old, i)), f"image {i}"
    # The same request as one unit in the units list is the same fusion.
    unit = {"checkpoint": fields.get("expert_checkpoint", EXPERT), "prompt": fields.get("expert_prompt", ""),
            "k": fields.get("k_expert", 1.0), "cfg_scale": fields.get("expert_cfg_scale", 0.0)}
    rest = {k: v for k, v in fields.items() if k not in ("expert_checkpoint", "expert_prompt", "k_expert", "expert_cfg_scale")}
    body = {"prompt": PROMPT, "steps": 6, "seed": 101, "sampler_name": sampler, **webui.checkpoint(MAIN), **payload,
            "alwayson_scripts": {"MagicFusion": {"args": [{"enabled": True, "method": "official", "units": [unit], **rest}]}}}
    units = webui.txt2img(**body)
    assert np.array_equal(webui.pixels(units), first_release.pixels(old))


def test_an_infotext_of_the_first_release_pastes_back_to_the_same_image(webui, first_release):
    old = gen(first_release, {"k_expert": 2.0, "fusion_end": 0.7, "blur": 2, "saliency_baseline": "own",
                              "expert_prompt": "a cartoon cat, bold lines"}, sampler_name="DPM++ 2M")
    text = first_release.info(old)["infotexts"][0]
    assert "MagicFusion method" not in text  # written before methods existed
    body = {"prompt": PROMPT, "steps": 6, "seed": 101, "sampler_name": "DPM++ 2M", **webui.checkpoint(MAIN),
            "alwayson_scripts": {"MagicFusion": {"args": [{"infotext": text}]}}}
    again = webui.txt2img(**body)
    assert np.array_equal(webui.pixels(again), first_release.pixels(old))
    assert "MagicFusion method: official" in webui.info(again)["infotexts"][0]


def test_the_first_release_positional_form_still_fuses(webui, first_release):
    """The first release's UI sent 15 positional values; they still mean the same fields."""
    info = first_release.get("/sdapi/v1/script-info").json()
    args = [a["value"] for a in next(s for s in info if s["name"] == "magicfusion" and not s["is_img2img"])["args"]]
    assert len(args) == 15
    args[0], args[1], args[5] = True, EXPERT, 1.5
    body = {"prompt": PROMPT, "steps": 6, "seed": 101, **webui.checkpoint(MAIN), "alwayson_scripts": {"MagicFusion": {"args": args}}}
    old, new = first_release.txt2img(**body), webui.txt2img(**body)
    named = gen(webui, {"k_expert": 1.5})
    assert np.array_equal(webui.pixels(new), webui.pixels(named))  # the same fields as the named form, with today's method
    assert webui.info(new)["infotexts"][0].count("MagicFusion expert: tiny-eps-b") == 1 and first_release.pixels(old).std() > 10
