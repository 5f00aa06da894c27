"""The README's main-job command, tools/compare.py, against the test bed."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from PIL import Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_compare_grid(webui, tmp_path):
    out = tmp_path / "grid.png"
    cmd = [sys.executable, os.path.join(REPO_ROOT, "tools", "compare.py"), "--url", webui.url, "--main", "tiny-eps-a",
           "--expert", "tiny-eps-b", "--prompt", "a lion with a crown on his head", "--seed", "6854", "--steps", "6",
           "--width", "64", "--height", "64", "--k-expert", "1.5", "--sampler", "Euler a", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with Image.open(out) as im:
        grid = np.asarray(im.convert("RGB")).astype(np.int16)
        text = im.info["parameters"]
    assert "MagicFusion expert: tiny-eps-b" in text and "MagicFusion k expert: 1.5" in text
    assert grid.shape[1] == 4 * 64
    band = grid.shape[0] - 64
    tiles = [grid[band:, i * 64:(i + 1) * 64] for i in range(4)]

    body = {"prompt": "a lion with a crown on his head", "seed": 6854, "steps": 6, "sampler_name": "Euler a",
            "cfg_scale": 7.0, **webui.checkpoint("tiny-eps-a")}
    general = webui.decode(webui.txt2img(**body)["images"][0]).astype(np.int16)
    mf = {"enabled": True, "expert_checkpoint": "tiny-eps-b", "k_expert": 1.5}
    fused = webui.txt2img(**body, alwayson_scripts={"MagicFusion": {"args": [mf]}})
    assert np.array_equal(tiles[0], general)
    assert np.array_equal(tiles[2], webui.decode(fused["images"][0]).astype(np.int16))
    assert not np.array_equal(tiles[1], tiles[0]) and not np.array_equal(tiles[1], tiles[2])
    assert set(np.unique(tiles[3])) <= {0, 255}


def test_compare_reports_errors(webui, tmp_path):
    cmd = [sys.executable, os.path.join(REPO_ROOT, "tools", "compare.py"), "--url", webui.url, "--expert", "no-such-model",
           "--prompt", "x", "--steps", "2", "--width", "64", "--height", "64", "--out", str(tmp_path / "x.png")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "MagicFusion expert_checkpoint: no installed checkpoint matches 'no-such-model'" in done.stderr
