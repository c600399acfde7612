"""YAML for files users write (pipelines, loop files, trainer configs, stage data files).

``yaml.safe_load`` accepts two things that lose or bury a user's intent:

- a key written twice in one mapping (the second silently wins), and
- aliases that expand into a huge document (the "billion laughs": ten
  levels of ten aliases is 10**10 nodes once anything walks or serializes
  the result, e.g. a JSON schema check or a fingerprint).

:class:`StrictSafeLoader` refuses both: a duplicate key names both lines,
and a document that aliases make more than :data:`MAX_NODES` nodes larger
than written (or that refers to itself) is refused before anything is
constructed. It uses libyaml's C parser when PyYAML has it: a 50 MB file
loads in about the time ``yaml.CSafeLoader`` takes (the pure-Python parser
took minutes and gigabytes).
Errors are ``yaml.MarkedYAMLError``; :func:`describe` turns one into
``line L, column C: problem``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

# Nodes that aliases may add to a document beyond the ones written (each alias
# counts as a full copy of what it names). A pipeline file is a few hundred
# nodes; this leaves room for generous use of anchors in large files.
MAX_NODES = 100_000


class YAMLInputError(ValueError):
    """A YAML file that cannot be read; the message names the file and line."""


class AliasExpansionError(yaml.MarkedYAMLError):
    """Aliases expand the document beyond :data:`MAX_NODES` nodes, or an alias refers to itself."""


def _expanded_size(root: yaml.Node, limit: int) -> None:
    """Raise :class:`AliasExpansionError` if aliases make the tree that
    ``root``'s node graph stands for (each alias counted as a full copy) more
    than ``limit`` nodes larger than the graph itself (the nodes as written),
    or if an alias refers to a node that contains it. A document without
    aliases is never refused, however large. Linear in the graph: a shared
    node's size is computed once."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    first_big: yaml.Node | None = None  # where the expansion first passes the limit (for the error's line)
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    mapping, sequence = yaml.MappingNode, yaml.SequenceNode
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            if isinstance(node, mapping):
                total = 1 + sum(size[id(k)] + size[id(v)] for k, v in node.value)
            else:
                total = 1 + sum(size[id(k)] for k in node.value)
            if total > limit and first_big is None:
                first_big = node
            size[key] = total
            continue
        if key in size:
            continue
        if key in on_path:
            raise AliasExpansionError(None, None, "an alias refers to a node that contains it (a recursive "
                                                  "structure); write the value out", node.start_mark)
        if not isinstance(node, (mapping, sequence)):
            size[key] = 1
            continue
        on_path.add(key)
        stack.append((node, True))
        kids = [n for kv in node.value for n in kv] if isinstance(node, mapping) else node.value
        for k in kids:
            if id(k) not in size:
                stack.append((k, False))
    if size[id(root)] - len(size) > limit:
        raise AliasExpansionError(
            None, None,
            f"aliases expand this document to more than {limit} nodes beyond those written (refused: a YAML "
            "alias bomb?); write the values out instead of repeating aliases",
            (first_big or root).start_mark)


# libyaml's C parser when PyYAML was built with it (the pure-Python one is
# ~3x slower and keeps far more per node); construction is Python either way.
_BaseLoader = yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader


class StrictSafeLoader(_BaseLoader):  # type: ignore[misc, valid-type]
    """``yaml.SafeLoader`` (libyaml's parser when available) that refuses
    duplicate mapping keys and alias bombs."""

    max_nodes = MAX_NODES
    may_alias = True  # False when the text has no `*`: no alias, nothing to expand

    def resolve(self, kind, value, implicit):
        # a plain scalar's tag depends on its text alone (no path resolvers are registered), and
        # large files repeat the same keys and values: resolve each distinct one once
        if kind is not yaml.ScalarNode:
            return super().resolve(kind, value, implicit)
        cache = self.__dict__.setdefault("_tags", {})
        key = (value, implicit)
        tag = cache.get(key)
        if tag is None:
            tag = super().resolve(kind, value, implicit)
            if len(cache) < 100_000:
                cache[key] = tag
        return tag

    def construct_document(self, node):
        if self.may_alias:
            _expanded_size(node, self.max_nodes)
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        # checked as written (before `<<` merges are flattened into the mapping); the keys
        # built here are cached by the constructor and reused by the real construction
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base`: explicit keys may override merged ones
                key = self.construct_object(key_node)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"duplicate key {key!r} (first on line {first + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


# YAML 1.1 (PyYAML) reads `1e-5` as the string '1e-5' (its float pattern wants a dot); YAML 1.2 and
# every config a TRL user writes mean a number. Resolve exponent floats without a dot as floats too.
StrictSafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def safe_load(text: str) -> Any:
    """Parse YAML text with :class:`StrictSafeLoader` (raises ``yaml.YAMLError``)."""
    loader = StrictSafeLoader(text)
    loader.may_alias = "*" in text
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


# -- a native fast path for large files ---------------------------------------------------------------

FAST_MIN_CHARS = 1_000_000
"""Files at least this long (characters) may be read by ``yaml_rs`` (the ``fast-yaml`` extra): a native
YAML parser that builds the Python objects itself, 10-25x faster than libyaml plus PyYAML's Python
constructor. Shorter files (every ordinary pipeline file) always take :func:`safe_load`, and so does every
file when the environment sets ``SYNTHFB_YAML_FAST=0``."""

# Where YAML 1.2 (yaml_rs) and YAML 1.1 as PyYAML reads it (with our exponent floats) may give different
# values, or the strict loader has checks of its own: a match of any of these anywhere in the text sends the
# whole file to :func:`safe_load`. Each pattern over-approximates (a match inside a quoted string or a comment
# only costs speed), so a file that yaml_rs reads holds none of the constructs whose meaning differs. Every
# pattern starts with a literal or a small set of characters, then looks back for the place where a plain
# scalar can start (after a space, a flow indicator or a colon: `{"a":yes}`; the text is scanned with a
# newline in front): one pass each at memchr-like speed, not a backtracking search at every position.
_AT = r"(?<=[\s\[{,:].)"  # the character just matched starts a plain scalar (or may)
_WHOLE = r"(?=[ \t]*(?:$|[,\]}:#]))"  # where a plain scalar can end
_NOT_FAST_TEXT = ("&", "!", "<<", "\\")
"""Anchors (hence aliases and alias bombs), tags, merge keys, backslashes (double-quoted escapes, surrogate
pairs among them): found by ``in`` at memory speed."""
_ASCII_OK = bytes(range(0x20, 0x7F)) + b"\n"
_ODD_CHARS = re.compile("[^\n\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd\U00010000-\U0010ffff]")
"""Characters the parsers treat differently: anything but a line feed, printable ASCII and the printable
planes (tabs, CR, NEL, the line and paragraph separators, a BOM, C0/C1 controls, U+FFFE/U+FFFF)."""
_NOT_FAST = [re.compile(p, re.MULTILINE) for p in (
    r"\?" + _AT, r"[\]}][ \t]*:",                     # complex keys, collections as keys
    r":(?<=[\s\[{,:]:)", r":[,\[\]{}]",                # empty keys and values next to flow indicators (`: v`,
                                                     # `[1:]`: libyaml refuses some that yaml_rs reads)
    r"[|>]" + _AT,                                   # block scalars (the parsers differ on blank ones)
    r"\n(?:%|(?:---|\.\.\.)(?:\s|$))",                # directives, several documents
    r"=" + _AT + _WHOLE,                             # the YAML 1.1 value tag
    r":(?<=\d:)\d",                                  # sexagesimal numbers (1:20 is 80 in YAML 1.1)
    r"-(?<=\d{4}-)\d",                               # dates and timestamps
    r"_(?<=[\s\[{,:\-+.]_)",                          # a leading underscore (yaml_rs reads `_3` as 3)
    # YAML 1.1 booleans (`on: x` is {True: x}); bool and null keys (1 and true are one key to a dict)
    r"[oOnNyYtTfF~]" + _AT + r"(?:(?:(?<=[oO])(?:[nN]|[fF][fF])|(?<=[nN])[oO]|(?<=[yY])[eE][sS])" + _WHOLE
    + r"|(?:(?<=[tT])[rR][uU][eE]|(?<=[fF])[aA][lL][sS][eE]|(?<=[nN])[uU][lL][lL]|(?<=~))[ \t]*:(?:\s|$))",
    # numbers: octal (010 is 8 in YAML 1.1), 0o/0b/0x, exponents (1.5e3 is a string in YAML 1.1), digit
    # separators, -.5 (a string in YAML 1.1); keys that start like a number
    r"[-+.\d]" + _AT + r"(?:(?<=0)[0-9_oObBxX]|(?<=[-+])[0._]|[\d.]*(?<=[\d.])[eE_]"
    r"|[^\s:,\[\]{}#]*[ \t]*:(?:\s|$))",
)]


def _fast_load(text: str) -> tuple[bool, Any]:
    """(True, data) when yaml_rs read ``text`` (installed, a large text, no construct whose meaning
    differs between the parsers); (False, None) otherwise, and on any yaml_rs error: the strict loader
    then reads the file and reports its problem with its own line and wording."""
    if len(text) < FAST_MIN_CHARS or os.environ.get("SYNTHFB_YAML_FAST", "1") == "0":
        return False, None
    try:
        import yaml_rs
    except ImportError:
        return False, None
    if any(t in text for t in _NOT_FAST_TEXT):
        return False, None
    if text.isascii():
        if text.encode("ascii").translate(None, _ASCII_OK):  # a control character, tab or CR
            return False, None
    elif _ODD_CHARS.search(text):
        return False, None
    if any(line.count("[") + line.count("{") != line.count("]") + line.count("}")
           for line in text.split("\n") if "[" in line or "{" in line or "]" in line or "}" in line):
        return False, None  # a flow collection over several lines (the parsers differ on multi-line keys there)
    scan = "\n" + text
    if any(p.search(scan) for p in _NOT_FAST):
        return False, None
    try:
        return True, yaml_rs.loads(text, parse_datetime=False,
                                   duplicate_key_policy=yaml_rs.DuplicateKeyPolicy.Error)
    except Exception:  # noqa: BLE001 - whatever it is, the strict loader says it properly
        return False, None


def load_text(text: str) -> Any:
    """YAML text as data, exactly as :func:`safe_load` reads it (raises ``yaml.YAMLError``); large texts
    through the native fast path where it gives the same data."""
    ok, data = _fast_load(text)
    return data if ok else safe_load(text)


def describe(err: yaml.YAMLError) -> str:
    """``line L, column C: problem`` for a YAML error (one line)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err)
    return f"{where}invalid YAML: {' '.join(str(problem).split())}"


def load_file(path: str | Path, what: str = "file") -> Any:
    """Read and parse a YAML file; :class:`YAMLInputError` names the file and line."""
    p = Path(path)
    if not p.exists():
        raise YAMLInputError(f"{p}: {what} not found")
    if not p.is_file():
        raise YAMLInputError(f"{p}: {what} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise YAMLInputError(f"{p}: not valid UTF-8 (byte offset {e.start})") from None
    except OSError as e:
        raise YAMLInputError(f"{p}: cannot read {what} ({e.strerror or e})") from None
    try:
        return load_text(text)
    except yaml.YAMLError as e:
        raise YAMLInputError(f"{p}: {describe(e)}") from None
