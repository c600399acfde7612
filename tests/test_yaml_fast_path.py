"""The native fast path for large YAML files (`yaml_rs`, the `fast-yaml` extra) gives exactly what the strict
PyYAML loader gives, or leaves the file to it: checked on a corpus of the scalars whose meaning differs between
YAML 1.1 (PyYAML) and YAML 1.2, in every place a scalar can stand."""

from __future__ import annotations

import itertools
import math

import pytest
import yaml

from synthfb.data import yamlio

yaml_rs = pytest.importorskip("yaml_rs")

SCALARS = [
    # booleans and nulls, YAML 1.1 and 1.2 spellings
    "yes", "Yes", "YES", "no", "No", "on", "On", "ON", "off", "Off", "y", "n", "Y", "N", "true", "True", "TRUE",
    "tRue", "false", "FALSE", "null", "Null", "NULL", "nULL", "~", "",
    # integers
    "0", "-0", "+0", "7", "+7", "-7", "010", "0o10", "0O10", "0b101", "0x1F", "0X1f", "1_000", "12345678901234567890123",
    "-010", "+010", "00",
    # floats
    "1.5", "-1.5", "+1.5", "1.", "0.", ".5", "-.5", "+.5", "1e5", "1e-5", "1E+5", "1.5e3", "1.5e+3", "-1.5e-3", ".5e3",
    "1_0.5", ".inf", ".Inf", ".INF", "-.inf", "+.inf", ".nan", ".NaN", ".NAN", "inf", "nan", "0.1428571428571428571",
    # sexagesimal, dates, times
    "1:20", "190:20:30.15", "2001-12-14", "2001-12-14t21:59:43.10-05:00", "2001-12-14 21:59:43.10 -5", "12:30",
    # odd plain strings
    "=", "<<", "1.2.3", "1a", "a1", "-", "+", ".", "..", "e5", "0e", "x: y", "a b", "o n", "2e", "1:", "no way",
    "on the way", "hello!", "'quoted'", '"dq"', '"\\x41\\u00e9\\N"', "'it''s'", '"yes"', "'010'", "caf\u00e9 \U0001F600",
    # indicators and punctuation inside and around scalars
    "a:b", "a,b", "#x", "a #b", "a#b", "@x", "`x", "%x", "|", ">", "*", "&", "!", "?x", ":x", "-x", "--", "---x", "k:",
    "1,000", "1 000", "$5", "5%", "\\", "a\\nb", "[]", "{}", "[a, b]", "{a: b}", "[a: 1]", "'a' b", "a 'b'",
]

TEMPLATES = [
    "k: {s}\n", "{s}: v\n", "- {s}\n", "k: [{s}]\n", "k: [a, {s}, b]\n", "k: {{a: {s}}}\n", "k: {{{s}: 1}}\n",
    "k:\n  - {s}\n  - x\n", "outer:\n  inner: {s}  # comment\n", "k: {s}\nj: 2\n", "k: |\n  {s}\n", "k: >-\n  {s}\n  more\n",
    "k: text before {s}\n", "k: {s} after\n", "k: \"{s}\"\n", "k: '{s}'\n",
]


def _canon(x):
    """Values with their types: 1, 1.0 and True differ; nan equals nan."""
    if isinstance(x, dict):
        return ("dict", sorted(((_canon(k), _canon(v)) for k, v in x.items()), key=repr))
    if isinstance(x, list):
        return ("list", [_canon(v) for v in x])
    if isinstance(x, float) and math.isnan(x):
        return ("float", "nan")
    return (type(x).__name__, x)


def _strict(text):
    try:
        return "ok", _canon(yamlio.safe_load(text))
    except yaml.YAMLError:
        return "error", None


def _fast(text):
    try:
        return "ok", _canon(yamlio.load_text(text))
    except yaml.YAMLError:
        return "error", None


def test_fast_path_gives_the_strict_loaders_data_or_leaves_the_file_to_it(monkeypatch):
    monkeypatch.setattr(yamlio, "FAST_MIN_CHARS", 0)
    taken, differ = 0, []
    for s, tpl in itertools.product(SCALARS, TEMPLATES):
        text = tpl.format(s=s)
        if _fast(text) != _strict(text):
            differ.append(text)
        taken += yamlio._fast_load(text)[0]
    assert not differ, differ
    assert taken > len(SCALARS) * len(TEMPLATES) // 3  # the fast path is taken for most of the corpus


@pytest.mark.parametrize("text", [
    "a: 1\nb: 2\na: 3\n",                      # duplicate key: the strict loader's message
    "a: {x: 1, x: 2}\n",
    "a: [1, 2\n",                              # syntax error
    "a: 1\n---\nb: 2\n",                       # two documents
    "a: &x [1, 2]\nb: *x\n",                   # aliases: the strict loader's bomb check
    "1: a\n1.0: b\n", "1: a\ntrue: b\n",       # one key to a Python dict
    "a:\n\t- 1\n",                             # tab indentation
    "a: 1\r\nb: [x, y]\r\n",                   # CRLF
    # found in review: each read differently by the two parsers before the scan knew them
    "\ufeffk: v\n", "\ufeffyes\n", "a: 1\n\ufeffyes: 2\n",  # a byte-order mark
    "k: _3\n", "k: -_200\n", "k: _1e5\n", "- _58:\n",   # leading underscores
    '{"a":yes}\n', '{"a":010}\n', '{"a":1.5e3}\n', '{"a":-.5}\n', '{"a":!!binary aGk=}\n', '{"a":!foo x}\n',
    '{"a":=}\n', '{"a":|}\n',                 # values right after a quoted key
    'k: a\x01b\n', 'k: a\x7fb\n', 'k: a\x80b\n', 'k: a\ufffeb\n', 'a: 1\x00\nb: 2\n',  # control characters
    'k: "\\ud83d\\ude00"\n', 'k: "\\x41\\N\\_"\n',  # escapes
    'k: a\u2028b\n', 'k: a\x85b\n', "k: 'a\x85b'\n", 'a: 1\u2028\n', 'a: 1\u2029\n',  # other line breaks
    '{a\n b: 1}\n', '{"a\n b": 1}\n', 'x: {a\n  b: 1}\n', 'x: [a,\n  b]\n',  # flow over several lines
    "- {k: [], '\n \n ': http://x}\n", "k: [a, {b: c}\n  ]\n",
    'k: yes\r\n', 'k: no\r', 'k: =\r\n', 'a: 1\r---\rb: 2\r',  # CR
])
def test_errors_and_special_files_match_the_strict_loader(monkeypatch, text):
    monkeypatch.setattr(yamlio, "FAST_MIN_CHARS", 0)
    assert _fast(text) == _strict(text)
    if _strict(text)[0] == "error":
        with pytest.raises(yaml.YAMLError) as fast_err:
            yamlio.load_text(text)
        with pytest.raises(yaml.YAMLError) as strict_err:
            yamlio.safe_load(text)
        assert str(fast_err.value) == str(strict_err.value)  # the same message, line and column


def test_an_alias_bomb_behind_quoted_keys_is_still_refused(monkeypatch):
    monkeypatch.setattr(yamlio, "FAST_MIN_CHARS", 0)
    levels = ['"l0":&a0 {"x":1}'] + [
        f'"l{i}":&a{i} {{' + ", ".join(f'"k{j}":*a{i - 1}' for j in range(10)) + "}" for i in range(1, 6)]
    text = "{" + ", ".join(levels) + "}\n"
    assert yamlio._fast_load(text)[0] is False
    with pytest.raises(yaml.YAMLError, match="aliases expand this document"):
        yamlio.load_text(text)


def test_a_large_plain_file_takes_the_fast_path_and_a_yaml11_one_does_not(tmp_path):
    rows = "".join(f"  - {{id: {i}, name: item {i}, ok: true, score: {i / 7:.3f}, note: \"a, b: c\"}}\n"
                   for i in range(25_000))
    plain = "name: big\nitems:\n" + rows
    assert len(plain) >= yamlio.FAST_MIN_CHARS
    ok, data = yamlio._fast_load(plain)
    assert ok and data == yamlio.safe_load(plain) and len(data["items"]) == 25_000
    f = tmp_path / "big.yaml"
    f.write_text(plain)
    assert yamlio.load_file(f) == data
    # one YAML 1.1 boolean key anywhere: the whole file goes to the strict loader, which reads it as True
    f.write_text(plain + "flags:\n  on: 1\n")
    assert yamlio._fast_load(f.read_text())[0] is False and yamlio.load_file(f)["flags"] == {True: 1}
    # a duplicate key deep in a large file: the strict loader's one-line error, with its line
    f.write_text(plain + "name: again\n")
    with pytest.raises(yamlio.YAMLInputError, match=r"big\.yaml: line \d+, column 1: invalid YAML: duplicate key 'name' \(first on line 1\)"):
        yamlio.load_file(f)


TOKENS = ["a", "k", "x y", "1", "12", "1.5", "0.", ".5", "yes", "on", "no", "true", "null", "~", ":", ": ", " ", "  ",
          "\n", "\n  ", "\n    ", "- ", "-", "[", "]", "{", "}", ", ", ",", "#", " #c", "'", '"', "'q'", '"d"', '"\\n"',
          "\\", "?", "!", "&", "*", "|", ">", "%", "@", "`", "...", "---", "\u00e9", "\U0001F600", "\u00a0", "\u3000",
          "=", "a:b", '"a":', '"a":b', "'a':1", '""', "''", '"a\n b"', "'a\n\n b'", "a\n b", ":x", "-1", "+1", "0x",
          "1_", "_1", "e", "e5", ".", "..", "<<", "\r", "\ufeff", "\x85"]


def test_random_texts_read_alike_wherever_the_fast_path_takes_them(monkeypatch):
    """Random texts of YAML's indicators, scalars and odd characters: wherever the fast path reads one, the
    strict loader reads the same data (or both refuse it)."""
    import random

    monkeypatch.setattr(yamlio, "FAST_MIN_CHARS", 0)
    rng = random.Random(0)
    taken, differ = 0, []
    for _ in range(6000):
        text = "".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 10)))
        ok, data = yamlio._fast_load(text)
        if ok:
            taken += 1
            if ("ok", _canon(data)) != _strict(text):
                differ.append(text)
    assert not differ, differ[:10]
    assert taken > 500
