"""PPO: GAE against a plain loop, score placement, first-minibatch ratio, learning, resume."""

from __future__ import annotations

import random
import shutil

import pytest
import torch

from synthfb.train.ppo import PPOConfig, compute_gae, masked_whiten, place_score, ppo_losses, rollout_batch, train_ppo


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


@pytest.mark.timeout(900)
def test_ppo_raises_programmatic_reward_with_bounded_kl(small_policy, tmp_path):
    prompts = [f"Write {w} please" for w in "a b c d e f g h i j k l m n o p".split()]
    cfg = PPOConfig(model=str(small_policy), dataset="-", output_dir=str(tmp_path / "ppo"), reward_function="-:-",
                    rollout_backend="transformers", rollout_batch_size=16, samples_per_prompt=4, max_new_tokens=6,
                    ppo_epochs=4, batch_size=32, learning_rate=1e-3, kl_coef=0.02, max_steps=10, seed=0)
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
