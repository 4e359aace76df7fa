import math

import pytest

from icv_vllm.spec import ICVSpecError, VectorChoice, format_spec, parse_spec


def test_string_and_list_forms_agree():
    text = parse_spec("polite:0.1, formal:-0.05")
    listed = parse_spec([{"name": "polite", "scale": 0.1}, {"name": "formal", "scale": -0.05}])
    assert text == listed == (VectorChoice("polite", 0.1), VectorChoice("formal", -0.05))


def test_format_round_trips_exactly():
    choices = parse_spec("a:0.1,b.v2:-1e-3,c_d:3")
    assert parse_spec(format_spec(choices)) == choices
    assert format_spec(choices) == "a:0.1,b.v2:-0.001,c_d:3.0"


@pytest.mark.parametrize("spec, message", [
    ("polite", "must be 'name:scale'"),
    ("polite:abc", "is not a number"),
    ("polite:nan", "must be finite"),
    ("polite:inf", "must be finite"),
    ("a:1,,b:1", "empty entry"),
    ("a:1,b:1,c:1,d:1,e:1", "at most 4 vectors"),
    ("../etc/passwd:1", "invalid vector name"),
    ("a b:1", "invalid vector name"),
    ("", "empty entry"),
    ([], "selects no vector"),
    ([{"name": "a"}], "must be an object"),
    ([{"name": "a", "scale": 1, "extra": 2}], "must be an object"),
    ([{"name": 3, "scale": 1}], "invalid vector name"),
    ([{"name": "a", "scale": "x"}], "is not a number"),
    ([{"name": "a", "scale": True}], "must be a number"),
    ([{"name": "a", "scale": math.inf}], "must be finite"),
    ({"name": "a"}, "icv must be a string"),
    (3, "icv must be a string"),
])
def test_bad_specs_say_why(spec, message):
    with pytest.raises(ICVSpecError, match=message.replace("(", r"\(")):
        parse_spec(spec)
