"""The selection grammar (``icv_vllm.spec``): what it accepts, what it refuses
and what it says, for both the string and the list form."""

import math

import pytest

from icv_vllm.spec import (MAX_ABS_SCALE, MAX_SPEC_CHARS, MIN_ABS_SCALE, ICVSpecError, VectorChoice, format_spec,
                           parse_spec, validate_name)

RANGE = f"must be 0 or between {MIN_ABS_SCALE:g} and {MAX_ABS_SCALE:g} in magnitude"


def test_string_and_list_forms_agree():
    text = parse_spec("polite:0.1, formal:-0.05")
    listed = parse_spec([{"name": "polite", "scale": 0.1}, {"name": "formal", "scale": -0.05}])
    assert text == listed == (VectorChoice("polite", 0.1), VectorChoice("formal", -0.05))


def test_format_round_trips_exactly():
    choices = parse_spec("a:0.1,b.v2:-1e-3,c_d:3")
    assert parse_spec(format_spec(choices)) == choices
    assert format_spec(choices) == "a:0.1,b.v2:-0.001,c_d:3.0"
    for scale in (MIN_ABS_SCALE, -MAX_ABS_SCALE, 0.1 + 0.2, 1 / 3, -0.0):
        choice = (VectorChoice("a", scale),)
        assert parse_spec(format_spec(choice)) == choice


@pytest.mark.parametrize("text, scale", [
    ("1", 1.0), ("+1", 1.0), ("-1", -1.0), ("1.", 1.0), ("-.5", -0.5), ("0.25", 0.25), ("00012", 12.0),
    ("1e3", 1000.0), ("1E-3", 0.001), ("2.5e+2", 250.0), ("1000", MAX_ABS_SCALE), ("-1000", -MAX_ABS_SCALE),
    ("1e-30", MIN_ABS_SCALE), ("-1e-30", -MIN_ABS_SCALE), ("0", 0.0), ("-0", 0.0), ("0.000", 0.0), ("0e5", 0.0),
])
def test_string_scales_accepted(text, scale):
    assert parse_spec(f"a:{text}") == (VectorChoice("a", scale),)


@pytest.mark.parametrize("spec", ["a:1,b:2", " a : 1 , b:2 ", "a:1 ,b:2", "a :1, b : 2"])
def test_spaces_around_names_scales_and_commas(spec):
    assert parse_spec(spec) == (VectorChoice("a", 1.0), VectorChoice("b", 2.0))


@pytest.mark.parametrize("name", ["a", "A.b-c_d", "v2", "-x", "x.", "..a", "a" * 128, "0"])
def test_names_accepted(name):
    assert validate_name(name) == name
    assert parse_spec(f"{name}:1") == (VectorChoice(name, 1.0),)


@pytest.mark.parametrize("spec, message", [
    # not numbers: only ASCII digits, one optional sign, one optional exponent
    ("polite:abc", "is not a number: 'abc'"),
    ("polite:1_000", "is not a number: '1_000'"),
    ("polite:\uff11", "is not a number: '\uff11'"),        # full-width 1
    ("polite:\u0663", "is not a number: '\u0663'"),        # Arabic-Indic 3
    ("polite:nan", "is not a number: 'nan'"),
    ("polite:inf", "is not a number: 'inf'"),
    ("polite:-Infinity", "is not a number"),
    ("polite:0x10", "is not a number"),
    ("polite:1e", "is not a number"),
    ("polite:.", "is not a number"),
    ("polite:", "is not a number: ''"),
    ("polite:+-1", "is not a number"),
    ("polite:\t1", "is not a number"),                     # only spaces may surround a scale
    ("polite:1\n", "is not a number"),
    # out of range, including what float() would silently round
    ("polite:1e-400", f"{RANGE}, got '1e-400'"),
    ("polite:9e-31", f"{RANGE}, got '9e-31'"),
    ("polite:1e39", f"{RANGE}, got '1e39'"),
    ("polite:1e999", "got '1e999'"),  # overflows float: said as 'must be finite'
    ("polite:1000.0001", RANGE),
    ("polite:-1001", RANGE),
    # structure
    ("polite;layers=", "layers of 'polite' must be indices or spans"),
    ("polite:1;layers=3-1", "layer span '3-1' runs backwards"),
    ("polite:1;layers=-1", "must be indices or spans"),
    ("polite:1;layers=100000", "must be indices or spans"),
    ("polite:1;layers=5000", "must be at most 4095"),
    ("polite:1;positions=decode", "positions of 'polite' must be one of all, prompt, generated"),
    ("polite:1;mode=mul", "mode of 'polite' must be one of icv, add"),
    ("polite:1;mode=add;mode=icv", "option 'mode' of 'polite' is given twice"),
    ("polite:1;scale=2", "option 'scale=2' of 'polite' must be one of layers=..., positions=..., mode=..."),
    ("polite:1;", "option '' of 'polite' must be one of"),
    ("a:1,,b:1", "empty entry"),
    ("a:1,", "empty entry"),
    ("", "empty entry"),
    ("a:1,b:1,c:1,d:1,e:1", "at most 4 vectors"),
    ("x:1," * (MAX_SPEC_CHARS // 4 + 1), f"longer than {MAX_SPEC_CHARS} characters"),
    # names
    ("../etc/passwd:1", "invalid vector name '../etc/passwd'"),
    ("a b:1", "invalid vector name 'a b'"),
    ("a\n:1", "invalid vector name 'a\\n'"),
    (".:1", "invalid vector name '.'"),
    ("..:1", "invalid vector name '..'"),
    (":1", "invalid vector name ''"),
    ("\u00e9:1", "invalid vector name"),
    ("a:1:2", "invalid vector name 'a:1'"),
    ("a" * 129 + ":1", "use 1-128 characters from [A-Za-z0-9._-]"),
])
def test_bad_strings_say_why(spec, message):
    with pytest.raises(ICVSpecError) as info:
        parse_spec(spec)
    assert message in str(info.value)


@pytest.mark.parametrize("scale, value", [(1, 1.0), (-2.5, -2.5), (0, 0.0), (1e-30, 1e-30), (-1000, -1000.0)])
def test_list_scales_accepted(scale, value):
    assert parse_spec([{"name": "a", "scale": scale}]) == (VectorChoice("a", value),)
    assert parse_spec(({"name": "a", "scale": scale},)) == (VectorChoice("a", value),)


@pytest.mark.parametrize("spec, message", [
    ([{"name": "a", "scale": "1"}], "must be a number, got str"),
    ([{"name": "a", "scale": "nan"}], "must be a number, got str"),
    ([{"name": "a", "scale": None}], "must be a number, got NoneType"),
    ([{"name": "a", "scale": True}], "must be a number, got bool"),
    ([{"name": "a", "scale": [1]}], "must be a number, got list"),
    ([{"name": "a", "scale": math.inf}], "must be finite"),
    ([{"name": "a", "scale": math.nan}], "must be finite"),
    ([{"name": "a", "scale": 1e-31}], f"{RANGE}, got 1e-31"),
    ([{"name": "a", "scale": 1001}], f"{RANGE}, got an integer of 4 digits"),
    ([{"name": "a", "scale": 10 ** 300}], "got an integer of over 100 digits"),
    ([{"name": "a", "scale": -(10 ** 4000)}], "got an integer of over 100 digits"),
    ([{"name": "polite\n", "scale": 1}], "invalid vector name 'polite\\n'"),
    ([{"name": 3, "scale": 1}], "invalid vector name 3"),
    ([{"name": "a", "layers": []}], "must be a non-empty list of layer indices"),
    ([{"name": "a", "layers": [1, -2]}], "must be a non-empty list of layer indices"),
    ([{"name": "a", "layers": [True]}], "must be a non-empty list of layer indices"),
    ([{"name": "a", "layers": 3}], "must be a non-empty list of layer indices"),
    ([{"name": "a", "layers": [9999]}], "must be at most 4095"),
    ([{"name": "a", "positions": None}], "positions of 'a' must be one of"),
    ([{"name": "a", "mode": "ADD"}], "mode of 'a' must be one of icv, add, got 'ADD'"),
    ([{"scale": 1}], "must be an object"),
    ([{"name": "a", "scale": 1, "extra": 2}], "must be an object"),
    (["a:1"], "must be an object"),
    ([], "selects no vector"),
    ([{"name": "a", "scale": 1}] * 5, "at most 4 vectors"),
    ({"name": "a"}, "icv must be a string"),
    (3, "icv must be a string"),
    (None, "icv must be a string"),
])
def test_bad_lists_say_why(spec, message):
    with pytest.raises(ICVSpecError) as info:
        parse_spec(spec)
    assert message in str(info.value)


def test_long_names_are_shortened_in_messages():
    with pytest.raises(ICVSpecError) as info:
        validate_name("x" * 10_000)
    assert len(str(info.value)) < 300


def test_options_in_both_forms():
    text = parse_spec("polite:0.02;layers=4-6+9;positions=generated, formal;mode=add")
    listed = parse_spec([{"name": "polite", "scale": 0.02, "layers": [9, 4, 5, 6, 6], "positions": "generated"},
                         {"name": "formal", "mode": "add"}])
    assert text == listed == (VectorChoice("polite", 0.02, (4, 5, 6, 9), "generated", None),
                              VectorChoice("formal", None, None, "all", "add"))
    assert parse_spec([{"name": "a", "layers": "0-2+7"}])[0].layers == (0, 1, 2, 7)
    assert format_spec(text) == "polite:0.02;layers=4-6+9;positions=generated,formal;mode=add"
    assert parse_spec(format_spec(text)) == text
    assert parse_spec(" a : 1 ; layers = 3 ; positions = prompt ")[0] == VectorChoice("a", 1.0, (3,), "prompt")


def test_a_bare_name_leaves_the_scale_to_the_file():
    assert parse_spec("polite") == (VectorChoice("polite", None),)
    assert parse_spec([{"name": "polite"}]) == (VectorChoice("polite", None),)
    assert format_spec(parse_spec("polite,formal:0.1")) == "polite,formal:0.1"
