"""Several experts at once: expert units (issue #15), in the real WebUI."""

from __future__ import annotations

import numpy as np
import pytest

MAIN, B, SD2 = "tiny-eps-a", "tiny-eps-b", "tiny-sd2-v"
PROMPT = "a photo of a cat, sharp focus"


def gen(webui, units=None, extra=None, **payload):
    """txt2img with these units (a list of unit objects) and other MagicFusion fields."""
    body = {"prompt": PROMPT, "steps": 6, "seed": 201, "sampler_name": "Euler a", **webui.checkpoint(MAIN), **payload}
    if units is not None or extra:
        fields = {"enabled": True, **({"units": units} if units else {}), **(extra or {})}
        body["alwayson_scripts"] = {"MagicFusion": {"args": [fields]}}
    return webui.txt2img(**body)


def px(webui, units=None, extra=None, **payload):
    return webui.pixels(gen(webui, units, extra, **payload))


THREE = [{"checkpoint": B, "k": 1.2}, {"checkpoint": SD2, "k": 0.8}, {"checkpoint": MAIN, "prompt": "a watercolor lion"}]


def test_two_separate_experts_and_a_main_checkpoint_unit_fuse_and_differ_from_every_subset(webui):
    full = px(webui, THREE)
    assert np.array_equal(px(webui, THREE), full)
    report = webui.mf_status()["last_generation"]
    assert [u["unit"] for u in report["units"]] == [1, 2, 3] and report["units"][2]["is_main"]
    calls = report["passes"][0]["model_calls"]
    assert calls == {"general": 6, "expert 1": 6, "expert 2": 6}, calls  # unit 3 rode in the main model's calls
    subsets = [[0], [1], [2], [0, 1], [0, 2], [1, 2]]
    pictures = [px(webui, [THREE[i] for i in subset]) for subset in subsets] + [px(webui)]
    for subset, picture in zip(subsets + [[]], pictures):
        assert webui.differs(full, picture, threshold=0.5), f"the fusion of units {subset} equals all three"


def test_a_disabled_unit_equals_the_generation_without_it(webui):
    with_off = px(webui, [THREE[0], {**THREE[1], "enabled": False}])
    assert np.array_equal(with_off, px(webui, [THREE[0]]))
    first_off = px(webui, [{**THREE[0], "enabled": False}, THREE[1]])
    flat = px(webui, extra={"expert_enabled": False, "expert2_enabled": True, "expert2_checkpoint": SD2, "k_expert2": 0.8})
    assert np.array_equal(first_off, flat)


def test_three_units_of_the_main_checkpoint_with_the_main_prompt_equal_fusion_off(webui):
    plain = px(webui)
    same = [{"checkpoint": MAIN, "k": k} for k in (0.5, 1.0, 2.0)]
    assert np.array_equal(px(webui, same), plain)
    assert webui.mf_status()["last_generation"]["passes"][0]["model_calls"] == {"general": 6}


def test_one_unit_equals_the_one_expert_fields(webui):
    fields = {"enabled": True, "expert_checkpoint": B, "k_expert": 1.5, "expert_prompt": "a lion"}
    legacy = webui.txt2img(prompt=PROMPT, steps=6, seed=201, sampler_name="Euler a", **webui.checkpoint(MAIN),
                           alwayson_scripts={"MagicFusion": {"args": [fields]}})
    units = px(webui, [{"checkpoint": B, "k": 1.5, "prompt": "a lion"}])
    assert np.array_equal(webui.pixels(legacy), units)


def test_infotext_xyz_style_overrides_and_outside_unit_round_trip(webui):
    units = [{"checkpoint": B, "k": 1.2}, {"checkpoint": SD2, "prompt": "a dog", "cfg_scale": 4.0}]
    first = gen(webui, units, {"outside_window": "expert 2", "fusion_start": 0.3})
    text = webui.info(first)["infotexts"][0]
    assert "MagicFusion expert 2: tiny-sd2-v" in text and "MagicFusion expert 2 prompt: a dog" in text
    assert "MagicFusion expert 2 CFG: 4.0" in text and "MagicFusion outside: expert 2" in text
    assert "MagicFusion expert 2 hash: " in text
    again = webui.txt2img(prompt=PROMPT, steps=6, seed=201, sampler_name="Euler a", **webui.checkpoint(MAIN),
                          alwayson_scripts={"MagicFusion": {"args": [{"infotext": text}]}})
    assert np.array_equal(webui.pixels(again), webui.pixels(first))
    record = webui.mf_status()["last_generation"]["passes"][0]
    assert record["model_calls"]["expert 2"] == 6 and record["model_calls"]["general"] == 4  # steps 0-1: unit 2 alone


def test_mask_pictures_colour_each_model(webui):
    resp = gen(webui, [THREE[0], THREE[1]], {"show_mask": True, "k_general": 2.0})
    final = webui.decode(resp["images"][1]).reshape(-1, 3)
    colours = {tuple(c) for c in np.unique(final, axis=0)}
    assert colours <= {(0, 0, 0), (255, 255, 255), (228, 64, 56)} and len(colours) >= 2, colours
    assert webui.mf_status()["experts_loaded"]  # both experts were loaded once and stay within the bound


@pytest.mark.parametrize("units, field, message", [
    ([{"checkpoint": B}] * 5, "units", "at most 4"),
    ([{"checkpoint": B}, {"prompt": "no checkpoint"}], "expert2_checkpoint", "is required"),
    ([{"checkpoint": B}, {"checkpoint": "no-such-model"}], "expert2_checkpoint", "no installed checkpoint matches"),
    ([{"checkpoint": B}, {"checkpoint": B, "k": -1}], "k_expert2", "between"),
    ([{"checkpoint": B, "ckpt": "x"}], "units[0].ckpt", "unknown unit field"),
])
def test_bad_unit_input_is_refused_naming_the_unit_and_field(webui, units, field, message):
    r = webui.post("/sdapi/v1/txt2img", {**webui.TXT2IMG_DEFAULTS, "prompt": PROMPT, **webui.checkpoint(MAIN),
                                         "alwayson_scripts": {"MagicFusion": {"args": [{"enabled": True, "units": units}]}}})
    assert r.status_code == 422, r.text[:300]
    assert f"MagicFusion {field}:" in r.json()["errors"] and message in r.json()["errors"], r.json()["errors"]


def test_the_schema_route_describes_units(webui):
    schema = webui.get("/magicfusion/v1/schema").json()
    assert schema["properties"]["units"]["maxItems"] == 4
    assert "expert3_checkpoint" in schema["properties"] and "k_expert4" in schema["properties"]
