"""Scripted runs of every shipped pipeline on the fake model (``tests/fakes.py``).

For each pipeline file in ``pipelines/`` (loop files aside) one function
``NAME(failures=()) -> (pipeline dict, FakeGenerator)``: the file as it
ships with only its input made small (input size, chunk size, the iterative
stages' targets), and a fake that answers every prompt of that pipeline the
way the stage's parser expects, so the run ends with rows. ``failures`` are
the fake's injected request failures (``FakeGenerator(failures=...)``); by
default none. ``SCRIPTED_RUNS`` maps each pipeline name to its function.

Users: ``tests/test_fast_stages.py`` (each pipeline end to end, with
failures and resume), ``tests/test_sft_contract.py`` (its helpers), and
``tests/test_every_pipeline_trains.py`` (every pipeline's output trains in
TRL and in ``synthfb train``). A new pipeline file needs a function here.

Scoring. ``judge_pairs`` and ``self_curate`` pick ``scoring: auto`` from the
shipped files: log-prob scoring on local engines (vllm, transformers), text
parsing elsewhere, and the fake's backend is ``"fake"``, so they sample and
parse judgements / ratings here. The fakes also script ``logprobs=`` with the
same verdicts (the label a scripted judgement gives gets nearly all the
mass), so the same rows survive when a test sets ``scoring: logprobs``.
"""

from __future__ import annotations

import copy
import itertools
import json
import random
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import datasets
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ has no __init__.py
from fakes import FakeGenerator, Reply, last_user, render_messages, request_text

from synthfb.engine import Pipeline, Runner

REPO = Path(__file__).resolve().parent.parent
PIPELINES = REPO / "pipelines"

Failures = Iterable[tuple[Any, Any]]


# -- helpers -----------------------------------------------------------------------------------------------------

def shipped(name: str) -> dict[str, Any]:
    """A shipped pipeline file as a dict (to shrink its input before running)."""
    return yaml.safe_load((PIPELINES / f"{name}.yaml").read_text())


def shipped_loop(name: str, **edits: Any):
    """A shipped loop file loaded with top-level keys replaced (``None`` removes a key)."""
    from synthfb.loop import load_loop

    data = shipped(name)
    for k, v in edits.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    return load_loop(f"{name}.yaml", data=data, base_dir=PIPELINES)


def stage_cfg(d: dict[str, Any], kind: str) -> dict[str, Any]:
    [cfg] = [s for s in d["stages"] if s["stage"] == kind]
    return cfg


def run(d: dict[str, Any], out: Path, fake: FakeGenerator, **kw):
    """Run pipeline dict ``d`` (paths relative to pipelines/) into ``out`` with ``fake`` as every model."""
    p = Pipeline.from_dict(copy.deepcopy(d), PIPELINES, source=f"pipelines/{d['name']}.yaml")
    stage_models = {s["model"] for s in d["stages"] if s.get("model")}  # e.g. humpback_iterate's M_yx
    return Runner(p, out, generators={m: fake for m in {p.model, *stage_models}}, progress=False, **kw).run()


def rows(out: Path) -> list[dict[str, Any]]:
    return datasets.load_from_disk(str(out / "dataset")).to_list()


def _text(context: Any) -> str:
    """A score request's context (raw prompt or messages) as text."""
    return context if isinstance(context, str) else render_messages(context)


def label_logprobs(target: Callable[[str], int]) -> Callable[[Any, str], float]:
    """``logprobs=`` for G-Eval-style label scoring: the continuation ``" N"`` /
    ``"Score: N"`` whose N is ``target(context text)`` gets nearly all the mass."""

    def lp(context: Any, continuation: str) -> float:
        label = continuation.split()[-1]
        return -0.01 if label == str(target(_text(context))) else -9.0

    return lp


# -- quickstart: load -> generate ---------------------------------------------------------------------------------

def quickstart(failures: Failures = ()) -> tuple[dict[str, Any], FakeGenerator]:
    d = shipped("quickstart")
    d["chunk_size"] = 3  # 8 seeds: chunks of 3, 3, 2
    fake = FakeGenerator(rules=[("friendly email", " ".join(["word"] * 300))],  # longer than max_tokens 200
                         default=lambda req, k: f"Answer: {last_user(req)}", failures=failures)
    return d, fake


# -- self_instruct: bootstrap -> classify -> instances ------------------------------------------------------------

WORDS = [
    "amber", "basil", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "iris", "juniper", "kelp", "lagoon",
    "meadow", "nectar", "orchid", "pebble", "quartz", "raven", "saffron", "tundra", "umber", "violet", "willow",
    "yarrow", "zephyr", "acorn", "bramble", "canyon", "dune", "estuary", "fern", "glacier", "heather", "island",
    "jasmine", "kestrel", "lichen", "marsh", "nettle", "oasis", "prairie", "quill", "reef", "sorrel", "thistle",
    "upland", "vale", "wren", "yew", "alder", "birch", "cobalt", "dahlia", "elm", "flint", "grove", "hazel",
    "indigo", "jade", "knoll", "loam", "maple", "nutmeg", "opal", "pine", "quince", "rowan", "slate", "teal",
    "umbra", "verbena", "walnut",
]


def novel_instruction(i: int) -> str:
    """A task instruction no seed and no other i resembles (random words; ROUGE-L stays low)."""
    rng = random.Random(i)
    return "Describe " + " ".join(rng.sample(WORDS, 7))


class SelfInstructScript:
    """Answers the three Self-Instruct prompts; remembers which new task is a classification one."""

    def __init__(self):
        self.count = itertools.count()
        self.is_clf: dict[str, bool] = {}

    def bootstrap(self, req, k):
        a, b = (novel_instruction(next(self.count)) for _ in range(2))
        for t in (a, b):
            self.is_clf[t] = len(self.is_clf) % 2 == 1
        # the prompt ends with "9.": the first item is unnumbered; the third is blacklisted ("picture")
        return f" {a}\n10. {b}\n11. Draw a picture of a happy dog in the park\n"

    @staticmethod
    def task(req) -> str:
        return re.findall(r"Task: (.*)", request_text(req))[-1].strip()

    def classify(self, req, k):
        return " Yes" if self.is_clf.get(self.task(req)) else " No"

    def classify_logprob(self, context, continuation) -> float:
        """``scoring: logprobs``: the answer :meth:`classify` gives gets nearly all the mass."""
        task = re.findall(r"Task: (.*)", _text(context))[-1].strip()
        said = "Yes" if self.is_clf.get(task) else "No"
        return -0.01 if continuation.split()[-1] == said else -6.0


def self_instruct(failures: Failures = (), script: SelfInstructScript | None = None
                  ) -> tuple[dict[str, Any], FakeGenerator]:
    """``script``: the SelfInstructScript the fake answers with (a new one by default)."""
    d = shipped("self_instruct")
    d["chunk_size"] = 4
    stage_cfg(d, "self_instruct_bootstrap").update(num_instructions=6, prompts_per_step=2, max_steps=6)
    script = script or SelfInstructScript()
    fake = FakeGenerator(rules=[
        ("Write a list of new and varied tasks:", script.bootstrap),
        ("Is it classification?", script.classify),
        ("list its possible class labels", ("\nClass label: Positive\nText: I loved it.\n"
                                            "Class label: Negative\nText: I did not like it at all.")),
        ("For each task, write one or more examples.", ("\nExample 1\nInput: two apples\nOutput: a pair of apples\n"
                                                        "Example 2\nInput: three pears\nOutput: a few pears")),
    ], default=Reply("unexpected prompt", "stop"), logprobs=script.classify_logprob, failures=failures)
    return d, fake


# -- alpaca: one iterative stage ---------------------------------------------------------------------------------

def alpaca(failures: Failures = ()) -> tuple[dict[str, Any], FakeGenerator]:
    d = shipped("alpaca")
    stage_cfg(d, "alpaca_bootstrap").update(num_instructions=5, prompts_per_step=2, max_steps=8)
    count = itertools.count()

    def reply(req, k):
        # `fill: response`: the prompt ends with "4. Instruction:", the reply has 2 tasks and a malformed block 6
        # (no Input/Output). `fill: fields` asks for the instruction (stop "\n"), then continues after
        # "4. Input:\n" and "4. Output:\n" (stop "###"): every other task gets an empty output (malformed)
        if req.prompt.endswith("4. Input:\n"):
            return "<noinput>\n4. Output:\nnot reached: the stop string cuts here"
        if req.prompt.endswith("4. Output:\n"):
            task = re.findall(r"4\. Instruction: Describe (\w+)", req.prompt)[-1]
            return "\n###\n5. Instruction:" if WORDS.index(task) % 2 else "A short answer.\n###\n5. Instruction:"
        a, b = (novel_instruction(100 + next(count)) for _ in range(2))
        return (f" {a}\n4. Input:\n<noinput>\n4. Output:\nA short answer.\n###\n"
                f"5. Instruction: {b}\n5. Input:\nsome input text\n5. Output:\nAnother answer.\n###\n"
                f"6. Instruction: Broken block without the other fields\n###")

    return d, FakeGenerator(reply, failures=failures)


# -- backtranslation: segments -> backtranslate -> self_curate ---------------------------------------------------

def _segment(req) -> str:
    return re.findall(r"Text: (.*?)\nRequest:", request_text(req), re.DOTALL)[-1]


def _answer(req) -> str:
    return _answer_in(request_text(req))


def _answer_in(text: str) -> str:
    """The rated answer: the end of the curation prompt (chat), or before "Rate the answer" (completion mode)."""
    return re.findall(r"Answer: (.*?)(?:\n\nRate the answer|\Z)", text, re.DOTALL)[-1].strip()


def _backward(req, k):
    words = _segment(req).split()[:4]
    # the pipeline's stop ["\n"] cuts the second line
    return f" How do I {' '.join(words).lower()}?\nThis line is after the stop string."


def _ratings(req, k):
    ans = _answer(req)
    if "Deeper is better" in ans:
        return ["Vague.\nScore: 2", "Score: 3", "Off-topic.\nScore: 2"][k]  # mean 2.33 < min_score 4
    if "balcony garden needs" in ans:
        return ["banana", "Good.\nScore: 5", "Score: 4"][k]  # one unparseable rating, mean 4.5
    return ["Clear and complete.\nScore: 5", "Score: 4", "Score: 5"][k]


def _rating_target(context: str) -> int:
    """The rating with (nearly) all the label mass under ``scoring: logprobs``."""
    return 2 if "Deeper is better" in _answer_in(context) else 5


def backtranslation(failures: Failures = ()) -> tuple[dict[str, Any], FakeGenerator]:
    d = shipped("backtranslation")
    d["chunk_size"] = 4
    fake = FakeGenerator(rules=[("Request:", _backward), ("Judge whether the answer is a good example", _ratings)],
                         logprobs=label_logprobs(_rating_target), failures=failures)
    return d, fake


# -- humpback_*: reversed seed pairs (no model), tagged seed pairs (no model), M_yx + M_t curation ----------------

def humpback_backward(failures: Failures = ()) -> tuple[dict[str, Any], FakeGenerator]:
    return shipped("humpback_backward"), FakeGenerator(default=Reply("no model is called", "stop"), failures=failures)


def humpback_seed(failures: Failures = ()) -> tuple[dict[str, Any], FakeGenerator]:
    return shipped("humpback_seed"), FakeGenerator(default=Reply("no model is called", "stop"), failures=failures)


def trained_backward(req, k) -> str:
    """M_yx's answer to the bare segment (the user turn): a request naming its first words."""
    return f"How do I {' '.join(last_user(req).split()[:4]).lower()}?"


def humpback_iterate(failures: Failures = ()) -> tuple[dict[str, Any], FakeGenerator]:
    """One fake as M_yx (the bare segment -> a request) and as the curator (backtranslation's ratings; one
    rating per row: "Deeper is better" rated 2, "balcony garden needs" unparseable, the rest 5)."""
    d = shipped("humpback_iterate")
    d["chunk_size"] = 4
    fake = FakeGenerator(rules=[("Judge whether the answer is a good example", _ratings)], default=trained_backward,
                         logprobs=label_logprobs(_rating_target), failures=failures)
    return d, fake


# -- realign: classify -> rewrite ------------------------------------------------------------------------------

def _query(req) -> str:
    return re.findall(r"Query: (.*)\nCategory:", req if isinstance(req, str) else request_text(req))[-1]


def _category(req, k):
    q = _query(req)
    if q.startswith(("How do I", "Give me a plan")):
        return " how_to_generation\nQuery: more text after the stop string"
    if "Python" in q:
        return " code_generation"
    if "poem" in q:
        return " poem_generation"
    if q.startswith("Hi!"):
        return " no idea"  # names no category: the default one
    return " open_qa"


def _category_logprob(context, continuation) -> float:
    """``scoring: logprobs``: the category :func:`_category` names gets nearly all the mass (the query it
    answers "no idea" to: the default category)."""
    text = _text(context)
    said = _category(text, 0).split("\n")[0].strip()
    said = said if re.fullmatch(r"[a-z_]+", said) else "default"
    return -0.01 if continuation.split()[-1] == said else -7.0 - 0.1 * len(continuation)


def _original(req) -> str:
    return re.findall(r"\[Response start\]\n(.*?)\n\[Response end\]", request_text(req), re.DOTALL)[-1]


def realign(failures: Failures = ()) -> tuple[dict[str, Any], FakeGenerator]:
    d = shipped("realign")
    d["chunk_size"] = 4
    fake = FakeGenerator(rules=[
        ("\nCategory:", _category),
        ("[Response start]",
         lambda req, k: [" Too short.", f" 1. {_original(req)}\n2. One more step, to be clear."][k]),
    ], logprobs=_category_logprob, failures=failures)
    return d, fake


# -- cai_sft: generate -> cai_revise ---------------------------------------------------------------------------

def _current(req) -> str:
    """The response a critique/revision request is about: in the separate style the one shown before
    "Critique request:"; in the transcript style the sample's last revision (or its first response)."""
    text = last_user(req)
    if req.prompt is None:  # separate style: one chat request per critique / revision
        return re.findall(r"Assistant: (.*?)\n\nCritique request:", text, re.DOTALL)[-1]
    own = text.split("=== Conversation ===")[-1]  # the sample's own transcript, after the few-shot examples
    return re.findall(r"\n\n(?:Assistant|Revision): (.*?)\n\nCritique request:", own, re.DOTALL)[-1]


def cai_sft(failures: Failures = ()) -> tuple[dict[str, Any], FakeGenerator]:
    """Both styles: transcript (the shipped one, raw prompts ending at "Critique:" / "Revision:") and
    separate (chat requests). Each critique runs on into the next label, which the stop strings cut."""
    d = shipped("cai_sft")
    d["chunk_size"] = 2
    stage_cfg(d, "load")["limit"] = 4
    fake = FakeGenerator(rules=[
        ("Reply with only the revised response", lambda req, k: f"Revised response: {_current(req)} [rev]"),
        ("Write a short critique", "The response could be more considerate."),
        (lambda req: (req.prompt or "").endswith("Critique:"),
         " The response could be more considerate.\n\nRevision request: (run on)"),
        (lambda req: (req.prompt or "").endswith("Revision:"),
         lambda req, k: f" {_current(req)} [rev]\n\nCritique request: (run on)"),
    ], default=lambda req, k: f"First answer to: {last_user(req)}", failures=failures)
    return d, fake


# -- cai_preferences: generate (n=2) -> cai_label (log-probs) ---------------------------------------------------

def _option(context: str, letter: str) -> str:
    return re.findall(rf"\({letter}\) \[\[\[(.*?)\]\]\]", context, re.DOTALL)[-1]


def kind_is_better(context, continuation) -> float:
    letter = continuation.strip()[1]
    return -0.2 if "kind" in _option(context, letter) else -1.7


def cai_preferences(failures: Failures = ()) -> tuple[dict[str, Any], FakeGenerator]:
    d = shipped("cai_preferences")
    d["chunk_size"] = 2
    stage_cfg(d, "load")["limit"] = 4
    fake = FakeGenerator(lambda req, k: ["A rude answer.", "A kind and careful answer."][k], logprobs=kind_is_better,
                         failures=failures)
    return d, fake


# -- judge_pairs: generate (n=4) -> judge_pairs ----------------------------------------------------------------

CANDIDATES = ["Short answer.", "A fuller answer.", "The most complete answer.", "Off-topic text."]
JUDGEMENTS = {"Short answer.": "Score: 2", "A fuller answer.": "Some reasoning.\nScore: 3",
              "The most complete answer.": "Very good.\nScore: 5",
              "Off-topic text.": ["Score: 1", "no score", "Score: 9"]}
JUDGE_TARGETS = {"Short answer.": 2, "A fuller answer.": 3, "The most complete answer.": 5, "Off-topic text.": 1}
"""The score each candidate gets under ``scoring: logprobs`` (the parsable judgements' mean, rounded)."""


def _judged_in(text: str) -> str:
    return re.findall(r"<response>(.*?)</response>", text, re.DOTALL)[-1]


def _judged(req) -> str:
    return _judged_in(last_user(req))


def judge_pairs(failures: Failures = ()) -> tuple[dict[str, Any], FakeGenerator]:
    d = shipped("judge_pairs")
    d["chunk_size"] = 2
    stage_cfg(d, "load")["limit"] = 4
    fake = FakeGenerator(rules=[("<response>", lambda req, k: JUDGEMENTS[_judged(req)])], default=CANDIDATES,
                         logprobs=label_logprobs(lambda ctx: JUDGE_TARGETS[_judged_in(ctx)]), failures=failures)
    return d, fake


# -- onpolicy_pairs: sample n=5 -> pairwise LLM judge over the full matrix ------------------------------------

ONPOLICY_QUALITY = [3, 1, 4, 5, 2]
"""The quality of sample k; the A/B judge prefers the higher one."""


def quality(text: str) -> int:
    return int(re.search(r"quality (\d)", text).group(1))


def better_quality_wins(context, continuation) -> float:
    letter = continuation.strip()[1]
    answer = re.findall(rf"Answer \({letter}\):\n(.*?)\n\n", context, re.DOTALL)[-1]
    return -0.5 * (6 - quality(answer))


def onpolicy_pairs(failures: Failures = ()) -> tuple[dict[str, Any], FakeGenerator]:
    d = shipped("onpolicy_pairs")
    d["chunk_size"] = 2
    stage_cfg(d, "load")["limit"] = 4
    q = ONPOLICY_QUALITY
    fake = FakeGenerator(rules=[("sky is blue", "The same answer quality 3")],  # all 5 samples identical
                         default=lambda req, k: f"Answer {k}: quality {q[k]}", logprobs=better_quality_wins,
                         failures=failures)
    return d, fake


# -- kpdds: extract -> TCPM questions -> score -> solve + vote (issue #14) -----------------------------------------

KPDDS_TOPICS = {  # seed keyword -> its topics and key points (what the scripted teacher extracts)
    "pencils": {"Arithmetic - Unit rates": ["Divide the total price by the count for the unit price"],
                "Arithmetic - Decimals": ["Multiply a decimal by a whole number"]},
    "Solve for x": {"Algebra - Linear equations": ["Isolate the variable with inverse operations"]},
    "circle": {"Geometry - Circles": ["The area of a circle is pi r^2"]},
    "rectangle": {"Geometry - Perimeter and area": ["The perimeter of a rectangle is 2(l + w)",
                                                     "The area of a rectangle is l w"],
                  "Algebra - Linear equations": ["Isolate the variable with inverse operations"]},
    "discounted": {"Arithmetic - Percentages": ["A percentage of a quantity is the quantity times p/100"]},
    "consecutive": {"Algebra - Linear equations": ["Isolate the variable with inverse operations"],
                    "Number theory - Integers": ["Consecutive integers differ by 1"]},
    "car travels": {"Arithmetic - Unit rates": ["Speed is distance divided by time"]},
    "right triangle": {"Geometry - Right triangles": ["The Pythagorean theorem a^2 + b^2 = c^2"]},
    "recipe": {"Arithmetic - Ratios": ["Scale both parts of a ratio by the same factor"],
               "Arithmetic - Unit rates": ["Divide the total price by the count for the unit price"]},
    "garden": {"Geometry - Perimeter and area": ["The area of a square is its side squared"]},
}
KPDDS_UNPARSEABLE = "garden"
"""The seed whose scripted extraction is not JSON (counted as dropped_unparseable_no_json)."""
KPDDS_SOLUTIONS = ["3 + 4 = 7, so the answer is \\boxed{7}."] * 6 + ["2 * 4 = 8, so \\boxed{8}."] * 3 + \
    ["3 + 4 = 9, so \\boxed{9}."]
"""The 10 scripted solutions of every question: 6 say 7, 3 say 8, one has an arithmetic error."""


def _kpdds_extract(req, k):
    text = last_user(req)
    key = next(w for w in KPDDS_TOPICS if w in text.split("Solution:")[0])
    if key == KPDDS_UNPARSEABLE:
        return "I am not sure."
    return json.dumps({"topics": [{"topic": t, "key_points": kps} for t, kps in KPDDS_TOPICS[key].items()]})


def kpdds(failures: Failures = ()) -> tuple[dict[str, Any], FakeGenerator]:
    d = shipped("kpdds")
    d["chunk_size"] = 4
    q = stage_cfg(d, "kpdds_questions")
    q["num_questions"], q["questions_per_step"] = 6, 4
    made = itertools.count()

    def question(req, k):
        i = next(made)
        return "No tags here." if i % 5 == 4 else f"Here it is. <Q>Practice problem number {i}: combine them.</Q>"

    def score(req, k):
        return "Fine.\nScore: 0.5" if "number 1:" in last_user(req) else "Good.\nScore: 0.9"

    fake = FakeGenerator(rules=[
        ("specialist in mathematics education", _kpdds_extract),
        ("mathematics teacher helping students", question),
        ("reviewing a new mathematics problem", score),
        ("Solve the problem step by step", lambda req, k: KPDDS_SOLUTIONS[k]),
    ], default=Reply("unexpected prompt", "stop"), failures=failures)
    return d, fake


# -- the registry -----------------------------------------------------------------------------------------------

SCRIPTED_RUNS: dict[str, Callable[..., tuple[dict[str, Any], FakeGenerator]]] = {
    "quickstart": quickstart,
    "self_instruct": self_instruct,
    "alpaca": alpaca,
    "backtranslation": backtranslation,
    "realign": realign,
    "cai_sft": cai_sft,
    "cai_preferences": cai_preferences,
    "judge_pairs": judge_pairs,
    "onpolicy_pairs": onpolicy_pairs,
    "kpdds": kpdds,
    "humpback_backward": humpback_backward,
    "humpback_seed": humpback_seed,
    "humpback_iterate": humpback_iterate,
}


# -- issue #14: best_of_n, consistency, rso_pairs -----------------------------------------------------------------

BEST_OF_N_QUALITY = [3, 1, 4, 5, 2, 0, 2, 3]
"""The quality of best-of-N sample k: the additive judge scores it so (sample 3 wins)."""


def _sample_quality(req, k: int) -> str:
    return f"Answer {k}: quality {BEST_OF_N_QUALITY[k % len(BEST_OF_N_QUALITY)]}"


def best_of_n(failures: Failures = ()) -> tuple[dict[str, Any], FakeGenerator]:
    """8 samples per prompt, judged (text scoring on the fake) by their quality; the judge writes no score
    for the samples of the password prompt (all unscored: the prompt leaves as too_few_scored)."""
    d = shipped("best_of_n")
    d["chunk_size"] = 2
    stage_cfg(d, "load")["limit"] = 5

    def judgement(req, k):
        if "strong password" in last_user(req):
            return "I cannot rate this."
        return f"Reasons.\nScore: {quality(_judged(req))}"

    fake = FakeGenerator(rules=[("<response>", judgement)], default=_sample_quality,
                         logprobs=label_logprobs(lambda ctx: quality(_judged_in(ctx))), failures=failures)
    return d, fake


def _problem(req) -> str:
    return re.findall(r"Problem: (.*)", last_user(req))[-1].strip()


def consistency_answers() -> dict[str, str]:
    """question -> answer of the shipped seed problems."""
    import json

    lines = (PIPELINES / "data" / "math_word_problems.jsonl").read_text().splitlines()
    return {r["question"]: r["answer"] for r in map(json.loads, lines)}


def consistency(failures: Failures = ()) -> tuple[dict[str, Any], FakeGenerator]:
    """Text solutions end in the seed answer; programs compute it. Problem 2's text answer is off by one
    (disagree), problem 4's program raises (program_error), problem 5's reply has no code block."""
    d = shipped("consistency")
    d["chunk_size"] = 3
    stage_cfg(d, "load")["limit"] = 7
    answers = consistency_answers()
    order = list(answers)

    def text(req, k):
        q = _problem(req)
        a = float(answers[q]) + (1 if order.index(q) == 1 else 0)
        return f"We work it out step by step.\nSo the result is {a:g}.\nAnswer: {a:,g}"

    def program(req, k):
        q = _problem(req)
        i = order.index(q)
        if i == 4:
            return "I would compute it by hand."
        body = "raise ValueError('oops')" if i == 3 else f"parts = [{answers[q]}, 0]\nprint(sum(parts))"
        return f"Here is the program:\n```python\n{body}\n```"

    fake = FakeGenerator(rules=[("Write a short Python program", program), ("Reason step by step", text)],
                         default=Reply("unexpected prompt", "stop"), failures=failures)
    return d, fake


RSO_QUALITY = [3, 1, 4, 5, 2, 0, 4, 1, 2]
"""The quality of RSO sample k (the 9th, k = 8, is the baseline the pairwise judge compares against)."""


def rso_pairs(failures: Failures = ()) -> tuple[dict[str, Any], FakeGenerator]:
    """8 candidates (+ 1 baseline) per prompt, 4 accepted, 2 first-round pairs; the A/B judge prefers the
    higher quality."""
    d = shipped("rso_pairs")
    d["chunk_size"] = 2
    stage_cfg(d, "load")["limit"] = 4
    stage_cfg(d, "rso_pairs").update(n=8, num_samples=4)
    fake = FakeGenerator(lambda req, k: f"Answer {k}: quality {RSO_QUALITY[k]}", logprobs=better_quality_wins,
                         failures=failures)
    return d, fake


SCRIPTED_RUNS.update(best_of_n=best_of_n, consistency=consistency, rso_pairs=rso_pairs)


def shipped_pipeline_files() -> list[Path]:
    """Every pipeline file in ``pipelines/`` (top level; ``pipelines/train/`` holds trainer configs):
    the YAML files that are not loop files (``synthfb.loop.config.looks_like_loop``)."""
    from synthfb.loop.config import looks_like_loop

    return sorted(f for f in PIPELINES.glob("*.yaml") if not looks_like_loop(yaml.safe_load(f.read_text())))
