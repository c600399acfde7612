"""Reward model: last-real-token scoring under any padding, learning, Plackett-Luce, CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch

from synthfb.train.rm import RMConfig, load_reward_model, pair_accuracy, reward_scores, train_rm

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent
WORDS = "write explain list give describe summarize translate classify".split()
GOOD = ["good", "helpful", "clear", "honest"]
BAD = ["bad", "short", "long", "art"]


def pairs(n, seed):
    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.choice(WORDS) for _ in range(4)),
             "chosen": " ".join(rng.choice(GOOD) for _ in range(rng.randint(2, 4))),
             "rejected": " ".join(rng.choice(BAD) for _ in range(rng.randint(2, 4)))} for _ in range(n)]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from synthfb.llm.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("rm") / "tiny64", hidden_size=64, num_heads=2, seed=4)


def test_score_read_at_last_real_token_any_padding(small):
    torch.manual_seed(0)
    model, tok = load_reward_model(str(small))
    model.eval()
    eos = tok.eos_token_id
    seqs = [[10, 11, 12, eos], [13, 14, eos], [15, 16, 17, 18, 19, 20]]
    with torch.no_grad():
        single = [float(reward_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))) for s in seqs]
        for pad_id in (tok.pad_token_id, eos):  # pad == eos is the classic trap
            for side in ("right", "left"):
                for extra in (0, 3):
                    W = max(map(len, seqs)) + extra
                    ids = torch.full((3, W), pad_id)
                    am = torch.zeros(3, W, dtype=torch.long)
                    for i, s in enumerate(seqs):
                        sl = slice(0, len(s)) if side == "right" else slice(W - len(s), W)
                        ids[i, sl] = torch.tensor(s)
                        am[i, sl] = 1
                    got = reward_scores(model, ids, am).tolist()
                    assert got == pytest.approx(single, abs=1e-5), (pad_id, side, extra)


def test_shared_prompt_scores_equal_single_sequences(small):
    """Prefix sharing: prompt + chosen + rejected in one row scores each completion as its own sequence."""
    from synthfb.train.collate import collate_shared_prompt
    from synthfb.train.rm import shared_prompt_scores

    model, tok = load_reward_model(str(small))
    model.eval()
    rng = random.Random(2)
    trip = [([rng.randrange(4, 200) for _ in range(rng.randint(1, 6))], [rng.randrange(4, 200) for _ in range(k)],
             [rng.randrange(4, 200) for _ in range(rng.randint(1, 5))]) for k in (1, 3, 6)]
    b = collate_shared_prompt(*map(list, zip(*trip)), tok.pad_token_id)
    with torch.no_grad():
        got = shared_prompt_scores(model, b).tolist()
        want = [float(reward_scores(model, torch.tensor([p + c]), torch.ones(1, len(p + c), dtype=torch.long)))
                for k in (1, 2) for p, *cs in trip for c in [cs[k - 1]]]
    assert got == pytest.approx(want, abs=1e-5)


@pytest.mark.timeout(600)
def test_shared_prompt_trains_the_same_reward_model(small, tmp_path):
    runs = {}
    for share in (False, True):
        cfg = RMConfig(model=str(small), dataset="-", output_dir=str(tmp_path / f"rm{share}"), batch_size=8,
                       learning_rate=1e-3, lr_scheduler="constant", max_steps=4, center_rewards_coef=0.01,
                       share_prompt=share)
        runs[share] = train_rm(cfg, pairs(32, 5))
    for key in ("loss", "reward_margin", "reward_mean", "tokens"):
        a, b = ([h[key] for h in runs[s]["history"]] for s in (False, True))
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), key
    # Adam turns float-rounding noise in a near-zero gradient into a step of up to ~lr: 1 of 8192 weights of a
    # layer moved 1.9e-5 apart here; the tolerance allows that, not a wrong gradient
    for (n, p), (_, q) in zip(runs[False]["model"].named_parameters(), runs[True]["model"].named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4, msg=n)


@pytest.mark.timeout(600)
def test_rm_separates_toy_preferences_and_saves_hf_checkpoint(small, tmp_path):
    train, held_out = pairs(48, 0), pairs(32, 1)
    for i, r in enumerate(train):
        r["margin"] = 0.5 if i % 2 else 0.0
    cfg = RMConfig(model=str(small), dataset="-", output_dir=str(tmp_path / "rm"), batch_size=8, learning_rate=1e-3,
                   lr_scheduler="constant", max_steps=12, center_rewards_coef=0.01, margin_column="margin")
    out = train_rm(cfg, train)
    hist = out["history"]
    assert all({"loss", "reward_accuracy", "reward_margin"} <= set(h) for h in hist)
    assert hist[-1]["loss"] < hist[0]["loss"]
    from synthfb.train.rm import build_examples

    ex = build_examples(cfg, out["tokenizer"], held_out)
    acc = pair_accuracy(out["model"], out["tokenizer"], ex)
    assert acc > 0.9
    # the saved folder is a sequence classifier transformers loads, with the same scores
    reloaded, tok = load_reward_model(str(tmp_path / "rm"))
    assert pair_accuracy(reloaded, tok, ex) == acc


@pytest.mark.timeout(600)
def test_plackett_luce_ranked_lists(small, tmp_path):
    rng = random.Random(2)
    levels = [GOOD, ["fine", "ok", "plain", "some"], BAD]
    rows = []
    for _ in range(32):
        comps = [" ".join(rng.choice(lv) for _ in range(3)) for lv in levels]
        order = rng.sample(range(3), 3)  # shuffle positions; scores say which is best
        rows.append({"prompt": " ".join(rng.choice(WORDS) for _ in range(3)),
                     "completions": [comps[k] for k in order], "scores": [float(2 - k) for k in order]})
    cfg = RMConfig(model=str(small), dataset="-", output_dir=str(tmp_path / "pl"), ranked=True, batch_size=8,
                   learning_rate=1e-3, lr_scheduler="constant", max_steps=10)
    out = train_rm(cfg, rows)
    assert out["history"][-1]["loss"] < 0.5 * out["history"][0]["loss"]
    model, tok = out["model"], out["tokenizer"]
    from synthfb.train.rm import _batch

    b = _batch(out["examples"], tok.pad_token_id, True)
    with torch.no_grad():
        s = reward_scores(model.eval(), b["input_ids"], b["attention_mask"]).view(-1, 3)
    assert ((s[:, 0] > s[:, 1]) & (s[:, 1] > s[:, 2])).float().mean() > 0.9


def test_cli_runs_the_example_config(small, tmp_path):
    from synthfb.train.cli import main

    rc = main(["train", "rm", "--config", str(REPO / "pipelines/train/rm_tiny.yaml"), "--set", f"model={small}",
               "--set", f"output_dir={tmp_path / 'o'}", "--set", "max_steps=2",
               "--set", f"dataset={REPO / 'pipelines/train/data/prefs_toy.jsonl'}"])
    assert rc == 0
    lines = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and "reward_accuracy" in lines[0]
    assert main(["train", "rm", "--config", str(REPO / "pipelines/train/rm_tiny.yaml"), "--set", "max_step=3"]) == 2


def test_ppo_reward_model_scorer_matches_single_sequences(small, tmp_path):
    """PPO's RewardModelScorer reads a saved RM checkpoint and scores like reward_scores alone."""
    from synthfb.train.collate import Tokenizer
    from synthfb.train.ppo import RewardModelScorer

    torch.manual_seed(1)
    model, tok = load_reward_model(str(small))
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    prompts = ["list three", [{"role": "user", "content": "give tips"}], "why"]
    comps = [" good clear", "helpful honest water", " bad"]
    got = RewardModelScorer(str(tmp_path / "rm"), batch_size=2)(prompts, comps)
    t = Tokenizer(tok)
    model.eval()
    for p, c, g in zip(prompts, comps, got):
        ids = t.prompt_ids(p) + (t.completion_ids(p, [{"role": "assistant", "content": c}]) if isinstance(p, list)
                                 else t.completion_ids(p, c))
        with torch.no_grad():
            want = float(reward_scores(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)))
        assert g == pytest.approx(want, abs=1e-5)
