"""OpenAIGenerator against a real ``vllm serve`` of the tiny random model.

One server for the whole module. The model's text is gibberish, so the tests
check structure (counts, finish reasons, JSON validity, order), and compare
``score()`` with a transformers forward pass on the same checkpoint. Faults
(503, 429, dropped connections, truncated bodies, timeouts) come from a local
proxy in front of the server, with tiny backoff waits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import pytest

from synthfb.llm.openai_backend import OpenAIGenerator, _split_tokens
from synthfb.llm.types import (
    GenerationRequest,
    Generator,
    SamplingParams,
    ScoreRequest,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ has no __init__.py
from servers import FaultProxy, free_port, start_vllm_server, stop_vllm_server  # noqa: E402

MODEL = "tiny"
SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["yes", "no"]}},
    "required": ["label"],
    "additionalProperties": False,
}
CHAT = [{"role": "user", "content": "Give three tips for staying healthy."}]
FAST = dict(retry_wait_min=0.01, retry_wait_max=0.05)  # tiny backoff for fault tests


@pytest.fixture(scope="module")
def vllm_server(tiny_model):
    """`vllm serve` of the tiny model (tests using it are marked `engine` by conftest)."""
    proc, base_url = start_vllm_server(tiny_model, served_model_name=MODEL)
    try:
        yield base_url
    finally:
        stop_vllm_server(proc)


@pytest.fixture(scope="module")
def root_url(vllm_server):
    return vllm_server[: -len("/v1")]


@pytest.fixture()
def gen(vllm_server):
    g = OpenAIGenerator(MODEL, base_url=vllm_server, timeout=120)
    yield g
    g.close()


def _chat(n=1, max_tokens=16, **kw):
    return GenerationRequest(messages=CHAT, params=SamplingParams(n=n, max_tokens=max_tokens, **kw))


# ------------------------------------------------------------------ basics
def test_info_detection_and_key_not_stored(vllm_server, monkeypatch):
    secret = "sk-test-secret-do-not-store"
    monkeypatch.setenv("SYNTHFB_TEST_KEY", secret)
    g = OpenAIGenerator(MODEL, base_url=vllm_server, api_key_env="SYNTHFB_TEST_KEY")
    assert isinstance(g, Generator)
    assert g.info.name == MODEL and g.info.path == vllm_server and g.info.backend == "openai"
    assert g.info.revision == "unknown"  # vLLM's /v1/models has no revision field
    assert g.is_vllm
    assert secret not in json.dumps(dataclasses.asdict(g.info))
    assert secret not in repr(g) and all(secret not in repr(v) for v in vars(g).values())
    # the key is still sent (vLLM without --api-key ignores it)
    assert g.generate([_chat(max_tokens=2)])[0].error is None
    g.close()
    with pytest.raises(RuntimeError, match="closed"):
        g.generate([_chat()])


def test_chat_n3(gen):
    [res] = gen.generate([_chat(n=3, max_tokens=16)], desc="chat")
    assert res.error is None
    assert len(res.completions) == 3
    for c in res.completions:
        assert c.finish_reason in ("length", "stop")
        assert 0 < c.num_tokens <= 16
        assert isinstance(c.text, str) and c.parsed is None and c.error is None
    assert res.prompt_tokens > 0
    u = gen.usage
    assert (u.requests, u.retries, u.failures) == (1, 0, 0)
    assert u.prompt_tokens == res.prompt_tokens
    assert u.completion_tokens == sum(c.num_tokens for c in res.completions)


def test_raw_prompts_in_order(gen):
    # prompts of growing length: prompt_tokens must grow with the index
    reqs = [
        GenerationRequest(prompt="water " * (i + 1), params=SamplingParams(max_tokens=4 + i, stop=["."]))
        for i in range(6)
    ]
    results = gen.generate(reqs)
    assert all(r.error is None for r in results)
    pts = [r.prompt_tokens for r in results]
    assert pts == sorted(pts) and len(set(pts)) == 6, pts
    for i, r in enumerate(results):
        [c] = r.completions
        assert 0 < c.num_tokens <= 4 + i and c.finish_reason in ("length", "stop")
    assert gen.usage.requests == 6 and gen.usage.prompt_tokens == sum(pts)


def test_seed_and_running_loop(gen):
    req = _chat(max_tokens=12, seed=1234, temperature=0.8)
    a = gen.generate([req])[0].completions[0].text

    async def inside_loop():  # generate() from code that already runs a loop
        return gen.generate([req])

    b = asyncio.run(inside_loop())[0].completions[0].text
    assert a == b


def test_token_count_split_without_vllm_extensions(vllm_server):
    g = OpenAIGenerator(MODEL, base_url=vllm_server, vllm_extensions=False)
    assert not g.is_vllm
    [res] = g.generate([_chat(n=3, max_tokens=8)])
    assert res.error is None and len(res.completions) == 3
    assert sum(c.num_tokens for c in res.completions) == g.usage.completion_tokens == 24
    assert _split_tokens(10, ["a", "bbb", ""]) == [2, 6, 2]
    assert sum(_split_tokens(7, ["x" * k for k in (1, 2, 3)])) == 7


# -------------------------------------------------------------------- JSON
def test_json_schema_chat_and_prompt(gen):
    reqs = [
        GenerationRequest(messages=CHAT, params=SamplingParams(n=4, max_tokens=64), json_schema=SCHEMA),
        GenerationRequest(prompt="Answer yes or no:", params=SamplingParams(n=4, max_tokens=64), json_schema=SCHEMA),
    ]
    for res in gen.generate(reqs):
        assert res.error is None and len(res.completions) == 4
        parsed = [c for c in res.completions if c.parsed is not None]
        # a random model pads JSON with whitespace; a completion cut off at
        # max_tokens is reported as invalid, never crashes
        assert len(parsed) >= 1
        for c in res.completions:
            if c.finish_reason == "stop":
                assert isinstance(c.parsed, dict) and c.parsed["label"] in ("yes", "no"), c
                assert c.error is None
                assert json.loads(c.text) == c.parsed
            else:
                assert c.finish_reason == "length" and c.parsed is None and c.error.startswith("invalid JSON")


# ------------------------------------------------------------------- score
def test_score_matches_transformers(gen, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cont = " Drink water, sleep well and exercise."
    prompt = "Three tips for health:"
    got_chat, got_prompt = gen.score(
        [ScoreRequest(continuation=cont, messages=CHAT), ScoreRequest(continuation=cont, prompt=prompt)]
    )

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    cont_ids = tok(cont, add_special_tokens=False)["input_ids"]

    def reference(context_text: str) -> list[float]:
        ctx = tok(context_text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + cont_ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        return [lp[len(ctx) + j - 1, t].item() for j, t in enumerate(cont_ids)]

    chat_text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    for got, ref in ((got_chat, reference(chat_text)), (got_prompt, reference(prompt))):
        assert len(got.token_logprobs) == len(cont_ids) == len(ref)
        assert all(math.isfinite(x) and x < 0 for x in got.token_logprobs)
        assert got.logprob == pytest.approx(sum(got.token_logprobs))
        for a, b in zip(got.token_logprobs, ref):
            assert abs(a - b) < 1e-3, (got.token_logprobs, ref)
    assert gen.score([ScoreRequest(continuation="", prompt=prompt)])[0].token_logprobs == []


def test_score_without_tokenize_endpoint(root_url):
    with FaultProxy(root_url, always="404") as proxy:
        g = OpenAIGenerator(MODEL, base_url=proxy.base_url, **FAST)
        with pytest.raises(NotImplementedError, match="/tokenize"):
            g.score([ScoreRequest(continuation=" x", prompt="y")])
        assert proxy.counts["404"] == 1  # a 404 is not retried


# ----------------------------------------------------------------- retries
def test_retries_on_503(root_url):
    with FaultProxy(root_url, faults=["503", "503"]) as proxy:
        g = OpenAIGenerator(MODEL, base_url=proxy.base_url, **FAST)
        results = g.generate([_chat(max_tokens=4) for _ in range(3)])
    assert all(r.error is None and len(r.completions) == 1 for r in results)
    assert proxy.injected == 2
    assert g.usage.retries == 2 and g.usage.failures == 0 and g.usage.requests == 3
    assert proxy.counts["post"] == 5


def test_retries_on_drop_429_truncate_badjson_timeout(root_url):
    faults = ["drop", "429", "truncate", "badjson", "slow"]
    with FaultProxy(root_url, faults=faults, slow_seconds=6.0) as proxy:
        # timeout 3 s: the "slow" fault (6 s) becomes a read timeout
        g = OpenAIGenerator(MODEL, base_url=proxy.base_url, concurrency=1, timeout=3.0, **FAST)
        t0 = time.monotonic()
        results = g.generate([GenerationRequest(prompt="hello", params=SamplingParams(max_tokens=4))] * 2)
        elapsed = time.monotonic() - t0
    assert all(r.error is None for r in results), [r.error for r in results]
    assert proxy.injected == len(faults)
    assert {k: proxy.counts[k] for k in faults} == {k: 1 for k in faults}
    assert g.usage.retries == len(faults) and g.usage.failures == 0
    assert elapsed < 30  # Retry-After: 1 is capped at retry_wait_max


def test_retry_after_is_honored_and_capped(root_url):
    with FaultProxy(root_url, faults=["429"]) as proxy:  # sends Retry-After: 1
        g = OpenAIGenerator(MODEL, base_url=proxy.base_url, retry_wait_min=0.01, retry_wait_max=5.0)
        t0 = time.monotonic()
        assert g.generate([_chat(max_tokens=2)])[0].error is None
        assert time.monotonic() - t0 >= 0.95  # waited the server's 1 s, not 0.01 s
    with FaultProxy(root_url, always="429") as proxy:
        g = OpenAIGenerator(MODEL, base_url=proxy.base_url, max_retries=3, retry_wait_min=0.01, retry_wait_max=0.05)
        t0 = time.monotonic()
        [r] = g.generate([_chat(max_tokens=2)])
        assert time.monotonic() - t0 < 1.9  # 2 waits of at most 0.05 s, not 2 x 1 s
    assert r.error.startswith("request 0 failed after 3 tries: HTTP 429: injected: too many requests")
    assert proxy.counts["429"] == 3 and g.usage.retries == 2


def test_gives_up_after_max_retries(root_url):
    with FaultProxy(root_url, always="503") as proxy:
        g = OpenAIGenerator(MODEL, base_url=proxy.base_url, max_retries=3, **FAST)
        t0 = time.monotonic()
        results = g.generate([_chat(max_tokens=4), _chat(max_tokens=4)])
        assert time.monotonic() - t0 < 20
    for i, r in enumerate(results):
        assert r.completions == []
        assert r.error.startswith(f"request {i} failed after 3 tries: HTTP 503: injected: service unavailable"), r.error
    assert proxy.counts["503"] == 6
    assert g.usage.failures == 2 and g.usage.retries == 4


def test_connection_refused_does_not_hang():
    port = free_port()  # nothing listens here
    g = OpenAIGenerator(MODEL, base_url=f"http://127.0.0.1:{port}/v1", max_retries=2, timeout=5, **FAST)
    assert g.info.revision == "unknown"
    t0 = time.monotonic()
    [r] = g.generate([_chat()])
    assert time.monotonic() - t0 < 20
    assert r.error.startswith("request 0 failed after 2 tries: ConnectError"), r.error
    assert g.usage.failures == 1 and g.usage.retries == 1


def test_400_not_retried(root_url):
    with FaultProxy(root_url) as proxy:  # pass-through: the real server's 400
        g = OpenAIGenerator(MODEL, base_url=proxy.base_url, **FAST)
        [bad, good] = g.generate([_chat(max_tokens=4000), _chat(max_tokens=4)])
    assert bad.error.startswith("request 0 failed (not retried): HTTP 400:"), bad.error
    assert "max_tokens" in bad.error
    assert good.error is None
    assert proxy.counts["post"] == 2 and g.usage.retries == 0 and g.usage.failures == 1

    with FaultProxy(root_url, faults=["400"]) as proxy:
        g = OpenAIGenerator(MODEL, base_url=proxy.base_url, **FAST)
        [r] = g.generate([_chat(max_tokens=4)])
    assert r.error == "request 0 failed (not retried): HTTP 400: injected: bad request"
    assert proxy.counts["post"] == 1 and g.usage.retries == 0


# ------------------------------------------------------------------ a whole pipeline through faults
def test_pipeline_through_faulty_proxy_counts_retries_and_keeps_key_secret(root_url, tmp_path, monkeypatch):
    from synthfb.engine import Pipeline, run_pipeline

    secret = "sk-PLANTED-never-write-me-0123456789"
    monkeypatch.setenv("SYNTHFB_TEST_KEY", secret)
    (tmp_path / "seeds.jsonl").write_text("".join(json.dumps({"instruction": f"Tip {i} for health"}) + "\n"
                                                  for i in range(24)))
    with FaultProxy(root_url, rate=0.3, seed=7) as proxy:
        f = tmp_path / "pipe.yaml"
        f.write_text(f"""
name: faulty
backend: openai
model: {MODEL}
backend_options: {{base_url: "{proxy.url}/v1", api_key_env: SYNTHFB_TEST_KEY, max_retries: 8,
                   retry_wait_min: 0.01, retry_wait_max: 0.05, concurrency: 4, timeout: 120}}
chunk_size: 8
stages:
  - stage: load
    path: seeds.jsonl
  - stage: generate
    input_column: instruction
    sampling: {{max_tokens: 8}}
""")
        res = run_pipeline(Pipeline.from_yaml(f), tmp_path / "run", progress=False)
        injected = proxy.injected
    st = res.manifest["stages"][1]
    assert injected > 0
    # every row completed or is reported failed with its reason
    assert st["rows_out"] + len(st["failures"]) == st["rows_in"] == 24
    for fail in st["failures"]:
        assert "failed after" in fail["reason"]
    if not st["failures"]:
        assert st["usage"]["retries"] == injected
    assert st["usage"]["retries"] >= 1
    # the API key is nowhere in what the run wrote
    for p in (tmp_path / "run").rglob("*"):
        if p.is_file():
            assert secret.encode() not in p.read_bytes(), p
