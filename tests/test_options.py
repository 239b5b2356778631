"""One ``KEY=VALUE`` syntax for every option flag (:mod:`tao_core.options`)."""

from __future__ import annotations

import datetime
import math

import pytest

from tao_core.errors import TaoInputError
from tao_core.options import parse_key_values


def test_toml_scalars():
    got = parse_key_values(["train.lr=1e-5", "n=64", "flag=true", "off=false", "neg=-3", "hex=0x1F",
                            "big=1_000", "q=\"quoted text\"", "lit='C:\\dir'", "day=2024-05-01", "x=inf"])
    assert got == {"train.lr": 1e-5, "n": 64, "flag": True, "off": False, "neg": -3, "hex": 31, "big": 1000,
                   "q": "quoted text", "lit": "C:\\dir", "day": datetime.date(2024, 5, 1), "x": math.inf}
    assert type(got["n"]) is int and type(got["train.lr"]) is float


def test_arrays_and_inline_tables():
    got = parse_key_values(['stop=["\\n", "###"]', "ks=[1, 2.5, true]", 'score.options={path = "rm", batch_size = 4}',
                            'nested={a = {b = [1, {c = "d"}]}}'])
    assert got == {"stop": ["\n", "###"], "ks": [1, 2.5, True], "score.options": {"path": "rm", "batch_size": 4},
                   "nested": {"a": {"b": [1, {"c": "d"}]}}}


def test_anything_not_one_toml_value_is_the_raw_text(capsys):
    got = parse_key_values(["level=mul2", "name=a=b", "sql=SELECT * FROM t WHERE x = 1", "empty=", "pad= keep ",
                            "two=1\nother = 2", "hdr=1\n[t]", "open=[1, 2", "word=None"], flag="--option")
    assert got == {"level": "mul2", "name": "a=b", "sql": "SELECT * FROM t WHERE x = 1", "empty": "",
                   "pad": " keep ", "two": "1\nother = 2", "hdr": "1\n[t]", "open": "[1, 2", "word": "None"}
    assert capsys.readouterr().err == ""  # none of these is a deprecated spelling


def test_key_is_stripped_and_later_items_override():
    assert parse_key_values([" seed = 3", "seed=4"]) == {"seed": 4}
    assert parse_key_values([]) == {}


@pytest.mark.parametrize(("item", "problem"), [("level", "no '='"), ("=3", "an empty KEY"), ("  =3", "an empty KEY"),
                                                ("", "no '='")])
def test_missing_equals_or_key_names_the_flag_and_item(item, problem):
    with pytest.raises(TaoInputError) as e:
        parse_key_values(["ok=1", item], flag="--option")
    msg = str(e.value)
    assert msg.startswith(f"--option {item!r}: {problem}") and "KEY=VALUE" in msg and "--option name=value" in msg


@pytest.mark.parametrize(("raw", "value", "advice"), [
    ('{"a": 1}', {"a": 1}, "write k={a = 1}"),
    ('{"level": "mul2", "n eval": [1, 2]}', {"level": "mul2", "n eval": [1, 2]},
     'write k={level = "mul2", "n eval" = [1, 2]}'),
    ('[{"a": 1}, {"b": 2.5}]', [{"a": 1}, {"b": 2.5}], "write k=[{a = 1}, {b = 2.5}]"),
    ("null", None, "TOML has no null: leave the option out to get its default"),
    ("[1, null]", [1, None], "TOML has no null, so this value has no TOML spelling"),
    ("-Infinity", -math.inf, "write k=-inf"),
    ('"a\\/b"', "a/b", 'write k="a/b"'),
])
def test_old_json_spellings_still_work_with_a_deprecation_note(capsys, raw, value, advice):
    assert parse_key_values([f"k={raw}"], flag="--option") == {"k": value}
    err = capsys.readouterr().err
    assert err.startswith(f"warning: --option k={raw}: JSON values are deprecated") and advice in err
    assert err.count("\n") == 1


def test_json_nan_is_deprecated_for_toml_nan(capsys):
    assert math.isnan(parse_key_values(["k=NaN"])["k"])
    assert "--set k=NaN: JSON values are deprecated" in capsys.readouterr().err
    assert math.isnan(parse_key_values(["k=nan"])["k"])
    assert capsys.readouterr().err == ""


def test_the_deprecated_spelling_advised_parses_to_the_same_value(capsys):
    old = '{"a": [1, 2.5, "x=y"], "b": {"c": false}, "d e": -1e-07}'
    legacy = parse_key_values([f"k={old}"])["k"]
    advised = capsys.readouterr().err.split("write ", 1)[1].strip()
    assert parse_key_values([advised]) == {"k": legacy}
    assert capsys.readouterr().err == ""
