"""The trained toy world of bench/quality/ in the real A1111 WebUI.

Its checkpoints (assembled with their .yaml, `server.toy_world_checkpoints`) load through the
WebUI's own loader and draw what each model knows; fused generations through the API give the
pixels of the quality bench's harness (the fusion step in a plain DDIM loop with the same
weights, computed here), so the bench's two modes measure the same pictures. A second WebUI
serves the toy checkpoints beside the session's.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from tests.webui.conftest import WEBUI_DIR, WEBUI_PYTHON, webui_server

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for _folder in (os.path.join(REPO, "bench", "quality"), os.path.join(REPO, "bench")):
    if _folder not in sys.path:
        sys.path.insert(0, _folder)

import quality as Q  # noqa: E402
import scorer  # noqa: E402

SEEDS = (1003, 1004)  # one batch: the WebUI draws image i from seed 1003 + i, as the harness does
TASK = scorer.Task("fine", "snow", "blue striped")
# Mean absolute difference (0..255) allowed between the WebUI's pictures and the harness's: the
# same weights and the same DDIM steps, but another implementation of the UNet, the VAE and the
# text encoder (ldm's and diffusers'), so float rounding differs.
TOLERANCE = 1.5


@pytest.fixture(scope="module")
def toy_webui(webui):  # after the session's WebUI: the same skip rules and install
    checkpoints = webui_server.toy_world_checkpoints(WEBUI_PYTHON, log=lambda m: None)
    with webui_server.running(WEBUI_DIR, WEBUI_PYTHON, ckpt_dir=checkpoints, testbed=False, log=lambda m: None) as client:
        yield client


@pytest.fixture(scope="module")
def models():
    import toy
    return toy.load_models()


def generate(client, checkpoint: str, prompt: str, fields: dict | None = None) -> np.ndarray:
    body = {"prompt": prompt, "negative_prompt": "", "width": 128, "height": 128, "steps": Q.STEPS, "cfg_scale": Q.CFG,
            "seed": SEEDS[0], "batch_size": len(SEEDS), "sampler_name": "DDIM", **client.checkpoint(checkpoint)}
    if fields is not None:
        body["alwayson_scripts"] = {"MagicFusion": {"args": [{"enabled": True, "expert_checkpoint": "toy-fine",
                                                              "expert_prompt": TASK.expert_prompt, **fields}]}}
    resp = client.txt2img(**body)
    return np.stack([client.pixels(resp, i) for i in range(len(SEEDS))]).astype(np.uint8)


def assert_close(webui_images: np.ndarray, harness_images: np.ndarray) -> None:
    assert webui_images.shape == harness_images.shape
    diff = np.abs(webui_images.astype(np.float32) - harness_images.astype(np.float32)).mean(axis=(1, 2, 3))
    assert (diff < TOLERANCE).all(), f"mean |WebUI - harness| per image {diff.round(2).tolist()} (allowed {TOLERANCE})"


def test_each_toy_model_draws_what_it_knows(toy_webui, models):
    import toy
    general = generate(toy_webui, "toy-general", TASK.general_prompt)
    expert = generate(toy_webui, "toy-fine", TASK.expert_prompt)
    assert [scorer.scene(im) for im in general] == [TASK.scene] * len(SEEDS)
    assert [scorer.fine_object(im) for im in expert] == [TASK.obj] * len(SEEDS)
    assert_close(general, toy.generate(models, "general", [TASK.general_prompt] * len(SEEDS), SEEDS, Q.STEPS, Q.CFG))
    assert_close(expert, toy.generate(models, "fine", [TASK.expert_prompt] * len(SEEDS), SEEDS, Q.STEPS, Q.CFG))


@pytest.mark.parametrize("name", ["official", "stable"])
def test_a_fused_generation_gives_the_harness_pictures(toy_webui, models, name):
    method = next(m for m in Q.METHODS if m.name == name)
    webui_images = generate(toy_webui, "toy-general", TASK.general_prompt, method.fields)
    harness_images, _ = Q.harness_images(models, "fine", method, [(TASK, s) for s in SEEDS], "ddim")
    assert_close(webui_images, harness_images)
    assert [scorer.success(im, TASK) for im in webui_images] == [scorer.success(im, TASK) for im in harness_images]
    # Fusion takes the scene from the general model and the ball from the expert: neither
    # model alone gets both (test above), the fused picture does.
    assert any(scorer.success(im, TASK) for im in webui_images)
