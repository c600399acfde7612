"""Our preference objectives against TRL 1.16's, on the same batch and the same tiny models.

For each objective TRL implements (DPO sigmoid/IPO/hinge, SimPO and CPO in
``CPOTrainer``, ORPO in ``ORPOTrainer``, KTO in ``KTOTrainer``) a real TRL
trainer is built on a tiny random policy (and a *different* tiny reference,
so log-ratios are not zero), TRL collates a batch and computes its loss, and
our trainer's loss (``synthfb.train.dpo.dpo_task`` / ``synthfb.train.kto``,
i.e. ``sequence_logps`` + :mod:`synthfb.train.losses`) runs on the same token
ids. Where TRL deviates from the paper the test states the relation exactly:

- CPO: TRL's NLL term is a token-mean over the batch's chosen tokens, ours
  (the paper's) a per-example sum; equal when lam = cpo_alpha * B / tokens.
- ORPO: TRL's NLL runs over prompt + response tokens; ours (the paper's) over
  the response. The odds-ratio terms are equal; the NLL gap is computed here
  independently and closes the difference.
- SimPO needs ``cpo_alpha=0`` in TRL (its default 1.0 adds an NLL term).
- IPO: TRL length-normalises the log-ratios (not in the paper); our trainer
  does the same, so the losses are equal.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("trl")
# slow tier: each test builds a TRL trainer (dataset maps, accelerate) and runs tiny models (3-10 s each)
pytestmark = pytest.mark.engine

ROWS = [
    {"prompt": "write a list", "chosen": " good clear", "rejected": " bad art long"},
    {"prompt": "explain the river", "chosen": " helpful honest words", "rejected": " short"},
    {"prompt": "give three tips", "chosen": " water sleep food", "rejected": " art"},
]
TOL = 1e-5
# TRL 1.16 configs default to bf16 autocast (accelerate wraps the reference model's forward in it); compare in float32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from synthfb.llm.tiny import make_tiny_model

    d = tmp_path_factory.mktemp("parity")
    return (make_tiny_model(d / "policy", hidden_size=64, num_heads=2, seed=5),
            make_tiny_model(d / "reference", hidden_size=64, num_heads=2, seed=6))


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _common(tmp_path, **kw):
    return dict(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(ROWS), report_to="none",
                use_cpu=True, max_length=64, bf16=False, **kw)


def _ds(rows):
    from datasets import Dataset

    return Dataset.from_list(rows)


def _ours(loss_type, policy_path, **fields):
    from synthfb.train.dpo import DPOConfig, dpo_task

    cfg = DPOConfig(model=str(policy_path), dataset="-", output_dir="-", loss_type=loss_type, **fields)
    return cfg, dpo_task(_tok(policy_path), cfg)


@torch.no_grad()
def _seq(model, ids, mask, loss_mask):
    from synthfb.train.logprobs import sequence_logps

    return sequence_logps(model, ids, mask, loss_mask)


def _our_mean(task, model, b) -> torch.Tensor:
    with torch.no_grad():
        total, _ = task.loss(model, b)
    return total / task.count(b)


# -- DPO trainer: sigmoid, IPO, hinge ---------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type,beta", [("ipo", 0.1), ("ipo", 0.5), ("sigmoid", 0.1), ("hinge", 0.1)])
def test_dpo_trainer_losses_match_trl(models, tmp_path, loss_type, beta):
    from trl import DPOConfig, DPOTrainer

    pol_path, ref_path = models
    policy, ref = _load(pol_path), _load(ref_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = DPOTrainer(model=policy, ref_model=ref, processing_class=_tok(pol_path), train_dataset=_ds(ROWS),
                        args=DPOConfig(**_common(tmp_path, loss_type=[loss_type], beta=beta)))
    b = next(iter(tr.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = float(tr.compute_loss(tr.model, b))
    # ours on TRL's token ids: [chosen; rejected] rows, completion mask = our loss mask
    ids, am, lm = b["input_ids"], b["attention_mask"], b["completion_mask"]
    ref_lp, _ = _seq(ref, ids, am, lm)
    k = len(ROWS)
    cfg, task = _ours(loss_type, pol_path, beta=beta)
    ours = _our_mean(task, tr.model, {"input_ids": ids, "attention_mask": am, "loss_mask": lm,
                                      "ref_chosen": ref_lp[:k], "ref_rejected": ref_lp[k:], "eps": torch.zeros(k)})
    assert abs(trl_loss) > 1e-3  # the reference differs from the policy: a non-trivial value
    assert float(ours) == pytest.approx(trl_loss, abs=TOL)


# -- CPOTrainer: SimPO and CPO ----------------------------------------------------------------------------------

def _cpo_pairs(b) -> dict:
    """TRL's CPO/ORPO batch (chosen_* / rejected_*, labels -100 outside the response) as our pair batch."""
    T = max(b["chosen_input_ids"].shape[1], b["rejected_input_ids"].shape[1])

    def pad(x, v):
        return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=v)

    ids = torch.cat([pad(b["chosen_input_ids"], 0), pad(b["rejected_input_ids"], 0)])
    am = torch.cat([pad(b["chosen_attention_mask"], 0), pad(b["rejected_attention_mask"], 0)])
    lm = torch.cat([pad(b["chosen_labels"], -100), pad(b["rejected_labels"], -100)]) != -100
    return {"input_ids": ids, "attention_mask": am, "loss_mask": lm.long(), "eps": torch.zeros(ids.shape[0] // 2)}


def _cpo_trainer(trainer_cls, config_cls, pol_path, tmp_path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = trainer_cls(model=_load(pol_path), processing_class=_tok(pol_path), train_dataset=_ds(ROWS),
                         args=config_cls(**_common(tmp_path, **kw)))
    return tr, next(iter(tr.get_train_dataloader()))


@pytest.mark.parametrize("beta,gamma", [(2.0, 1.0), (2.5, 0.3)])
def test_simpo_matches_trl_cpo_trainer_with_cpo_alpha_0(models, tmp_path, beta, gamma):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    tr, b = _cpo_trainer(CPOTrainer, CPOConfig, models[0], tmp_path, loss_type="simpo", cpo_alpha=0.0,
                         simpo_gamma=gamma, beta=beta)
    with torch.no_grad():
        trl_loss = float(tr.compute_loss(tr.model, b))
    _, task = _ours("simpo", models[0], beta=beta, simpo_gamma=gamma)
    assert float(_our_mean(task, tr.model, _cpo_pairs(b))) == pytest.approx(trl_loss, abs=TOL)


def test_cpo_matches_trl_up_to_its_token_mean_nll(models, tmp_path):
    """TRL: mean_i(-log sigmoid(beta (s_w - s_l))) + alpha * (-sum_i s_w,i / chosen tokens); the paper (ours):
    mean_i(-log sigmoid(...) - lam s_w,i). Equal when lam = alpha * B / chosen tokens."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    alpha, beta = 1.0, 0.1
    tr, b = _cpo_trainer(CPOTrainer, CPOConfig, models[0], tmp_path, loss_type="sigmoid", cpo_alpha=alpha,
                         beta=beta)
    with torch.no_grad():
        trl_loss = float(tr.compute_loss(tr.model, b))
    pb = _cpo_pairs(b)
    k = len(ROWS)
    chosen_tokens = float(pb["loss_mask"][:k, 1:].sum())
    _, task = _ours("cpo", models[0], beta=beta, cpo_lambda=alpha * k / chosen_tokens)
    assert float(_our_mean(task, tr.model, pb)) == pytest.approx(trl_loss, abs=TOL)
    # with the paper's lam = alpha the per-example sum makes the NLL term (tokens / B) times larger
    _, paper = _ours("cpo", models[0], beta=beta, cpo_lambda=alpha)
    assert float(_our_mean(paper, tr.model, pb)) > trl_loss + 1.0


# -- ORPOTrainer --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_orpo_matches_trl_up_to_its_prompt_plus_response_nll(models, tmp_path, lam):
    from synthfb.train.logprobs import token_logps
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tr, b = _cpo_trainer(ORPOTrainer, ORPOConfig, models[0], tmp_path, beta=lam)
    with torch.no_grad():
        trl_loss, metrics = tr.get_batch_loss_metrics(tr.model, b)
    trl_loss, trl_nll = float(trl_loss), metrics["nll_loss"]
    pb = _cpo_pairs(b)
    k = len(ROWS)
    _, task = _ours("orpo", models[0], orpo_lambda=lam)
    ours = float(_our_mean(task, tr.model, pb))
    # our NLL term (the paper's): mean over pairs of -a(y_w), response tokens only
    lp, n = _seq(tr.model, pb["input_ids"][:k], pb["attention_mask"][:k], pb["loss_mask"][:k])
    our_nll = float((-lp / n).mean())
    # TRL's, computed independently: token-mean NLL over every real token after the first (prompt + response)
    with torch.no_grad():
        am = b["chosen_attention_mask"]
        tl = token_logps(tr.model, b["chosen_input_ids"], am, am)
    full_nll = float(-tl.sum() / am[:, 1:].sum())
    assert trl_nll == pytest.approx(full_nll, abs=TOL)
    assert abs(full_nll - our_nll) > 1e-3  # the deviation is real on this batch
    # the odds-ratio terms agree; the whole losses differ by exactly the NLL choice
    assert ours - our_nll == pytest.approx(trl_loss - trl_nll, abs=TOL)
    assert ours + (full_nll - our_nll) == pytest.approx(trl_loss, abs=TOL)


# -- KTOTrainer ---------------------------------------------------------------------------------------------------

def _raise_completions(model, tok, steps: int = 5) -> None:
    """A few SGD steps on every completion of ROWS after the empty prompt: their log-probs rise under any
    prompt, so the mismatched-pair KL estimate becomes positive (the unclamped branch)."""
    from synthfb.train.collate import collate_sequences
    from synthfb.train.logprobs import sequence_logps

    comps = [tok(r[k], add_special_tokens=False)["input_ids"] for r in ROWS for k in ("chosen", "rejected")]
    b = collate_sequences([[tok.eos_token_id]] * len(comps), comps, tok.pad_token_id)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        lp, _ = sequence_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"])
        (-lp.mean()).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("beta,lw,ll,tuned", [(0.1, 1.0, 1.0, True), (0.5, 1.0, 1.33, True), (0.1, 1.0, 1.0, False)])
def test_kto_matches_trl_kto_trainer(models, tmp_path, beta, lw, ll, tuned):
    """Same unpaired rows (our split of the pairs = TRL's unpair_preference_dataset), same mismatched KL
    completions, same loss."""
    from trl import KTOConfig, KTOTrainer

    from synthfb.train import kto

    # tuned: the reference is the starting checkpoint and the policy moved away from it on the completions;
    # otherwise two unrelated random models
    pol_path, ref_path = (models[0], models[0]) if tuned else models
    policy, ref = _load(pol_path), _load(ref_path)
    if tuned:
        _raise_completions(policy, _tok(pol_path))
    n = 2 * len(ROWS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = KTOTrainer(model=policy, ref_model=ref, processing_class=_tok(pol_path), train_dataset=_ds(ROWS),
                        args=KTOConfig(**{**_common(tmp_path, beta=beta, desirable_weight=lw,
                                                    undesirable_weight=ll), "per_device_train_batch_size": n}))
    b = next(iter(tr.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = float(tr.compute_loss(tr.model, b))
    trl_kl = tr._metrics["eval" if not tr.model.training else "train"]["kl"][-1]

    cfg = kto.KTOConfig(model=str(pol_path), dataset="-", output_dir=str(tmp_path / "ours"), batch_size=n,
                        max_length=64, beta=beta, desirable_weight=lw, undesirable_weight=ll, ref_model=str(ref_path))
    tok = _tok(pol_path)
    ex = kto.build_examples(cfg, tok, ROWS)
    # the examples TRL built: same prompt / completion / mismatched-completion ids and labels, same order
    trl_ds = tr.train_dataset
    assert [e["prompt_ids"] for e in ex] == trl_ds["prompt_ids"]
    assert [e["completion_ids"] for e in ex] == trl_ds["completion_ids"]
    assert [e["kl_completion_ids"] for e in ex] == trl_ds["KL_completion_ids"]
    assert [e["label"] for e in ex] == trl_ds["label"]
    for e, (r, rk) in zip(ex, kto.reference_logps(cfg, ex, tok).tolist()):
        e["ref"], e["ref_kl"] = r, rk
    task = kto.kto_task(tok, cfg)
    batch = task.collate(ex)
    with torch.no_grad():
        total, ms = task.loss(tr.model, batch)
    if tuned:
        assert trl_kl > 0.1  # a positive reference point
    else:  # these two random models give a negative raw estimate, clamped at 0 by both
        assert trl_kl == 0
    assert ms["kl"] / n == pytest.approx(trl_kl, abs=TOL)
    assert float(total) / n == pytest.approx(trl_loss, abs=TOL)
