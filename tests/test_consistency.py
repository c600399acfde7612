"""Consistency-checked answers (TableLLM cross-way validation; specs/methods-2.md section 5).

The sandbox is checked on real programs (a correct one's output is read, an
endless loop is killed at the timeout, a huge allocation fails under the
memory limit, the network is unreachable, output beyond the limit stops the
program), the answer comparison on the spec's cases, and the stage end to
end on the scripted fake model (tests/scripted_runs.py).
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ has no __init__.py
import scripted_runs
from fakes import FakeGenerator, last_user
from scripted_runs import _problem, consistency_answers, rows, run, stage_cfg

from synthfb.stages.consistency import answers_agree, extract_program, final_answer, normalise_answer, printed_answer
from synthfb.stages.sandbox import run_python

# -- the sandbox ---------------------------------------------------------------------------------------------------


def test_sandbox_reads_a_correct_programs_output():
    res = run_python("price = 3\nmon = 48\ntue = mon + 15\nprint(price * (mon + tue))\n")
    assert res.ok and res.returncode == 0 and res.stdout == "333\n"
    assert printed_answer(res.stdout) == "333"


def test_sandbox_timeout_kills_an_endless_loop():
    t0 = time.perf_counter()
    res = run_python("while True:\n    pass\n", timeout=1.0)
    assert res.status == "timeout" and not res.ok
    assert time.perf_counter() - t0 < 5  # killed, not waited for


def test_sandbox_timeout_kills_the_programs_children_too(tmp_path):
    marker = tmp_path / "child-alive"
    child = "import sys, time; time.sleep(2); open(sys.argv[1], 'w')"
    code = ("import subprocess, sys\n"
            f"subprocess.Popen([sys.executable, '-c', {child!r}, {str(marker)!r}])\n"
            "while True:\n    pass\n")
    assert run_python(code, timeout=1.0).status == "timeout"
    time.sleep(2.5)
    assert not marker.exists()


def test_sandbox_memory_limit_stops_a_huge_allocation():
    res = run_python("x = bytearray(4 * 1024 ** 3)\nprint(len(x))\n", memory_mb=256)
    assert res.status == "error" and "MemoryError" in res.stderr and res.stdout == ""
    # the same program allocating within the limit runs
    assert run_python("x = bytearray(16 * 1024 ** 2)\nprint(len(x))\n", memory_mb=256).stdout.strip() == str(16 * 1024 ** 2)


def test_sandbox_has_no_network():
    res = run_python("import socket\ns = socket.create_connection(('127.0.0.1', 9), timeout=2)\nprint('connected')\n")
    assert res.status == "error" and "connected" not in res.stdout
    assert res.network in ("namespace", "socket_blocked")


def test_sandbox_stops_endless_output_and_runs_isolated_in_a_temp_dir():
    res = run_python("while True:\n    print('x' * 1000)\n", timeout=5.0, max_output=20_000)
    assert res.status in ("error", "killed") and len(res.stdout) <= 20_000
    res = run_python("import os, sys\nprint(os.getcwd())\nprint(sorted(os.environ))\nprint(sys.flags.isolated)\n")
    cwd, env, isolated = res.stdout.splitlines()
    assert "synthfb-sandbox-" in cwd and not Path(cwd).exists()  # deleted afterwards
    assert json.loads(env.replace("'", '"')) == ["LC_ALL", "PATH"] and isolated == "1"
    with pytest.raises(ValueError, match="timeout"):
        run_python("print(1)", timeout=0)


# -- answers ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("a,b,same", [
    ("1,200", "1200.0", True),  # spec 5.4
    ("12%", "0.12", True),  # a percentage is its fraction (spec 5.4's percent rule)
    ("12%", "12", True),  # ... or its bare number, printed by a program
    ("12%", "13", False),
    ("12%", "0.12%", False),
    ("50%", "1/2", True),
    ("$54", "54.00", True),
    ("36.2", "36.199999999999996", True),
    ("7 cows", "7", True),
    ("3/4", "0.75", True),
    ("\\boxed{40}", "40", True),
    ("**21**.", "21", True),
    ("40", "41", False),
    ("1200", "1,201", False),
    ("Paris", "paris.", True),
    ("Paris", "Lyon", False),
])
def test_answers_agree(a, b, same):
    assert answers_agree(a, b) is same
    assert answers_agree(b, a) is same


def test_missing_answers_are_none_not_false():
    assert answers_agree(None, "3") is None and answers_agree("", "3") is None
    assert normalise_answer("  ") == (None, None)
    assert normalise_answer("-2.5e3 metres")[0] == -2500.0


def test_final_answer_and_program_extraction():
    assert final_answer("Step 1: 3*4 = 12.\nAnswer: 12\n") == "12"
    assert final_answer("Answer: 5\nWait, recheck.\nAnswer: 6") == "6"  # the last one
    assert final_answer("so the total is \\boxed{18}.") == "18"
    assert final_answer("The final answer is 42.") == "42."
    assert final_answer("no answer here") is None
    reply = "First:\n```python\nprint(1)\n```\nBetter:\n```python\nx = 2\nprint(x)\n```\n"
    assert extract_program(reply) == "x = 2\nprint(x)\n"
    assert extract_program("```\nprint(3)\n```") == "print(3)\n"
    assert extract_program("print(3)") is None
    assert printed_answer("debug\n  \n42\n\n") == "42" and printed_answer("") is None


# -- the stage -------------------------------------------------------------------------------------------------------

def test_stage_keeps_only_agreeing_rows_and_counts_agreement(tmp_path):
    d, fake = scripted_runs.consistency()
    res = run(d, tmp_path / "run", fake)
    counts = res.manifest["stages"][1]["counts"]
    out = rows(tmp_path / "run")
    answers = consistency_answers()
    # 7 problems: #2 disagrees (text off by one), #4's program raises, #5 has no program -> 4 kept of 5 checked
    assert (counts["agreement_checked"], counts["agreed"]) == (5, 4)
    assert counts["dropped_answers_disagree"] == 1 and counts["dropped_program_error"] == 1
    assert counts["dropped_no_program"] == 1 and counts["kept_matching_gold"] == 4
    assert len(out) == 4
    for r in out:
        assert answers_agree(r["answer"], answers[r["question"]])
        assert r["answers_agree"] is True and r["program_status"] == "ok"
        assert r["completion"] == [{"role": "assistant", "content": r["first_solution"]}]
        assert r["prompt"] == [{"role": "user", "content": r["question"]}]  # sft_prompt: question
        assert "```python" in r["second_solution"]
    assert [r["id"] for r in out] == ["mwp-01", "mwp-03", "mwp-06", "mwp-07"]
    # both routes of every problem in one engine call per chunk (chunk_size 3: 3 + 3 + 1 problems)
    assert [len(reqs) for _, reqs in fake.generate_calls] == [6, 6, 2]
    card = (tmp_path / "run" / "README.md")
    if not card.exists():
        from synthfb.cli import main

        assert main(["card", str(tmp_path / "run")]) == 0
    text = card.read_text()
    assert "`consistency`: 4 of 5 agreed (80.0%)" in text and "arXiv:2403.19318" in text


def test_stage_drops_a_program_that_times_out_without_failing_the_run(tmp_path):
    d, _ = scripted_runs.consistency()
    stage_cfg(d, "load")["limit"] = 2
    stage_cfg(d, "consistency")["timeout"] = 1.0
    answers = consistency_answers()

    def reply(req, k):
        q = _problem(req)
        if "Python program" in last_user(req):
            return "```python\nwhile True:\n    pass\n```" if "muffins" in q else f"```python\nprint({answers[q]})\n```"
        return f"Answer: {answers[q]}"

    res = run(d, tmp_path / "run", FakeGenerator(reply))
    counts = res.manifest["stages"][1]["counts"]
    assert res.manifest["status"] == "finished"
    assert counts["dropped_program_timeout"] == 1 and counts["programs_timeout"] == 1
    assert [r["id"] for r in rows(tmp_path / "run")] == ["mwp-02"]


def test_two_solvers_mode_and_second_target(tmp_path):
    d, _ = scripted_runs.consistency()
    d = copy.deepcopy(d)
    stage_cfg(d, "load")["limit"] = 3
    stage_cfg(d, "consistency").update(mode="two_solvers", target="second", format="standard", sft_prompt="rendered")
    answers = consistency_answers()

    def reply(req, k):
        q = _problem(req)
        a = answers[q]
        if "list every quantity" in last_user(req):  # the second solver
            return f"Quantities...\nAnswer: {a}" if "Priya" not in q else "Quantities...\nAnswer: 1"
        return f"Steps...\nAnswer: {a}"

    res = run(d, tmp_path / "run", FakeGenerator(reply))
    out = rows(tmp_path / "run")
    assert [r["id"] for r in out] == ["mwp-01", "mwp-03"]
    assert all(r["completion"] == r["second_solution"] and r["program_status"] is None for r in out)
    assert all(isinstance(r["prompt"], str) and "list every quantity" in r["prompt"] for r in out)
    assert res.manifest["stages"][1]["counts"]["dropped_answers_disagree"] == 1


def test_config_errors():
    from synthfb.engine import Pipeline

    def build(**cfg):
        return Pipeline.from_dict({"name": "x", "stages": [
            {"stage": "load", "path": "data/math_word_problems.jsonl"}, {"stage": "consistency", **cfg}]},
            scripted_runs.PIPELINES)

    for cfg, msg in [({"mode": "vote"}, "mode"), ({"timeout": 0}, "timeout"), ({"target": "both"}, "target"),
                     ({"text_prompt": "respond.jinja"}, "question")]:
        with pytest.raises(ValueError, match=msg):
            build(**cfg)


@pytest.mark.timeout(900)
def test_shipped_pipeline_on_the_tiny_model(tmp_path, vllm_tiny):
    """The shipped file on real vLLM: a tiny random model writes no program and no answer, so every row is
    dropped with a reason and none is kept by accident; the run finishes."""
    d = scripted_runs.shipped("consistency")
    stage_cfg(d, "load")["limit"] = 3
    stage_cfg(d, "consistency")["sampling"] = {"temperature": 0.0, "max_tokens": 24}
    res = run(d, tmp_path / "run", vllm_tiny)
    counts = res.manifest["stages"][1]["counts"]
    assert res.manifest["status"] == "finished"
    kept = res.num_rows
    dropped = sum(v for k, v in counts.items() if k.startswith("dropped_"))
    assert kept + dropped == 3 and kept == counts.get("agreed", 0)
