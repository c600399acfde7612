"""The preference stages' metadata contract (issue #15 a, b).

* judge_pairs, onpolicy_pairs and cai_label write ``score_margin``
  (score_chosen - score_rejected, each in its own unit), never ``margin``,
  the name TRL's RewardTrainer and our RM would read as a reward margin;
* the data card says the unit of ``score_margin`` per stage;
* our RM reads no metadata column unless its config names one
  (``margin_column`` default None) and trains on soft labels with
  ``soft_label_column`` (Bai et al. 2022), checked against hand values;
* the cai_preferences card renders for a cai_label record without ``sampling``.

Fast tier: the fake generator of tests/fakes.py, a word-level stand-in tokenizer.
"""

from __future__ import annotations

import copy
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ has no __init__.py
from fakes import FakeGenerator, last_user

from synthfb.engine import Pipeline, Runner

REPO = Path(__file__).resolve().parent.parent
PIPELINES = REPO / "pipelines"


def shipped(name: str, limit: int = 3) -> dict:
    d = yaml.safe_load((PIPELINES / f"{name}.yaml").read_text())
    [load] = [s for s in d["stages"] if s["stage"] == "load"]
    load["limit"] = limit
    return d


def run(d: dict, out: Path, fake: FakeGenerator):
    p = Pipeline.from_dict(copy.deepcopy(d), PIPELINES, source=f"pipelines/{d['name']}.yaml")
    return Runner(p, out, generators={p.model: fake}, progress=False).run()


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# -- the column -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kind", [("judge_pairs", "judge_pairs"), ("onpolicy_pairs", "onpolicy_pairs"),
                                       ("cai_preferences", "cai_label")])
def test_preference_stages_declare_score_margin_not_margin(name, kind):
    p = Pipeline.from_dict(shipped(name), PIPELINES, source=name)
    cols: list[str] = []
    for st in p.stages:
        cols = st.output_columns(cols)
    assert p.stages[-1].kind == kind
    assert "score_margin" in cols and "margin" not in cols


def _option(context: str, letter: str) -> str:
    return re.findall(rf"\({letter}\) \[\[\[(.*?)\]\]\]", context, re.DOTALL)[-1]


def kind_is_better(context, continuation) -> float:
    return -0.2 if "kind" in _option(context, continuation.strip()[1]) else -1.7


@pytest.fixture(scope="module")
def cai_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cai") / "run"
    fake = FakeGenerator(lambda req, k: ["A rude answer.", "A kind and careful answer."][k], logprobs=kind_is_better)
    run(shipped("cai_preferences"), out, fake)
    return out


def test_cai_label_score_margin_is_2p_minus_1_and_the_card_says_so(cai_run):
    import datasets

    rows = datasets.load_from_disk(str(cai_run / "dataset")).to_list()
    assert rows and all("margin" not in r for r in rows)
    for r in rows:
        assert r["p_chosen"] == pytest.approx(_sig(1.5))
        assert r["score_margin"] == pytest.approx(2 * r["p_chosen"] - 1)
    card = (cai_run / "README.md").read_text()
    [line] = [x for x in card.splitlines() if x.startswith("- `score_margin` (stage 02-cai_label)")]
    assert "2p-1" in line and "margin_column" in line
    assert any(x.startswith("- `p_chosen` (stage 02-cai_label)") and "soft_label_column" in x
               for x in card.splitlines())


def test_judge_and_onpolicy_units_in_the_card():
    from synthfb.cards.builder import _column_notes

    def note(kind, **cfg):
        [n] = _column_notes([{"index": 2, "kind": kind, "config": cfg}], ["score_margin"])
        assert n["column"] == "score_margin" and n["stage"] == f"02-{kind}"
        return n["note"]

    assert "judge points on the additive 0-5 rubric" in note("judge_pairs")
    assert "mean logit gap of the ranker" in note("onpolicy_pairs", aggregate="max_logits")
    assert "wins" in note("onpolicy_pairs", aggregate="max_wins")
    assert "2p-1" in note("cai_label")
    # no note for a column the dataset does not have, nor for other stages
    assert _column_notes([{"index": 1, "kind": "judge_pairs", "config": {}}], ["prompt"]) == []
    assert _column_notes([{"index": 1, "kind": "generate", "config": {}}], ["score_margin"]) == []


def test_judge_pairs_card_and_loop_metrics_read_score_margin(tmp_path):
    from synthfb.loop.pairs import pairs_metrics

    judgements = {"good": "Score: 5", "fair": "Score: 3", "poor": "Score: 1", "meh": "Score: 2"}
    fake = FakeGenerator(rules=[("<response>", lambda req, k: judgements[
        re.findall(r"<response>(.*?)</response>", last_user(req), re.DOTALL)[-1]])],
        default=["good", "fair", "poor", "meh"])
    res = run(shipped("judge_pairs"), tmp_path / "run", fake)
    assert res.num_rows == 3
    assert pairs_metrics(res)["mean_margin"] == pytest.approx(4.0)
    card = (tmp_path / "run" / "README.md").read_text()
    assert "- `score_margin` (stage 02-judge_pairs): score_chosen - score_rejected; unit: judge points" in card


@pytest.mark.filterwarnings("ignore:license unknown")
def test_card_renders_for_a_model_stage_without_sampling(cai_run, tmp_path):
    """Regression: the card template read `config.sampling`, which a cai_label record may lack
    (StrictUndefined is not JSON serializable); `synthfb card` and `publish` then crashed."""
    import shutil

    from synthfb.cards import build_card, publish_dir

    run_dir = tmp_path / "run"
    shutil.copytree(cai_run, run_dir)
    m = json.loads((run_dir / "run.json").read_text())
    [label] = [s for s in m["stages"] if s["kind"] == "cai_label"]
    label["config"].pop("sampling", None)
    (run_dir / "run.json").write_text(json.dumps(m))
    body = build_card(run_dir).body
    assert "Stage 2 `cai_label` records no sampling settings." in body
    assert 'Stage 1 `generate` sampling: `{"max_tokens": 200, "temperature": 1.0}`, n = 2.' in body
    import datasets

    out = publish_dir(run_dir, tmp_path / "pub")
    assert len(datasets.load_dataset(str(out), split="train")) == 3


# -- the reward model ---------------------------------------------------------------------------------------------

def test_rm_reads_no_metadata_column_by_default():
    from synthfb.train.rm import RMConfig

    cfg = RMConfig(model="m", dataset="d", output_dir="o")
    assert cfg.margin_column is None and cfg.soft_label_column is None


def _t(*x):
    return torch.tensor(x, dtype=torch.float64)


def test_soft_label_bt_loss_matches_hand_computation():
    from synthfb.train.rm import bt_loss

    rc, rr = _t(1.5, -0.5), _t(0.5, 0.5)  # d = 1, -1
    p = _t(0.8, 0.3)
    got = bt_loss(rc, rr, p_chosen=p).tolist()
    want = [-(0.8 * math.log(_sig(1.0)) + 0.2 * math.log(_sig(-1.0))),
            -(0.3 * math.log(_sig(-1.0)) + 0.7 * math.log(_sig(1.0)))]
    assert got == pytest.approx(want, abs=1e-12)
    assert got[0] == pytest.approx(0.513261, abs=1e-6)
    # with a margin m the gap is d - m, and centering adds coef * (r_c + r_r)^2
    got = bt_loss(_t(1.5), _t(0.5), _t(0.25), 0.01, _t(0.8)).item()
    assert got == pytest.approx(-(0.8 * math.log(_sig(0.75)) + 0.2 * math.log(_sig(-0.75))) + 0.01 * 4.0, abs=1e-12)


def test_soft_label_p1_is_the_hard_loss_and_p0_swaps_the_pair():
    from synthfb.train.rm import bt_loss

    rc, rr, m = _t(1.5, -2.0, 0.3), _t(0.5, 1.0, 0.3), _t(0.1, 0.0, -0.2)
    ones, zeros = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    assert bt_loss(rc, rr, m, 0.01, ones).tolist() == pytest.approx(bt_loss(rc, rr, m, 0.01).tolist(), abs=1e-12)
    assert bt_loss(rc, rr, None, 0.0, zeros).tolist() == pytest.approx(bt_loss(rr, rc).tolist(), abs=1e-12)


def test_soft_label_loss_is_minimal_where_the_model_agrees_with_p():
    """d(loss)/d(r_c - r_r) = sigmoid(d) - p: zero at d = logit(p)."""
    from synthfb.train.rm import bt_loss

    p = 0.8
    rc = torch.tensor([math.log(p / (1 - p))], dtype=torch.float64, requires_grad=True)
    bt_loss(rc, _t(0.0), p_chosen=_t(p)).sum().backward()
    assert rc.grad.item() == pytest.approx(0.0, abs=1e-12)


class WordTokenizer:
    """Just enough of a HF tokenizer for ``collate.Tokenizer`` on plain-string rows."""

    pad_token_id, eos_token_id, chat_template = 0, 1, None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + len(w) for w in text.split()]}


def _rows():
    return [{"prompt": "say hi", "chosen": "hi there", "rejected": "go away", "p_chosen": 0.9, "score_margin": 0.8,
             "margin": 3.0},
            {"prompt": "say bye", "chosen": "bye now", "rejected": "no", "p_chosen": 0.6, "score_margin": 0.2,
             "margin": 1.0}]


def test_build_examples_reads_only_the_named_columns():
    from synthfb.train.rm import RMConfig, build_examples

    ex = build_examples(RMConfig(model="m", dataset="-", output_dir="o"), WordTokenizer(), _rows())
    assert all("margin" not in e and "p_chosen" not in e for e in ex)
    ex = build_examples(RMConfig(model="m", dataset="-", output_dir="o", soft_label_column="p_chosen",
                                 margin_column="score_margin"), WordTokenizer(), _rows())
    assert [e["p_chosen"] for e in ex] == [0.9, 0.6] and [e["margin"] for e in ex] == [0.8, 0.2]


@pytest.mark.parametrize("bad", [1.5, -0.1, "0.7", None, True])
def test_soft_label_must_be_a_probability(bad):
    from synthfb.data.io import InputError
    from synthfb.train.rm import RMConfig, build_examples

    rows = _rows()
    rows[1]["p_chosen"] = bad
    with pytest.raises(InputError, match=r"row 1: `p_chosen` \(soft_label_column\) must be a probability"):
        build_examples(RMConfig(model="m", dataset="-", output_dir="o", soft_label_column="p_chosen"),
                       WordTokenizer(), rows)


def test_rm_task_uses_the_soft_labels(monkeypatch):
    """The batch carries p_chosen to the loss: the task's loss equals the hand value."""
    from synthfb.train import rm

    tok = WordTokenizer()
    rewards = torch.tensor([1.5, -0.5, 0.5, 0.5])  # chosen 1.5, -0.5; rejected 0.5, 0.5
    monkeypatch.setattr(rm, "pair_scores", lambda model, b: rewards)  # chosen rows first, shared prompt or not
    for col, want in ((None, -math.log(_sig(1.0)) - math.log(_sig(-1.0))),
                      ("p_chosen", -(0.9 * math.log(_sig(1.0)) + 0.1 * math.log(_sig(-1.0)))
                                   - (0.6 * math.log(_sig(-1.0)) + 0.4 * math.log(_sig(1.0))))):
        cfg = rm.RMConfig(model="m", dataset="-", output_dir="o", soft_label_column=col)
        task = rm.rm_task(tok, cfg)
        b = task.collate(rm.build_examples(cfg, tok, _rows()))
        loss, _ = task.loss(None, b)
        assert loss.item() == pytest.approx(want, abs=1e-5), col


def test_ranked_lists_take_no_pair_columns(tmp_path):
    from synthfb.train.config import ConfigError, load_config
    from synthfb.train.rm import RMConfig

    with pytest.raises(ConfigError, match="ranked lists"):
        load_config(RMConfig, {"model": "m", "dataset": "d", "output_dir": str(tmp_path / "o"), "ranked": True,
                               "soft_label_column": "p_chosen"})
