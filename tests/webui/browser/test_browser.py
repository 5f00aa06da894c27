"""The MagicFusion accordion in the real WebUI page, driven by headless Chromium.

The tests share one page (``web``) and run in file order; each one that needs a clean page
reloads it. The WebUI's ui-config makes 64x64, 4-step, seed-1234 images the page's defaults.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from . import pages
from .pages import CONTROL_NAMES, SHOWN_BY, SPEC, TABS

ENABLED_HINT = SPEC["enabled"].hint
FIXTURE_NAMES = sorted(f"{name}.safetensors" for name in pages._load_server_module().CHECKPOINTS)

# Every control that the infotext carries, at a value that is not its default.
NON_DEFAULT = {
    "expert_checkpoint": "tiny-eps-b",
    "expert_prompt": "a red ball, studio light",
    "expert_negative_prompt": "blurry, grey",
    "k_general": 1.5,
    "k_expert": 2.5,
    "expert_cfg_scale": 3.5,
    "fusion_start": 0.1,
    "fusion_end": 0.6,
    "outside_window": "expert",
    "blur": 2,
    "saliency_baseline": "own",
    "expert_text_encoder": "general",
    "apply_in_hires": False,
    "expert2_enabled": True,
    "expert2_checkpoint": "tiny-v",  # SD1 (v): the general text encoder fits it
    "expert2_prompt": "a blue ball",
    "k_expert2": 0.7,
}


def _name(title: str) -> str:
    """'tiny-eps-a.safetensors [d58015f069]' -> 'tiny-eps-a.safetensors' (the hash shows once computed)."""
    return re.sub(r"\s*\[[0-9a-f]+\]$", "", title)


def _png(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def _parameters(im: Image.Image) -> str:
    return im.info.get("parameters", "")


def _sub_images(web, urls):
    return [np.asarray(_png(web.fetch(u)).convert("RGB")) for u in urls]


# --------------------------------------------------------------------------- the accordion

@pytest.mark.parametrize("tab", TABS)
def test_accordion_has_every_control_at_its_default(web, tab):
    web.switch_tab(tab)
    acc = web.mf(tab, "enabled")
    acc.wait_for(state="visible")
    assert acc.locator(".label-wrap span").first.inner_text().strip() == "MagicFusion"
    assert not web.enabled(tab), "MagicFusion must start disabled"
    web.open_accordion(tab)
    assert web.enabled(tab), "A1111's InputAccordion ticks itself when unfolded (until its box is clicked)"
    web.set_enabled(tab, False)
    assert web.is_open(tab) and not web.enabled(tab), "unticking the box must leave the accordion open"
    tabs = web.mf(tab, "units").locator(":scope > .tab-nav > button").all_inner_texts()
    assert [t.strip() for t in tabs] == ["Expert 1", "Expert 2"], tabs
    for name, (other, value) in SHOWN_BY.items():
        assert SPEC[other].default != value and not web.mf(tab, name).is_visible(), \
            f"{tab}: {name} shows although {other} is not {value!r}"
    for name in CONTROL_NAMES:
        web.show_unit(tab, name)  # also makes a SHOWN_BY control's choice (after that control's own check)
        box = web.mf(tab, name)
        assert box.is_visible(), f"{tab}: control {name} is not visible"
        label = SPEC[name].label
        assert box.get_by_text(label, exact=True).count() >= 1, f"{tab}: {name} lacks its label {label!r}"
        assert web.get_value(tab, name) == SPEC[name].default, f"{tab}: {name} does not start at its default"
    for name, (other, _) in SHOWN_BY.items():  # back to the default choice: hidden again
        web.set_value(tab, other, SPEC[other].default)
        web.mf(tab, name).wait_for(state="hidden")
    for unit in ("expert", "expert2"):
        web.show_unit(tab, f"{unit}_checkpoint")
        assert web.mf(tab, f"{unit}_checkpoint_refresh").is_visible()
    for name in ("outside_window", "saliency_baseline", "expert_text_encoder"):
        got = web.mf(tab, name).locator("input[type=radio]").evaluate_all("els => els.map(e => e.value)")
        assert got == list(SPEC[name].choices), name


@pytest.mark.parametrize("tab", TABS)
def test_every_control_shows_its_hint_on_hover(web, tab):
    web.switch_tab(tab)
    web.open_accordion(tab)
    labels = [(web.mf(tab, "enabled").locator(".label-wrap span").first, ENABLED_HINT)]  # the header
    labels += [(name, web.mf(tab, name).get_by_text(SPEC[name].label, exact=True).first, SPEC[name].hint)
               for name in CONTROL_NAMES]
    for name, label, hint in [(None, *labels[0])] + labels[1:]:
        if name is not None:
            web.show_unit(tab, name)
        label.hover()
        # hints.js sets the title 1 s after the DOM last changed (a debounce), so wait for it
        try:
            web.page.wait_for_function("([e, t]) => e.title === t", arg=[label.element_handle(), hint], timeout=10_000)
        except Exception:  # noqa: BLE001 - say which label and what it shows instead
            pytest.fail(f"{tab}: hovering {label.inner_text()!r} shows {label.get_attribute('title')!r}, "
                        f"expected {hint!r}")
    web.show_unit(tab, "expert_checkpoint")
    refresh = web.mf(tab, "expert_checkpoint_refresh")
    refresh.hover()
    assert refresh.get_attribute("title") == "Expert checkpoint: refresh"
    for other, _ in SHOWN_BY.values():
        web.set_value(tab, other, SPEC[other].default)


def test_expert_dropdown_lists_checkpoints_and_refresh_finds_a_new_one(web, ui_server):
    tab = "txt2img"
    web.switch_tab(tab)
    web.open_accordion(tab)
    assert sorted(map(_name, web.expert_choices(tab))) == FIXTURE_NAMES
    added = ui_server.add_checkpoint("tiny-eps-b", f"tiny-added-{os.getpid()}")
    assert f"{added}.safetensors" not in map(_name, web.expert_choices(tab))  # not before the refresh
    web.mf(tab, "expert_checkpoint_refresh").click()
    deadline = time.monotonic() + 30
    while f"{added}.safetensors" not in (names := sorted(map(_name, web.expert_choices(tab)))):
        assert time.monotonic() < deadline, f"refresh did not list {added}: {names}"
        time.sleep(0.3)
    assert names == sorted([*FIXTURE_NAMES, f"{added}.safetensors"])
    assert web.choose_expert(tab, added).startswith(added)


# --------------------------------------------------------------------------- generating

def test_fused_generation_shows_the_image_and_its_masks(web):
    tab = "txt2img"
    web.open()
    web.set_enabled(tab, True)
    web.choose_expert(tab, "tiny-eps-b")
    web.set_value(tab, "show_mask", True)
    info = web.generate(tab, expect_images=3)
    assert "MagicFusion expert: tiny-eps-b" in info, info
    assert "MagicFusion expert hash: " in info
    urls = web.gallery_urls(tab)
    assert len(urls) == 3, urls
    image, mask, strip = (_png(web.fetch(u)) for u in urls)
    assert image.size == (64, 64)
    assert "MagicFusion expert: tiny-eps-b" in _parameters(image)  # the PNG's own infotext
    assert mask.size == (64, 64)
    assert set(np.unique(np.asarray(mask.convert("L")))) <= {0, 255}, "the mask is black (general) / white (expert 1)"
    steps, tile = 4, 48  # the ui-config's steps; tiles of a quarter of the image, at least 48 px
    assert strip.size == (48 + steps * (tile + 2), tile + 2 + 14), strip.size  # a label, a tile per step; the legend
    assert np.asarray(image).std() > 5


def test_unload_button_frees_the_expert(web, ui_server):
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1, never a proxy

    def status():
        with direct.open(ui_server.url + "/magicfusion/v1/status", timeout=60) as r:
            return json.load(r)

    tab = "txt2img"
    web.open()
    web.set_enabled(tab, True)
    web.choose_expert(tab, "tiny-eps-b")
    web.generate(tab)
    before = status()
    assert before["expert_loaded"] and before["expert_bytes"] > 0, before
    web.mf(tab, "unload_expert").click()
    deadline = time.monotonic() + 30
    while (after := status())["expert_loaded"] is not None:
        assert time.monotonic() < deadline, f"the unload button left the expert loaded: {after}"
        time.sleep(0.3)
    assert after["expert_bytes"] == 0 and after["expert_loads"] == before["expert_loads"]


def test_the_unload_button_waits_for_a_generation_in_progress(web, ui_server):
    """Clicked while a fused generation samples, the button frees the expert only once the
    generation is done: the picture is the fused one, not one that lost its expert half-way."""
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def api(path, payload=None):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(ui_server.url + path, data=data, headers={"Content-Type": "application/json"})
        with direct.open(req, timeout=300) as r:
            return json.load(r)

    steps = 40
    reference = api("/sdapi/v1/txt2img", {"prompt": "a photo of a cat", "width": 64, "height": 64, "steps": steps, "seed": 1234,
                                          "sampler_name": "Euler a", "cfg_scale": 7, "alwayson_scripts": {"MagicFusion": {"args": [
                                              {"enabled": True, "expert_checkpoint": "tiny-eps-b"}]}}})["images"][0]
    tab = "txt2img"
    web.open()
    web.page.locator("#txt2img_steps input[type=number]").fill(str(steps))
    web.page.locator("#txt2img_steps input[type=number]").blur()
    web.set_enabled(tab, True)
    web.choose_expert(tab, "tiny-eps-b")

    def unload_mid_way():
        deadline = time.monotonic() + 60
        while not api("/sdapi/v1/progress").get("state", {}).get("sampling_step"):
            assert time.monotonic() < deadline, "the generation never started sampling"
            time.sleep(0.02)
        web.mf(tab, "unload_expert").click()

    web.generate(tab, after_click=unload_mid_way)
    got = np.asarray(_png(web.fetch(web.gallery_urls(tab)[0])).convert("RGB"))
    want = np.asarray(_png(__import__("base64").b64decode(reference)).convert("RGB"))
    assert np.array_equal(got, want)
    deadline = time.monotonic() + 30
    while api("/magicfusion/v1/status")["experts_loaded"]:  # and then it did unload
        assert time.monotonic() < deadline
        time.sleep(0.3)


@pytest.fixture(scope="module")
def non_default_image(web):
    """An image generated from the page with every infotext control at a non-default value."""
    tab = "txt2img"
    web.open()
    web.set_enabled(tab, True)
    for name, value in NON_DEFAULT.items():
        web.set_value(tab, name, value)
    for name, value in NON_DEFAULT.items():  # the page took every value
        got = web.get_value(tab, name)
        assert got.startswith(value) if name.endswith("_checkpoint") else got == value, (name, got)
    info = web.generate(tab, expect_images=1)
    for key, text in (("MagicFusion k expert", "2.5"), ("MagicFusion end", "0.6"), ("MagicFusion outside", "expert"),
                      ("MagicFusion blur", "2"), ("MagicFusion expert 2", "tiny-v"), ("MagicFusion k expert 2", "0.7")):
        assert f"{key}: {text}" in info, (key, info)
    data = web.fetch(web.gallery_urls(tab)[0])
    assert "MagicFusion k expert: 2.5" in _parameters(_png(data))
    return data


def _check_restored(web, tab="txt2img"):
    # The paste lands asynchronously: wait for the last control in the accordion to change.
    web.page.wait_for_function(
        "() => document.querySelector('#magicfusion_txt2img_k_expert input[type=number]').value === '2.5'",
        timeout=30_000)
    assert web.enabled(tab), "the paste did not enable MagicFusion"
    web.open_accordion(tab)
    wrong = {}
    for name, value in NON_DEFAULT.items():
        got = web.get_value(tab, name)
        ok = _name(got).startswith(value) if name.endswith("_checkpoint") else got == value
        if not ok:
            wrong[name] = (got, value)
    assert not wrong, f"controls not restored from the infotext (got, wanted): {wrong}"


def test_png_info_send_to_txt2img_restores_every_control(web, non_default_image, tmp_path):
    path = tmp_path / "fused.png"
    path.write_bytes(non_default_image)
    web.open()  # a fresh page: every control at its default
    assert not web.enabled("txt2img") and web.get_value("txt2img", "k_expert") == 1.0
    web.switch_tab("PNG Info")
    web.page.locator("#pnginfo_image input[type=file]").set_input_files(str(path))
    web.page.locator("#tab_pnginfo").get_by_text("MagicFusion expert", exact=False).first.wait_for(timeout=30_000)
    web.page.locator("#tab_pnginfo #txt2img_tab").click()
    web.page.locator("#tab_txt2img").wait_for(state="visible")
    _check_restored(web)


def test_prompt_paste_button_restores_every_control(web, non_default_image):
    infotext = _parameters(_png(non_default_image))
    web.open()
    web.switch_tab("txt2img")
    web.page.locator("#txt2img_prompt textarea").fill(infotext)
    web.page.locator("#tab_txt2img #paste").click()
    _check_restored(web)
    assert web.page.locator("#txt2img_prompt textarea").input_value() == "a photo of a cat"
    # An infotext without MagicFusion keys unticks the accordion and leaves the controls alone.
    web.page.locator("#txt2img_prompt textarea").fill("a dog\nSteps: 4, Sampler: Euler a, CFG scale: 5, Seed: 7, Size: 64x64")
    web.page.locator("#tab_txt2img #paste").click()
    web.page.wait_for_function("() => !document.querySelector('#magicfusion_txt2img_enabled-visible-checkbox').checked",
                               timeout=30_000)
    assert web.get_value("txt2img", "k_expert") == 2.5


def test_xyz_plot_over_k_expert_makes_three_different_images(web):
    tab = "txt2img"
    values = ["0.5", "2", "8"]
    web.open()
    web.set_enabled(tab, True)
    web.choose_expert(tab, "tiny-eps-b")
    web.select("#tab_txt2img #script_list", "X/Y/Z plot")
    web.select("#script_txt2img_xyz_plot_x_type", "[MagicFusion] k expert")
    web.fill("#script_txt2img_xyz_plot_x_values", ", ".join(values))
    web.page.locator("#script_txt2img_xyz_plot_include_lone_images input[type=checkbox]").check()
    info = web.generate(tab, expect_images=1 + len(values))
    urls = web.gallery_urls(tab)
    assert len(urls) == 1 + len(values), urls  # the grid, then each cell
    grid = np.asarray(_png(web.fetch(urls[0])).convert("RGB"))
    assert grid.shape[1] >= 3 * 64 and grid.shape[0] >= 64, grid.shape
    cells = _sub_images(web, urls[1:])
    for i in range(len(cells)):
        for j in range(i + 1, len(cells)):
            assert np.abs(cells[i].astype(int) - cells[j].astype(int)).max() > 0, \
                f"k expert {values[i]} and {values[j]} gave the same image"
    for url, value in zip(urls[1:], values):
        params = _parameters(_png(web.fetch(url)))
        m = re.search(r"MagicFusion k expert: ([0-9.]+)", params)
        assert m and float(m.group(1)) == float(value), (value, params)
    assert "MagicFusion expert: tiny-eps-b" in info


def test_send_to_img2img_carries_the_magicfusion_controls(web):
    """The gallery's 🖼️ button copies the paste_field_names controls from txt2img to img2img."""
    web.open()
    web.set_enabled("txt2img", True)
    web.choose_expert("txt2img", "tiny-eps-b")
    web.set_value("txt2img", "k_expert", 2.5)
    web.set_value("txt2img", "expert_prompt", "a red ball")
    web.generate("txt2img")
    web.page.locator("#txt2img_send_to_img2img").click()
    web.page.locator("#tab_img2img").wait_for(state="visible")
    web.page.wait_for_function("() => document.querySelector('#img2img_prompt textarea').value === 'a photo of a cat'")
    time.sleep(1)  # the MagicFusion values would land with the same event as the prompt
    assert web.enabled("img2img")
    web.open_accordion("img2img")
    assert _name(web.get_value("img2img", "expert_checkpoint")).startswith("tiny-eps-b")
    assert web.get_value("img2img", "k_expert") == 2.5
    assert web.get_value("img2img", "expert_prompt") == "a red ball"


def test_no_script_errors_on_the_page(web):
    """Nothing the tests above did raised an uncaught JavaScript error in the page."""
    errors = [e for e in web.console_errors if e.startswith("pageerror")]
    assert not errors, errors
