"""The SFT output contract (issue #15): every stage that ends an SFT dataset
emits TRL prompt-completion rows.

Each shipped SFT pipeline (quickstart, self_instruct, alpaca, backtranslation,
realign) runs as it ships on the scripted fake model (``tests/fakes.py``,
with the replies and small targets of ``tests/test_fast_stages.py``), and its
rows are checked three ways:

1. the shape: ``prompt`` = [system?, user], ``completion`` = [assistant], the
   user turn / system message / completion each stage documents, with the
   method's own columns kept beside them;
2. TRL's own helpers (``trl.data_utils.is_conversational`` and
   ``maybe_apply_chat_template``) accept them;
3. synthfb's SFT trainer reads them: ``build_examples`` (the path of
   ``synthfb train sft`` up to loading the model: ``load_rows`` on the run's
   ``dataset/`` folder, tokenization, loss masks) and ``collate_sft``.

The standard format (plain strings) is checked the same way. No training
here.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ has no __init__.py
from fakes import FakeGenerator, last_user
from test_fast_stages import (PIPELINES, SelfInstructScript, _category, _original, _segment, novel_instruction,
                              rows, run, shipped, stage_cfg)

from synthfb.data.trl import sft_row, trl_completion
from synthfb.engine import Pipeline, Runner
from synthfb.stages.backtranslation_data import AUGMENTED_TAG, SEED_TAG
from synthfb.stages.self_instruct import ALPACA_PROMPT


# -- the helper ------------------------------------------------------------------------------------------------

def test_sft_row_shapes():
    assert sft_row("Hi?", "Hello.") == {"prompt": [{"role": "user", "content": "Hi?"}],
                                        "completion": [{"role": "assistant", "content": "Hello."}]}
    assert sft_row("Hi?", "Hello.", "Be brief.")["prompt"] == [{"role": "system", "content": "Be brief."},
                                                               {"role": "user", "content": "Hi?"}]
    assert sft_row("Hi?", "Hello.", "", "conversational")["prompt"] == [{"role": "user", "content": "Hi?"}]
    assert sft_row("Hi?", "Hello.", "Be brief.", "standard") == {"prompt": "Be brief.\n\nHi?", "completion": "Hello."}
    assert sft_row("Hi?", "Hello.", None, "standard") == {"prompt": "Hi?", "completion": "Hello."}
    assert trl_completion("Hi?", "Hello.") == sft_row("Hi?", "Hello.")
    with pytest.raises(ValueError, match="unknown format"):
        sft_row("Hi?", "Hello.", fmt="chatml")
    with pytest.raises(ValueError, match="needs text"):
        sft_row("Hi?", None)


# -- the checks ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(tiny_model):
    from synthfb.train.loop import load_tokenizer

    return load_tokenizer(str(tiny_model))


def user_of(r: dict[str, Any]) -> str:
    return r["prompt"][-1]["content"]


def system_of(r: dict[str, Any]) -> str | None:
    return r["prompt"][0]["content"] if r["prompt"][0]["role"] == "system" else None


def completion_of(r: dict[str, Any]) -> str:
    return r["completion"][0]["content"]


def check_conversational(rs: list[dict[str, Any]]) -> None:
    assert rs, "no rows"
    for r in rs:
        roles = [m["role"] for m in r["prompt"]]
        assert roles in (["user"], ["system", "user"]), roles
        assert [m["role"] for m in r["completion"]] == ["assistant"]
        assert all(isinstance(m["content"], str) for m in r["prompt"] + r["completion"])
        assert "messages" not in r  # one SFT form per row


def check_trl_accepts(rs: list[dict[str, Any]], tok, conversational: bool = True) -> None:
    trl_data = pytest.importorskip("trl.data_utils", reason="TRL not installed (optional)")
    for r in rs:
        assert trl_data.is_conversational(r) is conversational
        out = trl_data.maybe_apply_chat_template(r, tok)
        if conversational:
            assert out["prompt"].endswith("<|im_start|>assistant\n")
            assert user_of(r) in out["prompt"]
            if system_of(r):
                assert out["prompt"].startswith(f"<|im_start|>system\n{system_of(r)}<|im_end|>")
            assert out["completion"].startswith(completion_of(r))
        else:
            assert (out["prompt"], out["completion"]) == (r["prompt"], r["completion"])


def check_synthfb_trainer_accepts(run_dir: Path, tok, tiny_model: Path, n: int) -> None:
    """`synthfb train sft`'s data path on the run's dataset folder, up to the model."""
    from synthfb.train.collate import collate_sft
    from synthfb.train.sft import SFTConfig, build_examples

    cfg = SFTConfig(model=str(tiny_model), dataset=str(run_dir / "dataset"), output_dir=str(run_dir / "sft"),
                    max_length=4096)
    ex = build_examples(cfg, tok)
    assert len(ex) == n
    for e in ex:
        assert len(e["input_ids"]) == len(e["loss_mask"]) and 0 < sum(e["loss_mask"]) < len(e["loss_mask"])
        assert e["loss_mask"][0] == 0  # the prompt is not trained on
    batch = collate_sft(ex, tok.pad_token_id)
    assert batch["input_ids"].shape == batch["loss_mask"].shape and int(batch["loss_mask"].sum()) > 0


def check_all(run_dir: Path, tok, tiny_model: Path) -> list[dict[str, Any]]:
    rs = rows(run_dir)
    check_conversational(rs)
    check_trl_accepts(rs, tok)
    check_synthfb_trainer_accepts(run_dir, tok, tiny_model, len(rs))
    return rs


# -- the five shipped SFT pipelines ---------------------------------------------------------------------------

def quickstart_fake() -> FakeGenerator:
    return FakeGenerator(default=lambda req, k: f"Answer: {last_user(req)}")


def test_quickstart_rows(tmp_path, tok, tiny_model):
    out = tmp_path / "run"
    run(shipped("quickstart"), out, quickstart_fake())
    rs = check_all(out, tok, tiny_model)
    assert len(rs) == 8
    for r in rs:  # the rendered prompt (respond.jinja: the instruction) -> the response
        assert r["prompt"] == [{"role": "user", "content": r["instruction"]}]
        assert r["completion"] == [{"role": "assistant", "content": r["response"]}]
        assert r["response"] == f"Answer: {r['instruction']}"


def self_instruct_fake() -> FakeGenerator:
    script = SelfInstructScript()
    return FakeGenerator(rules=[
        ("Write a list of new and varied tasks:", script.bootstrap),
        ("Is it classification?", script.classify),
        ("list its possible class labels", ("\nClass label: Positive\nText: I loved it.\n"
                                            "Class label: Negative\nText: I did not like it at all.")),
        ("For each task, write one or more examples.", ("\nExample 1\nInput: two apples\nOutput: a pair of apples\n"
                                                        "Example 2\nInput: three pears\nOutput: a few pears")),
    ])


def test_self_instruct_rows(tmp_path, tok, tiny_model):
    d = shipped("self_instruct")
    stage_cfg(d, "self_instruct_bootstrap").update(num_instructions=4, prompts_per_step=2, max_steps=4)
    out = tmp_path / "run"
    run(d, out, self_instruct_fake())
    rs = check_all(out, tok, tiny_model)
    assert len(rs) == 8
    for r in rs:  # instruction, blank line, input -> output; no system message
        assert r["input"] and system_of(r) is None
        assert user_of(r) == f"{r['instruction']}\n\n{r['input']}"
        assert completion_of(r) == r["output"]
        assert {"instruction", "input", "output", "generation_mode", "demo_ids"} <= set(r)


def alpaca_fake() -> FakeGenerator:
    count = itertools.count()

    def reply(req, k):
        a, b = (novel_instruction(100 + next(count)) for _ in range(2))
        return (f" {a}\n4. Input:\n<noinput>\n4. Output:\nA short answer.\n###\n"
                f"5. Instruction: {b}\n5. Input:\nsome input text\n5. Output:\nAnother answer.\n###\n")

    return FakeGenerator(reply)


def alpaca_pipeline(fmt: str | None = None) -> dict[str, Any]:
    d = shipped("alpaca")
    cfg = stage_cfg(d, "alpaca_bootstrap")
    cfg.update(num_instructions=4, prompts_per_step=2, max_steps=4, fill="response")  # alpaca_fake: whole responses
    if fmt:
        cfg["format"] = fmt
    return d


def test_alpaca_rows(tmp_path, tok, tiny_model):
    out = tmp_path / "run"
    run(alpaca_pipeline(), out, alpaca_fake())
    rs = check_all(out, tok, tiny_model)
    assert len(rs) == 4 and {r["input"] for r in rs} == {"", "some input text"}
    for r in rs:  # the instruction alone when there is no input
        want = f"{r['instruction']}\n\n{r['input']}" if r["input"] else r["instruction"]
        assert r["prompt"] == [{"role": "user", "content": want}]
        assert completion_of(r) == r["output"]


def backtranslation_fake() -> FakeGenerator:
    return FakeGenerator(rules=[
        ("Request:", lambda req, k: f" How do I {' '.join(_segment(req).split()[:4]).lower()}?"),
        ("Judge whether the answer is a good example", "Good.\nScore: 5"),  # the curation chat turn
    ])


def test_backtranslation_rows(tmp_path, tok, tiny_model):
    out = tmp_path / "run"
    run(shipped("backtranslation"), out, backtranslation_fake())
    rs = check_all(out, tok, tiny_model)
    for r in rs:  # the generated instruction -> the segment, Humpback's S_w tag as the system message
        assert r["system_tag"] == AUGMENTED_TAG
        assert r["prompt"] == [{"role": "system", "content": AUGMENTED_TAG},
                               {"role": "user", "content": r["instruction"]}]
        assert r["completion"] == [{"role": "assistant", "content": r["output"]}]
        assert r["curation_score"] == 5.0


def realign_fake() -> FakeGenerator:
    return FakeGenerator(rules=[
        ("\nCategory:", _category),
        ("[Response start]", lambda req, k: [" Too short.", f" 1. {_original(req)}\n2. One more step, to be clear."][k]),
    ])


def test_realign_rows(tmp_path, tok, tiny_model):
    out = tmp_path / "run"
    run(shipped("realign"), out, realign_fake())
    rs = check_all(out, tok, tiny_model)
    assert len(rs) == 12 and {r["realign_tag"] for r in rs} == {"rewrite", "original"}
    for r in rs:  # the query -> the final (rewritten or original) response
        assert r["prompt"] == [{"role": "user", "content": r["instruction"]}]
        assert completion_of(r) == r["output"]
        if r["realign_tag"] == "rewrite":
            assert completion_of(r) != r["original_response"]


# -- the standard format ---------------------------------------------------------------------------------------

def test_standard_format_rows(tmp_path, tok, tiny_model):
    """`format: standard`: plain strings that TRL leaves as they are and synthfb's trainer reads."""
    d = shipped("quickstart")
    stage_cfg(d, "generate").update(format="standard", system="Be brief.")
    out = tmp_path / "quick"
    fake = quickstart_fake()
    run(d, out, fake)
    rs = rows(out)
    assert [r.messages[0] for r in fake.requests] == [{"role": "system", "content": "Be brief."}] * 8
    for r in rs:
        assert (r["prompt"], r["completion"]) == (f"Be brief.\n\n{r['instruction']}", r["response"])
    check_trl_accepts(rs, tok, conversational=False)
    check_synthfb_trainer_accepts(out, tok, tiny_model, len(rs))

    out = tmp_path / "alpaca"
    run(alpaca_pipeline("standard"), out, alpaca_fake())
    rs = rows(out)
    for r in rs:  # Alpaca's own training prompt
        assert r["prompt"] == ALPACA_PROMPT[bool(r["input"])].format(instruction=r["instruction"], input=r["input"])
        assert r["prompt"].endswith("### Response:\n") and r["completion"] == r["output"]
    check_trl_accepts(rs, tok, conversational=False)
    check_synthfb_trainer_accepts(out, tok, tiny_model, len(rs))

    d = shipped("backtranslation")
    for kind in ("backtranslate", "self_curate"):
        stage_cfg(d, kind)["format"] = "standard"
    out = tmp_path / "bt"
    run(d, out, backtranslation_fake())
    rs = rows(out)
    for r in rs:  # the tag a paragraph before the instruction, as a completion-mode request sends a system text
        assert (r["prompt"], r["completion"]) == (f"{AUGMENTED_TAG}\n\n{r['instruction']}", r["output"])
    check_trl_accepts(rs, tok, conversational=False)


# -- generate in the middle of a pipeline, and source_tag --------------------------------------------------------

def _pipe(tmp_path: Path, stages: list[dict[str, Any]], rows_: list[dict[str, Any]]) -> Pipeline:
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_))
    p = Pipeline.from_dict({"name": "t", "stages": [{"stage": "load", "path": "in.jsonl"}, *stages]}, tmp_path)
    p.check_columns()
    return p


def _run(p: Pipeline, out: Path, fake: FakeGenerator) -> list[dict[str, Any]]:
    Runner(p, out, generators={p.model: fake}, progress=False).run()
    return rows(out)


def test_generate_sft_columns_options(tmp_path):
    seeds = [{"prompt": "Question one?"}, {"prompt": "Question two?"}]
    fake = FakeGenerator(default=lambda req, k: f"Answer {k} to {last_user(req)}")
    # a list of samples (n > 1, explode: false) is no SFT row: `prompt` stays the input string
    p = _pipe(tmp_path, [{"stage": "generate", "input_column": "prompt", "output_column": "responses", "n": 2,
                          "explode": False}], seeds)
    assert p.stages[-1].output_columns(["prompt"]) == ["prompt", "responses", "provenance"]
    rs = _run(p, tmp_path / "a", fake)
    assert [r["prompt"] for r in rs] == ["Question one?", "Question two?"] and "completion" not in rs[0]
    # sft_columns: false
    p = _pipe(tmp_path, [{"stage": "generate", "input_column": "prompt", "sft_columns": False}], seeds)
    rs = _run(p, tmp_path / "b", fake)
    assert rs[0]["prompt"] == "Question one?" and "completion" not in rs[0]
    # n > 1, exploded: one SFT row per sample; a later generate reads the conversational `prompt`
    # (its user turn, and its system message when the stage has none)
    p = _pipe(tmp_path, [{"stage": "generate", "input_column": "prompt", "n": 2, "system": "Be brief."},
                         {"stage": "generate", "input_column": "prompt", "output_column": "again"}], seeds)
    fake.forget()
    rs = _run(p, tmp_path / "c", fake)
    assert len(rs) == 4
    system = {"role": "system", "content": "Be brief."}
    assert [r.messages for r in fake.requests[2:]] == [[system, {"role": "user", "content": q}]
                                                       for q in ["Question one?"] * 2 + ["Question two?"] * 2]
    for r in rs:
        assert r["prompt"] == [system, {"role": "user", "content": user_of(r)}]
        assert user_of(r) in ("Question one?", "Question two?")
        assert r["completion"] == [{"role": "assistant", "content": r["again"]}]
    # the SFT columns' names are taken
    with pytest.raises(Exception, match="output_column"):
        _pipe(tmp_path, [{"stage": "generate", "input_column": "prompt", "output_column": "completion"}], seeds)


def test_source_tag_makes_seed_rows_sft_rows(tmp_path, tok):
    """Humpback's seed data (tag S_a) next to the curated data: the tag is the system message."""
    seeds = [{"instruction": "Name a colour.", "output": "Blue."}, {"instruction": "Count to two.", "output": "1, 2."}]
    p = _pipe(tmp_path, [{"stage": "source_tag", "source": "seed"}], seeds)
    rs = _run(p, tmp_path / "a", FakeGenerator())
    check_conversational(rs)
    check_trl_accepts(rs, tok)
    for r in rs:
        assert r["source"] == "seed" and system_of(r) == SEED_TAG
        assert (user_of(r), completion_of(r)) == (r["instruction"], r["output"])
    # rows without instruction/output just get the tags
    p = _pipe(tmp_path, [{"stage": "source_tag", "source": "augmented"}], [{"text": "x"}])
    assert p.stages[-1].output_columns(["text"]) == ["text", "source", "system_tag"]
    assert set(_run(p, tmp_path / "b", FakeGenerator())[0]) == {"row_id", "text", "source", "system_tag"}


def test_shipped_sft_pipelines_declare_the_sft_columns():
    """Column flow (`Pipeline.check_columns`): the five SFT pipelines end with prompt/completion."""
    for name in ("quickstart", "self_instruct", "alpaca", "backtranslation", "realign", "cai_sft"):
        p = Pipeline.from_yaml(PIPELINES / f"{name}.yaml")
        p.check_columns()
        cols: list[str] = []
        for st in p.stages:
            cols = st.output_columns(cols)
        assert {"prompt", "completion"} <= set(cols), (name, cols)
