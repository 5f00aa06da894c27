"""MagicFusion under the WebUI's --medvram and --lowvram modes.

Those modes put forward hooks on the models' parts that move each part to the device when it
runs and the previous one back (a single "module on the device" slot shared by every loaded
model, the expert included). On this CPU test bed the moves are no-ops but the hooks and
their bookkeeping run as on a GPU: fused pictures must equal the normal mode's, pixel for
pixel, for an SD1 and an SDXL pair, and for the expert alone.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

CASES = [
    # main, expert, extra fields
    ("tiny-eps-a", "tiny-eps-b", {}),
    ("tiny-eps-a", "tiny-v", {"expert_prompt": "a watercolor painting of a lion"}),
    ("tiny-xl-a", "tiny-xl-b", {}),
    ("tiny-eps-a", "tiny-eps-b", {"fusion_start": 1.0, "fusion_end": 1.0, "outside_window": "expert"}),
]


def generate(client, main, expert, fields, seed):
    body = {"prompt": "a photo of a cat", "steps": 5, "seed": seed, "sampler_name": "Euler a", **client.checkpoint(main),
            "alwayson_scripts": {"MagicFusion": {"args": [{"enabled": True, "expert_checkpoint": expert, **fields}]}}}
    return client.decode(client.txt2img(**body)["images"][0])


@pytest.fixture(scope="module", params=["--medvram", "--lowvram"])
def vram_webui(request):
    server = sys.modules["magicfusion_webui_server"]  # loaded by conftest.py
    webui_dir, python = server.find_install()
    with server.running(webui_dir, python, extra_args=(request.param,), log=lambda m: sys.stderr.write(m + "\n")) as client:
        yield client


def test_fused_pictures_equal_the_normal_mode(webui, vram_webui):
    flags = vram_webui.get("/sdapi/v1/cmd-flags").json()
    assert flags["medvram"] or flags["lowvram"], flags
    for i, (main, expert, fields) in enumerate(CASES):
        reference = generate(webui, main, expert, fields, seed=60 + i)
        assert np.array_equal(generate(vram_webui, main, expert, fields, seed=60 + i), reference), (main, expert, fields)
    plain = vram_webui.txt2img_array(prompt="a photo of a cat", steps=5, seed=60, sampler_name="Euler a",
                                     **vram_webui.checkpoint("tiny-eps-a"))
    assert not np.array_equal(plain, generate(webui, *CASES[0][:2], CASES[0][2], seed=60))
