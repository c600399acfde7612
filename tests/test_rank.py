"""Rankers and aggregation: hand-computed matrices, soft-label math,
cross-backend log-probs for the LLM judge, the reward model read at the last
real token (one scorer shared with PPO, tokenizing as the RM trainer does),
and a PairRM-style cross-encoder on a tiny random config."""

from __future__ import annotations

import math

import numpy as np
import pytest

from feedback_models import make_tiny_pairrm, make_tiny_reward_model
from synthfb.rank import PairwiseRanker, ScalarRanker, load_ranker
from synthfb.rank.aggregate import pick_pair, position_bias, ranks_from_scores, scores_from_matrix, trl_pair
from synthfb.rank.llm_judge import LLMPairwiseJudge, merge_orders, soft_label

M3 = [[0.0, 2.0, -1.0],
      [1.0, 0.0, 3.0],
      [0.5, -2.0, 0.0]]


# -- aggregation ---------------------------------------------------------------
def test_max_logits_hand_computed():
    # M - M^T = [[0, 1, -1.5], [-1, 0, 5], [1.5, -5, 0]]; row means over N=3 (zero diagonal included)
    s = scores_from_matrix(M3, "max_logits")
    assert s == pytest.approx([-0.5 / 3, 4 / 3, -3.5 / 3])
    # whatever is on the diagonal is ignored
    m = np.array(M3)
    np.fill_diagonal(m, 7.0)
    assert scores_from_matrix(m) == pytest.approx(s)


def test_max_wins_hand_computed():
    # wins (M > 0 per row): [1, 2, 1]; (M < 0).mean over rows, per column: [0, 1/3, 1/3]
    s = scores_from_matrix(M3, "max_wins")
    assert s == pytest.approx([1.0, 2 + 1 / 3, 1 + 1 / 3])
    with pytest.raises(ValueError, match="unknown aggregation"):
        scores_from_matrix(M3, "borda")
    with pytest.raises(ValueError, match="square"):
        scores_from_matrix([[0.0, 1.0]])


def test_ranks_share_ties():
    assert ranks_from_scores([3.0, 1.0, 3.0, 2.0]).tolist() == [1, 4, 1, 3]
    assert ranks_from_scores(scores_from_matrix(M3)).tolist() == [2, 1, 3]


def test_scalar_scores_give_consistent_matrix():
    r = np.array([0.3, -1.2, 2.0, 0.1])
    m = r[:, None] - r[None, :]
    # max_logits of a Bradley-Terry matrix is 2 (r - mean r): same order as r, no position bias
    assert scores_from_matrix(m) == pytest.approx(2 * (r - r.mean()))
    assert position_bias(m) == pytest.approx(0.0, abs=1e-12)


def test_position_bias_hand_computed():
    # candidate 0 shown first: P = sigmoid(log 3) = 0.75; candidate 1 shown first: P = 0.5
    m = [[0.0, math.log(3.0)], [0.0, 0.0]]
    assert position_bias(m) == pytest.approx(0.75 + 0.5 - 1.0)
    assert math.isnan(position_bias([[0.0]]))


def test_pick_pair_ties_and_identical():
    p = pick_pair([0.1, 0.9, -0.4, 0.9], ["a", "b", "c", "d"])
    assert (p.best, p.worst, p.reason) == (1, 2, None)  # lowest index among tied best
    assert p.margin == pytest.approx(1.3)
    assert pick_pair([0.5, 0.5, 0.5], ["a", "b", "c"]).reason == "tie"
    assert pick_pair([0.5, 0.52], ["a", "b"], min_margin=0.05).reason == "tie"
    assert pick_pair([1.0, 0.0], ["same", "same"]).reason == "identical_chosen_rejected"
    p = pick_pair([float("nan"), 2.0, float("nan"), 1.0], ["a", "b", "c", "d"])
    assert (p.best, p.worst) == (1, 3)
    assert pick_pair([float("nan"), 2.0], ["a", "b"]).reason == "too_few_scored"


def test_trl_pair_formats():
    conv = trl_pair("q", "good", "bad", "conversational")
    assert conv == {"prompt": [{"role": "user", "content": "q"}],
                    "chosen": [{"role": "assistant", "content": "good"}],
                    "rejected": [{"role": "assistant", "content": "bad"}]}
    assert trl_pair("q", "good", "bad", "standard") == {"prompt": "q", "chosen": "good", "rejected": "bad"}
    with pytest.raises(ValueError):
        trl_pair("q", "a", "b", "chatml")


# -- soft labels -----------------------------------------------------------------
def test_soft_label_hand_computed():
    # exp(-1.2) / (exp(-1.2) + exp(-2.3)) = 1 / (1 + exp(-1.1))
    assert soft_label(-1.2, -2.3) == pytest.approx(0.7502601055951177, rel=1e-12)
    assert soft_label(-2.3, -1.2) == pytest.approx(1 - 0.7502601055951177, rel=1e-12)
    # stable where exp underflows: only the difference matters
    assert soft_label(-1000.0, -1001.0) == pytest.approx(0.7310585786300049, rel=1e-12)
    assert soft_label(-1001.0, -1000.0) == pytest.approx(0.2689414213699951, rel=1e-12)
    assert soft_label(0.0, -800.0) == 1.0
    assert 0.0 <= soft_label(-800.0, 0.0) < 1e-300


def test_merge_orders_maps_swap_back():
    # x as (A): P(A) = sigmoid(1.6); y as (A): P(A) = sigmoid(0.6) -> P(x) in swapped order = 1 - sigmoid(0.6)
    pa, pb = soft_label(-0.2, -1.8), soft_label(-0.4, -1.0)
    p, gap = merge_orders(pa, pb)
    assert pa == pytest.approx(0.8320183851339245)
    assert pb == pytest.approx(0.6456563062257954)
    assert p == pytest.approx((0.8320183851339245 + 1 - 0.6456563062257954) / 2)
    assert gap == pytest.approx(0.8320183851339245 - (1 - 0.6456563062257954))
    # an order-blind judge: no gap, same p
    assert merge_orders(0.7, 0.3) == pytest.approx((0.7, 0.0))


# -- LLM pairwise judge ----------------------------------------------------------
PROMPTS = ["Give three tips for staying healthy.", "Why is the sky blue?"]
CANDS = [["Drink water, sleep well and exercise.", "Eat candy.", "Sleep."],
         ["Rayleigh scattering of sunlight.", "Because it is."]]


@pytest.mark.timeout(600)
def test_llm_judge_matrix_matches_transformers_backend(vllm_tiny, hf_tiny):
    judge_v = LLMPairwiseJudge(vllm_tiny)
    judge_h = LLMPairwiseJudge(hf_tiny)
    assert isinstance(judge_v, PairwiseRanker)
    mv = judge_v.compare(PROMPTS, CANDS)
    mh = judge_h.compare(PROMPTS, CANDS)
    assert [m.shape for m in mv] == [(3, 3), (2, 2)]
    for a, b in zip(mv, mh):
        assert np.all(np.diag(a) == 0)
        assert a == pytest.approx(b, abs=2e-3)
    # M[i, j] is lp(" (A)") - lp(" (B)") after the prompt with i as (A) and j as (B)
    from synthfb.llm.types import ScoreRequest

    text = judge_h.render(PROMPTS[0], CANDS[0][2], CANDS[0][0])
    la, lb = (r.logprob for r in hf_tiny.score([ScoreRequest(" (A)", prompt=text), ScoreRequest(" (B)", prompt=text)]))
    assert mh[0][2, 0] == pytest.approx(la - lb, abs=1e-5)
    # swapping the candidate list permutes the matrix (entries keyed by candidate, not slot)
    sw = judge_v.compare([PROMPTS[1]], [CANDS[1][::-1]])[0]
    assert sw[0, 1] == pytest.approx(mv[1][1, 0], abs=1e-3)
    assert sw[1, 0] == pytest.approx(mv[1][0, 1], abs=1e-3)


def test_llm_judge_template_must_show_both_responses(vllm_tiny, tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{{ prompt }} {{ response_a }}")
    with pytest.raises(ValueError, match="response_b"):
        LLMPairwiseJudge(vllm_tiny, template=str(bad))


# -- reward model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_rm(tiny_model, tmp_path_factory):
    return make_tiny_reward_model(tmp_path_factory.mktemp("rm") / "tiny-rm", tiny_model)


@pytest.mark.timeout(300)
def test_reward_model_reads_last_real_token(tiny_rm):
    import torch

    rm = load_ranker("reward_model", path=str(tiny_rm), batch_size=4)
    assert isinstance(rm, ScalarRanker)
    prompts = ["short", "a much longer prompt that needs more tokens than the others do"]
    cands = [["yes", "no thanks, not today", "ok"], ["fine", "the sky is blue because of scattering"]]
    got = rm.score(prompts, cands)
    # reference: each text alone (no padding), hidden state of its final token through the head
    model = rm.model
    for p, cs, r in zip(prompts, cands, got):
        for c, val in zip(cs, r):
            ids = rm.tok(rm.text(p, c), add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                h = model.model(input_ids=ids).last_hidden_state[0, -1]
                ref = float(model.score(h)[0])
            assert val == pytest.approx(ref, abs=1e-4)
    # the chat template ends every turn with the EOS token; with pad == eos the model's own
    # pooling would skip it, ours does not
    assert rm.text("q", "a").rstrip().endswith("<|im_end|>")
    m = rm.compare(prompts, cands)
    assert m[0] == pytest.approx(got[0][:, None] - got[0][None, :])


# -- one reward-model scorer (ranker = PPO = RM trainer) -----------------------------
_CONV = [{"prompt": [{"role": "user", "content": "why is the sky blue"}],
          "chosen": [{"role": "assistant", "content": "because of scattering"}],
          "rejected": [{"role": "assistant", "content": "no"}]},
         {"prompt": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "tips for sleep"}],
          "chosen": [{"role": "assistant", "content": "a dark room, no screens"}],
          "rejected": [{"role": "assistant", "content": "sleep is bad"}]},
         {"prompt": [{"role": "user", "content": " ".join(["explain the water and the river"] * 6)}],
          "chosen": [{"role": "assistant", "content": "rivers carry water to the sea, " * 4}],
          "rejected": [{"role": "assistant", "content": "ok"}]}]
_STD = [{"prompt": "Give three tips.", "chosen": " Drink water, sleep well.", "rejected": " Eat candy."},
        {"prompt": "why", "chosen": "because", "rejected": ""},
        {"prompt": "the long question " * 10, "chosen": " a long answer that goes on " * 5, "rejected": " no"}]


@pytest.mark.parametrize("limits", [(None, None), (24, None), (40, 12), (5, 3)])
def test_reward_scorer_tokenizes_like_the_rm_trainer(tiny_rm, limits):
    """RewardScorer.token_ids == the RM trainer's prompt_ids + chosen_ids (collate.Tokenizer),
    truncation included, for chat and plain rows; a plain string answer to a chat prompt is the
    assistant turn."""
    from transformers import AutoTokenizer

    from synthfb.rank.reward_model import RewardScorer
    from synthfb.train.collate import Tokenizer

    tok = AutoTokenizer.from_pretrained(tiny_rm)
    scorer = RewardScorer(object(), tok, max_length=limits[0], max_prompt_length=limits[1])
    trainer = Tokenizer(tok, *limits)
    for row in _CONV + _STD:
        ex = trainer.preference_example(row)
        for k in ("chosen", "rejected"):
            assert scorer.token_ids(row["prompt"], row[k]) == ex["prompt_ids"] + ex[f"{k}_ids"], (row, k)
    for row in _CONV:
        assert scorer.token_ids(row["prompt"], row["chosen"][0]["content"]) == scorer.token_ids(row["prompt"], row["chosen"])
    ids = RewardScorer(object(), tok).token_ids("why", "because")
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1  # EOS appended once


@pytest.mark.timeout(300)
def test_one_reward_model_scorer_for_ranker_ppo_and_rm_trainer(tiny_model, tmp_path):
    """A reward model trained by `synthfb train rm` on the tiny model gives the same score for a
    (prompt, response) through the reward_model ranker, through PPO's scoring step and through
    the RM trainer's own forward (rm._batch + reward_scores), truncation limits included
    (read back from the RM's train_config.yaml)."""
    import torch

    from synthfb.train.ppo import RewardModelScorer, Rollout, score
    from synthfb.train.rm import RMConfig, _batch, build_examples, reward_scores, train_rm

    cfg = RMConfig(model=str(tiny_model), dataset="-", output_dir=str(tmp_path / "rm"), batch_size=3,
                   learning_rate=1e-3, max_steps=2, max_length=40, max_prompt_length=24, device="cpu")
    out = train_rm(cfg, _CONV + _STD)
    assert out["steps"] == 2
    rm_path = str(tmp_path / "rm")

    def trainer_scores(rows):  # the trainer's own forward: chosen scores then rejected scores
        model, tok = out["model"].eval(), out["tokenizer"]
        b = _batch(build_examples(cfg, tok, rows), tok.pad_token_id, False)
        with torch.no_grad():
            r = reward_scores(model, b["input_ids"], b["attention_mask"])
        return r.view(2, -1).T.flatten().tolist()  # per row: chosen, rejected

    def ppo_scores(rows):  # PPO's reward_fn for cfg.reward_model, through the score() step
        fn = RewardModelScorer(rm_path, "float32", "cpu", batch_size=4)
        assert (fn.max_length, fn.max_prompt_length) == (40, 24)  # the limits the RM was trained with
        prompts = [r["prompt"] for r in rows for _ in (0, 1)]
        comps = [r[k][0]["content"] if isinstance(r[k], list) else r[k] for r in rows for k in ("chosen", "rejected")]
        ro = Rollout(prompts, comps, [], [], torch.ones(len(comps), dtype=torch.bool))
        raw, _ = score(ro, fn)
        return raw.tolist()

    conv_rank = load_ranker("reward_model", path=rm_path, batch_size=3, device="cpu")  # chat template: conversational
    std_rank = load_ranker("reward_model", path=rm_path, batch_size=5, device="cpu", use_chat_template=False)
    simple = [r for r in _CONV if len(r["prompt"]) == 1]  # the ranker's string prompt is one user turn
    rank_conv = conv_rank.score([r["prompt"][0]["content"] for r in simple],
                                [[r["chosen"][0]["content"], r["rejected"][0]["content"]] for r in simple])
    rank_std = std_rank.score([r["prompt"] for r in _STD], [[r["chosen"], r["rejected"]] for r in _STD])
    assert np.concatenate(rank_conv).tolist() == pytest.approx(trainer_scores(simple), abs=1e-5)
    assert np.concatenate(rank_std).tolist() == pytest.approx(trainer_scores(_STD), abs=1e-5)
    assert ppo_scores(_CONV) == pytest.approx(trainer_scores(_CONV), abs=1e-5)
    assert ppo_scores(_STD) == pytest.approx(trainer_scores(_STD), abs=1e-5)
    # a ranker given the whole conversation (system turn included) scores it like the trainer too
    full = conv_rank.score([r["prompt"] for r in _CONV], [[r["chosen"][0]["content"], r["rejected"][0]["content"]]
                                                         for r in _CONV])
    assert np.concatenate(full).tolist() == pytest.approx(trainer_scores(_CONV), abs=1e-5)
    # the truncation limits mattered for the long rows
    long_ids = conv_rank.scorer.token_ids(_CONV[2]["prompt"], _CONV[2]["chosen"])
    assert len(long_ids) == 40 and long_ids[-1] != out["tokenizer"].eos_token_id


# -- PairRM-style cross-encoder -------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pairrm(tmp_path_factory):
    return make_tiny_pairrm(tmp_path_factory.mktemp("pairrm") / "tiny-pairrm")


def test_pairrm_checkpoint_layout_and_sequence(tiny_pairrm):
    from safetensors.torch import load_file

    keys = set(load_file(str(tiny_pairrm / "model.safetensors")))
    # parameter names of the published PairRM-hf checkpoint
    assert {"head_layer.1.weight", "head_layer.1.bias", "head_layer.4.weight", "head_layer.4.bias"} <= keys
    assert any(k.startswith("pretrained_model.embeddings.") for k in keys)
    assert any(k.startswith("pretrained_model.encoder.layer.1.") for k in keys)
    r = load_ranker("pairrm", path=str(tiny_pairrm))
    toks = r.tok.convert_ids_to_tokens(r.encode_pair("why is the sky blue", "the sky [SEP] is blue", "water"))
    assert toks == ["[CLS]", "<|source|>", "why", "is", "the", "sky", "blue", "[SEP]",
                    "[CLS]", "<|candidate1|>", "the", "sky", "is", "blue", "[SEP]",
                    "[CLS]", "<|candidate2|>", "water", "[SEP]"]
    # length budget: the candidates share what the source leaves
    r.source_max_length, r.candidate_max_length = 6, 5
    ids = r.encode_pair("why is the sky blue today", "the cat sat on the mat " * 3, "a dog ran " * 5)
    assert len(ids) <= 6 + 2 * 5


@pytest.mark.timeout(300)
def test_pairrm_logits_match_head_on_prefix_states(tiny_pairrm):
    import torch

    r = load_ranker("pairrm", path=str(tiny_pairrm), batch_size=3)
    prompts = ["why is the sky blue", "how to sleep"]
    cands = [["the sky is blue", "water", "dog ran on the mat fast"], ["sleep is good", "no"]]
    mats = r.compare(prompts, cands)
    model, c = r.model, r.model.config
    for p, cs, m in zip(prompts, cands, mats):
        assert np.all(np.diag(m) == 0)
        for i, a in enumerate(cs):
            for j, b in enumerate(cs):
                if i == j:
                    continue
                ids = torch.tensor([r.encode_pair(p, a, b)])
                with torch.no_grad():
                    h = model.pretrained_model(input_ids=ids).last_hidden_state[0]
                    pos = {t: int((ids[0] == t).nonzero()[0, 0]) for t in
                           (c.source_prefix_id, c.cand1_prefix_id, c.cand2_prefix_id)}
                    s1 = model.head_layer(torch.cat([h[pos[c.source_prefix_id]], h[pos[c.cand1_prefix_id]]]))
                    s2 = model.head_layer(torch.cat([h[pos[c.source_prefix_id]], h[pos[c.cand2_prefix_id]]]))
                assert m[i, j] == pytest.approx(float(s1 - s2), abs=1e-5)


@pytest.mark.timeout(300)
def test_pairrm_learns_a_preference_through_prefix_states(tiny_pairrm, tmp_path):
    """Train the tiny cross-encoder briefly (loss -log sigmoid(s_win - s_lose)) to prefer
    candidates that say "good"; the full matrix + max_logits must then rank them first."""
    import shutil

    import torch

    from synthfb.rank.pairrm import PairRMRanker

    ck = tmp_path / "pairrm"
    shutil.copytree(tiny_pairrm, ck)
    r = PairRMRanker(ck)
    model = r.model
    model.eval()  # no dropout: deterministic; gradients still flow
    rng = np.random.default_rng(0)
    fill = "the a cat dog sat ran on mat water sky".split()

    def cand(word):
        return " ".join(rng.choice(fill, 3)) + f" {word} " + " ".join(rng.choice(fill, 2))

    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(60):
        trips, signs = [], []
        for k in range(16):  # the good candidate is shown first in half of the pairs
            g, b = cand("good"), cand("bad")
            trips.append(("how is it", g, b) if k % 2 else ("how is it", b, g))
            signs.append(1.0 if k % 2 else -1.0)
        seqs = [r.encode_pair(*t) for t in trips]
        width = max(map(len, seqs))
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, s in enumerate(seqs):
            ids[k, :len(s)] = torch.tensor(s)
            mask[k, :len(s)] = 1
        loss = -torch.nn.functional.logsigmoid(torch.tensor(signs) * model(ids, mask)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    cands = ["cat sat on good dog mat", "dog ran sky bad the a", "water the mat bad sat on", "the a dog good cat sky"]
    m = r.compare(["how is it"], [cands])[0]
    ranks = ranks_from_scores(scores_from_matrix(m))
    assert set(np.argsort(ranks)[:2].tolist()) == {0, 3}, (m, ranks)
    assert m[0, 1] > 0 and m[1, 0] < 0, m  # both orders agree
    assert m[3, 2] > 0 and m[2, 3] < 0, m


def test_load_ranker_errors(tmp_path):
    with pytest.raises(ValueError, match="checkpoint path"):
        load_ranker("pairrm")
    with pytest.raises(ValueError, match="unknown ranker"):
        load_ranker("elo")
    with pytest.raises(FileNotFoundError, match="no hub downloads"):
        load_ranker("pairrm", path=str(tmp_path / "missing"))
