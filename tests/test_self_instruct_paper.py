"""Self-Instruct as in the paper (Wang et al. 2023; specs/methods.md section 1).

* The classification prompt (``prompts/self_instruct_is_classification.jinja``)
  carries 31 demonstrations, 12 "Yes" and 19 "No", as the paper's did, read
  from the prompt the ``self_instruct_classify`` stage of the shipped pipeline
  actually sends; it ends where the label scorer puts " Yes" / " No".
* The paper's own seed file (``seed_tasks.jsonl``: ``id``, ``name``,
  ``instruction``, ``instances`` [{input, output}], ``is_classification``) runs
  through the shipped ``pipelines/self_instruct.yaml`` with ``--input FILE``
  (``Pipeline.from_dict(..., input_file=...)``): the real ``load`` stage keeps
  the schema, ``self_instruct_bootstrap`` draws its demos from that file only
  (``classification_only`` from its ``is_classification`` rows),
  ``alpaca_bootstrap`` reads ``instances[0]``. The rows here are written for
  this test in that schema; the model is the scripted fake of
  ``tests/scripted_runs.py``.
"""

from __future__ import annotations

import collections
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ has no __init__.py
import scripted_runs as sr
from fakes import FakeGenerator, Reply, last_user, request_text

from synthfb.engine import Pipeline, Runner

PIPELINES = sr.PIPELINES
DEMO = re.compile(r"^Task: (.*)\nIs it classification\?(.*)$", re.M)
NEW_TASK = "Decide whether the tweet below is sarcastic."

# Five seed tasks in the exact schema of the paper repo's data/seed_tasks.jsonl (our own wording).
PAPER_SEEDS = [
    {"id": "seed_task_0", "name": "packing_list", "instruction": "Make a packing list for a weekend camping trip.",
     "instances": [{"input": "", "output": "Tent, sleeping bag, torch, water filter, warm jacket, snacks."}],
     "is_classification": False},
    {"id": "seed_task_1", "name": "past_tense", "instruction": "Does the sentence use the past tense?",
     "instances": [{"input": "We walked to the harbour at dawn.", "output": "Yes"}], "is_classification": True},
    {"id": "seed_task_2", "name": "shorten_sentence",
     "instruction": "Shorten the sentence without changing its meaning.",
     "instances": [{"input": "Due to the fact that it was raining, we stayed at home.",
                    "output": "Because it rained, we stayed home."}], "is_classification": False},
    {"id": "seed_task_3", "name": "formal_or_casual", "instruction": "Is the message formal or casual?",
     "instances": [{"input": "hey, u coming tonight?", "output": "Casual"}], "is_classification": True},
    {"id": "seed_task_4", "name": "explain_idiom", "instruction": "Explain what the idiom means to a child.",
     "instances": [{"input": "break the ice", "output": "It means doing something to make people feel relaxed "
                                                        "when they first meet."}], "is_classification": False},
]


def _write_seeds(folder: Path) -> Path:
    path = folder / "seed_tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAPER_SEEDS))
    return path


def _classify_run(tmp_path: Path, fake: FakeGenerator, instruction: str = NEW_TASK, **cfg) -> list[dict]:
    """The shipped pipeline's ``self_instruct_classify`` (plus ``cfg``) on one new task; the output rows."""
    d = sr.shipped("self_instruct")
    stage = {**sr.stage_cfg(d, "self_instruct_classify"), **cfg}
    tmp_path.mkdir(parents=True, exist_ok=True)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": "t", "instruction": instruction}) + "\n")
    p = Pipeline.from_dict({**d, "stages": [{"stage": "load", "path": str(tasks), "id_column": "id"}, stage]},
                           PIPELINES, "pipelines/self_instruct.yaml")
    Runner(p, tmp_path / "run", generators={p.model: fake}, progress=False).run()
    return sr.rows(tmp_path / "run")


def _demos(text: str) -> list[tuple[str, str]]:
    found = DEMO.findall(text)
    assert found[-1] == (NEW_TASK, ""), "the prompt must end with the new task, unanswered"
    return [(task, answer.strip()) for task, answer in found[:-1]]


# -- the classification prompt -----------------------------------------------------------------------------------

@pytest.mark.parametrize("chat", [False, True])
def test_classify_prompt_has_the_papers_31_demos_12_yes_19_no(tmp_path, chat):
    fake = FakeGenerator(rules=[("Is it classification?", " No")], default=Reply("unexpected prompt", "stop"))
    [row] = _classify_run(tmp_path, fake, chat=chat, scoring="text")
    [req] = fake.requests
    text = last_user(req)
    demos = _demos(text)
    assert len(demos) == 31 and collections.Counter(a for _, a in demos) == {"Yes": 12, "No": 19}
    assert len({t for t, _ in demos}) == 31  # 31 different tasks
    assert text.rstrip().endswith(f"\n\nTask: {NEW_TASK}\nIs it classification?")
    assert (req.prompt is None) is chat and row["is_classification"] is False


def test_classify_prompt_ends_where_the_scorer_puts_the_label(tmp_path):
    """``scoring: logprobs`` (raw): the context is the rendered prompt as it is (it already ends with
    "Is it classification?", so nothing is appended) and " Yes" / " No" are scored right after it."""
    text_fake = FakeGenerator(rules=[("Is it classification?", " Yes")])
    _classify_run(tmp_path / "text", text_fake, scoring="text")
    rendered = text_fake.requests[0].prompt

    def lp(context, continuation):
        return -0.05 if continuation == " Yes" else -4.0

    fake = FakeGenerator(logprobs=lp)
    [row] = _classify_run(tmp_path / "lp", fake, scoring="logprobs")
    yes, no = fake.score_requests
    assert yes.prompt == no.prompt == rendered.rstrip()
    assert yes.prompt.endswith(f"Task: {NEW_TASK}\nIs it classification?")
    assert (yes.continuation, no.continuation) == (" Yes", " No")
    assert len(_demos(yes.prompt)) == 31 and row["is_classification"] is True and not fake.requests

    chat_fake = FakeGenerator(logprobs=lambda c, cont: -0.05 if cont.endswith(" No") else -4.0)
    [row] = _classify_run(tmp_path / "chat", chat_fake, chat=True, scoring="logprobs")
    yes, no = chat_fake.score_requests  # chat: the prefix is part of the continuation (cancels out)
    assert yes.messages[-1]["content"].endswith(f"Task: {NEW_TASK}\nIs it classification?")
    assert (yes.continuation, no.continuation) == ("Is it classification? Yes", "Is it classification? No")
    assert row["is_classification"] is False


# -- the paper's 175 seed tasks: its seed_tasks.jsonl schema -----------------------------------------------------

def test_load_keeps_the_paper_seed_schema(tmp_path):
    seeds = _write_seeds(tmp_path)
    p = Pipeline.from_dict(sr.shipped("self_instruct"), PIPELINES, input_file=seeds)
    load = p.stages[0]
    assert load.kind == "load" and Path(load.config.path) == seeds.resolve()
    p.check_columns()
    only_load = Pipeline.from_dict({"name": "seeds", "stages": [{**sr.stage_cfg(sr.shipped("self_instruct"), "load"),
                                                                "path": str(seeds)}]}, tmp_path)
    Runner(only_load, tmp_path / "run", progress=False).run()
    got = {r["row_id"]: r for r in sr.rows(tmp_path / "run")}
    assert list(got) == [s["id"] for s in PAPER_SEEDS]
    for s in PAPER_SEEDS:
        r = got[s["id"]]
        assert {k: r[k] for k in s} == s  # instances stay a list of {input, output}; is_classification a bool


def test_shipped_self_instruct_runs_from_the_paper_seed_file(tmp_path):
    seeds = _write_seeds(tmp_path)
    script = sr.SelfInstructScript()
    d, fake = sr.self_instruct(script=script)
    p = Pipeline.from_dict(d, PIPELINES, "pipelines/self_instruct.yaml", input_file=seeds)
    res = Runner(p, tmp_path / "run", generators={p.model: fake}, progress=False).run()
    m = res.manifest
    assert m["status"] == "finished" and m["stages"][0]["rows_out"] == len(PAPER_SEEDS)
    assert m["config"]["stages"][0]["path"] == "seed_tasks.jsonl"  # recorded without the machine's folders

    # bootstrap: the demos are this file's instructions (all 5 fit in 8), never the shipped seeds
    ours = {s["instruction"] for s in PAPER_SEEDS}
    shipped = {json.loads(x)["instruction"] for x in (PIPELINES / "data" / "seed_tasks.jsonl").read_text().splitlines()}
    boot = [request_text(r) for r in fake.requests if "Write a list of new and varied tasks:" in request_text(r)]
    assert boot
    machine = set(script.is_clf)
    for text in boot:
        demos = set(re.findall(r"^\d+\. (.+)$", text, re.M))
        assert ours <= demos and demos <= ours | machine and not demos & shipped

    rs = sr.rows(tmp_path / "run")
    assert rs and {r["instruction"] for r in rs} <= machine
    seed_ids = {s["id"] for s in PAPER_SEEDS}
    for r in rs:
        assert seed_ids <= set(r["demo_ids"]) and r["is_classification"] is script.is_clf[r["instruction"]]
        assert r["generation_mode"] == ("output_first" if r["is_classification"] else "input_first")


def test_resume_of_an_input_run_needs_the_input_again(tmp_path):
    """A run made with `--input` records the file's name; resuming it without `--input` is refused with one line
    (the load stage would read the pipeline's own seeds and the finished rows would be made again from them),
    and nothing in the run changes; with `--input` again the run is reused as it is."""
    from synthfb.engine.runner import RunError

    seeds = _write_seeds(tmp_path)
    d, fake = sr.self_instruct(script=sr.SelfInstructScript())
    out = tmp_path / "run"
    p = Pipeline.from_dict(d, PIPELINES, "pipelines/self_instruct.yaml", input_file=seeds)
    first = Runner(p, out, generators={p.model: fake}, progress=False).run()
    assert first.manifest["input"] == "seed_tasks.jsonl"
    before = {f: f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file() and "logs" not in f.parts}
    plain = Pipeline.from_dict(d, PIPELINES, "pipelines/self_instruct.yaml")
    with pytest.raises(RunError, match=r"this run read --input seed_tasks.jsonl; give --input seed_tasks.jsonl again"):
        Runner(plain, out, resume=True, generators={plain.model: fake}, progress=False).run()
    assert {f: f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file() and "logs" not in f.parts} == before
    asked = len(fake.requests)
    again = Runner(Pipeline.from_dict(d, PIPELINES, "pipelines/self_instruct.yaml", input_file=seeds), out,
                   resume=True, generators={p.model: fake}, progress=False).run()
    assert again.manifest["status"] == "finished" and len(fake.requests) == asked  # every stage reused
    assert sr.rows(out) and again.num_rows == first.num_rows


def test_classification_only_takes_the_paper_files_classification_seeds(tmp_path):
    seeds = _write_seeds(tmp_path)
    script = sr.SelfInstructScript()
    fake = FakeGenerator(rules=[("Write a list of new classification tasks", script.bootstrap)],
                         default=Reply("unexpected prompt", "stop"))
    d = sr.shipped("self_instruct")
    boot = {**sr.stage_cfg(d, "self_instruct_bootstrap"), "classification_only": True, "num_instructions": 2,
            "prompts_per_step": 1, "max_steps": 3}
    p = Pipeline.from_dict({**d, "stages": [sr.stage_cfg(d, "load"), boot]}, PIPELINES, input_file=seeds)
    Runner(p, tmp_path / "run", generators={p.model: fake}, progress=False).run()
    clf = {s["instruction"] for s in PAPER_SEEDS if s["is_classification"]}
    assert fake.requests
    for req in fake.requests:
        demos = set(re.findall(r"^\d+\. (.+)$", request_text(req), re.M))
        assert clf <= demos and demos <= clf | set(script.is_clf)
    assert len(sr.rows(tmp_path / "run")) == 2


def test_alpaca_reads_the_paper_files_instances(tmp_path):
    seeds = _write_seeds(tmp_path)
    d, fake = sr.alpaca()
    p = Pipeline.from_dict(d, PIPELINES, "pipelines/alpaca.yaml", input_file=seeds)
    Runner(p, tmp_path / "run", generators={p.model: fake}, progress=False).run()
    firsts = [r.prompt for r in fake.requests if r.prompt.endswith("4. Instruction:")]
    assert firsts
    blocks = {(s["instruction"], s["instances"][0]["input"] or "<noinput>", s["instances"][0]["output"])
              for s in PAPER_SEEDS}
    for prompt in firsts:
        shown = set(re.findall(r"\d\. Instruction: (.*)\n\d\. Input:\n(.*)\n\d\. Output:\n(.*)\n", prompt))
        assert len(shown) == 3 and shown <= blocks


# -- the command line: synthfb run / validate --input FILE -------------------------------------------------------

def test_cli_input_replaces_the_load_path(tmp_path, monkeypatch, capsys):
    import synthfb.engine
    from synthfb.cli import main

    seeds = _write_seeds(tmp_path)
    seen = []

    def fake_run(pipeline, out, **kw):  # no model: the pipeline as `synthfb run` built it
        seen.append(pipeline)
        return SimpleNamespace(out_dir=out, dataset_dir=out / "dataset", num_rows=0)

    monkeypatch.setattr(synthfb.engine, "run_pipeline", fake_run)
    monkeypatch.chdir(tmp_path)  # a relative --input is taken from the working directory
    assert main(["run", str(PIPELINES / "self_instruct.yaml"), "--input", "seed_tasks.jsonl", "--quiet"]) == 0
    [p] = seen
    assert Path(p.stages[0].config.path) == seeds.resolve() and p.raw["stages"][0]["path"] == "seed_tasks.jsonl"
    assert [s.kind for s in p.stages[1:]] == ["self_instruct_bootstrap", "self_instruct_classify",
                                             "self_instruct_instances"]
    capsys.readouterr()

    assert main(["validate", "self_instruct", "--input", "seed_tasks.jsonl"]) == 0
    assert "ok (4 stages" in capsys.readouterr().out
    assert main(["run", "self_instruct", "--input", "missing.jsonl"]) == 2
    assert "--input 'missing.jsonl': no such file" in capsys.readouterr().err
    (tmp_path / "no_instruction.jsonl").write_text(json.dumps({"id": "a", "task": "x"}) + "\n")
    assert main(["validate", "self_instruct", "--input", "no_instruction.jsonl"]) == 2
    assert "instruction" in capsys.readouterr().err
    assert main(["validate", "rlaif_tiny", "--input", "seed_tasks.jsonl"]) == 2
    assert "--input applies to pipeline files" in capsys.readouterr().err


# -- the prompt fits the shipped engine (SmolLM2's tokenizer) ----------------------------------------------------

@pytest.mark.smollm2
def test_classify_prompt_fits_the_shipped_max_model_len(tmp_path, smol_model):
    """With the longest instruction the bootstrap keeps (150 words) the rendered prompt, in either mode,
    plus the classifier's 3 new tokens fits the shipped pipeline's max_model_len."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smol_model))
    d = sr.shipped("self_instruct")
    limit = d["backend_options"]["max_model_len"]
    longest = " ".join(["Summarize"] + ["counterintuitively"] * 149)
    for chat in (False, True):
        fake = FakeGenerator(rules=[("Is it classification?", " No")])
        _classify_run(tmp_path / str(chat), fake, longest, chat=chat, scoring="text")
        [req] = fake.requests
        text = tok.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=False) if chat else req.prompt
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        assert 700 < n and n + 3 <= limit, (chat, n, limit)  # the 31 demos are there, and the answer fits
