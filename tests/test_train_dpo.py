"""DPO trainer: learns preferences, cached reference log-probs, variants, soft labels, row formats."""

from __future__ import annotations

import math
import random

import pytest
import torch

from synthfb.train import loop
from synthfb.train.collate import Tokenizer
from synthfb.train.dpo import DPOConfig, build_examples, preference_accuracy, prepare, reference_logps, train_dpo

WORDS = "write explain list give describe summarize translate classify".split()
GOOD = ["good", "helpful", "clear", "honest"]
BAD = ["bad", "short", "long", "art"]


def pairs(n, seed):
    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.choice(WORDS) for _ in range(4)),
             "chosen": " ".join(rng.choice(GOOD) for _ in range(rng.randint(2, 4))),
             "rejected": " ".join(rng.choice(BAD) for _ in range(rng.randint(2, 4))),
             "p_chosen": 0.9} for _ in range(n)]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from synthfb.llm.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("dpo") / "tiny64", hidden_size=64, num_heads=2, seed=5)


@pytest.mark.timeout(600)
def test_dpo_reaches_high_preference_accuracy(small, tmp_path):
    cfg = DPOConfig(model=str(small), dataset="-", output_dir=str(tmp_path / "dpo"), batch_size=8, learning_rate=1e-3,
                    lr_scheduler="constant", max_steps=12, beta=0.1)
    out = train_dpo(cfg, pairs(48, 0))
    hist = out["history"]
    # step 1: policy == reference, so the loss is exactly ln 2 and rewards are 0
    assert hist[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert hist[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert all({"loss", "reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected"} <= set(h) for h in hist)
    held = build_examples(cfg, out["tokenizer"], pairs(32, 1))
    ref, _ = reference_logps(cfg, held, out["tokenizer"])
    for e, (c, r) in zip(held, ref.tolist()):
        e["ref_chosen"], e["ref_rejected"] = c, r
    assert preference_accuracy(out["model"], out["tokenizer"], held, cfg) > 0.9


@pytest.mark.timeout(600)
@pytest.mark.parametrize("loss_type,beta", [("ipo", 0.1), ("hinge", 0.1), ("simpo", 2.0)])
def test_variants_learn(small, tmp_path, loss_type, beta):
    cfg = DPOConfig(model=str(small), dataset="-", output_dir=str(tmp_path / loss_type), batch_size=8,
                    learning_rate=1e-3, lr_scheduler="constant", max_steps=8, beta=beta, loss_type=loss_type)
    out = train_dpo(cfg, pairs(32, 2))
    assert out["history"][-1]["loss"] < out["history"][0]["loss"]
    assert preference_accuracy(out["model"], out["tokenizer"], out["examples"], cfg) > 0.9
    if loss_type == "simpo":
        assert not list((tmp_path / loss_type).glob("ref_logps-*.pt"))  # reference-free


@pytest.mark.timeout(600)
def test_gradient_checkpointing_changes_memory_not_results(small, tmp_path):
    """Recomputing activations in backward (TRL's DPO default) must train the same model."""
    runs = {}
    for gc in (False, True):
        cfg = DPOConfig(model=str(small), dataset="-", output_dir=str(tmp_path / f"gc{gc}"), batch_size=8,
                        learning_rate=1e-3, lr_scheduler="constant", max_steps=4, beta=0.1, gradient_checkpointing=gc)
        runs[gc] = train_dpo(cfg, pairs(32, 3))
    assert runs[True]["model"].is_gradient_checkpointing and not runs[False]["model"].is_gradient_checkpointing
    a, b = ([h["loss"] for h in runs[gc]["history"]] for gc in (False, True))
    assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    assert a[-1] < a[0]
    for (n, p), (_, q) in zip(runs[False]["model"].named_parameters(), runs[True]["model"].named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("gc", [False, True])
def test_shared_prompt_trains_the_same_model(small, tmp_path, gc):
    """``share_prompt`` (prefix sharing: one copy of the prompt per pair) is a way to compute the same loss:
    the same losses, metrics and weights as the prompt repeated per completion (TRL's layout), with and
    without gradient checkpointing; the reference pass and the token count agree too."""
    runs = {}
    for share in (False, True):
        cfg = DPOConfig(model=str(small), dataset="-", output_dir=str(tmp_path / f"share{share}"), batch_size=8,
                        learning_rate=1e-3, lr_scheduler="constant", max_steps=4, beta=0.1, share_prompt=share,
                        gradient_checkpointing=gc)
        runs[share] = train_dpo(cfg, pairs(32, 4))
    for key in ("loss", "reward_margin", "logps_chosen", "logps_rejected", "tokens"):
        a, b = ([h[key] for h in runs[s]["history"]] for s in (False, True))
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4), key
    ref = [x for e in runs[False]["examples"] for x in (e["ref_chosen"], e["ref_rejected"])]
    assert [x for e in runs[True]["examples"] for x in (e["ref_chosen"], e["ref_rejected"])] == \
        pytest.approx(ref, abs=1e-4)
    for (n, p), (_, q) in zip(runs[False]["model"].named_parameters(), runs[True]["model"].named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def test_shared_prompt_only_where_attention_takes_the_mask(small, monkeypatch):
    """Eager attention adds a boolean 4D mask as 0/1 (masking nothing): such a model repeats the prompt
    instead of sharing it, with the same result; sdpa shares it."""
    from transformers import AutoModelForCausalLM

    from synthfb.train import dpo
    from synthfb.train.logprobs import takes_4d_mask

    shared_with = []
    real = dpo.shared_prompt_logps
    monkeypatch.setattr(dpo, "shared_prompt_logps", lambda m, b: shared_with.append(m) or real(m, b))
    sdpa = AutoModelForCausalLM.from_pretrained(small)
    eager = AutoModelForCausalLM.from_pretrained(small, attn_implementation="eager")
    assert takes_4d_mask(sdpa) and not takes_4d_mask(eager)
    cfg = DPOConfig(model=str(small), dataset="-", output_dir="unused")
    tok = loop.load_tokenizer(str(small))
    ex = build_examples(cfg, tok, pairs(6, 7))
    for e in ex:
        e["ref_chosen"] = e["ref_rejected"] = 0.0
    assert preference_accuracy(eager, tok, ex, cfg) == preference_accuracy(sdpa, tok, ex, cfg)
    assert shared_with and all(m is sdpa for m in shared_with)


def test_reference_logps_cached_and_model_not_needed_again(small, tmp_path, monkeypatch):
    cfg = DPOConfig(model=str(small), dataset="-", output_dir=str(tmp_path), ref_batch_size=3)
    tok, ex = prepare(cfg, pairs(7, 3))
    assert len(list(tmp_path.glob("ref_logps-*.pt"))) == 1
    # the cached values equal single-example log-probs of the reference model
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(small, dtype=torch.float32).eval()
    for e in ex[:3]:
        p, c = e["prompt_ids"], e["chosen_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(ref(torch.tensor([p + c])).logits[0].double(), -1)
        want = sum(float(lp[len(p) - 1 + j, t]) for j, t in enumerate(c))
        assert e["ref_chosen"] == pytest.approx(want, abs=1e-4)

    def boom(*a, **k):
        raise AssertionError("reference model loaded again")

    monkeypatch.setattr(loop, "load_causal_lm", boom)
    _, ex2 = prepare(cfg, pairs(7, 3))
    assert [e["ref_chosen"] for e in ex2] == [e["ref_chosen"] for e in ex]


def test_soft_labels_and_row_formats(small, tmp_path):
    tok = loop.load_tokenizer(str(small))
    cfg = DPOConfig(model=str(small), dataset="-", output_dir=str(tmp_path), soft_label_column="p_chosen")
    ex = build_examples(cfg, tok, pairs(3, 4))
    assert [e["eps"] for e in ex] == pytest.approx([0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="row 0: `p_chosen` must be a probability"):
        build_examples(cfg, tok, [{"prompt": "a", "chosen": "b", "rejected": "c", "p_chosen": 2}])
    t = Tokenizer(tok)
    user = [{"role": "user", "content": "list three"}]
    good = [{"role": "assistant", "content": "good clear"}]
    bad = [{"role": "assistant", "content": "bad art"}]
    explicit = t.preference_example({"prompt": user, "chosen": good, "rejected": bad})
    implicit = t.preference_example({"chosen": user + good, "rejected": user + bad})
    assert explicit == implicit
    assert tok.decode(explicit["chosen_ids"]) == "good clear<|im_end|>\n"
    assert tok.decode(explicit["prompt_ids"]).endswith("<|im_start|>assistant\n")
    std = t.preference_example({"prompt": "Q:", "chosen": " yes", "rejected": " no"})
    assert std["chosen_ids"][-1] == tok.eos_token_id
    with pytest.raises(ValueError, match="row 2: preference rows need `chosen` and `rejected`; missing `rejected`"):
        t.preference_example({"prompt": "x", "chosen": "y"}, 2)


def test_reads_pipeline_outputs(tmp_path):
    """A save_to_disk folder (what `synthfb run` emits), parquet and jsonl give the same rows."""
    import datasets

    from synthfb.train.collate import load_rows

    rows = [{"row_id": str(i), **r} for i, r in enumerate(pairs(5, 6))]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    for src in ("ds", "d.parquet", "d.jsonl"):
        assert load_rows(str(tmp_path / src)) == rows
