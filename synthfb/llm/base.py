"""Helpers shared by the Generator backends (no engine imports here)."""

from __future__ import annotations

import json
from typing import Any

from .types import Completion


def check_json(text: str, schema: dict[str, Any] | None) -> tuple[Any, str | None]:
    """Parse ``text`` as JSON and validate it against ``schema``.

    Returns ``(parsed, None)`` on success or ``(None, reason)``; never raises,
    so one bad output never crashes a chunk.
    """
    if schema is None:
        return None, None
    import jsonschema

    try:
        # strict=False: a raw control character inside a string (which grammar-constrained decoding lets
        # through) is read as the character, not refused
        parsed = json.loads(text, strict=False)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg} at char {e.pos}"
    try:
        jsonschema.validate(parsed, schema)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        return None, f"schema violation at {where}: {e.message}"
    return parsed, None


def make_completion(text: str, finish_reason: str | None, num_tokens: int, schema: dict | None) -> Completion:
    """Build a Completion, validating JSON output when a schema was asked for."""
    parsed, error = check_json(text, schema)
    return Completion(
        text=text,
        finish_reason=finish_reason or "unknown",
        num_tokens=num_tokens,
        parsed=parsed,
        error=error,
    )


class PromptTokenizer:
    """Turns requests into token ids the same way for every local backend.

    Chat messages are rendered with the model's chat template and tokenized
    without extra special tokens (the template already has them); raw prompts
    are tokenized as the tokenizer does by default. Continuations to score are
    tokenized on their own and appended, so all backends score the same ids.
    """

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        if getattr(tokenizer, "chat_template", None) is None:
            self._has_template = False
        else:
            self._has_template = True

    def render(self, messages_batch: list[list[dict[str, str]]]) -> list[str]:
        if not self._has_template:
            raise ValueError(
                "this model's tokenizer has no chat template; use raw `prompt` requests "
                "(stage option `chat: false`) or pick an instruct model"
            )
        if not messages_batch:
            return []
        return self.tok.apply_chat_template(messages_batch, tokenize=False, add_generation_prompt=True)

    def context_ids(self, items: list[Any]) -> list[list[int]]:
        """Token ids of each item's context (``messages`` or ``prompt``).

        A context shared by several items (one per option or label when
        scoring) is rendered and tokenized once."""
        keys = [("p", r.prompt) if r.messages is None else
                ("m", json.dumps(r.messages, sort_keys=True)) for r in items]
        first: dict[Any, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        if len(first) < len(items):
            uniq = list(first.values())
            ids = self._context_ids([items[i] for i in uniq])
            by_key = {keys[i]: x for i, x in zip(uniq, ids)}
            return [list(by_key[k]) for k in keys]
        return self._context_ids(items)

    def _context_ids(self, items: list[Any]) -> list[list[int]]:
        out: list[list[int] | None] = [None] * len(items)
        chat_idx = [i for i, r in enumerate(items) if r.messages is not None]
        raw_idx = [i for i, r in enumerate(items) if r.messages is None]
        if chat_idx:
            texts = self.render([items[i].messages for i in chat_idx])
            ids = self.tok(texts, add_special_tokens=False)["input_ids"]
            for i, x in zip(chat_idx, ids):
                out[i] = list(x)
        if raw_idx:
            ids = self.tok([items[i].prompt for i in raw_idx])["input_ids"]
            for i, x in zip(raw_idx, ids):
                out[i] = list(x)
        return out  # type: ignore[return-value]

    def score_ids(self, items: list[Any]) -> list[tuple[list[int], int]]:
        """(context + continuation ids, index where the continuation starts)."""
        ctx = self.context_ids(items)
        conts = self.tok([r.continuation for r in items], add_special_tokens=False)["input_ids"]
        out = []
        for i, (c, k) in enumerate(zip(ctx, conts)):
            if not k:
                raise ValueError(f"score request {i}: the continuation is empty after tokenization")
            if not c:
                raise ValueError(f"score request {i}: the context is empty after tokenization")
            out.append((c + list(k), len(c)))
        return out
