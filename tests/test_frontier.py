"""bench/frontier.py: the true reward, the frontier rule, the sampler and its log-probs against
plain references, and the smallest end-to-end run (SFT -> pairs -> DPO and PPO -> measured table)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("frontier", Path(__file__).resolve().parent.parent / "bench" / "frontier.py")
F = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("frontier", F)  # dataclasses look their module up there
_spec.loader.exec_module(F)


@pytest.fixture
def one_thread():
    """The tiny model's steps are too small to share between threads (see the bench's --threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_positive_rate_counts_lexicon_words():
    assert F.positive_rate("good water, best!") == pytest.approx(2 / 3)
    assert F.positive_rate("Good GOOD goods") == pytest.approx(2 / 3)  # case-folded; "goods" is another word
    assert F.positive_rate("") == 0.0 and F.positive_rate(" ,.!") == 0.0
    assert F.positive_rate("the river") == 0.0 and F.positive_rate("helpful honest harmless") == 1.0
    assert F.true_reward(["p", "q"], ["clear", "the clear"]) == [1.0, 0.5]


def test_texts_have_the_drawn_positive_rates():
    rows = F.make_texts(2000, seed=0)
    rates = [F.positive_rate(r["completion"]) for r in rows]
    # each row's words are positive with a rate drawn uniformly from RATES
    assert sum(rates) / len(rates) == pytest.approx(sum(F.RATES) / len(F.RATES), abs=0.01)
    assert all(6 <= len(r["completion"].split()) <= 10 and 3 <= len(r["prompt"].split()) <= 5 for r in rows)


def test_frontier_rule_on_hand_made_points():
    start = (0.0, 0.1)
    dpo = [(1.0, 0.3), (3.0, 0.5)]
    # each PPO point has a DPO point with <= KL and >= reward
    assert F.dpo_dominates(dpo, [(1.5, 0.3), (4.0, 0.5), (3.0, 0.45)], start) == (True, 3)
    # (0.5, 0.2): nothing of DPO within KL 0.5 but the start, whose reward is lower
    assert F.dpo_dominates(dpo, [(0.5, 0.2), (2.0, 0.3)], start) == (False, 1)
    assert F.dpo_dominates(dpo, [(0.2, 0.05)], start) == (True, 1)  # below the start: the start matches it
    assert F.dpo_dominates(dpo, [(3.5, 0.51)], start) == (False, 0)
    # area: trapezoids (0, 0.1)-(1, 0.3)-(3, 0.5), then flat at 0.5; a dominated point changes nothing
    assert F.frontier_area(dpo, start, 4.0) == pytest.approx(0.2 * 1 + 0.4 * 2 + 0.5 * 1)
    assert F.frontier_area(dpo + [(2.0, 0.25)], start, 4.0) == pytest.approx(0.2 * 1 + 0.4 * 2 + 0.5 * 1)
    assert F.frontier_area(dpo, start, 2.0) == pytest.approx(0.2 * 1 + (0.3 + 0.4) / 2 * 1)
    assert F.frontier_area([], start, 2.0) == pytest.approx(0.1 * 2)
    assert F.best_within(dpo, 0.5) == -math.inf


def _plain_logp(model, prompt: list[int], completion: list[int]) -> float:
    """One unpadded sequence, full logits: sum_t log softmax(logits_{t-1})[y_t] over the completion."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    P = len(prompt)
    return sum(float(lp[P + j - 1, t]) for j, t in enumerate(completion))


@pytest.mark.engine  # transformers generation
def test_samples_and_logps_against_plain_references(tiny_model, one_thread):
    from synthfb.train.collate import Tokenizer
    from synthfb.train.loop import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    model = F.load_policy(str(tiny_model), "cpu")
    T = Tokenizer(tok)
    prompts = [T.prompt_ids(p) for p in ["the water", "why is the river long and the city short", "a"]]
    comps = F.sample_completions(model, tok, prompts, 3, 12, seed=0)
    assert len(comps) == 9 and all(1 <= len(c) <= 12 for c in comps)
    assert all(tok.eos_token_id not in c[:-1] for c in comps)  # cut after the first EOS
    rep = [p for p in prompts for _ in range(3)]
    got = F.completion_logps(model, rep, comps, tok.pad_token_id, batch_size=4)
    want = [_plain_logp(model, p, c) for p, c in zip(rep, comps)]
    assert got.tolist() == pytest.approx(want, abs=1e-4)
    # the full distribution, no top-k: a random model's next token is spread over the whole
    # vocabulary, so 400 first tokens take far more than 50 (transformers' default top_k) values
    first = F.sample_completions(model, tok, [prompts[0]] * 100, 4, 1, seed=1)
    assert len({c[0] for c in first}) > 100


@pytest.mark.engine  # transformers generation
def test_transformers_backend_samples_without_top_k(tiny_model):
    from synthfb.llm.hf_backend import TransformersGenerator
    from synthfb.llm.types import GenerationRequest, SamplingParams

    gen = TransformersGenerator(str(tiny_model), seed=0, progress=False, batch_size=100)
    res = gen.generate([GenerationRequest(prompt="the water", params=SamplingParams(n=4, max_tokens=1))] * 100)
    texts = {c.text for r in res for c in r.completions}
    assert len(texts) > 100  # with transformers' default top_k=50 there would be at most 50


@pytest.mark.engine  # trains SFT, DPO and PPO and samples (~1 min on 2 CPU cores)
@pytest.mark.timeout(900)
def test_smallest_bench_run_prints_its_table(tmp_path, one_thread):
    s = dataclasses.replace(F.QUICK, sft_texts=320, sft_epochs=5.0, pair_prompts=32, dpo_betas=(0.1,), dpo_epochs=1.0,
                            dpo_batch=8, ppo_kl_coefs=(0.1,), ppo_steps=2, ppo_prompts=4, ppo_minibatch=8, ppo_epochs=1,
                            eval_prompts=8, eval_samples=2)
    res = F.run_bench("tiny", tmp_path, s, "cpu", log=lambda m: None)
    rows = res["rows"]
    assert [(r["method"], r["param"]) for r in rows] == [("sft", None), ("dpo", 0.1), ("ppo", 0.1)]
    sft, dpo, ppo = rows
    # the SFT start measured against itself (loaded twice, scored on the same samples): KL 0 exactly
    assert abs(sft["kl"]) < 1e-5 and sft["kl_se"] < 1e-5
    for r in rows:
        assert 0 <= r["reward"] <= 1 and 0 <= r["stopped"] <= 1 and r["length"] >= 1
    # trained policies differ from the start on the sampled completions
    assert dpo["kl_se"] > 0 and ppo["kl_se"] > 0
    assert dpo["reward_labels"] == 2 * res["pairs"]["pairs"] > 0
    assert ppo["reward_labels"] == s.ppo_steps * s.ppo_prompts * s.ppo_samples
    assert res["pairs"]["pairs"] + res["pairs"]["ties"] + res["pairs"]["unfinished"] == s.pair_prompts
    assert res["matched"] == int(F.best_within([(dpo["kl"], dpo["reward"]), (0.0, sft["reward"])], ppo["kl"]) >= ppo["reward"])
    text = F.report(res, s)
    lines = text.splitlines()
    assert lines[1] == F.HEADER and len(lines) == 2 + 3 + 3
    assert all(len(ln.split()) == len(F.HEADER.split()) for ln in lines[2:5])
    assert lines[-2] == f"rule: {F.RULE}"
    assert lines[-1].startswith(f"DPO dominates PPO: {'yes' if res['dominates'] else 'no'} ({res['matched']} of 1")
