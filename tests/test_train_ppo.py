"""PPO: GAE against a plain loop, score placement, the advantages step, first-minibatch ratio,
pinned numbers of a scripted run, learning, resume."""

from __future__ import annotations

import random
import shutil

import pytest
import torch

from synthfb.train.ppo import (PPOConfig, advantages, compute_gae, masked_whiten, place_score, ppo_losses, rollout_batch,
                               train_ppo)


def _gae_loop(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list[float], list[float]]:
    """Textbook GAE for one finished episode (value after the end is 0)."""
    T = len(rewards)
    adv = [0.0] * T
    last = 0.0
    for t in reversed(range(T)):
        nv = values[t + 1] if t + 1 < T else 0.0
        delta = rewards[t] + gamma * nv - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, [a + v for a, v in zip(adv, values)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_equals_python_loop(gamma, lam):
    rng = random.Random(0)
    lengths = [5, 1, 3, 7]
    T = max(lengths) + 2  # extra right padding
    rewards = torch.zeros(len(lengths), T, dtype=torch.float64)
    values = torch.randn(len(lengths), T, dtype=torch.float64)  # garbage in the padding too
    mask = torch.zeros(len(lengths), T)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        for t in range(n):
            rewards[i, t] = rng.uniform(-1, 1)
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        a, r = _gae_loop(rewards[i, :n].tolist(), values[i, :n].tolist(), gamma, lam)
        assert adv[i, :n].tolist() == pytest.approx(a, abs=1e-12)
        assert ret[i, :n].tolist() == pytest.approx(r, abs=1e-12)
        assert adv[i, n:].abs().sum() == 0 and ret[i, n:].abs().sum() == 0


def test_whitening_uses_only_real_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).float()
    w = masked_whiten(x, m)
    real = w[m.bool()]
    assert real.mean().abs() < 1e-6 and (real.pow(2).mean() - 1).abs() < 1e-4
    assert w[~m.bool()].abs().sum() == 0


@pytest.mark.parametrize("pad_equals_eos", [False, True])
def test_score_lands_on_eos_for_any_padding(pad_equals_eos):
    eos = 2
    pad_id = eos if pad_equals_eos else 3
    prompts = [[10, 11, 12], [13], [14, 15]]
    responses = [[20, 21, eos], [22, eos], [23, 24, 25, 26]]  # the last one hit max tokens, no EOS
    for extra in range(0, 5):
        rs = responses + [[30] * (4 + extra) + [eos]]  # a longer row forces more padding on the others
        ps = prompts + [[16] * (1 + extra)]
        b = rollout_batch(ps, rs, pad_id)
        P = b["P"]
        scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
        r = place_score(torch.zeros(b["response_mask"].shape), scores, b["response_mask"].float())
        for i, resp in enumerate(rs):
            nz = r[i].nonzero().flatten().tolist()
            assert nz == [len(resp) - 1], (extra, i, nz)
            assert r[i, nz[0]] == scores[i]
            tok = int(b["input_ids"][i, P + nz[0]])
            assert tok == resp[-1]
            if resp[-1] == eos:
                assert tok == eos
            assert b["attention_mask"][i, P + nz[0]] == 1  # never a pad position


def test_ppo_losses_ratio_one_means_no_clipping():
    lp = torch.randn(3, 4)
    adv = torch.randn(3, 4)
    v = torch.randn(3, 4)
    m = torch.ones(3, 4)
    pg, vf, st = ppo_losses(lp, lp.clone(), adv, v, v.clone(), v + 1, m, 0.2, 0.2)
    assert st["clipfrac"] == 0 and st["ratio"] == pytest.approx(12.0) and st["ratio_max_dev"] == 0
    assert float(pg) == pytest.approx(float(-adv.sum()), abs=1e-5)
    assert float(vf) == pytest.approx(0.5 * 12, abs=1e-5)
    # a ratio beyond the clip with positive advantage is clipped
    _, _, st2 = ppo_losses(lp + 1.0, lp, torch.ones(3, 4), v, v, v, m, 0.2, 0.2)
    assert st2["clipfrac"] == pytest.approx(12.0)


@pytest.mark.parametrize("whiten", [True, False])
def test_advantages_step_is_kl_shaped_reward_then_gae(whiten):
    """advantages(): r_t = -kl_coef * (lp - ref) + score at the last real token; GAE on that;
    returns taken before whitening; nothing outside the mask."""
    torch.manual_seed(0)
    lengths = [4, 1, 6]
    mask = torch.zeros(3, 7)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    lp, ref, v = torch.randn(3, 7), torch.randn(3, 7), torch.randn(3, 7)
    scores = torch.tensor([1.5, -0.5, 0.25])
    a = advantages(scores, lp, ref, v, mask, kl_coef=0.1, gamma=0.99, lam=0.9, whiten=whiten)
    for i, n in enumerate(lengths):
        kl = (lp[i, :n] - ref[i, :n]).tolist()
        r = [-0.1 * k for k in kl]
        r[-1] += float(scores[i])
        assert a.kl[i, :n].tolist() == pytest.approx(kl, abs=1e-6)
        assert a.rewards[i, :n].tolist() == pytest.approx(r, abs=1e-6)
        adv, ret = _gae_loop(r, v[i, :n].tolist(), 0.99, 0.9)
        assert a.returns[i, :n].tolist() == pytest.approx(ret, abs=1e-5)
        if not whiten:
            assert a.advantages[i, :n].tolist() == pytest.approx(adv, abs=1e-5)
        for t in (a.kl, a.rewards, a.advantages, a.returns):
            assert t[i, n:].abs().sum() == 0
    if whiten:
        raw, _ = compute_gae(a.rewards, v * mask, mask, 0.99, 0.9)
        assert torch.allclose(a.advantages, masked_whiten(raw, mask), atol=1e-6)


@pytest.fixture(scope="module")
def small_policy(tmp_path_factory):
    from synthfb.llm.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("ppo") / "tiny64", hidden_size=64, num_heads=2, seed=2)


def letter_e(prompts, completions):
    return [sum(ch == "e" for ch in c) / max(1, len(c)) for c in completions]


def _mean_reward(path, prompts, n=4, seed=123):
    from synthfb.llm.hf_backend import TransformersGenerator
    from synthfb.llm.types import GenerationRequest, SamplingParams

    gen = TransformersGenerator(str(path), seed=seed, progress=False, batch_size=64)
    sp = SamplingParams(n=n, temperature=1.0, max_tokens=6)
    res = gen.generate([GenerationRequest(prompt=p, params=sp) for p in prompts])
    texts = [c.text for r in res for c in r.completions]
    return sum(letter_e(None, texts)) / len(texts)


@pytest.mark.engine  # rollouts on the transformers backend
@pytest.mark.timeout(900)
def test_ppo_raises_programmatic_reward_with_bounded_kl(small_policy, tmp_path):
    prompts = [f"Write {w} please" for w in "a b c d e f g h i j k l m n o p".split()]
    cfg = PPOConfig(model=str(small_policy), dataset="-", output_dir=str(tmp_path / "ppo"), reward_function="-:-",
                    rollout_backend="transformers", rollout_batch_size=16, samples_per_prompt=4, max_new_tokens=6,
                    ppo_epochs=4, batch_size=32, learning_rate=2e-3, kl_coef=0.02, max_steps=10, seed=0)
    out = train_ppo(cfg, [{"prompt": p} for p in prompts], reward_fn=letter_e)
    hist = out["history"]
    assert [h["step"] for h in hist] == list(range(1, 11))
    for h in hist:  # rollout log-probs are reproduced exactly by the first minibatch
        assert h["first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-5)
        assert h["first_minibatch_ratio_max_dev"] < 1e-4
        assert h["first_minibatch_clipfrac"] == 0.0
        assert {"kl", "score_mean", "reward_mean", "clipfrac", "pg_loss", "vf_loss"} <= set(h)
    before = _mean_reward(small_policy, prompts)
    after = _mean_reward(tmp_path / "ppo", prompts)
    assert after > before + 0.04, (before, after)
    assert max(h["kl"] for h in hist) < 6.0
    assert (tmp_path / "ppo" / "metrics.jsonl").read_text().count("\n") == 10
    assert (tmp_path / "ppo" / "model.safetensors").exists() and (tmp_path / "ppo" / "value_head.pt").exists()


@pytest.mark.engine  # rollouts on the transformers backend
@pytest.mark.timeout(600)
def test_ppo_resume_matches_uninterrupted_run(small_policy, tmp_path):
    rows = [{"prompt": f"Explain {w}"} for w in "a b c d".split()]
    kw = dict(model=str(small_policy), dataset="-", reward_function="-:-", rollout_backend="transformers",
              rollout_batch_size=4, max_new_tokens=4, ppo_epochs=1, batch_size=4, learning_rate=1e-3,
              max_steps=2, save_steps=1, seed=0)
    a = train_ppo(PPOConfig(output_dir=str(tmp_path / "a"), **kw), rows, reward_fn=letter_e)
    shutil.copytree(tmp_path / "a" / "checkpoint-1", tmp_path / "b" / "checkpoint-1")
    shutil.copy(tmp_path / "a" / ".synthfb.json", tmp_path / "b")  # a killed training keeps its folder's marker
    b = train_ppo(PPOConfig(output_dir=str(tmp_path / "b"), resume=True, **kw), rows, reward_fn=letter_e)
    assert [h["step"] for h in b["history"]] == [2]
    assert b["history"][-1]["score_mean"] == pytest.approx(a["history"][-1]["score_mean"])
    sa, sb = a["model"].state_dict(), b["model"].state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)
    assert torch.allclose(a["value_head"].weight, b["value_head"].weight, atol=1e-6)


@pytest.mark.engine  # rollouts on a vLLM engine
@pytest.mark.timeout(600)
def test_ppo_rollouts_through_vllm_from_the_saved_policy(small_policy, tmp_path):
    """The default rollout path: each iteration saves the policy and a real vLLM
    engine samples from that folder; the completions it returns are the ones scored."""
    from synthfb.train.ppo import default_generator_factory

    rows = [{"prompt": [{"role": "user", "content": f"Explain {w}"}]} for w in "a b c d".split()]
    cfg = PPOConfig(model=str(small_policy), dataset="-", output_dir=str(tmp_path / "ppo"), reward_function="-:-",
                    rollout_backend="vllm", rollout_options={"max_model_len": 512}, rollout_batch_size=4,
                    samples_per_prompt=2, max_new_tokens=6, ppo_epochs=1, batch_size=8, learning_rate=1e-3,
                    max_steps=1, seed=0)
    made, scored = [], []

    def factory(path, seed):
        gen = default_generator_factory(cfg)(path, seed)
        made.append((type(gen).__name__, gen.info.path, gen.info.revision, seed))
        return gen

    def reward(prompts, completions):
        scored.extend(completions)
        return letter_e(prompts, completions)

    out = train_ppo(cfg, rows, reward_fn=reward, generator_factory=factory)
    from synthfb.llm.models import model_revision

    (name, path, revision, seed), = made
    assert name == "VLLMGenerator" and path == str(tmp_path / "ppo" / "rollout-policy") and seed == 0
    assert revision != "unknown"
    h, = out["history"]
    assert len(scored) == 8 and h["response_length"] > 0 and h["kl"] == 0.0  # first rollout: policy == reference
    assert h["first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-5) and h["first_minibatch_clipfrac"] == 0.0
    assert model_revision(str(tmp_path / "ppo")) != model_revision(str(small_policy))


# -- pinned numbers ---------------------------------------------------------------
_TEXTS = ["the water is good", "list three tips", "why the sky", "", "helpful honest clear answer please",
          "explain", "a b c", "sleep well and exercise"]


class _Scripted:
    """A Generator with fixed completions (no sampling): the pinned numbers below
    depend on the PPO math only, not on a sampler. Even samples stop, odd ones hit max tokens."""

    def __init__(self, path, seed):
        self.seed = seed

    def generate(self, reqs):
        from synthfb.llm.types import Completion, GenerationResult

        return [GenerationResult(completions=[
            Completion(text=_TEXTS[(i * r.params.n + k + self.seed) % len(_TEXTS)],
                       finish_reason="stop" if (i + k) % 2 == 0 else "length", num_tokens=0)
            for k in range(r.params.n)]) for i, r in enumerate(reqs)]

    def close(self):
        pass


_KEYS = ("score_mean", "score_std", "reward_mean", "kl", "response_length", "eos_fraction", "pg_loss", "vf_loss",
         "clipfrac", "ratio", "approx_kl", "entropy")
# recorded with the single-function train_ppo before it was split into rollout/score/evaluate/advantages/update
_PINNED = {
    "rm_str": ([
        (0.03593733, 0.12945232, -0.46406266, 0.0, 4.625, 0.5, 0.35768711, 0.16036524, 0.26339286, 0.93806413,
         0.02415179, 6.45557551),
        (0.04925288, 0.15561135, -0.37819517, -1.4510386, 4.5, 0.5, 0.17007732, 0.1177816, 0.05555556, 0.97216765,
         0.00309699, 6.45536804)], (0.03616876891464926, -0.005414686165750027)),
    "letter_e_chat": ([
        (0.11526085, 0.08718251, 0.11526085, 0.0, 4.625, 0.5, -0.05705331, 0.0068183, 0.24032738, 1.04648191,
         0.02088666, 6.45489069),
        (0.10017826, 0.07536883, 0.09494713, 0.1046226, 4.5, 0.5, -0.03146769, 0.00024693, 0.0, 0.98835283,
         0.00212671, 6.45457882)], (-0.065674237877829, 0.004673963412642479)),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", sorted(_PINNED))
def test_ppo_numbers_of_a_scripted_run_are_pinned(case, small_policy, tiny_model, tmp_path_factory, tmp_path):
    """Two PPO iterations on fixed completions give the numbers the pre-refactor trainer
    gave (reward-model path with string prompts, EOS penalty, grad_accum 2, no whitening;
    and a Python reward with chat prompts and whitening)."""
    from feedback_models import make_tiny_reward_model

    kw = dict(model=str(small_policy), dataset="-", output_dir=str(tmp_path / "ppo"), device="cpu",
              rollout_batch_size=4, samples_per_prompt=2, max_new_tokens=6, ppo_epochs=2, batch_size=4,
              learning_rate=1e-3, kl_coef=0.05, max_steps=2, seed=0)
    if case == "rm_str":
        rm = make_tiny_reward_model(tmp_path_factory.mktemp("rm") / "tiny-rm", tiny_model)
        cfg = PPOConfig(**{**kw, "batch_size": 2, "grad_accum": 2}, reward_model=str(rm), whiten_advantages=False,
                        missing_eos_penalty=1.0)
        out = train_ppo(cfg, [{"prompt": f"Explain {w}"} for w in "a b c d e f".split()], generator_factory=_Scripted)
    else:
        cfg = PPOConfig(**kw, reward_function="-:-")
        rows = [{"prompt": [{"role": "user", "content": f"Give tips on {w}"}]} for w in "a b c d e f".split()]
        out = train_ppo(cfg, rows, reward_fn=letter_e, generator_factory=_Scripted)
    steps, vhead = _PINNED[case]
    assert [h["step"] for h in out["history"]] == [1, 2]
    for h, want in zip(out["history"], steps):
        assert [h[k] for k in _KEYS] == pytest.approx(list(want), rel=1e-3, abs=1e-6), h
        assert h["first_minibatch_ratio"] == pytest.approx(1.0, abs=1e-5)
    got = [float(out["value_head"].weight.double().sum()), float(out["value_head"].bias.double().sum())]
    assert got == pytest.approx(list(vhead), rel=1e-3, abs=1e-6)
