"""The InstructGPT K-way reward-model loss (Ouyang et al. 2022, Eq. 1) on ranked rows.

* the loss equals a hand computation of Eq. 1 (the spec's golden value for K = 4,
  ties, several prompts with different K in one batch), is invariant to the order of
  the completions in a row, and a K = 2 row gives the pairwise Bradley-Terry loss;
* the ranked-row contract: ``ranks`` (1 = best, equal = tie) wins over ``scores``,
  ranks derived from scores tie on equal scores, one-line errors naming the row;
* one batch element per prompt: K sequences, not 2 C(K,2);
* learning (engine tier, it trains): the loss falls and held-out pairwise accuracy
  rises on ranked lists whose order follows a countable property of the text.

The fast tests use a word-level stand-in tokenizer and an in-memory tiny Llama.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from synthfb.data.io import InputError
from synthfb.train import rm
from synthfb.train.collate import ranks_of
from synthfb.train.rm import RMConfig, build_examples, instructgpt_loss


def _nls(x: float) -> float:
    """-log sigmoid(x), by hand."""
    return math.log1p(math.exp(-x))


def eq1(rewards: list[float], ranks: list[int]) -> float:
    """Eq. 1 for one prompt, written out: the mean over pairs (w better than l) of -log sigmoid(r_w - r_l)."""
    pairs = [(w, l) for w, l in itertools.permutations(range(len(rewards)), 2) if ranks[w] < ranks[l]]
    return sum(_nls(rewards[w] - rewards[l]) for w, l in pairs) / len(pairs)


def test_golden_value_k4():
    """The spec's check (methods-2.md 7.5): K = 4, rewards [3, 2, 1, 0] in rank order -> 0.20704,
    the mean of the C(4,2) = 6 pair losses."""
    got = instructgpt_loss(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), torch.tensor([[1, 2, 3, 4]]))
    assert got.shape == (1,)
    assert float(got) == pytest.approx(0.20704, abs=1e-5)
    want = sum(_nls(a - b) for a, b in itertools.combinations([3.0, 2.0, 1.0, 0.0], 2)) / math.comb(4, 2)
    assert float(got) == pytest.approx(want, abs=1e-6)


def test_equals_hand_computation_for_mixed_k_ties_and_padding():
    rng = random.Random(0)
    rows = []
    for k in (2, 3, 5, 9, 4):
        r = [round(rng.uniform(-3, 3), 3) for _ in range(k)]
        ranks = [rng.randint(1, k) for _ in range(k)]  # random ranks: ties included
        if len(set(ranks)) == 1:
            ranks[0] += 1
        rows.append((r, ranks))
    K = max(len(r) for r, _ in rows)
    s = torch.full((len(rows), K), 123.0, dtype=torch.float64)  # padding scores that would dominate if they leaked
    rk = torch.zeros(len(rows), K, dtype=torch.long)
    m = torch.zeros(len(rows), K, dtype=torch.bool)
    for i, (r, ranks) in enumerate(rows):
        s[i, :len(r)] = torch.tensor(r, dtype=torch.float64)
        rk[i, :len(r)] = torch.tensor(ranks)
        m[i, :len(r)] = True
    got = instructgpt_loss(s, rk, m).tolist()
    assert got == pytest.approx([eq1(r, ranks) for r, ranks in rows], abs=1e-9)


def test_ties_make_no_pair_and_order_in_row_does_not_matter():
    # ranks [1, 1, 2]: pairs (0, 2), (1, 2) only
    r = [0.3, -1.2, 0.5]
    got = float(instructgpt_loss(torch.tensor([r], dtype=torch.float64), torch.tensor([[1, 1, 2]])))
    assert got == pytest.approx((_nls(0.3 - 0.5) + _nls(-1.2 - 0.5)) / 2, abs=1e-12)
    # all tied: nothing to learn, 0 loss and no gradient
    s = torch.tensor([[1.0, 2.0]], requires_grad=True)
    loss = instructgpt_loss(s, torch.tensor([[2, 2]]))
    loss.sum().backward()
    assert float(loss.detach()) == 0.0 and s.grad.abs().sum() == 0
    # a permutation of the completions (rewards and ranks together) changes nothing
    base = [2.0, -0.5, 1.0, 0.25, -2.0]
    ranks = [1, 4, 2, 3, 5]
    for perm in itertools.islice(itertools.permutations(range(5)), 0, 120, 7):
        p = list(perm)
        got = float(instructgpt_loss(torch.tensor([[base[i] for i in p]], dtype=torch.float64), torch.tensor([[ranks[i] for i in p]])))
        assert got == pytest.approx(eq1(base, ranks), abs=1e-12)


def test_k2_equals_pairwise_bradley_terry():
    rc, rr = torch.randn(16).double(), torch.randn(16).double()
    kway = instructgpt_loss(torch.stack([rc, rr], 1), torch.tensor([[1, 2]] * 16))
    assert torch.allclose(kway, rm.bt_loss(rc, rr), atol=1e-12)
    swapped = instructgpt_loss(torch.stack([rr, rc], 1), torch.tensor([[2, 1]] * 16))
    assert torch.allclose(swapped, rm.bt_loss(rc, rr), atol=1e-12)


# -- the row contract -------------------------------------------------------------------------------------------

class WordTokenizer:
    """Just enough of a HF tokenizer for ``collate.Tokenizer`` on plain-string rows (ids 2..63)."""

    pad_token_id, eos_token_id, chat_template = 0, 1, None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + (sum(map(ord, w)) % 62) for w in text.split()]}


def test_ranks_from_scores_and_ranks_column_wins():
    assert ranks_of({"scores": [0.5, 2.0, 0.5, -1.0]}, 4) == [2, 1, 2, 4]
    assert ranks_of({"scores": [1, 2], "ranks": [1, 2]}, 2) == [1, 2]  # ranks win over scores
    assert ranks_of({"ranks": [3, 1, 1]}, 3) == [3, 1, 1]
    for row, msg in (({"scores": [1.0, "x"]}, r"row 7: `scores` must be a list of 2 finite numbers"),
                     ({"scores": [1.0, float("nan")]}, r"row 7: `scores` must be a list of 2 finite numbers"),
                     ({"ranks": [1, 0]}, r"row 7: `ranks` must be a list of 2 integers >= 1"),
                     ({"ranks": [1, True]}, r"row 7: `ranks` must be a list of 2 integers >= 1"),
                     ({"ranks": [1, 2, 3]}, r"row 7: `ranks` must be a list of 2 integers"),
                     ({}, r"row 7: ranked rows need `ranks` \(1 = best\) or `scores`")):
        with pytest.raises(InputError, match=msg):
            ranks_of(row, 2, 7)


def test_examples_sorted_best_first_all_tied_rows_left_out():
    cfg = RMConfig(model="m", dataset="-", output_dir="o", ranked=True, ranked_loss="instructgpt")
    rows = [{"prompt": "say hi", "completions": ["a b", "c", "d e f"], "ranks": [2, 3, 1]},
            {"prompt": "say", "completions": ["x", "y"], "scores": [1.0, 1.0]},  # all tied: no comparison
            {"prompt": "go", "completions": ["p", "q", "r", "s"], "scores": [0.1, 0.9, 0.9, 0.3]}]
    tok = WordTokenizer()
    ex = build_examples(cfg, tok, rows)
    assert len(ex) == 2
    assert ex[0]["ranks"] == [1, 2, 3]
    assert ex[0]["completion_ids"] == [[tok(w)["input_ids"][0] for w in c.split()] + [1] for c in ("d e f", "a b", "c")]
    assert ex[1]["ranks"] == [1, 1, 3, 4]
    with pytest.raises(InputError, match="no ranked row has two completions of different rank"):
        build_examples(cfg, tok, [rows[1]])
    with pytest.raises(InputError, match=r"row 0: ranked rows need `completions`, a list of >= 2"):
        build_examples(cfg, tok, [{"prompt": "p", "completions": ["only"], "scores": [1.0]}])


def _tiny_rm(seed=0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    c = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2, max_position_embeddings=64, num_labels=1, pad_token_id=0)
    m = LlamaForSequenceClassification(c).eval()
    torch.nn.init.normal_(m.score.weight, std=0.5)
    return m


def test_task_one_forward_per_completion_equals_per_row_eq1_and_k2_equals_pair_row():
    """Through rm_task with a real (tiny) model: the batch holds each prompt's K completions once, and the
    task's loss is the sum over prompts of Eq. 1 on the rewards of each completion scored alone; a K = 2 row
    gives the same loss as the preference row (prompt, chosen, rejected) under the pairwise loss."""
    tok = WordTokenizer()
    model = _tiny_rm()
    rng = random.Random(1)
    words = "good fine bad art long clear tips".split()
    rows = [{"prompt": " ".join(rng.choice(words) for _ in range(3)),
             "completions": [" ".join(rng.choice(words) for _ in range(rng.randint(1, 4))) for _ in range(k)],
             "scores": [float(rng.randint(0, 3)) for _ in range(k)]} for k in (4, 2, 6, 3)]
    for r in rows:
        r["scores"][0] = 9.0  # at least one untied pair per row
    cfg = RMConfig(model="m", dataset="-", output_dir="o", ranked=True, ranked_loss="instructgpt")
    ex = build_examples(cfg, tok, rows)
    task = rm.rm_task(tok, cfg)
    b = task.collate(ex)
    assert b["input_ids"].shape[0] == len(rows) * 6  # B * max K sequences, never 2 * C(K, 2) per prompt
    with torch.no_grad():
        loss, ms = task.loss(model, b)
    want = 0.0
    for e in ex:
        alone = [float(rm.reward_scores(model, torch.tensor([e["prompt_ids"] + c]), torch.ones(1, len(e["prompt_ids"] + c),
                                                                                                dtype=torch.long)))
                 for c in e["completion_ids"]]
        want += eq1(alone, e["ranks"])
    assert float(loss) == pytest.approx(want, abs=1e-5)
    assert 0.0 <= ms["reward_accuracy"] <= len(rows)
    # K = 2 ranked row == preference row
    pair_rows = [{"prompt": "say hi", "chosen": "good clear", "rejected": "bad art long"},
                 {"prompt": "tips", "chosen": "fine", "rejected": "long"}]
    ranked_rows = [{"prompt": r["prompt"], "completions": [r["rejected"], r["chosen"]], "ranks": [2, 1]} for r in pair_rows]
    pcfg = RMConfig(model="m", dataset="-", output_dir="o")
    with torch.no_grad():
        lp, _ = rm.rm_task(tok, pcfg).loss(model, rm.rm_task(tok, pcfg).collate(build_examples(pcfg, tok, pair_rows)))
        lk, _ = task.loss(model, task.collate(build_examples(cfg, tok, ranked_rows)))
    assert float(lk) == pytest.approx(float(lp), abs=1e-6)


def test_ranked_config_refuses_pair_only_fields(tmp_path):
    from synthfb.train.config import ConfigError, load_config

    base = {"model": "m", "dataset": "d", "output_dir": str(tmp_path / "o"), "ranked": True}
    assert load_config(RMConfig, {**base, "ranked_loss": "instructgpt"}).ranked_loss == "instructgpt"
    with pytest.raises(ConfigError, match="center_rewards_coef"):
        load_config(RMConfig, {**base, "ranked_loss": "instructgpt", "center_rewards_coef": 0.1})
    with pytest.raises(ConfigError, match="ranked_loss"):
        load_config(RMConfig, {**base, "ranked_loss": "listnet"})


# -- learning ---------------------------------------------------------------------------------------------------

GOOD = ["good", "helpful", "clear", "honest"]
BAD = ["bad", "short", "long", "art"]
WORDS = "write explain list give describe summarize translate classify".split()


def ranked_rows(n: int, seed: int) -> list[dict]:
    """K = 2..6 completions of 4 words; the ranking is by the number of GOOD words (equal counts tie),
    given as `ranks` in half the rows and as `scores` in the other half."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randint(2, 6)
        comps, goods = [], []
        for _ in range(k):
            g = rng.randint(0, 4)
            ws = [rng.choice(GOOD) for _ in range(g)] + [rng.choice(BAD) for _ in range(4 - g)]
            rng.shuffle(ws)
            comps.append(" ".join(ws))
            goods.append(g)
        row = {"prompt": " ".join(rng.choice(WORDS) for _ in range(3)), "completions": comps}
        if i % 2:
            row["ranks"] = [1 + sum(h > g for h in goods) for g in goods]
        else:
            row["scores"] = [float(g) for g in goods]
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from synthfb.llm.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("rmk") / "tiny64", hidden_size=64, num_heads=2, seed=4)


@pytest.mark.engine  # trains a reward model (tens of seconds)
@pytest.mark.timeout(900)
def test_kway_rm_learns_a_ranking(small, tmp_path):
    train, held = ranked_rows(64, 0), ranked_rows(48, 1)
    cfg = RMConfig(model=str(small), dataset="-", output_dir=str(tmp_path / "rm"), ranked=True,
                   ranked_loss="instructgpt", batch_size=8, learning_rate=1e-3, lr_scheduler="constant", max_steps=16,
                   seed=0)
    model, tok = rm.load_reward_model(str(small))
    held_ex = build_examples(cfg, tok, held)
    before = rm.pair_accuracy(model, tok, held_ex)
    out = rm.train_rm(cfg, train)
    hist = out["history"]
    assert all({"loss", "reward_accuracy", "reward_margin", "reward_mean"} <= set(h) for h in hist)
    first, last = sum(h["loss"] for h in hist[:3]) / 3, sum(h["loss"] for h in hist[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    after = rm.pair_accuracy(out["model"], out["tokenizer"], held_ex)
    assert after > 0.85 and after > before + 0.25, (before, after)
    assert out["skipped_all_tied"] == sum(len(set(r.get("ranks") or r["scores"])) == 1 for r in train)
