"""synthfb.train.losses: each objective against its paper's formula computed by hand, and each new
loss_type (plus KTO) learning the toy preferences on a tiny model.

Hand values use plain Python floats (math.log, math.exp) on the same numbers,
never the functions under test. The golden pair of methods-2.md §6.2:
s_w = -10, s_l = -12, |y_w| = 5, |y_l| = 4, reference -11 / -11.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from synthfb.train import losses as L


def _t(*x):
    return torch.tensor(x, dtype=torch.float64)


def _sig(x):
    return 1 / (1 + math.exp(-x))


def _logsig(x):
    return math.log(_sig(x))


SW, SL, NW, NL, RW, RL = -10.0, -12.0, 5.0, 4.0, -11.0, -11.0
G = dict(chosen_logps=_t(SW), rejected_logps=_t(SL))
GL = dict(G, chosen_lengths=_t(NW), rejected_lengths=_t(NL))
GR = dict(ref_chosen_logps=_t(RW), ref_rejected_logps=_t(RL))


def test_spec_golden_values():
    # methods-2.md §6.2: DPO (beta 0.1) = -log sigmoid(0.2) = 0.5981; SimPO (beta 2, gamma 1): a_w = -2, a_l = -3
    assert L.sigmoid_loss(_t(SW), _t(SL), _t(RW), _t(RL), 0.1).item() == pytest.approx(0.5981, abs=1e-4)
    assert L.simpo_loss(**GL, beta=2.0, gamma=1.0).item() == pytest.approx(0.3133, abs=1e-4)


def test_rrhf_hand_value():
    # a_w = -2, a_l = -3: ranking term max(0, 2 - 3) = 0; SFT term -lam * s_w
    assert L.rrhf_loss(**GL, lam=0.5).item() == pytest.approx(0 + 0.5 * 10, abs=1e-12)
    # reversed lengths order the means the other way: a_w = -10/4, a_l = -12/5 -> max(0, 2.5 - 2.4) = 0.1
    v = L.rrhf_loss(chosen_logps=_t(SW), rejected_logps=_t(SL), chosen_lengths=_t(4.0), rejected_lengths=_t(5.0),
                    lam=0.1).item()
    assert v == pytest.approx(max(0.0, 10 / 4 - 12 / 5) + 0.1 * 10, abs=1e-12)


def test_slic_hand_value():
    # max(0, delta - s_w + s_l) - lam s_w = max(0, 1 + 10 - 12) + 0.1 * 10 = 1.0; delta 3 -> 1 + 1
    assert L.slic_loss(**G, delta=1.0, lam=0.1).item() == pytest.approx(1.0, abs=1e-12)
    assert L.slic_loss(**G, delta=3.0, lam=0.1).item() == pytest.approx(1.0 + 1.0, abs=1e-12)


def test_cpo_hand_value():
    want = -_logsig(0.1 * SW - 0.1 * SL) - 1.0 * SW  # -log sigmoid(0.2) + 10
    assert L.cpo_loss(**G, beta=0.1, lam=1.0).item() == pytest.approx(want, abs=1e-12)
    assert L.cpo_loss(**G, beta=0.1, lam=0.0).item() == pytest.approx(-_logsig(0.2), abs=1e-12)


def test_orpo_hand_value():
    pw, pl = math.exp(SW / NW), math.exp(SL / NL)
    log_odds = math.log(pw / (1 - pw)) - math.log(pl / (1 - pl))
    for lam in (0.1, 1.0):
        want = -math.log(pw) - lam * _logsig(log_odds)
        assert L.orpo_loss(**GL, lam=lam).item() == pytest.approx(want, abs=1e-12)
    # the log-odds stay finite near p = 1 (a mean log-prob of -1e-8) and far from it
    near = L.orpo_loss(chosen_logps=_t(-1e-8), rejected_logps=_t(-50.0), chosen_lengths=_t(1.0),
                       rejected_lengths=_t(1.0), lam=1.0)
    assert torch.isfinite(near).all()
    assert near.item() == pytest.approx(1e-8 - _logsig(math.log(1 / 1e-8) - math.log(math.exp(-50))), rel=1e-6)


def test_rdpo_hand_value_and_sign():
    h = (SW - RW) - (SL - RL)  # = 2
    for alpha in (0.0, 0.05, 1.0):
        want = -_logsig(0.1 * h + (alpha * NW - alpha * NL))  # the plus of Park et al. 2024
        v = L.rdpo_loss(**GL, **GR, beta=0.1, alpha=alpha).item()
        assert v == pytest.approx(want, abs=1e-12)
    # alpha = 0 is DPO; a longer chosen response lowers the loss (it already earns margin)
    assert L.rdpo_loss(**GL, **GR, beta=0.1, alpha=0.0).item() == pytest.approx(
        L.sigmoid_loss(_t(SW), _t(SL), _t(RW), _t(RL), 0.1).item(), abs=1e-12)
    assert L.rdpo_loss(**GL, **GR, beta=0.1, alpha=1.0).item() < L.rdpo_loss(**GL, **GR, beta=0.1, alpha=0.0).item()


def test_kto_hand_values_and_kl_estimate():
    pol, ref = _t(-10.0, -12.0, -7.0), _t(-11.0, -11.0, -7.0)
    des = torch.tensor([True, False, True])
    kl, beta, lw, ll = 0.3, 0.1, 1.0, 1.33
    got = L.kto_loss(policy_logps=pol, ref_logps=ref, desirable=des, kl=kl, beta=beta, lambda_w=lw, lambda_l=ll)
    want = [lw * (1 - _sig(beta * 1.0 - beta * kl)), ll * (1 - _sig(beta * kl - beta * -1.0)),
            lw * (1 - _sig(beta * 0.0 - beta * kl))]
    assert got.tolist() == pytest.approx(want, abs=1e-12)
    # policy == reference: every row's loss is lambda / 2 (methods-2.md §0)
    z = L.kto_loss(policy_logps=ref, ref_logps=ref, desirable=des, kl=0.0, beta=0.1, lambda_w=1.0, lambda_l=2.0)
    assert z.tolist() == pytest.approx([0.5, 1.0, 0.5], abs=1e-12)
    # the reference point: mean mismatched log-ratio, detached, clamped at 0
    kl_lp = _t(-5.0, -6.0).requires_grad_()
    est = L.kto_kl(kl_lp, _t(-5.5, -5.0))
    assert ((-5.0 + 5.5) + (-6.0 + 5.0)) / 2 < 0 and est.item() == 0.0  # raw mean -0.25, clamped at 0
    assert not est.requires_grad
    assert L.kto_kl(_t(-5.0, -4.0), _t(-5.5, -5.0)).item() == pytest.approx((0.5 + 1.0) / 2, abs=1e-12)


def test_hinge_is_rso_hinge_not_slic():
    # relu(1 - beta h), h = 2: 0.8 at beta 0.1; SLiC-HF on the same numbers is a different value
    assert L.hinge_loss(_t(SW), _t(SL), _t(RW), _t(RL), 0.1).item() == pytest.approx(0.8, abs=1e-12)
    assert L.slic_loss(**G, delta=1.0, lam=0.0).item() == pytest.approx(0.0, abs=1e-12)  # 1 - 2 < 0


def test_ipo_length_normalised_as_trl():
    # (rho_w/|y_w| - rho_l/|y_l| - 1/(2 beta))^2 = (1/5 + 1/4 - 5)^2
    v = L.ipo_loss(_t(SW), _t(SL), _t(RW), _t(RL), 0.1, _t(NW), _t(NL)).item()
    assert v == pytest.approx((1 / 5 + 1 / 4 - 5) ** 2, abs=1e-12)
    assert L.ipo_loss(_t(SW), _t(SL), _t(RW), _t(RL), 0.1).item() == pytest.approx((2 - 5) ** 2, abs=1e-12)


@pytest.mark.parametrize("name", ["rrhf", "slic", "cpo", "orpo", "simpo"])
def test_reference_free_gradients_raise_chosen_lower_rejected(name):
    """Descent on each reference-free objective raises log pi(y_w) and (where the ranking term is active)
    lowers log pi(y_l): the sign a preference loss must have."""
    pc, pr = _t(-12.0).requires_grad_(), _t(-10.0).requires_grad_()  # mis-ordered pair: every ranking term active
    n = dict(chosen_lengths=_t(5.0), rejected_lengths=_t(5.0))
    kw = {"rrhf": dict(n, lam=0.1), "slic": dict(delta=1.0, lam=0.1), "cpo": dict(beta=0.1, lam=0.1),
          "orpo": dict(n, lam=1.0), "simpo": dict(n, beta=2.0, gamma=1.0)}[name]
    getattr(L, f"{name}_loss")(chosen_logps=pc, rejected_logps=pr, **kw).sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()


def test_shapes_are_per_example():
    B = 7
    g = torch.Generator().manual_seed(0)
    s = lambda: -torch.rand(B, generator=g, dtype=torch.float64) * 20 - 1  # noqa: E731
    n = lambda: torch.randint(1, 9, (B,), generator=g).double()  # noqa: E731
    a = dict(chosen_logps=s(), rejected_logps=s())
    al = dict(a, chosen_lengths=n(), rejected_lengths=n())
    outs = [L.rrhf_loss(**al, lam=1.0), L.slic_loss(**a, delta=1.0, lam=0.1), L.cpo_loss(**a, beta=0.1, lam=1.0),
            L.orpo_loss(**al, lam=0.1), L.rdpo_loss(**al, ref_chosen_logps=s(), ref_rejected_logps=s(), beta=0.1,
                                                   alpha=0.05),
            L.simpo_loss(**al, beta=2.0, gamma=1.0),
            L.kto_loss(policy_logps=s(), ref_logps=s(), desirable=torch.rand(B, generator=g) > 0.5, kl=0.1,
                       beta=0.1, lambda_w=1.0, lambda_l=1.0)]
    assert all(o.shape == (B,) and torch.isfinite(o).all() for o in outs)


def test_config_defaults_follow_the_papers():
    from synthfb.train.dpo import DPOConfig

    simpo = DPOConfig(model="m", dataset="d", output_dir="o", loss_type="simpo")
    assert simpo.beta_value == 2.0 and simpo.simpo_gamma_value / simpo.beta_value == pytest.approx(0.5)
    assert DPOConfig(model="m", dataset="d", output_dir="o").beta_value == 0.1
    assert DPOConfig(model="m", dataset="d", output_dir="o", loss_type="simpo", beta=2.5).simpo_gamma_value == 1.25
    assert not simpo.needs_reference and DPOConfig(model="m", dataset="d", output_dir="o",
                                                   loss_type="rdpo").needs_reference
    with pytest.raises(ValueError, match="label_smoothing.*loss_type 'orpo'"):
        DPOConfig(model="m", dataset="d", output_dir="o", loss_type="orpo", label_smoothing=0.1).check()


# -- learning: each new objective, and KTO, on the tiny model ----------------------------------------------------

from test_train_rm import pairs  # noqa: E402 - the toy preference task the trainer tests share


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from synthfb.llm.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("losses") / "tiny64", hidden_size=64, num_heads=2, seed=5)


@pytest.mark.engine  # trains a tiny model (~20 s each on 2 cores)
@pytest.mark.timeout(600)
@pytest.mark.parametrize("loss_type", ["rrhf", "slic", "cpo", "orpo", "rdpo", "simpo"])
def test_new_loss_types_learn_through_the_cli(small, tmp_path, loss_type):
    """`synthfb train dpo --set loss_type=X` on the toy pairs: the loss falls and the pairs end up ranked
    right; reference-free types write no reference cache (no reference model ran)."""
    import json

    import yaml

    from synthfb.train.cli import main
    from synthfb.train.dpo import DPOConfig, build_examples, preference_accuracy

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs(32, 2)))
    out = tmp_path / loss_type
    conf = tmp_path / "dpo.yaml"
    conf.write_text(yaml.safe_dump({"model": str(small), "dataset": str(data), "output_dir": str(out),
                                    "batch_size": 8, "learning_rate": 1e-3, "lr_scheduler": "constant",
                                    # the summed-log-prob objectives (their NLL / hinge terms) need more steps here
                                    "max_steps": 24 if loss_type in ("slic", "cpo") else 12,
                                    "loss_type": loss_type}))
    assert main(["train", "dpo", "--config", str(conf)]) == 0
    hist = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert hist[-1]["reward_accuracy"] > hist[0]["reward_accuracy"]
    assert bool(list(out.glob("ref_logps-*.pt"))) == (loss_type == "rdpo")
    from synthfb.train import loop

    cfg = DPOConfig(model=str(small), dataset=str(data), output_dir=str(out), loss_type=loss_type)
    tok = loop.load_tokenizer(str(out))
    trained = loop.load_causal_lm(str(out), cfg)
    ex = build_examples(cfg, tok, pairs(32, 2))
    if cfg.needs_reference:
        from synthfb.train.dpo import reference_logps

        logps, _ = reference_logps(cfg, ex, tok)  # the cached pass of the run (reference = the start model)
        for e, (c, r) in zip(ex, logps.tolist()):
            e["ref_chosen"], e["ref_rejected"] = c, r
    # the starting model (for rdpo the reference itself: every implicit reward 0, no pair ranked right)
    before = preference_accuracy(loop.load_causal_lm(str(small), cfg), tok, ex, cfg)
    after = preference_accuracy(trained, tok, ex, cfg)
    assert after >= 0.9 and after > before


@pytest.mark.engine  # trains a tiny model
@pytest.mark.timeout(600)
def test_kto_learns_from_unpaired_rows(small, tmp_path):
    """KTO on unpaired prompt/completion/label rows: step 1 is exactly 0.5 per row (policy = reference, KL 0),
    the loss falls, desirable completions' log-ratios rise and undesirable ones fall."""
    from synthfb.train.kto import KTOConfig, label_accuracy, train_kto

    rows = [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
            for i, p in enumerate(pairs(32, 4)) for k in (("chosen",) if i % 2 else ("rejected",))]
    random.Random(0).shuffle(rows)
    cfg = KTOConfig(model=str(small), dataset="-", output_dir=str(tmp_path / "kto"), batch_size=8,
                    learning_rate=1e-3, lr_scheduler="constant", max_steps=12)
    out = train_kto(cfg, rows)
    hist = out["history"]
    assert hist[0]["loss"] == pytest.approx(0.5, abs=1e-5) and hist[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.02
    assert hist[-1]["signed_reward"] > 0
    assert label_accuracy(out["model"], out["tokenizer"], out["examples"]) >= 0.9


@pytest.mark.engine  # trains a tiny model
@pytest.mark.timeout(600)
def test_loop_round_trains_kto_on_its_pairs(small, tmp_path):
    """`method: kto` in a loop file: a round's training step reads the round's prompt/chosen/rejected pairs,
    splits them into desirable/undesirable rows and records the registry's KTO metrics."""
    from pathlib import Path

    import datasets

    from synthfb.llm.models import model_revision
    from synthfb.loop import load_loop
    from synthfb.loop.train import prepare_training, train_round

    repo = Path(__file__).resolve().parent.parent
    text = (repo / "pipelines" / "rlaif_tiny.yaml").read_text().replace("\ntrain:", "\nmethod: kto\nkto:", 1)
    text = text.replace("prompts: data/", f"prompts: {repo}/pipelines/data/")
    f = tmp_path / "loop.yaml"
    f.write_text(text)
    cfg = load_loop(f)
    assert cfg.method == "kto" and [s.name for s in cfg.steps] == ["kto"]
    ds = tmp_path / "pairs"
    datasets.Dataset.from_list(pairs(8, 7)).save_to_disk(str(ds))
    rdir = tmp_path / "round-00"
    rdir.mkdir()
    setup = prepare_training(cfg, tmp_path, str(small))
    got = train_round(cfg, setup, str(small), model_revision(str(small)),
                      {"dataset": str(ds), "fingerprint": "p0", "pairs_built": 8, "counts": {}}, [], rdir, lambda m: None)
    assert got["method"] == "kto" and got["steps"] == cfg.sections["kto"]["max_steps"]
    assert got["first_loss"] == pytest.approx(0.5, abs=1e-5)  # policy == reference at step 1
    assert {"final_kl", "final_label_accuracy", "label_accuracy"} <= set(got)
    assert (rdir / "checkpoint" / "config.json").exists() and (rdir / "kto.json").exists()


def test_kto_rows_unpaired_as_trl_and_balance_warning():
    from synthfb.data.io import InputError
    from synthfb.train.kto import KTOConfig, check_balance, unpair_rows

    rows = [{"prompt": "p0", "chosen": "a", "rejected": "b", "extra": 1}, {"prompt": "p1", "chosen": "c", "rejected": "d"}]
    u = unpair_rows(rows)
    assert [(x["pair"]["prompt"], x["side"], x["label"]) for x in u] == [
        ("p0", "chosen", True), ("p1", "chosen", True), ("p0", "rejected", False), ("p1", "rejected", False)]
    flat = unpair_rows([{"prompt": "p", "completion": "c", "label": False}])
    assert flat[0]["label"] is False
    with pytest.raises(InputError, match=r"row 1: `label` must be a bool"):
        unpair_rows([{"prompt": "p", "completion": "c", "label": True}, {"prompt": "p", "completion": "c", "label": "y"}])
    with pytest.raises(InputError, match=r"row 0: KTO rows need .*missing `label`"):
        unpair_rows([{"prompt": "p", "completion": "c"}])
    cfg = KTOConfig(model="m", dataset="d", output_dir="o")
    ex = [{"label": True}] * 2 + [{"label": False}] * 6
    assert "recommends [1, 4/3]" in check_balance(cfg, ex) and "[3.00, 4.00]" in check_balance(cfg, ex)
    assert check_balance(KTOConfig(model="m", dataset="d", output_dir="o", desirable_weight=3.5), ex) is None
    assert check_balance(cfg, [{"label": True}] * 4 + [{"label": False}] * 4) is None
