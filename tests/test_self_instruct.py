"""Self-Instruct / Alpaca: parsers and filters on hand-made (and hostile)
model outputs, the seed file, and the pipelines on the tiny model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from rouge_score import rouge_scorer

from synthfb.engine import Pipeline, run_pipeline
from synthfb.stages.self_instruct_filters import (
    ALPACA_EXTRA_BLACKLIST,
    SELF_INSTRUCT_BLACKLIST,
    NoveltyPool,
    clean_instruction,
    demo_instruction,
    filter_instances,
    instance_drop_reason,
    instruction_drop_reason,
    parse_alpaca_blocks,
    parse_input_first,
    parse_instruction_list,
    parse_output_first,
    parse_yes_no,
)

REPO = Path(__file__).resolve().parent.parent
PIPELINES = REPO / "pipelines"


# -- instruction list parsing ------------------------------------------------------

def test_parse_completion_mode_first_item_is_unnumbered():
    text = " Tell a joke about fruit.\n10. Write a song about the color blue.\n11 . Name three rivers in Asia."
    assert parse_instruction_list(text, first_unnumbered=True) == [
        "Tell a joke about fruit.", "Write a song about the color blue.", "Name three rivers in Asia."]


def test_parse_chat_mode_skips_preamble_and_accepts_parens():
    text = "Here are some new tasks:\n9. Plan a picnic for six people.\n10) Describe a rainy morning in a city."
    assert parse_instruction_list(text, first_unnumbered=False) == [
        "Plan a picnic for six people.", "Describe a rainy morning in a city."]


@pytest.mark.parametrize("text", ["", "   \n ", None, 42, "\n\n\n"])
def test_parse_garbage_gives_no_items(text):
    assert parse_instruction_list(text, first_unnumbered=True) == []
    assert parse_instruction_list(text, first_unnumbered=False) == []


def test_parse_numbers_inside_a_line_do_not_split():
    # "3.5" and "in 2. steps" are not at a line start: one item
    text = " Convert 3.5 kg to pounds in 2. steps."
    assert parse_instruction_list(text, True) == ["Convert 3.5 kg to pounds in 2. steps."]


def test_parse_multiline_item_is_kept_whole_then_collapsed():
    items = parse_instruction_list(" Summarize the text.\nText: a b c\n10. Next task here now.", True)
    assert items == ["Summarize the text.\nText: a b c", "Next task here now."]
    assert clean_instruction(items[0]) == "Summarize the text. text: a b c"


def test_capitalize_faithful_and_not():
    assert clean_instruction("  write a  Python program\n") == "Write a python program"
    assert clean_instruction("write a  Python program", faithful_capitalize=False) == "Write a Python program"


def test_demo_instruction_strips_colon_and_whitespace():
    assert demo_instruction("Classify the animal:\n") == "Classify the animal"
    assert demo_instruction("  a\n\tb  ") == "a b"


# -- instruction filters (reference order) ---------------------------------------------

@pytest.mark.parametrize("inst,reason", [
    ("Write a poem", "too_short"),                      # 3 words: <= 3 dropped
    ("Write a short poem", None),                       # 4 words kept
    ("Draw a map", "too_short"),                        # length is checked before keywords
    ("Draw a picture of a cat", "blacklisted_keyword"),
    ("Describe the images in this article", "blacklisted_keyword"),
    ("Explain the mapping between keys and values", None),   # whole words only
    ("Go to the shop and buy milk", "blacklisted_keyword"),  # multi-word entry
    ("Plot the data as a chart", "blacklisted_keyword"),
    ("List steps to PLOT a story arc", "blacklisted_keyword"),  # case-insensitive
    ("Write a program that sorts numbers", "write_a_program"),
    ("Write a programme that sorts numbers", "write_a_program"),  # a prefix check, as in the reference
    ("Write a Python program that sorts numbers", None),
    ("\"Quote\" this famous sentence properly", "starts_with_punctuation"),
    ("#1 tip for better sleep please", "starts_with_punctuation"),
    ("Écrivez une histoire courte maintenant", "non_ascii_start"),
    ("写 一 首 关于 秋天 的 诗", "non_ascii_start"),
    ("Summarize the article below for a child", None),
])
def test_instruction_filters(inst, reason):
    assert instruction_drop_reason(inst) == reason


def test_word_bounds_exact():
    assert instruction_drop_reason("Write " + "word " * 149) is None  # 150 words
    assert instruction_drop_reason("Write " + "word " * 150) == "too_long"  # 151 words
    assert instruction_drop_reason("") == "too_short"


def test_alpaca_blacklist_extends_self_instruct():
    inst = "Compose music for a short film scene"
    assert instruction_drop_reason(inst, SELF_INSTRUCT_BLACKLIST) is None
    assert instruction_drop_reason(inst, SELF_INSTRUCT_BLACKLIST + ALPACA_EXTRA_BLACKLIST) == "blacklisted_keyword"


def test_novelty_pool_matches_rouge_score():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    seeds = ["Write a short poem about the sea.", "Give three tips for staying healthy."]
    pool = NoveltyPool(seeds)
    assert pool.drop_reason("Write a short poem about the sea!", 0.7) == "rouge_l_similar"
    cand = "Write a limerick about a cat."
    assert pool.drop_reason(cand, 0.7) is None
    best = max(seeds, key=lambda s: scorer.score(s, cand)["rougeL"].fmeasure)
    assert pool.add(cand) == (scorer.score(best, cand)["rougeL"].fmeasure, best)
    # an accepted candidate joins the pool; seeds are not mutated
    assert pool.drop_reason("Write a limerick about a cat!", 0.7) == "rouge_l_similar"
    assert len(seeds) == 2 and pool.texts[-1] == cand
    assert NoveltyPool([]).add("anything at all here") == (0.0, "")


# -- classification answers --------------------------------------------------------------

@pytest.mark.parametrize("text,label", [
    ("Yes", True), (" yes", True), ("YES.", True), ("**Yes**", True), ("No", False), ("no, it is not", False),
    ("Maybe", None), ("", None), ("Yesterday", None), ("123", None), (None, None), ("Nope", None),
])
def test_parse_yes_no(text, label):
    assert parse_yes_no(text) is label


# -- instances -----------------------------------------------------------------------------

def test_input_first_parsing():
    text = ("Example 1\nSentence: The cat sat.\nOutput: The cat was seated.\n"
            "Example 2\nSentence: Bob ate.\nOutput 2: Bob had eaten.\nExample 3\nno output marker here")
    assert parse_input_first(text, truncated=False) == [
        ("Sentence: The cat sat.", "The cat was seated."), ("Sentence: Bob ate.", "Bob had eaten.")]
    # truncated: the last parsed instance is dropped
    assert parse_input_first(text, truncated=True) == [("Sentence: The cat sat.", "The cat was seated.")]


def test_input_first_no_input_task():
    assert parse_input_first(" Output: 1. Sleep. 2. Eat well.", False) == [("", "1. Sleep. 2. Eat well.")]
    assert parse_input_first("Example 1\nInput: None\nOutput: Hello", False) == [("", "Hello")]
    assert parse_input_first("just words, no markers", False) == []
    assert parse_input_first(None, False) == []


def test_output_first_parsing():
    text = ("Class label: Positive\nReview: Great food.\nClass label: Negative\nReview: Cold soup.\n"
            "Class label: Neutral")
    assert parse_output_first(text, False) == [
        ("Review: Great food.", "Positive"), ("Review: Cold soup.", "Negative"), ("", "Neutral")]
    assert parse_output_first(text, True) == [("Review: Great food.", "Positive"), ("Review: Cold soup.", "Negative")]
    assert parse_output_first("no labels at all", False) == []


@pytest.mark.parametrize("inp,out,reason", [
    ("x", "", "empty_output"), ("x", "  ", "empty_output"), ("same", "same", "input_equals_output"),
    ("List:", "a", "ends_with_colon"), ("a", "Answer:", "ends_with_colon"), ("", "fine", None), ("a", "b", None),
])
def test_instance_filters(inp, out, reason):
    assert instance_drop_reason(inp, out) == reason


def test_conflicting_outputs_drop_whole_task():
    counts: dict[str, int] = {}
    insts = [("2+2", "4"), ("2+2", "5"), ("3+3", "6")]
    assert filter_instances(insts, 5, random.Random(0), counts) == []
    assert counts == {"conflicting_outputs": 3}


def test_dedupe_and_max_instances_sample_is_deterministic():
    insts = [(f"in {i}", f"out {i}") for i in range(8)] + [("in 0", "out 0"), ("", "x"), ("", "y")]
    counts: dict[str, int] = {}
    a = filter_instances(insts, 5, random.Random(7), counts)
    b = filter_instances(insts, 5, random.Random(7), {})
    assert a == b and len(a) == 5 and len(set(a)) == 5
    assert counts == {"duplicate_instance": 1, "over_max_instances": 5}
    # empty inputs with different outputs are not a conflict
    assert filter_instances([("", "x"), ("", "y")], 5, random.Random(0), {}) == [("", "x"), ("", "y")]


# -- Alpaca blocks ---------------------------------------------------------------------------

ALPACA_RESPONSE = (
    " Name a famous bridge.\n4. Input:\n<noinput>\n4. Output:\nThe Golden Gate Bridge.\n###\n"
    "5. Instruction: Convert the time to 24-hour format.\n5. Input:\n3:15 pm\n5. Output:\n15:15\n###\n"
    "6. Instruction: broken block without fields\n###\n"
    "7. Instruction: Add the numbers.\n7. Input:\n2 and 3\n7. Output:\n5"
)


def test_alpaca_parse_completion():
    items, bad = parse_alpaca_blocks(ALPACA_RESPONSE, 4, truncated=False)
    assert bad == 1
    assert items == [
        {"instruction": "Name a famous bridge.", "input": "", "output": "The Golden Gate Bridge."},
        {"instruction": "Convert the time to 24-hour format.", "input": "3:15 pm", "output": "15:15"},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    ]
    items, bad = parse_alpaca_blocks(ALPACA_RESPONSE, 4, truncated=True)
    assert [i["instruction"] for i in items] == ["Name a famous bridge.", "Convert the time to 24-hour format."]


def test_alpaca_parse_chat_style_and_garbage():
    text = "4. Instruction: Say hi.\n4. Input:\n<noinput>\n4. Output:\nHi!"
    assert parse_alpaca_blocks(text, 4, False) == ([{"instruction": "Say hi.", "input": "", "output": "Hi!"}], 0)
    assert parse_alpaca_blocks("", 4, False) == ([], 0)
    assert parse_alpaca_blocks(None, 4, False) == ([], 0)
    # fields out of order are malformed, not mis-assigned
    items, bad = parse_alpaca_blocks("4. Output: a\n4. Input: b\n4. Instruction: c", 4, False)
    assert items == [] and bad == 1


# -- seed file --------------------------------------------------------------------------------

def test_seed_file_shape():
    rows = [json.loads(x) for x in (PIPELINES / "data" / "seed_tasks.jsonl").read_text().splitlines() if x.strip()]
    assert len(rows) >= 100
    assert len({r["id"] for r in rows}) == len(rows) and len({r["instruction"] for r in rows}) == len(rows)
    for r in rows:
        assert set(r) == {"id", "name", "instruction", "instances", "is_classification"}
        assert isinstance(r["is_classification"], bool)
        assert len(r["instances"]) == 1 and r["instances"][0]["output"].strip()
    assert 15 <= sum(r["is_classification"] for r in rows) <= 40
    # the seeds are varied: no two seed instructions are near-duplicates
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    insts = [r["instruction"] for r in rows]
    worst = max(scorer.score(a, b)["rougeL"].fmeasure for i, a in enumerate(insts) for b in insts[i + 1:])
    assert worst <= 0.7


# -- pipelines on the tiny model -------------------------------------------------------------

def _pipeline(name: str, model: Path, tweak) -> Pipeline:
    d = yaml.safe_load((PIPELINES / f"{name}.yaml").read_text())
    d["model"] = str(model)
    tweak(d)
    return Pipeline.from_dict(d, PIPELINES, f"{name}.yaml (test)")


def _stage(d, kind):
    return next(s for s in d["stages"] if s["stage"] == kind)


def _drop_total(counts: dict[str, int]) -> int:
    return sum(v for k, v in counts.items() if k.startswith("dropped_"))


@pytest.mark.timeout(600)
def test_self_instruct_pipeline_tiny(tmp_path, tiny_model, vllm_tiny):
    def tweak(d):
        b = _stage(d, "self_instruct_bootstrap")
        b.update(num_instructions=6, prompts_per_step=12, max_steps=2, sampling={"max_tokens": 48, "stop": ["\n\n"]},
                 discard_truncated=False)
        _stage(d, "self_instruct_instances")["sampling"] = {"max_tokens": 48}
        _stage(d, "self_instruct_classify")["unparseable_as"] = True  # exercise output-first too

    p = _pipeline("self_instruct", tiny_model, tweak)
    res = run_pipeline(p, tmp_path / "out", generators={p.model: vllm_tiny}, progress=False)
    st = {s["kind"]: s for s in res.manifest["stages"]}
    boot = st["self_instruct_bootstrap"]
    c = boot["counts"]
    # every parsed candidate is either accepted or dropped for a counted reason
    assert c["prompts"] >= 12
    assert c.get("candidates", 0) == c.get("accepted", 0) + _drop_total(c)
    assert boot["rows_out"] == c.get("accepted", 0) <= 6
    if boot["rows_out"] < 6:
        assert c["stopped_at_max_steps_short_of_target"] == 6 - boot["rows_out"]
    # the machine instructions on disk: schema, demos, novelty (checked with rouge_score itself)
    import pyarrow.parquet as pq

    sdir = tmp_path / "out" / "stages" / "01-self_instruct_bootstrap"
    rows = [r for f in sorted(sdir.glob("chunk-*.parquet")) for r in pq.read_table(f).to_pylist()]
    seeds = {json.loads(x)["id"]: json.loads(x)["instruction"]
             for x in (PIPELINES / "data" / "seed_tasks.jsonl").read_text().splitlines()}
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    accepted: list[str] = []
    ids = set()
    for r in rows:
        assert r["source"] == "machine" and r["instruction"] and r["row_id"] not in ids
        ids.add(r["row_id"])
        assert len(r["demo_ids"]) == 8
        machine_demos = [i for i in r["demo_ids"] if i not in seeds]
        assert len(machine_demos) <= 2 and all(i.startswith("si-") for i in machine_demos)
        assert instruction_drop_reason(r["instruction"]) is None
        pool = list(seeds.values()) + accepted
        best = max(scorer.score(p_, r["instruction"])["rougeL"].fmeasure for p_ in pool)
        assert best <= 0.7 and best == pytest.approx(r["rouge_l_max"])
        accepted.append(r["instruction"])
        prov = r["provenance"][-1]
        assert prov["stage"] == "self_instruct_bootstrap" and len(prov["template_sha256"]) == 64
    # classification + instances: every task is labelled, instance rows are schema-valid
    clf = st["self_instruct_classify"]
    assert clf["rows_out"] == boot["rows_out"]
    inst = st["self_instruct_instances"]
    ic = inst["counts"]
    assert ic.get("instances_parsed", 0) == ic.get("instances_kept", 0) + _drop_total(ic)
    assert inst["rows_out"] == ic.get("instances_kept", 0) == res.num_rows
    if res.num_rows:
        import datasets

        ds = datasets.load_from_disk(str(res.dataset_dir))
        for r in ds:
            assert r["generation_mode"] in ("input_first", "output_first")
            assert r["output"].strip() and isinstance(r["input"], str)
            assert [p_["stage"] for p_ in r["provenance"]] == [
                "self_instruct_bootstrap", "self_instruct_classify", "self_instruct_instances"]


@pytest.mark.timeout(600)
def test_self_instruct_resume_continues_identically(tmp_path, tiny_model, hf_tiny):
    """Demos are drawn from (seed, step) and the accepted pool on disk: a run
    killed after step 0 and resumed redoes step 1 exactly as the
    uninterrupted run did (the transformers backend reseeds every call, so
    the model's side is fixed too)."""
    import shutil

    import pyarrow.parquet as pq

    def tweak(d):
        d["stages"] = d["stages"][:2]
        b = _stage(d, "self_instruct_bootstrap")
        b.update(num_instructions=1000, prompts_per_step=6, max_steps=2,
                 sampling={"temperature": 1.0, "max_tokens": 24, "stop": ["\n\n"]}, discard_truncated=False)

    p = _pipeline("self_instruct", tiny_model, tweak)
    run_pipeline(p, tmp_path / "full", generators={p.model: hf_tiny}, progress=False)
    # the state a kill -9 right after step 0 leaves: step 0 on disk, the stage unfinished, nothing later
    shutil.copytree(tmp_path / "full", tmp_path / "killed")
    sdir = tmp_path / "killed" / "stages" / "01-self_instruct_bootstrap"
    for f in sdir.glob("chunk-*"):
        if not f.name.startswith("chunk-00000."):
            f.unlink()
    meta = json.loads((sdir / "stage.json").read_text())
    (sdir / "stage.json").write_text(json.dumps({"fingerprint": meta["fingerprint"], "kind": meta["kind"],
                                                 "finished": False}))
    shutil.rmtree(tmp_path / "killed" / "dataset")
    res = run_pipeline(p, tmp_path / "killed", generators={p.model: hf_tiny}, progress=False, resume=True)
    boot = res.manifest["stages"][1]
    assert not boot["reused"] and boot["counts"]["prompts"] == 12  # step 1 really ran again (6 prompts x 2 steps)

    def step_rows(run, step):
        f = tmp_path / run / "stages" / "01-self_instruct_bootstrap" / f"chunk-{step:05d}.parquet"
        return [{k: r[k] for k in ("row_id", "instruction", "demo_ids", "step")} for r in pq.read_table(f).to_pylist()]

    assert step_rows("killed", 0) == step_rows("full", 0)
    assert step_rows("killed", 1) == step_rows("full", 1)
    assert step_rows("killed", 2) == step_rows("full", 2) == []  # the step that stops at max_steps
    # step 1's demos may use machine instructions accepted at step 0
    step0_ids = {r["row_id"] for r in step_rows("full", 0)}
    assert step0_ids and step_rows("full", 1), "the tiny model should get some instructions through at each step"
    for r in step_rows("full", 1):
        assert all(i.startswith("seed_task_") or i in step0_ids for i in r["demo_ids"])


@pytest.mark.timeout(600)
def test_alpaca_pipeline_tiny(tmp_path, tiny_model, vllm_tiny):
    def tweak(d):
        _stage(d, "alpaca_bootstrap").update(num_instructions=4, prompts_per_step=6, max_steps=1,
                                              sampling={"max_tokens": 64})

    p = _pipeline("alpaca", tiny_model, tweak)
    res = run_pipeline(p, tmp_path / "out", generators={p.model: vllm_tiny}, progress=False)
    st = res.manifest["stages"][1]
    c = st["counts"]
    assert c["prompts"] == 6
    assert c.get("candidates", 0) == c.get("accepted", 0) + sum(
        v for k, v in c.items() if k.startswith("dropped_") and k != "dropped_malformed_block")
    assert st["rows_out"] == res.num_rows == c.get("accepted", 0)
    if res.num_rows < 4:
        assert c["stopped_at_max_steps_short_of_target"] == 4 - res.num_rows


def test_bad_seed_rows_and_configs_are_named(tmp_path):
    d = yaml.safe_load((PIPELINES / "self_instruct.yaml").read_text())
    _stage(d, "self_instruct_bootstrap")["num_demos"] = 0
    with pytest.raises(ValueError, match="num_demos"):
        Pipeline.from_dict(d, PIPELINES, "x.yaml")
    d = yaml.safe_load((PIPELINES / "self_instruct.yaml").read_text())
    _stage(d, "self_instruct_bootstrap")["num_instrucions"] = 3
    with pytest.raises(ValueError, match="num_instrucions"):
        Pipeline.from_dict(d, PIPELINES, "x.yaml")


def test_system_message_is_kept_in_completion_mode():
    """One request builder for all text stages: in completion mode a system
    message becomes a paragraph before the prompt instead of being dropped."""
    from synthfb.llm.types import SamplingParams
    from synthfb.llm.prompts import text_request

    sp = SamplingParams(max_tokens=4)
    assert text_request("List tasks.", sp, chat=False, system="Be brief.").prompt == "Be brief.\n\nList tasks."
    assert text_request("List tasks.", sp, chat=False).prompt == "List tasks."
    chat = text_request("List tasks.", sp, chat=True, system="Be brief.")
    assert chat.prompt is None and chat.messages == [{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": "List tasks."}]
    assert text_request("x", sp, chat=True).messages == [{"role": "user", "content": "x"}]


# -- classify / instances on a scripted fake model -------------------------------------------

def _fake_run(tmp_path, tasks, stages, fake):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from synthfb.engine import Runner

    data = tmp_path / "tasks.jsonl"
    data.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    p = Pipeline.from_dict({"name": "si", "seed": 0, "stages": [
        {"stage": "load", "path": str(data), "id_column": "id"}, *stages]}, tmp_path)
    return Runner(p, tmp_path / "run", generators={p.model: fake}, progress=False).run()


def test_classify_passes_labelled_rows_and_labels_failures(tmp_path):
    from fakes import FakeGenerator

    fake = FakeGenerator(rules=[("Task: Sort these numbers", " Yes"), ("Task: Tell a story", " Maybe")],
                         failures=[("Task: Name a river", "HTTP 500: down")])
    tasks = [{"id": "a", "instruction": "Sort these numbers please", "is_classification": None},
             {"id": "b", "instruction": "Tell a story about a ship"},
             {"id": "c", "instruction": "Name a river in Asia"},
             {"id": "d", "instruction": "Already labelled task here", "is_classification": True}]
    res = _fake_run(tmp_path, tasks, [{"stage": "self_instruct_classify", "unparseable_as": False}], fake)
    st = res.manifest["stages"][-1]
    import datasets

    rows = {r["row_id"]: r for r in datasets.load_from_disk(str(res.dataset_dir)).to_list()}
    assert {k: r["is_classification"] for k, r in rows.items()} == {"a": True, "b": False, "c": False, "d": True}
    assert len(fake.requests) == 3  # the labelled row was not asked
    assert not rows["d"]["provenance"] and rows["a"]["provenance"][-1]["stage"] == "self_instruct_classify"
    c = st["counts"]
    assert c["already_labelled"] == 1 and c["failed_requests"] == 1 and c["unparseable_label"] == 2
    assert c["classification"] == 1 and c["not_classification"] == 2
    assert [f["row_id"] for f in st["failures"]] == ["c"]


def test_instances_rows_ids_and_template_provenance(tmp_path):
    from fakes import FakeGenerator

    fake = FakeGenerator(rules=[
        ("list its possible class labels", "\nClass label: Positive\nText: I loved it.\n"),
        ("For each task, write one or more examples.", "\nExample 1\nInput: a\nOutput: b\n"
                                                       "Example 2\nInput: a\nOutput: c\n"),  # conflicting
    ])
    tasks = [{"id": "t1", "instruction": "Classify the sentiment of a review", "is_classification": True},
             {"id": "t2", "instruction": "Rewrite the sentence more politely", "is_classification": False}]
    res = _fake_run(tmp_path, tasks, [{"stage": "self_instruct_instances", "sampling": {"max_tokens": 64}}], fake)
    import datasets

    [row] = datasets.load_from_disk(str(res.dataset_dir)).to_list()
    assert row["row_id"] == "t1/0" and row["generation_mode"] == "output_first"
    assert (row["input"], row["output"]) == ("Text: I loved it.", "Positive")
    from synthfb.llm.prompts import PromptTemplate

    want = PromptTemplate.load("self_instruct_output_first.jinja", tmp_path).sha256
    assert row["provenance"][-1]["template_sha256"] == want
    c = res.manifest["stages"][-1]["counts"]
    assert c["dropped_conflicting_outputs"] == 2 and c["tasks_without_instances"] == 1
    assert c["instances_parsed"] == c["instances_kept"] + _drop_total(c)
    assert {r.params.max_tokens for r in fake.requests} == {64}


def test_config_errors_name_the_field():
    for kind in ("self_instruct_bootstrap", "self_instruct_classify", "self_instruct_instances"):
        d = yaml.safe_load((PIPELINES / "self_instruct.yaml").read_text())
        _stage(d, kind)["sampling"] = {"temperature": "hot"}
        with pytest.raises(ValueError, match=r"sampling\.temperature"):
            Pipeline.from_dict(d, PIPELINES, "x.yaml")
    d = yaml.safe_load((PIPELINES / "alpaca.yaml").read_text())
    _stage(d, "alpaca_bootstrap")["max_machine_demos"] = 1  # not an Alpaca setting
    with pytest.raises(ValueError, match="max_machine_demos"):
        Pipeline.from_dict(d, PIPELINES, "x.yaml")


def test_instances_cut_before_a_whole_instance_is_a_truncation_not_a_parse_failure(tmp_path):
    from fakes import FakeGenerator, Reply

    from fakes import last_user

    def task(name):
        return lambda r: last_user(r).rstrip().endswith(name)

    fake = FakeGenerator(rules=[
        (task("more politely"), Reply("\nExample 1\nInput: a rude sentence that goes on", "length")),
        (task("summary of the text"), "\nI would rather not.\n"),
    ], default="\nExample 1\nInput: a\nOutput: b\n")
    tasks = [{"id": "t1", "instruction": "Rewrite the sentence more politely", "is_classification": False},
             {"id": "t2", "instruction": "Write a summary of the text", "is_classification": False},
             {"id": "t3", "instruction": "Translate the word into French", "is_classification": False}]
    res = _fake_run(tmp_path, tasks, [{"stage": "self_instruct_instances"}], fake)
    st = res.manifest["stages"][-1]
    c = st["counts"]
    assert c["truncated_outputs"] == 1 and c["completions_without_instances"] == 2
    # t1 was cut before its first whole instance: a truncation; t2 finished without one: a parse failure
    assert st["parse"] == {"outputs": 2, "parsed": 1, "rate": 0.5}
