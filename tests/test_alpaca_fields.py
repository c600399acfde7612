"""``alpaca_bootstrap`` with ``fill: fields`` (issue #15 item 6: prompts a
small model can follow) and the block parser's honest counts.

``fields``: per prompt three calls, each continuing the document so far after
a prefilled header (``4. Instruction:`` to the end of the line, ``4. Input:``
up to ``4. Output:``, ``4. Output:`` up to ``###``); the three fields are
parsed as one block by the same parser as Alpaca's responses. References:
the requests the fake saw (each continues the previous one word for word),
the scripted answers (which tasks get an empty output), and hand-written
blocks for the parser.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ has no __init__.py
import scripted_runs as sr
from fakes import FakeGenerator, Reply

from synthfb.engine import Pipeline
from synthfb.stages.self_instruct_filters import parse_alpaca_blocks


def _fields_run(tmp_path, fake=None, **cfg):
    d, scripted = sr.alpaca()
    sr.stage_cfg(d, "alpaca_bootstrap").update(fill="fields", **cfg)
    fake = fake or scripted
    res = sr.run(d, tmp_path / "run", fake)
    [rec] = [s for s in res.manifest["stages"] if s["kind"] == "alpaca_bootstrap"]
    return res, rec, fake


def test_fields_requests_continue_the_document(tmp_path):
    res, rec, fake = _fields_run(tmp_path)
    reqs = fake.requests
    inst = [r for r in reqs if r.prompt.endswith("4. Instruction:")]
    inp = [r for r in reqs if r.prompt.endswith("\n4. Input:\n")]
    out = [r for r in reqs if r.prompt.endswith("\n4. Output:\n")]
    assert len(inst) == len(inp) == len(out) and len(inst) + len(inp) + len(out) == len(reqs)
    assert fake.num_generate_calls == 3 * rec["counts"]["prompts"] // 2  # prompts_per_step 2: 3 calls per step
    for a, b, c in zip(inst, inp, out):
        # the input call is the instruction call's prompt + the instruction line + the Input header, and so on
        line = re.findall(r"4\. Instruction:(.*)\n4\. Input:\n$", b.prompt)[-1]
        assert b.prompt == a.prompt + line + "\n4. Input:\n"
        assert c.prompt == b.prompt + "<noinput>" + "\n4. Output:\n"
        assert a.params.stop == ("\n",) and a.params.n == b.params.n == c.params.n == 1
        assert "###" in c.params.stop and "4. Output" in b.params.stop
        assert c.params.max_tokens == 256 and a.params.max_tokens == b.params.max_tokens == 128


def test_fields_counts_empty_outputs_as_unparsed(tmp_path):
    res, rec, fake = _fields_run(tmp_path)
    c = rec["counts"]
    rows = sr.rows(tmp_path / "run")
    # the scripted output is empty for tasks whose first word has an odd index in WORDS
    outs = [r for r in fake.requests if r.prompt.endswith("\n4. Output:\n")]
    empty = sum(sr.WORDS.index(re.findall(r"4\. Instruction: Describe (\w+)", r.prompt)[-1]) % 2 for r in outs)
    assert 0 < empty < len(outs)
    assert c["outputs"] == len(outs) and c["parsed"] == len(outs) - empty
    assert c["dropped_malformed_block"] == empty
    assert rec["parse"]["rate"] == pytest.approx((len(outs) - empty) / len(outs), abs=1e-4)
    assert len(rows) == 5 and all(r["output"] == "A short answer." and r["input"] == "" for r in rows)


def test_fields_truncated_output_is_dropped_not_parsed(tmp_path):
    def reply(req, k):
        if req.prompt.endswith("4. Input:\n"):
            return "some input"
        if req.prompt.endswith("4. Output:\n"):
            return Reply("an output that runs on and on", "length")
        return f" {sr.novel_instruction(300 + len(req.prompt) % 97)}"

    res, rec, fake = _fields_run(tmp_path, FakeGenerator(reply), max_steps=2)
    c = rec["counts"]
    assert res.num_rows == 0 and c.get("parsed", 0) == 0 and c.get("outputs", 0) == 0
    assert c["truncated_outputs"] == c["prompts"] == 4  # prompts_per_step 2, 2 steps


def test_fields_output_ends_at_a_repeated_field_header(tmp_path):
    # SmolLM2 often writes "4. Output:" or "4. Input:" again inside the output (measured: the one malformed
    # block of 11 in an 8-row alpaca run); the output ends there, as the instruction ends at its line end
    def reply(req, k):
        if req.prompt.endswith("4. Input:\n"):
            return "<noinput>"
        if req.prompt.endswith("4. Output:\n"):
            return "The first answer.\n4. Output:\nA second go.\n4. Input:\nmore"
        return f" {sr.novel_instruction(300 + len(req.prompt) % 97)}"

    res, rec, fake = _fields_run(tmp_path, FakeGenerator(reply), max_steps=2)
    c = rec["counts"]
    assert c["outputs"] == c["parsed"] == 4 and not c.get("dropped_malformed_block")
    assert {r["output"] for r in sr.rows(tmp_path / "run")} == {"The first answer."}
    out = [r for r in fake.requests if r.prompt.endswith("\n4. Output:\n")]
    assert {"\n4. Input:", "\n4. Output:"} <= set(out[0].params.stop)  # not "4. Output the result ..."


def test_fields_needs_completion_mode():
    d, _ = sr.alpaca()
    sr.stage_cfg(d, "alpaca_bootstrap").update(fill="fields", chat=True)
    with pytest.raises(Exception, match="chat: false"):
        Pipeline.from_dict(d, sr.PIPELINES, source="alpaca")


def test_parser_empty_fields_and_plural_variant():
    text = (" Name a colour.\n4. Input:\n<noinput>\n4. Output:\n\n###\n"       # empty output: malformed
            "5. Instructions: Name a fruit.\n5. Input:\n<noinput>\n5. Output:\nA pear.\n###\n"  # plural header
            "6. Instruction:\n6. Input:\nx\n6. Output:\ny\n###\n"                 # empty instruction: malformed
            "7. Instruction: Add 2 and 2.\n7. Input:\n<noinput>\n7. Output:\n4")
    items, bad = parse_alpaca_blocks(text, 4, truncated=False)
    assert items == [{"instruction": "Name a fruit.", "input": "", "output": "A pear."},
                     {"instruction": "Add 2 and 2.", "input": "", "output": "4"}]
    assert bad == 2
