"""Scoring several options after one context tokenizes the context once, with the same ids."""

from __future__ import annotations

from synthfb.llm.base import PromptTokenizer
from synthfb.llm.types import ScoreRequest


class CountingTokenizer:
    """Wraps a real tokenizer and counts the texts it is asked to encode."""

    def __init__(self, tok):
        self.tok, self.encoded = tok, 0
        self.chat_template = tok.chat_template

    def __call__(self, texts, **kw):
        self.encoded += len(texts)
        return self.tok(texts, **kw)

    def apply_chat_template(self, *a, **kw):
        return self.tok.apply_chat_template(*a, **kw)


def test_shared_context_tokenized_once_same_ids(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    chat = [{"role": "user", "content": "Which is better?"}]
    reqs = [ScoreRequest(continuation=o, prompt=p) for p in ("ctx one", "ctx two") for o in (" (A)", " (B)")]
    reqs += [ScoreRequest(continuation=o, messages=chat) for o in (" (A)", " (B)")]
    reqs += [ScoreRequest(continuation=" (A)", messages=[{**chat[0], "name": "x"}])]  # differs: its own context
    counting = CountingTokenizer(tok)
    got = PromptTokenizer(counting).score_ids(reqs)
    # reference: each request tokenized alone, as before sharing
    ref = [PromptTokenizer(tok).score_ids([r])[0] for r in reqs]
    assert got == ref
    assert counting.encoded == 4 + len(reqs)  # 4 distinct contexts, then every continuation
