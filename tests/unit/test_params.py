"""The one parameter model: validation, positional/named args, infotext, schema."""

import json
import math

import pytest
from hypothesis import given, settings, strategies as st

from lib_magicfusion.params import FIELD_NAMES, FusionParams, MagicFusionError

GOOD = dict(enabled=True, expert_checkpoint="anything-v3.safetensors [abcdef1234]", k_expert=2.0)


def test_defaults_are_valid_and_disabled():
    p = FusionParams()
    assert not p.enabled and p.k_general == 1.0 and p.fusion_end == 1.0 and p.blur == 4
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
])
def test_invalid_values_name_the_field(field, value, message):
    with pytest.raises(MagicFusionError, match=f"MagicFusion {field}: .*{message}") as info:
        FusionParams(**{**GOOD, field: value})
    assert info.value.field == field


def test_window_order_and_required_expert():
    with pytest.raises(MagicFusionError, match="fusion_start"):
        FusionParams(**GOOD, fusion_start=0.8, fusion_end=0.2)
    with pytest.raises(MagicFusionError, match="expert_checkpoint.*required"):
        FusionParams(enabled=True)
    FusionParams(expert_checkpoint="")  # disabled needs no expert


def test_positional_and_named_args():
    p = FusionParams(**GOOD)
    assert FusionParams.from_args(p.to_args()) == p
    assert FusionParams.from_args([dict(GOOD)] + [None] * (len(FIELD_NAMES) - 1)) == p
    assert FusionParams.from_args((dict(GOOD),)) == p
    with pytest.raises(MagicFusionError, match="args.*positional values"):
        FusionParams.from_args(p.to_args()[:-1])
    with pytest.raises(MagicFusionError, match="args.*positional values"):
        FusionParams.from_args(p.to_args() + [1])
    with pytest.raises(MagicFusionError, match="MagicFusion args"):
        FusionParams.from_args("abc")
    with pytest.raises(MagicFusionError, match="MagicFusion k_expret: unknown field"):
        FusionParams.from_args([{**GOOD, "k_expret": 1}])


def test_infotext_round_trip_omits_defaults():
    p = FusionParams(**GOOD, expert_prompt='a lion, "crowned": 1', fusion_end=0.4, blur=0, apply_in_hires=False)
    text = p.infotext()
    assert text == {
        "MagicFusion expert": GOOD["expert_checkpoint"], "MagicFusion expert prompt": 'a lion, "crowned": 1',
        "MagicFusion k expert": 2.0, "MagicFusion end": 0.4, "MagicFusion blur": 0, "MagicFusion hires": False,
    }
    parsed = {k: str(v) for k, v in text.items()}  # the WebUI's parser hands back strings
    assert FusionParams.from_infotext(parsed) == p
    assert FusionParams.from_infotext({"Steps": "20"}) is None
    with pytest.raises(MagicFusionError, match="k_expert"):
        FusionParams.from_infotext({**parsed, "MagicFusion k expert": "lots"})


def test_schema_describes_every_field():
    schema = FusionParams.json_schema()
    json.dumps(schema)
    assert list(schema["properties"]) == list(FIELD_NAMES)
    assert schema["properties"]["outside_window"]["enum"] == ["general", "expert"]
    assert schema["properties"]["k_expert"]["minimum"] == 0.0
    assert schema["additionalProperties"] is False


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELD_NAMES + ("bogus",)),
                       st.one_of(st.none(), st.booleans(), st.integers(-5, 200), st.floats(allow_nan=True, allow_infinity=True),
                                 st.text(max_size=5), st.lists(st.integers(), max_size=2))))
def test_any_payload_is_accepted_or_rejected_with_a_named_field(payload):
    try:
        p = FusionParams.from_dict(payload)
    except MagicFusionError as e:
        assert str(e).startswith("MagicFusion ") and e.field
        assert e.field in FIELD_NAMES + ("bogus",)
    else:
        assert FusionParams.from_args(p.to_args()) == p
