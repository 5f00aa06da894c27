"""The one parameter model: validation, positional/named args, units, infotext, schema."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lib_magicfusion.params import (
    MAX_UNITS,
    FusionParams,
    MagicFusionError,
    UnitParams,
    flat_names,
    specs,
    unit_flat_name,
)

GOOD = dict(enabled=True, expert_checkpoint="anything-v3.safetensors [abcdef1234]", k_expert=2.0)
LEGACY_ORDER = ["enabled", "expert_checkpoint", "expert_prompt", "expert_negative_prompt", "k_general", "k_expert",
                "expert_cfg_scale", "fusion_start", "fusion_end", "outside_window", "blur", "saliency_baseline",
                "expert_text_encoder", "apply_in_hires", "show_mask"]


def test_defaults_are_valid_and_disabled():
    p = FusionParams()
    assert not p.enabled and p.k_general == 1.0 and p.fusion_end == 1.0 and p.blur == 4
    assert p.units == (UnitParams(enabled=True),) and p.active_units == (0,)
    assert p.infotext() == {}


@pytest.mark.parametrize("field, value, message", [
    ("k_general", math.nan, "finite"),
    ("k_expert", math.inf, "finite"),
    ("k_expert", -1.0, "between"),
    ("k_general", "1", "number"),
    ("k_general", True, "number"),
    ("expert_cfg_scale", 1e9, "between"),
    ("fusion_start", 1.5, "between"),
    ("outside_window", "both", "one of"),
    ("saliency_baseline", 3, "string"),
    ("blur", 2.5, "whole number"),
    ("enabled", "yes", "true or false"),
    ("show_mask", 1, "true or false"),
    ("expert_prompt", ["a"], "string"),
    ("expert_prompt", "x" * 30000, "longer"),
    ("method", "magic", "one of"),
    ("k_expert3", -2, "between"),
    ("expert2_enabled", "on", "true or false"),
    ("expert4_cfg_scale", "7", "number"),
])
def test_invalid_values_name_the_field(field, value, message):
    with pytest.raises(MagicFusionError, match=f"MagicFusion {field}: .*{message}") as info:
        FusionParams.from_dict({**GOOD, field: value})
    assert info.value.field == field


def test_window_order_and_required_expert():
    with pytest.raises(MagicFusionError, match="fusion_start"):
        FusionParams.from_dict({**GOOD, "fusion_start": 0.8, "fusion_end": 0.2})
    with pytest.raises(MagicFusionError, match="expert_checkpoint.*required"):
        FusionParams(enabled=True)
    with pytest.raises(MagicFusionError, match="expert2_checkpoint.*required"):
        FusionParams.from_dict({**GOOD, "expert2_enabled": True})
    with pytest.raises(MagicFusionError, match="expert_enabled.*no expert unit"):
        FusionParams.from_dict({**GOOD, "expert_enabled": False})
    with pytest.raises(MagicFusionError, match="outside_window.*'expert 2'.*not an enabled"):
        FusionParams.from_dict({**GOOD, "outside_window": "expert 2"})
    FusionParams.from_dict({"expert_checkpoint": ""})  # disabled needs no expert


def test_first_release_positional_args_and_named_fields_still_work():
    legacy = dict(zip(LEGACY_ORDER, [True, "x [1]", "a lion", "", 0.5, 2.0, 9.0, 0.1, 0.7, "expert", 2, "own", "general", False, True]))
    p = FusionParams.from_args(list(legacy.values()))
    assert FusionParams.from_dict(legacy) == p
    assert p.units == (UnitParams(True, "x [1]", "a lion", "", 2.0, 9.0),)
    assert p.outside_unit == 0 and p.method == "official"
    assert flat_names(1)[:15] == tuple(LEGACY_ORDER)  # the first release's layout stays at the front


@pytest.mark.parametrize("n", range(1, MAX_UNITS + 1))
def test_positional_layout_of_every_unit_count(n):
    p = FusionParams.from_dict({**GOOD, **{unit_flat_name(i, "checkpoint"): f"m{i}" for i in range(1, n)},
                                **{unit_flat_name(i, "enabled"): True for i in range(1, n)}})
    args = p.to_args(n)
    assert len(args) == len(specs(n)) == 15 + 3 + 6 * (n - 1)
    assert FusionParams.from_args(args) == p
    assert FusionParams.from_args([dict(GOOD)] + [None] * (len(args) - 1)) == FusionParams.from_dict(GOOD)
    assert len(p.active_units) == n


def test_bad_positional_lengths_and_types():
    args = FusionParams.from_dict(GOOD).to_args(2)
    for bad in (args[:-1], args + [1], args[:14]):
        with pytest.raises(MagicFusionError, match="args.*positional values"):
            FusionParams.from_args(bad)
    with pytest.raises(MagicFusionError, match="MagicFusion args"):
        FusionParams.from_args("abc")
    with pytest.raises(MagicFusionError, match="MagicFusion k_expret: unknown field"):
        FusionParams.from_args([{**GOOD, "k_expret": 1}])


def test_units_list_is_another_way_to_give_unit_fields():
    p = FusionParams.from_dict({"enabled": True, "units": [{"checkpoint": "a", "k": 2.0}, {"checkpoint": "b", "prompt": "x"},
                                                           {"checkpoint": "c", "enabled": False}]})
    assert [u.checkpoint for u in p.units] == ["a", "b", "c"] and p.active_units == (0, 1)
    assert p == FusionParams.from_dict({"enabled": True, "expert_checkpoint": "a", "k_expert": 2.0, "expert2_enabled": True,
                                        "expert2_checkpoint": "b", "expert2_prompt": "x", "expert3_checkpoint": "c"})
    with pytest.raises(MagicFusionError, match=r"MagicFusion units\[1\]\.ckpt: unknown unit field"):
        FusionParams.from_dict({"enabled": True, "units": [{"checkpoint": "a"}, {"ckpt": "b"}]})
    with pytest.raises(MagicFusionError, match="MagicFusion units: must hold at most 4"):
        FusionParams.from_dict({"enabled": True, "units": [{"checkpoint": "a"}] * 5})
    with pytest.raises(MagicFusionError, match=r"MagicFusion units\[0\]: must be an object"):
        FusionParams.from_dict({"enabled": True, "units": ["a"]})
    with pytest.raises(MagicFusionError, match="MagicFusion expert_checkpoint: is given both"):
        FusionParams.from_dict({"enabled": True, "expert_checkpoint": "a", "units": [{"checkpoint": "b"}]})
    with pytest.raises(MagicFusionError, match="MagicFusion expert2_checkpoint: is required"):
        FusionParams.from_dict({"enabled": True, "units": [{"checkpoint": "a"}, {"prompt": "no checkpoint"}]})


def test_infotext_round_trip_omits_defaults():
    p = FusionParams.from_dict({**GOOD, "expert_prompt": 'a lion, "crowned": 1', "fusion_end": 0.4, "blur": 0, "apply_in_hires": False})
    text = p.infotext()
    assert text == {
        "MagicFusion expert": GOOD["expert_checkpoint"], "MagicFusion expert prompt": 'a lion, "crowned": 1',
        "MagicFusion k expert": 2.0, "MagicFusion end": 0.4, "MagicFusion blur": 0, "MagicFusion hires": False,
        "MagicFusion method": "official",
    }
    parsed = {k: str(v) for k, v in text.items()}  # the WebUI's parser hands back strings
    assert FusionParams.from_infotext(parsed) == p
    assert FusionParams.from_infotext({"Steps": "20"}) is None
    with pytest.raises(MagicFusionError, match="k_expert"):
        FusionParams.from_infotext({**parsed, "MagicFusion k expert": "lots"})


def test_the_stable_method_always_writes_its_mask_memory():
    """A later default memory must not change what a stable infotext means; other methods leave it out."""
    stable = FusionParams.from_dict({**GOOD, "method": "stable"})
    text = stable.infotext()
    assert text["MagicFusion method"] == "stable" and text["MagicFusion mask memory"] == 0.9
    assert FusionParams.from_infotext({k: str(v) for k, v in text.items()}) == stable
    tuned = FusionParams.from_dict({**GOOD, "method": "stable", "mask_memory": 0.5})
    assert FusionParams.from_infotext({k: str(v) for k, v in tuned.infotext().items()}).mask_memory == 0.5
    assert "MagicFusion mask memory" not in FusionParams.from_dict(GOOD).infotext()
    with pytest.raises(MagicFusionError, match="mask_memory"):
        FusionParams.from_dict({**GOOD, "mask_memory": 1.0})


def test_infotext_of_the_first_release_means_the_official_method():
    old = {"MagicFusion expert": "b [1]", "MagicFusion k expert": "1.5", "MagicFusion end": "0.4"}
    p = FusionParams.from_infotext(old)
    assert p.method == "official" and p.units == (UnitParams(True, "b [1]", "", "", 1.5, 0.0),) and p.fusion_end == 0.4


def test_infotext_of_several_units():
    units = [{"checkpoint": "a", "enabled": False, "k": 3.0}, {"checkpoint": "b", "k": 0.5},
             {"checkpoint": "c", "prompt": "p", "cfg_scale": 4.0}]
    p = FusionParams.from_dict({"enabled": True, "outside_window": "expert 3", "units": units})
    text = p.infotext()
    assert "MagicFusion expert" not in text and "MagicFusion k expert" not in text  # a unit that is off is not written
    assert text["MagicFusion expert 2"] == "b" and text["MagicFusion k expert 2"] == 0.5
    assert text["MagicFusion expert 3 prompt"] == "p" and text["MagicFusion expert 3 CFG"] == 4.0
    back = FusionParams.from_infotext({k: str(v) for k, v in text.items()})
    assert back.active_units == (1, 2) and back.units[1:] == p.units[1:] and back.outside_window == "expert 3"


def test_schema_describes_every_field_and_units():
    schema = FusionParams.json_schema()
    json.dumps(schema)
    assert set(flat_names()) | {"units"} == set(schema["properties"])
    assert schema["properties"]["outside_window"]["enum"][:3] == ["general", "expert", "expert 2"]
    assert schema["properties"]["k_expert"]["minimum"] == 0.0
    assert schema["properties"]["units"]["maxItems"] == MAX_UNITS
    unit_fields = {"enabled", "checkpoint", "prompt", "negative_prompt", "k", "cfg_scale"}
    assert set(schema["properties"]["units"]["items"]["properties"]) == unit_fields
    assert schema["additionalProperties"] is False


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(flat_names() + ("bogus",)),
                       st.one_of(st.none(), st.booleans(), st.integers(-5, 200), st.floats(allow_nan=True, allow_infinity=True),
                                 st.text(max_size=5), st.lists(st.integers(), max_size=2))))
def test_any_payload_is_accepted_or_rejected_with_a_named_field(payload):
    try:
        p = FusionParams.from_dict(payload)
    except MagicFusionError as e:
        assert str(e).startswith("MagicFusion ") and e.field
        assert e.field in flat_names() + ("bogus",)
    else:
        padded = p.replace(units=p.units + tuple(UnitParams() for _ in range(MAX_UNITS - len(p.units))))
        assert FusionParams.from_args(p.to_args(MAX_UNITS)) == padded
