"""SFT: loss masks, gradient accumulation, packing, learning, resume, CLI, vLLM loads the result."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from synthfb.train import loop
from synthfb.train.collate import Tokenizer
from synthfb.train.sft import SFTConfig, build_examples, sft_task, train_sft

WORDS = "write explain list give describe summarize translate classify".split()
GOOD = ["good", "helpful", "clear", "honest"]


def _rows(n=32, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        a = " ".join(rng.choice(GOOD) for _ in range(rng.randint(1, 5)))
        if i % 2:
            rows.append({"row_id": str(i), "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        else:
            rows.append({"row_id": str(i), "prompt": q, "completion": " " + a})
    return rows


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from synthfb.llm.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("sft") / "tiny64", hidden_size=64, num_heads=2, seed=3)


def test_loss_mask_covers_assistant_turns_only(small):
    tok = loop.load_tokenizer(str(small))
    t = Tokenizer(tok)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "list three"},
            {"role": "assistant", "content": "good clear honest"}, {"role": "user", "content": "again"},
            {"role": "assistant", "content": "helpful"}]
    ex = t.sft_example({"messages": msgs})
    masked = tok.decode([i for i, m in zip(ex["input_ids"], ex["loss_mask"]) if m])
    assert masked == "good clear honest<|im_end|>\nhelpful<|im_end|>\n"
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(msgs, tokenize=False)
    ex2 = t.sft_example({"prompt": "Write a", "completion": " poem"})
    assert tok.decode([i for i, m in zip(ex2["input_ids"], ex2["loss_mask"]) if m]) == " poem<|im_end|>"
    conv = t.sft_example({"prompt": msgs[:2], "completion": msgs[2:3]})
    assert tok.decode([i for i, m in zip(conv["input_ids"], conv["loss_mask"]) if m]) == "good clear honest<|im_end|>\n"
    with pytest.raises(ValueError, match="row 4: SFT rows need"):
        t.sft_example({"text": "x"}, 4)


def test_gradient_accumulation_equals_larger_batch(small, tmp_path):
    tok = loop.load_tokenizer(str(small))
    cfg = SFTConfig(model=str(small), dataset="-", output_dir=str(tmp_path))
    items = build_examples(cfg, tok, _rows(4, seed=5))
    assert len({sum(e["loss_mask"]) for e in items}) > 1  # unequal token counts: mean-of-means would differ
    task = sft_task(tok, cfg)

    def grads(groups):
        torch.manual_seed(0)
        model = loop.load_causal_lm(str(small), cfg)
        loop.accumulate(model, task, [task.collate(g) for g in groups], torch.device("cpu"))
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    one = grads([items])
    two = grads([items[:1], items[1:]])
    four = grads([[e] for e in items])
    assert torch.allclose(one, two, atol=1e-6) and torch.allclose(one, four, atol=1e-6)


@pytest.mark.timeout(600)
def test_sft_learns_with_packing_and_resume_is_exact(small, tmp_path):
    rows = _rows(32)
    kw = dict(model=str(small), dataset="-", batch_size=4, learning_rate=1e-2, max_steps=8, save_steps=4,
              packing=True, max_length=64, lr_scheduler="cosine", warmup_steps=2)
    a = train_sft(SFTConfig(output_dir=str(tmp_path / "a"), **kw), rows)
    hist = a["history"]
    assert [h["step"] for h in hist] == list(range(1, 9))
    assert hist[-1]["loss"] < 0.7 * hist[0]["loss"]
    # kill after step 4: a fresh run resumes from checkpoint-4 and ends with the same weights
    shutil.copytree(tmp_path / "a" / "checkpoint-4", tmp_path / "b" / "checkpoint-4")
    shutil.copy(tmp_path / "a" / ".synthfb.json", tmp_path / "b")  # a killed training keeps its folder's marker
    (tmp_path / "b" / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hist[:5]))  # one stale line
    b = train_sft(SFTConfig(output_dir=str(tmp_path / "b"), resume=True, **kw), rows)
    assert [h["step"] for h in b["history"]] == list(range(1, 9))
    assert [h["loss"] for h in b["history"][4:]] == pytest.approx([h["loss"] for h in hist[4:]], rel=1e-5)
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "a" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


@pytest.mark.engine  # starts a vLLM engine on the checkpoint
@pytest.mark.timeout(900)
def test_cli_sft_checkpoint_loads_in_vllm_and_transformers(tiny_model, tmp_path):
    """`synthfb train sft --config` on the tiny model; our vLLM backend serves the result."""
    from synthfb.llm.types import ScoreRequest
    from synthfb.train.cli import main
    from synthfb.train.logprobs import sequence_logps

    data = tmp_path / "sft.jsonl"
    # one format per file: (synthfb.data.io reads a .jsonl's columns from its first row)
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(32) if "messages" in r))
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model: {tiny_model}\ndataset: {data}\noutput_dir: {tmp_path / 'out'}\n"
                   "batch_size: 8\nlearning_rate: 3.0e-3\nmax_steps: 4\nmax_length: 64\n")
    assert main(["train", "sft", "--config", str(cfg)]) == 0
    out = tmp_path / "out"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4] and all("loss" in x and "tokens_per_s" in x for x in lines)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    trained = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert not torch.allclose(trained.model.embed_tokens.weight, base.model.embed_tokens.weight)
    msgs = [{"role": "user", "content": "list three"}]
    cont = "good clear honest"
    ctx = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    p = tok(ctx, add_special_tokens=False)["input_ids"]
    c = tok(cont, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        want, _ = sequence_logps(trained, ids, torch.ones_like(ids), torch.tensor([[0] * len(p) + [1] * len(c)]))

    from synthfb.llm.vllm_backend import VLLMGenerator

    gen = VLLMGenerator(str(out), seed=0, dtype="float32", max_model_len=256, progress=False)
    try:
        got = gen.score([ScoreRequest(messages=msgs, continuation=cont)])[0].logprob
        gen_out = gen.generate([__import__("synthfb.llm.types", fromlist=["GenerationRequest"]).GenerationRequest(messages=msgs)])
    finally:
        gen.close()
    assert got == pytest.approx(float(want), abs=2e-3)
    assert gen_out[0].completions[0].finish_reason in ("stop", "length")


def test_config_errors_name_the_field(tmp_path):
    from synthfb.train.cli import main
    from synthfb.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['learning_rte'\] \(did you mean `learning_rate`\?\)"):
        load_config(SFTConfig, {"model": "m", "dataset": "d", "output_dir": "o", "learning_rte": 1})
    with pytest.raises(ConfigError, match="batch_size: expected integer, got str 'eight'"):
        load_config(SFTConfig, {"model": "m", "dataset": "d", "output_dir": "o", "batch_size": "eight"})
    with pytest.raises(ConfigError, match="lr_scheduler: 'exp' is not one of"):
        load_config(SFTConfig, {"model": "m", "dataset": "d", "output_dir": "o", "lr_scheduler": "exp"})
    with pytest.raises(ConfigError, match="output_dir: required field is missing"):
        load_config(SFTConfig, {"model": "m", "dataset": "d"})
    cfg = load_config(SFTConfig, {"model": "m", "dataset": "d", "output_dir": "o", "learning_rate": 1})
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\ndataset: d\noutput_dir: o\npacking: maybe\n")
    assert main(["train", "sft", "--config", str(bad)]) == 2
