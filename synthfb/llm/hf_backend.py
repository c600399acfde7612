"""Plain Hugging Face transformers backend, for machines without vLLM.

Batched ``model.generate`` with left padding. JSON-schema requests are not
constrained during decoding here (transformers has no built-in grammar
sampler); their outputs are still validated with ``jsonschema`` and an invalid
one carries ``Completion.error``.
"""

from __future__ import annotations

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


class TransformersGenerator:
    """Generator over ``AutoModelForCausalLM`` (CPU or one GPU)."""

    def __init__(
        self,
        model: str,
        *,
        seed: int = 0,
        dtype: str = "auto",
        batch_size: int = 16,
        device: str | None = None,
        trust_remote_code: bool = False,
        progress: bool = True,
        name: str | None = None,
        max_model_len: int | None = None,
    ):
        """``dtype`` ``auto`` is resolved by :func:`synthfb.llm.models.resolve_dtype`
        for the device (bfloat16 on a GPU or a CPU with native bf16, else
        float32) and kept in ``self.dtype``. ``max_model_len`` caps prompt + completion tokens as vLLM's does
        (default: the model's ``max_position_embeddings``): a longer prompt
        comes back as a failed result, and generation stops at the cap
        (finish reason ``length``)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        tok = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self.dtype = resolve_dtype(dtype, device=self.device)
        self.model = AutoModelForCausalLM.from_pretrained(
            model, dtype=getattr(torch, self.dtype), trust_remote_code=trust_remote_code
        ).to(self.device)
        self.model.eval()
        self.hf_tok = tok
        self.tokenizer = PromptTokenizer(tok)
        self.batch_size = batch_size
        self.seed = seed
        self.progress = progress
        self.info = ModelInfo(name=name or model, path=model, revision=model_revision(model), backend="transformers")
        self.usage = UsageCounter()
        self._eos = {i for i in [tok.eos_token_id, *(_as_list(self.model.generation_config.eos_token_id))] if i is not None}
        positions = int(getattr(self.model.config, "max_position_embeddings", 1 << 30))
        if max_model_len is not None and not 1 <= max_model_len <= positions:
            raise ValueError(f"max_model_len {max_model_len}: must be between 1 and the model's context "
                             f"(max_position_embeddings) {positions}")
        self.max_model_len = max_model_len or positions
        self._limit_name = "max_model_len" if max_model_len else "max_position_embeddings"

    def _pad_left(self, seqs: list[list[int]]):
        torch = self.torch
        width = max(len(s) for s in seqs)
        pad = self.hf_tok.pad_token_id
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    def generate(self, requests: list[GenerationRequest], desc: str = "") -> list[GenerationResult]:
        """Groups requests with identical sampling params into padded batches."""
        from tqdm.auto import tqdm

        torch = self.torch
        ctx = self.tokenizer.context_ids(requests)
        results: list[GenerationResult | None] = [None] * len(requests)
        groups: dict[Any, list[int]] = {}
        limit = self.max_model_len
        for i, r in enumerate(requests):
            if len(ctx[i]) >= limit:
                results[i] = GenerationResult(completions=[], prompt_tokens=len(ctx[i]), error=(
                    f"prompt has {len(ctx[i])} tokens; the model's context ({self._limit_name}) is {limit}"))
                self.usage.failures += 1
                continue
            groups.setdefault(r.params, []).append(i)
        hook = live.current()  # the runner's progress line, when one is shown
        bar = tqdm(total=len(requests), desc=desc or "generate (transformers)", disable=not self.progress or hook is not None)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        for params, idx in groups.items():
            idx.sort(key=lambda i: len(ctx[i]))
            for b in range(0, len(idx), self.batch_size):
                batch = idx[b:b + self.batch_size]
                ids, mask = self._pad_left([ctx[i] for i in batch])
                # greedy decoding is deterministic: decode once, repeat it n times
                per_prompt = params.n if params.temperature > 0 else 1
                kw: dict[str, Any] = dict(
                    # prompt + completion stay within the context (the longest prompt of the batch decides)
                    max_new_tokens=max(1, min(params.max_tokens, limit - max(len(ctx[i]) for i in batch))),
                    num_return_sequences=per_prompt,
                    pad_token_id=self.hf_tok.pad_token_id,
                )
                if params.temperature > 0:
                    # top_k=0: no top-k cut, as vLLM and the OpenAI API sample when none is asked for
                    # (transformers would otherwise apply its global default top_k=50, and e.g. PPO's
                    # rollouts would not be samples of the policy whose log-probs it scores)
                    kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
                else:
                    kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                if params.stop:
                    kw.update(stop_strings=list(params.stop), tokenizer=self.hf_tok)
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                with torch.no_grad():
                    out = self.model.generate(input_ids=ids, attention_mask=mask, **kw)
                new = out[:, ids.shape[1]:]
                for j, i in enumerate(batch):
                    comps = []
                    for k in range(params.n):
                        row = new[j * per_prompt + (k if per_prompt > 1 else 0)]
                        comps.append(self._completion(row.tolist(), params, requests[i].json_schema))
                    results[i] = GenerationResult(completions=comps, prompt_tokens=len(ctx[i]),
                                                  prompt_token_ids=list(ctx[i]))
                    self.usage.prompt_tokens += len(ctx[i])
                    self.usage.completion_tokens += sum(c.num_tokens for c in comps)
                bar.update(len(batch))
                if hook is not None:
                    hook(len(batch), len(requests), None)
        bar.close()
        self.usage.requests += len(requests)
        return results  # type: ignore[return-value]

    def _completion(self, toks: list[int], params, schema):
        pad = self.hf_tok.pad_token_id
        n = len(toks)
        while n and toks[n - 1] == pad and pad not in self._eos:
            n -= 1
        toks = toks[:n]
        finish = "length"
        cut = len(toks)
        for k, t in enumerate(toks):
            if t in self._eos:
                finish, cut = "stop", k
                break
        text = self.hf_tok.decode(toks[:cut], skip_special_tokens=True)
        for s in params.stop:
            pos = text.find(s)
            if pos >= 0:
                text, finish = text[:pos], "stop"
        n_tokens = cut + (1 if finish == "stop" and cut < len(toks) else 0)
        comp = make_completion(text, finish, n_tokens, schema)
        comp.token_ids = toks[:n_tokens]  # the sampled ids, the EOS it stopped on included
        return comp

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        """Continuation log-probs from one forward pass per padded batch."""
        torch = self.torch
        items = self.tokenizer.score_ids(requests)
        for i, (ids, _) in enumerate(items):
            if len(ids) > self.max_model_len:
                raise ValueError(f"score request {i}: {len(ids)} tokens exceed {self._limit_name} {self.max_model_len}")
        results = []
        for b in range(0, len(items), self.batch_size):
            batch = items[b:b + self.batch_size]
            ids, mask = self._pad_left([s for s, _ in batch])
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
            width = ids.shape[1]
            for j, (seq, start) in enumerate(batch):
                off = width - len(seq)
                lps = logp[j, off + start - 1: width - 1].tolist()
                results.append(ScoreResult(logprob=float(sum(lps)), token_logprobs=lps))
        self.usage.requests += len(requests)
        return results

    def close(self) -> None:
        self.model = None


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple, set)) else [x]
