"""The vllm and transformers backends on the tiny model (real engines)."""

from __future__ import annotations

import math

import pytest

from synthfb.llm import GenerationRequest, SamplingParams, ScoreRequest
from synthfb.llm.base import check_json

SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["yes", "no"]}, "score": {"type": "integer", "minimum": 0, "maximum": 5}},
    "required": ["label", "score"],
    "additionalProperties": False,
}


def test_generate_n_samples_and_per_request_params(vllm_tiny):
    reqs = [
        GenerationRequest(messages=[{"role": "user", "content": "Write three tips"}],
                          params=SamplingParams(n=4, temperature=1.0, max_tokens=12)),
        GenerationRequest(prompt="Explain the water cycle", params=SamplingParams(n=1, temperature=0.0, max_tokens=5)),
        GenerationRequest(prompt="Explain the water cycle", params=SamplingParams(n=2, max_tokens=3)),
    ]
    before = vllm_tiny.usage.requests
    res = vllm_tiny.generate(reqs)
    assert [len(r.completions) for r in res] == [4, 1, 2]
    for r in res:
        assert r.prompt_tokens > 0 and r.error is None
        for c in r.completions:
            assert c.finish_reason in ("stop", "length") and 0 < c.num_tokens
    assert all(c.num_tokens <= 12 for c in res[0].completions)
    assert res[1].completions[0].num_tokens <= 5
    assert all(c.num_tokens <= 3 for c in res[2].completions)
    # four random samples of a random model are not all the same text
    assert len({c.text for c in res[0].completions}) > 1
    assert vllm_tiny.usage.requests == before + 3


def test_greedy_agrees_between_backends(vllm_tiny, hf_tiny):
    req = [GenerationRequest(prompt="Describe a river", params=SamplingParams(temperature=0.0, max_tokens=8))]
    a = vllm_tiny.generate(req)[0].completions[0]
    b = hf_tiny.generate(req)[0].completions[0]
    assert a.text == b.text


def test_logprobs_agree_between_vllm_and_transformers(vllm_tiny, hf_tiny):
    reqs = [
        ScoreRequest(messages=[{"role": "user", "content": "Which response is better?"}], continuation=" (A)"),
        ScoreRequest(messages=[{"role": "user", "content": "Which response is better?"}], continuation=" (B)"),
        ScoreRequest(prompt="The answer is", continuation=" a short helpful story about the city river"),
        ScoreRequest(prompt="x", continuation="y"),
    ]
    a = vllm_tiny.score(reqs)
    b = hf_tiny.score(reqs)
    for ra, rb in zip(a, b):
        assert len(ra.token_logprobs) == len(rb.token_logprobs) > 0
        assert all(x < 0 and math.isfinite(x) for x in ra.token_logprobs)
        for x, y in zip(ra.token_logprobs, rb.token_logprobs):
            assert x == pytest.approx(y, abs=2e-3)
        assert ra.logprob == pytest.approx(sum(ra.token_logprobs), abs=1e-6)
    # a longer continuation has a lower total log-probability
    assert a[2].logprob < a[0].logprob


def test_json_schema_output_validates(vllm_tiny):
    reqs = [GenerationRequest(prompt=f"Rate item {i}", params=SamplingParams(max_tokens=48, temperature=1.0),
                              json_schema=SCHEMA) for i in range(6)]
    res = vllm_tiny.generate(reqs)
    parsed = [c.parsed for r in res for c in r.completions if c.finish_reason == "stop"]
    assert parsed, "no constrained output finished within max_tokens"
    for p in parsed:
        assert p["label"] in ("yes", "no") and 0 <= p["score"] <= 5


def test_transformers_backend_reports_schema_violations(hf_tiny):
    # transformers does not constrain decoding: a random model's text is not JSON, and that is reported
    res = hf_tiny.generate([GenerationRequest(prompt="Rate it", params=SamplingParams(max_tokens=6), json_schema=SCHEMA)])
    c = res[0].completions[0]
    assert c.parsed is None and c.error and "JSON" in c.error


def test_check_json_cases():
    assert check_json('{"label": "yes", "score": 3}', SCHEMA) == ({"label": "yes", "score": 3}, None)
    parsed, err = check_json('{"label": "maybe", "score": 3}', SCHEMA)
    assert parsed is None and "label" in err
    parsed, err = check_json('{"label": "yes"', SCHEMA)
    assert parsed is None and err.startswith("invalid JSON")
    parsed, err = check_json('{"label": "yes", "score": 9}', SCHEMA)
    assert parsed is None and "score" in err
    assert check_json("anything", None) == (None, None)


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="temprature"):
        SamplingParams.from_dict({"temprature": 0.5})
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=0)
    assert SamplingParams(stop="###").stop == ("###",)


def test_overlong_prompt_fails_alone(vllm_tiny, hf_tiny):
    huge = "the river " * 100_000  # ~1 MB prompt
    reqs = [GenerationRequest(prompt="Hello", params=SamplingParams(max_tokens=4)),
            GenerationRequest(messages=[{"role": "user", "content": huge}], params=SamplingParams(max_tokens=4)),
            GenerationRequest(prompt="Bye", params=SamplingParams(max_tokens=4))]
    for gen in (vllm_tiny, hf_tiny):
        res = gen.generate(reqs)
        assert res[1].error and "tokens" in res[1].error and not res[1].completions
        assert res[0].error is None and res[0].completions and res[2].completions
