"""Batched log-probs equal unpadded single-example log-probs (left, right, packed)."""

from __future__ import annotations

import random

import pytest
import torch

from synthfb.train.collate import collate_packed, collate_sequences, collate_sft, collate_shared_prompt
from synthfb.train.logprobs import last_token_index, sequence_logps, shared_prompt_logps, token_logps


@pytest.fixture(scope="module")
def model_and_tok(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from synthfb.llm.tiny import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("m") / "tiny64", hidden_size=64, num_heads=2, seed=1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def _reference(model, prompt: list[int], completion: list[int]) -> float:
    """Plain full-softmax log-prob of the completion, one unpadded example."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(completion))


def _examples(vocab: int, n: int = 6, seed: int = 0):
    rng = random.Random(seed)
    return [([rng.randrange(4, vocab) for _ in range(rng.randint(1, 9))],
             [rng.randrange(4, vocab) for _ in range(rng.randint(1, 7))]) for _ in range(n)]


@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_equals_single(model_and_tok, side):
    model, tok = model_and_tok
    ex = _examples(model.config.vocab_size)
    want = [_reference(model, p, c) for p, c in ex]
    b = collate_sequences([p for p, _ in ex], [c for _, c in ex], tok.pad_token_id, side)
    with torch.no_grad():
        got, n = sequence_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"])
    assert n.tolist() == [len(c) for _, c in ex]
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-4), (got, want)


def test_padding_amount_does_not_matter(model_and_tok):
    model, tok = model_and_tok
    ex = _examples(model.config.vocab_size, n=2, seed=3)
    b = collate_sequences([p for p, _ in ex], [c for _, c in ex], tok.pad_token_id, "left")
    extra = 5
    ids = torch.cat([torch.full((2, extra), tok.pad_token_id), b["input_ids"]], 1)
    am = torch.cat([torch.zeros(2, extra, dtype=torch.long), b["attention_mask"]], 1)
    lm = torch.cat([torch.zeros(2, extra, dtype=torch.long), b["loss_mask"]], 1)
    with torch.no_grad():
        a, _ = sequence_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"])
        c, _ = sequence_logps(model, ids, am, lm)
    assert torch.allclose(a, c, atol=1e-5)


def test_packed_equals_single(model_and_tok):
    model, tok = model_and_tok
    ex = _examples(model.config.vocab_size, n=5, seed=7)
    items = [{"input_ids": p + c, "loss_mask": [0] * len(p) + [1] * len(c)} for p, c in ex]
    b = collate_packed([items[:3], items[3:]], tok.pad_token_id)
    with torch.no_grad():
        lp = token_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"], b["position_ids"])
    # split each packed row back into examples
    got = []
    for row, group in enumerate([items[:3], items[3:]]):
        start = 0
        for e in group:
            got.append(float(lp[row, start:start + len(e["input_ids"])].sum()))
            start += len(e["input_ids"])
    want = [_reference(model, p, c) for p, c in ex]
    assert got == pytest.approx(want, abs=1e-4)


def test_shared_prompt_equals_single(model_and_tok):
    """Prefix sharing (DPO ``share_prompt``): prompt + chosen + rejected in one row, the rejected tokens
    blind to the chosen ones, gives each completion's log-prob as if it were alone, and so does its
    gradient; the empty prompt (first token without context) is left out as in ``sequence_logps``."""
    model, tok = model_and_tok
    rng = random.Random(5)
    V = model.config.vocab_size
    triples = [([rng.randrange(4, V) for _ in range(rng.randint(1, 9))],
                [rng.randrange(4, V) for _ in range(rng.randint(1, 7))],
                [rng.randrange(4, V) for _ in range(rng.randint(1, 7))]) for _ in range(5)]
    b = collate_shared_prompt([p for p, _, _ in triples], [c for _, c, _ in triples], [r for _, _, r in triples],
                              tok.pad_token_id)
    with torch.no_grad():
        got, n = shared_prompt_logps(model, b)
    want = [_reference(model, p, c) for p, c, _ in triples] + [_reference(model, p, r) for p, _, r in triples]
    assert n.tolist() == [len(c) for _, c, _ in triples] + [len(r) for _, _, r in triples]
    assert got.tolist() == pytest.approx(want, abs=1e-4)

    # same gradient as the batch with the prompt repeated
    rep = collate_sequences([p for p, _, _ in triples] * 2, [c for _, c, _ in triples] + [r for _, _, r in triples],
                            tok.pad_token_id, "right")
    grads = []
    for fn in (lambda: shared_prompt_logps(model, b)[0],
               lambda: sequence_logps(model, rep["input_ids"], rep["attention_mask"], rep["loss_mask"])[0]):
        model.zero_grad()
        (fn() * torch.linspace(-1, 1, 2 * len(triples))).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    model.zero_grad()
    assert torch.allclose(grads[0], grads[1], atol=1e-4, rtol=1e-3)

    # an empty prompt: neither completion's first token has a context, as with sequence_logps
    e = collate_shared_prompt([[]], [[5, 6, 7]], [[8, 9]], tok.pad_token_id)
    with torch.no_grad():
        _, n = shared_prompt_logps(model, e)
    assert n.tolist() == [2, 1]


def test_sft_collate_gradient_token_weights(model_and_tok):
    """Right- and left-padded SFT batches give the same summed log-prob."""
    model, tok = model_and_tok
    ex = _examples(model.config.vocab_size, n=4, seed=11)
    items = [{"input_ids": p + c, "loss_mask": [0] * len(p) + [1] * len(c)} for p, c in ex]
    with torch.no_grad():
        r = collate_sft(items, tok.pad_token_id, "right")
        l_ = collate_sft(items, tok.pad_token_id, "left")
        a = token_logps(model, r["input_ids"], r["attention_mask"], r["loss_mask"]).sum()
        b = token_logps(model, l_["input_ids"], l_["attention_mask"], l_["loss_mask"]).sum()
    assert float(a) == pytest.approx(float(b), abs=1e-4)


def test_last_token_index_any_padding_and_pad_equals_eos():
    eos = 7
    # right padding where pad == eos and the real sequence ends in eos
    ids = torch.tensor([[5, 6, eos, eos, eos], [eos, eos, 5, 6, eos]])
    am = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    assert last_token_index(am).tolist() == [2, 4]
    assert ids[0, 2] == eos and ids[1, 4] == eos
    assert last_token_index(torch.zeros(1, 3, dtype=torch.long)).tolist() == [-1]
