"""PPO options of issue #16: PPO-ptx, the value function initialised from the reward model,
score normalisation, and rollouts that keep the engine's token ids.

Fast tier (in-memory tiny Llamas, a word-level stand-in tokenizer, scripted Generators):

* score normalisation (running / batch / initial, clipping) against statistics of the
  concatenated scores, and its state across a resume;
* the ptx stream (every pass a permutation, resumable), the ptx rows, and the ptx NLL
  against a plain per-example forward;
* value_init reward_model: the rollout values are the RM's scores of each prefix;
* rollouts: the ids in the PPO update are the ids the Generator returned (not the text
  tokenized again); a Generator without ids falls back to tokenizing the text.

Engine tier (they train, or start vLLM / transformers generation):

* PPO-ptx lowers the policy's NLL on the ptx data against ptx_coef 0 from the same start,
  ptx_coef 0 with a ptx dataset is plain PPO bit for bit, the logged first-minibatch
  NLL is the start model's NLL, and ptx_loss = ptx_coef * ptx_nll;
* a run with value_init reward_model + ptx + running normalisation resumes exactly;
* the transformers and vLLM backends return the sampled ids (and vLLM their log-probs),
  and a vLLM rollout trains on exactly those ids.
"""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch

from synthfb.llm.types import Completion, GenerationResult
from synthfb.train import ppo
from synthfb.train.ppo import PPOConfig, PtxStream, Rollout, ScoreNormalizer

# -- score normalisation ------------------------------------------------------------------------------------------


def _pop_std(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def test_running_normalisation_uses_every_score_seen_and_survives_a_resume():
    rng = random.Random(0)
    batches = [[rng.gauss(3.0, 2.0) for _ in range(n)] for n in (5, 1, 8, 3)]
    norm, seen = ScoreNormalizer("running"), []
    for i, b in enumerate(batches):
        seen += b
        got = norm(torch.tensor(b, dtype=torch.float64)).tolist()
        m, sd = sum(seen) / len(seen), _pop_std(seen)
        assert got == pytest.approx([(x - m) / sd for x in b], abs=1e-9), i
        if i == 1:  # a resumed run continues from the saved statistics
            resumed = ScoreNormalizer("running")
            resumed.load_state_dict(json.loads(json.dumps(norm.state_dict())))
    b = batches[2]
    again = ScoreNormalizer("running")
    again.load_state_dict(resumed.state_dict())
    m, sd = sum(batches[0] + batches[1] + b) / 14, _pop_std(batches[0] + batches[1] + b)
    assert again(torch.tensor(b, dtype=torch.float64)).tolist() == pytest.approx([(x - m) / sd for x in b], abs=1e-9)


def test_batch_initial_and_clip_modes():
    a, b = torch.tensor([1.0, 2.0, 6.0, -1.0], dtype=torch.float64), torch.tensor([10.0, 0.0], dtype=torch.float64)
    w = ScoreNormalizer("batch")(a)
    assert float(w.mean()) == pytest.approx(0.0, abs=1e-12) and float(w.std(unbiased=False)) == pytest.approx(1.0)
    ini = ScoreNormalizer("initial")
    ini(a)
    m, sd = float(a.mean()), _pop_std(a.tolist())
    assert ini(b).tolist() == pytest.approx([(10 - m) / sd, (0 - m) / sd])  # frozen at the first rollout's
    assert ScoreNormalizer("none", clip=2.0)(a).tolist() == [1.0, 2.0, 2.0, -1.0]
    assert ScoreNormalizer("batch", clip=0.5)(a).abs().max() == 0.5
    assert ScoreNormalizer("batch")(torch.tensor([4.0, 4.0])).tolist() == [0.0, 0.0]  # no spread: no blow-up


def test_score_normalises_then_subtracts_the_eos_penalty():
    ro = Rollout(["p"] * 3, ["a", "b", "c"], [[1]] * 3, [[2, 3], [4], [5]], torch.tensor([True, False, True]))
    raw, s = ppo.score(ro, lambda p, c: [1.0, 2.0, 6.0], missing_eos_penalty=0.5, normalize=ScoreNormalizer("batch"))
    z = [(x - 3.0) / _pop_std([1.0, 2.0, 6.0]) for x in (1.0, 2.0, 6.0)]
    assert raw.tolist() == [1.0, 2.0, 6.0]
    assert s.tolist() == pytest.approx([z[0], z[1] - 0.5, z[2]], abs=1e-6)


# -- ptx data -----------------------------------------------------------------------------------------------------

class WordTokenizer:
    """Just enough of a HF tokenizer for PPO's rollout and ptx code on plain strings (ids 3..63)."""

    pad_token_id, eos_token_id, chat_template = 0, 1, None
    pad_token = eos_token = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([2] if add_special_tokens else []) + [3 + (sum(map(ord, w)) % 61) for w in text.split()]}

    def save_pretrained(self, path):
        pass


def test_ptx_stream_walks_permutations_and_resumes():
    s = PtxStream([{}] * 7, seed=3)
    taken = s.take(5) + s.take(9) + s.take(7)
    assert [sorted(taken[k:k + 7]) for k in (0, 7, 14)] == [list(range(7))] * 3  # each pass sees every row once
    assert taken[:7] != taken[7:14]  # a fresh order per pass
    r = PtxStream([{}] * 7, seed=3, cursor=5)
    assert r.take(16) == taken[5:]


def test_ptx_examples_text_and_sft_rows():
    tok = WordTokenizer()
    ex = ppo.ptx_examples([{"text": "the cat sat"}, {"prompt": "say", "completion": "hi there"}], tok, max_length=None)
    assert ex[0] == {"input_ids": tok("the cat sat")["input_ids"] + [1], "loss_mask": [1] * 5}
    p, c = tok("say")["input_ids"], tok("hi there", add_special_tokens=False)["input_ids"] + [1]
    assert ex[1] == {"input_ids": p + c, "loss_mask": [0] * len(p) + [1] * len(c)}
    assert ppo.ptx_examples([{"text": "a b c d e f"}], tok, max_length=4)[0]["input_ids"] == tok("a b c")["input_ids"]
    from synthfb.data.io import InputError

    with pytest.raises(InputError, match=r"ptx_dataset: row 1: `text` must be a string"):
        ppo.ptx_examples([{"text": "ok"}, {"text": 3}], tok, None)
    with pytest.raises(InputError, match=r"ptx_dataset: row 0: SFT rows need `messages` or `prompt` \+ `completion`"):
        ppo.ptx_examples([{"question": "?"}], tok, None)


def _llama(seed=0, vocab=64, classify=False):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    c = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2, max_position_embeddings=128, num_labels=1, pad_token_id=0, eos_token_id=1)
    m = (LlamaForSequenceClassification if classify else LlamaForCausalLM)(c).eval()
    if classify:
        torch.nn.init.normal_(m.score.weight, std=0.5)
    return m


def test_ptx_nll_equals_a_plain_forward_per_example():
    model = _llama()
    items = [{"input_ids": [2, 5, 9, 11, 1], "loss_mask": [1] * 5},
             {"input_ids": [2, 7, 8, 30, 31, 40, 1], "loss_mask": [0, 0, 0, 1, 1, 1, 1]}]
    nll, ntok = ppo.ptx_nll(model, items, 0, "cpu")
    want, n = 0.0, 0
    for e in items:
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([e["input_ids"]])).logits[0].double(), -1)
        for t in range(1, len(e["input_ids"])):
            if e["loss_mask"][t]:
                want -= float(lp[t - 1, e["input_ids"][t]])
                n += 1
    assert ntok == n == 4 + 4
    assert float(nll.detach()) == pytest.approx(want, rel=1e-5)


# -- value function from the reward model ----------------------------------------------------------------------------

def _rollout(prompts, responses, eos=1):
    return Rollout(["p"] * len(prompts), ["t"] * len(prompts), prompts, responses,
                   torch.tensor([bool(r) and r[-1] == eos for r in responses]))


def test_value_init_from_rm_gives_the_rm_score_of_every_prefix():
    policy, rmodel = _llama(0), _llama(1, classify=True)
    prompts = [[2, 5, 6], [2, 9], [2, 10, 11, 12, 13]]
    responses = [[20, 21, 22, 1], [23], [24, 25, 26, 27, 28, 1]]
    ro = _rollout(prompts, responses)
    vm = ppo.RewardValueModel(rmodel)
    ev = ppo.evaluate(policy, vm, policy, ro, batch_size=2, pad_id=0, dev="cpu")
    assert ev.values.shape == (3, 6) and ev.mask.shape == (3, 6)
    from synthfb.train.rm import reward_scores

    for i, (p, r) in enumerate(zip(prompts, responses)):
        for j in range(len(r)):  # V(x, y_<j) = the RM's score of prompt + the first j response tokens
            seq = p + r[:j]
            with torch.no_grad():
                want = float(reward_scores(rmodel, torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long)))
            assert float(ev.values[i, j]) == pytest.approx(want, abs=1e-5), (i, j)
    zero = ppo.evaluate(policy, torch.nn.Linear(32, 1).requires_grad_(False).apply(_zero), policy, ro, 2, 0, "cpu")
    assert zero.values.abs().sum() == 0


def _zero(m):
    if isinstance(m, torch.nn.Linear):
        torch.nn.init.zeros_(m.weight), torch.nn.init.zeros_(m.bias)


def test_value_init_config_checks(tmp_path):
    from synthfb.train.config import ConfigError, load_config

    base = {"model": "m", "dataset": "d", "output_dir": str(tmp_path / "o"), "reward_function": "f.py:r"}
    with pytest.raises(ConfigError, match="value_init: reward_model needs `reward_model`"):
        load_config(PPOConfig, {**base, "value_init": "reward_model"})
    with pytest.raises(ConfigError, match="ptx_coef is 1.0 but no `ptx_dataset`"):
        load_config(PPOConfig, {**base, "ptx_coef": 1.0})
    assert load_config(PPOConfig, {**base, "ptx_dataset": "x.jsonl"}).ptx_coef == 0.0  # gamma 0: plain PPO


# -- rollouts keep the engine's ids ------------------------------------------------------------------------------------

class IdsGenerator:
    """A Generator that returns fixed token ids (and log-probs) whose text does NOT tokenize back to them."""

    def __init__(self, path, seed, with_ids=True):
        self.with_ids = with_ids
        self.returned: list[GenerationResult] = []

    def generate(self, reqs):
        out = []
        for i, r in enumerate(reqs):
            comps = []
            for k in range(r.params.n):
                ids = [30 + i, 40 + k, 50] + ([1] if (i + k) % 2 == 0 else [])
                comps.append(Completion(text="zz", finish_reason="stop" if (i + k) % 2 == 0 else "length",
                                        num_tokens=len(ids), token_ids=ids if self.with_ids else None,
                                        logprobs=[-1.0 - 0.1 * t for t in range(len(ids))] if self.with_ids else None))
            out.append(GenerationResult(completions=comps, prompt_token_ids=[2, 60 + i] if self.with_ids else None))
        self.returned += out
        return out

    def close(self):
        pass


@pytest.mark.parametrize("with_ids", [True, False])
def test_the_ppo_update_trains_on_the_ids_the_generator_returned(with_ids, monkeypatch, tmp_path):
    tok, model = WordTokenizer(), _llama()
    cfg = PPOConfig(model="m", dataset="-", output_dir=str(tmp_path), reward_function="-:-", samples_per_prompt=2,
                    max_new_tokens=8, batch_size=2, ppo_epochs=1, seed=0)
    gens = []

    def factory(path, seed):
        gens.append(IdsGenerator(path, seed, with_ids))
        return gens[-1]

    ro = ppo.rollout(model, tok, ["a b", "c"], cfg, factory, 0, tmp_path / "rollout")
    returned = gens[0].returned
    if with_ids:
        want_r = [c.token_ids for res in returned for c in res.completions]
        want_p = [res.prompt_token_ids for res in returned for _ in res.completions]
        assert ro.engine_logprobs == [c.logprobs for res in returned for c in res.completions]
    else:  # no ids from the Generator: the text tokenized, EOS appended when it stopped
        want_r = [tok("zz", add_special_tokens=False)["input_ids"] + ([1] if (i + k) % 2 == 0 else [])
                  for i in range(2) for k in range(2)]
        want_p = [tok(p)["input_ids"] for p in ("a b", "c") for _ in range(2)]
        assert ro.engine_logprobs == [None] * 4
    assert ro.response_ids == want_r and ro.prompt_ids == want_p
    assert ro.has_eos.tolist() == [True, False, False, True]
    seen = []
    real = ppo.policy_forward

    def spy(m, vh, batch, with_values=True):
        if with_values and m is model:
            P = batch["P"]
            for row, rm in zip(batch["input_ids"][:, P:].tolist(), batch["response_mask"].tolist()):
                seen.append([t for t, k in zip(row, rm) if k])
        return real(m, vh, batch, with_values)

    monkeypatch.setattr(ppo, "policy_forward", spy)
    vhead = torch.nn.Linear(32, 1)
    ev = ppo.evaluate(model, vhead, model, ro, cfg.batch_size, 0, "cpu")
    adv = ppo.advantages(torch.zeros(4), ev.logprobs, ev.ref_logprobs, ev.values, ev.mask, kl_coef=0.0)
    opt = torch.optim.SGD(list(model.parameters()) + list(vhead.parameters()), lr=0.0)
    seen.clear()
    ppo.update(model, vhead, opt, ro, ev, adv, cfg, 0, 0, "cpu")
    assert sorted(seen) == sorted(want_r)  # every sequence of the update, exactly the returned ids
    gap = ppo.engine_logprob_gap(ro, ev.logprobs)
    if with_ids:
        want = sum(abs(lp - float(ev.logprobs[i, t])) for i, lps in enumerate(ro.engine_logprobs)
                   for t, lp in enumerate(lps)) / sum(map(len, ro.engine_logprobs))
        assert gap == pytest.approx(want, rel=1e-5)
    else:
        assert gap is None


# -- training runs (engine tier) -----------------------------------------------------------------------------------

_TEXTS = ["the water is good", "list three tips", "why the sky", "helpful honest clear answer please", "a b c"]


class Scripted:
    """Fixed completions (no sampling), without ids: the runs below differ only by the options under test."""

    def __init__(self, path, seed):
        self.seed = seed

    def generate(self, reqs):
        return [GenerationResult(completions=[
            Completion(text=_TEXTS[(i * r.params.n + k + self.seed) % len(_TEXTS)],
                       finish_reason="stop" if (i + k) % 2 == 0 else "length", num_tokens=0)
            for k in range(r.params.n)]) for i, r in enumerate(reqs)]

    def close(self):
        pass


def letter_e(prompts, completions):
    return [sum(ch == "e" for ch in c) / max(1, len(c)) for c in completions]


PTX = ["explain the water cycle in three simple steps", "good sleep and food help health",
       "write a short poem about the river", "the city has a long history of music and art"]


@pytest.fixture(scope="module")
def small_policy(tmp_path_factory):
    from synthfb.llm.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("ppox") / "tiny64", hidden_size=64, num_heads=2, seed=2)


def _ptx_file(tmp_path):
    f = tmp_path / "ptx.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in PTX))
    return f


def _nll(model, tok, path):
    from synthfb.train.collate import load_rows

    ex = ppo.ptx_examples(load_rows(str(path)), tok, None)
    with torch.no_grad():
        s, n = ppo.ptx_nll(model, ex, tok.pad_token_id, next(model.parameters()).device)
    return float(s) / n


@pytest.mark.engine  # three short PPO runs on a tiny model
@pytest.mark.timeout(900)
def test_ptx_lowers_the_nll_on_the_ptx_data_against_gamma_zero(small_policy, tmp_path):
    ptx = _ptx_file(tmp_path)
    rows = [{"prompt": f"Give tips on {w}"} for w in "a b c d".split()]
    kw = dict(model=str(small_policy), dataset="-", device="cpu", reward_function="-:-", rollout_batch_size=4,
              samples_per_prompt=2, max_new_tokens=6, ppo_epochs=2, batch_size=4, learning_rate=1e-3, max_steps=3,
              seed=0, ptx_batch_size=len(PTX))

    def run(name, **extra):
        return ppo.train_ppo(PPOConfig(output_dir=str(tmp_path / name), **kw, **extra), rows, reward_fn=letter_e,
                             generator_factory=Scripted)

    plain = run("plain")
    zero = run("zero", ptx_dataset=str(ptx), ptx_coef=0.0)
    mixed = run("ptx", ptx_dataset=str(ptx), ptx_coef=1.0)
    sp, sz = plain["model"].state_dict(), zero["model"].state_dict()
    assert all(torch.equal(sp[k], sz[k]) for k in sp)  # gamma 0 is plain PPO, bit for bit
    assert "ptx_nll" not in plain["history"][0] and "ptx_nll" not in zero["history"][0]
    tok = plain["tokenizer"]
    from synthfb.train import loop

    start = loop.load_causal_lm(str(small_policy), PPOConfig(**{**kw, "output_dir": str(tmp_path / "x")}))
    nll0, nll_plain, nll_ptx = (_nll(m, tok, ptx) for m in (start, plain["model"], mixed["model"]))
    h = mixed["history"]
    # the first minibatch's ptx NLL is the start model's NLL on the whole ptx set (ptx_batch_size = all rows)
    assert h[0]["first_minibatch_ptx_nll"] == pytest.approx(nll0, rel=1e-4)
    assert all(x["ptx_loss"] == pytest.approx(1.0 * x["ptx_nll"]) for x in h)
    assert nll_ptx < nll_plain - 0.5 and nll_ptx < nll0 - 0.5, (nll0, nll_plain, nll_ptx)


@pytest.mark.engine  # PPO runs on a tiny model with a second (value) network
@pytest.mark.timeout(900)
def test_value_from_rm_with_ptx_and_running_norm_resumes_exactly(small_policy, tmp_path):
    from feedback_models import make_tiny_reward_model

    rm_path = make_tiny_reward_model(tmp_path / "rm", small_policy, seed=5)  # the policy's tokenizer
    rows = [{"prompt": f"Explain {w}"} for w in "a b c d".split()]
    kw = dict(model=str(small_policy), dataset="-", device="cpu", reward_model=str(rm_path), rollout_batch_size=4,
              max_new_tokens=4, ppo_epochs=1, batch_size=4, learning_rate=1e-3, max_steps=2, save_steps=1, seed=0,
              value_init="reward_model", ptx_dataset=str(_ptx_file(tmp_path)), ptx_coef=0.5, ptx_batch_size=3,
              score_normalization="running", score_clip=3.0)
    a = ppo.train_ppo(PPOConfig(output_dir=str(tmp_path / "a"), **kw), rows, generator_factory=Scripted)
    assert isinstance(a["value_head"], ppo.RewardValueModel)
    from synthfb.rank.reward_model import RewardScorer

    saved = torch.load(tmp_path / "a" / "value_head.pt")
    assert sorted(saved) == sorted("rm." + k for k in RewardScorer.from_pretrained(rm_path).model.state_dict())
    h = a["history"]
    assert all({"ptx_nll", "ptx_loss", "score_normalized_mean", "vf_loss"} <= set(x) for x in h)
    assert h[0]["score_normalized_mean"] == pytest.approx(0.0, abs=1e-5)  # the first rollout is its own statistics
    shutil.copytree(tmp_path / "a" / "checkpoint-1", tmp_path / "b" / "checkpoint-1")
    shutil.copy(tmp_path / "a" / ".synthfb.json", tmp_path / "b")
    b = ppo.train_ppo(PPOConfig(output_dir=str(tmp_path / "b"), resume=True, **kw), rows, generator_factory=Scripted)
    assert [x["step"] for x in b["history"]] == [2]
    for k in ("ptx_nll", "score_normalized_mean", "vf_loss", "pg_loss"):
        assert b["history"][-1][k] == pytest.approx(h[-1][k], rel=1e-5, abs=1e-7), k
    sa, sb = a["value_head"].state_dict(), b["value_head"].state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


@pytest.mark.timeout(600)
def test_transformers_backend_returns_the_sampled_ids(hf_tiny):
    from synthfb.llm.types import GenerationRequest, SamplingParams

    sp = SamplingParams(n=3, temperature=1.0, max_tokens=12)
    reqs = [GenerationRequest(prompt="Write a poem", params=sp),
            GenerationRequest(messages=[{"role": "user", "content": "Give tips"}], params=sp)]
    res = hf_tiny.generate(reqs)
    tok = hf_tiny.hf_tok
    assert [r.prompt_token_ids for r in res] == hf_tiny.tokenizer.context_ids(reqs)
    for r in res:
        for c in r.completions:
            assert len(c.token_ids) == c.num_tokens and c.logprobs is None
            assert tok.decode(c.token_ids, skip_special_tokens=True) == c.text
            assert (c.token_ids[-1] == tok.eos_token_id) == (c.finish_reason == "stop")


@pytest.mark.engine  # a vLLM engine
@pytest.mark.timeout(900)
def test_vllm_rollout_trains_on_the_engine_ids_and_logprobs(tiny_model, tmp_path, monkeypatch):
    """A PPO iteration through a vLLM engine: the engine returns ids and their log-probs, the update runs on
    exactly those ids, and the engine's log-probs match the trainer's for the same ids."""
    returned, seen = [], []
    cfg = PPOConfig(model=str(tiny_model), dataset="-", output_dir=str(tmp_path / "ppo"), reward_function="-:-",
                    rollout_backend="vllm", rollout_options={"max_model_len": 512}, rollout_batch_size=4,
                    samples_per_prompt=2, max_new_tokens=8, ppo_epochs=1, batch_size=8, learning_rate=1e-4,
                    max_steps=1, seed=0, device="cpu")

    def factory(path, seed):
        gen = ppo.default_generator_factory(cfg)(path, seed)
        inner = gen.generate

        def generate(reqs, desc=""):
            out = inner(reqs, desc)
            returned.extend((c, gen.llm.get_tokenizer()) for r in out for c in r.completions)
            return out

        gen.generate = generate
        return gen

    real = ppo.update

    def spy(model, value_head, opt, ro, *a, **k):
        seen.extend(ro.response_ids)
        return real(model, value_head, opt, ro, *a, **k)

    monkeypatch.setattr(ppo, "update", spy)
    rows = [{"prompt": [{"role": "user", "content": f"Explain {w}"}]} for w in "a b c d".split()]
    out = ppo.train_ppo(cfg, rows, reward_fn=letter_e, generator_factory=factory)
    assert len(returned) == 8
    for c, tok in returned:
        assert len(c.token_ids) == c.num_tokens and len(c.logprobs) == len(c.token_ids)
        # vLLM's incremental detokenizer holds back a trailing partial UTF-8 character (the random model
        # samples byte tokens): the text is the decoded ids up to that; one reason not to re-tokenize text
        assert tok.decode(c.token_ids, skip_special_tokens=True).rstrip("\ufffd") == c.text.rstrip("\ufffd")
        assert (c.token_ids[-1] == tok.eos_token_id) == (c.finish_reason == "stop")
    assert seen == [c.token_ids for c, _ in returned]
    h, = out["history"]
    assert h["engine_logprob_gap"] < 1e-3, h["engine_logprob_gap"]
    assert h["first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-5)
