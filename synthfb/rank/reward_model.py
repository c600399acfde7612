"""Scalar reward from any Hugging Face sequence-classification checkpoint.

Works with checkpoints from our RM trainer and with public reward models
(``AutoModelForSequenceClassification``, one output label). Each (prompt,
response) is rendered with the tokenizer's chat template when it has one
(user turn + assistant turn), otherwise as ``prompt + "\\n\\n" + response``.

Decoder reward models (a ``score`` head over the last hidden state, as in
``LlamaForSequenceClassification``) are read at the LAST REAL TOKEN found from
the attention mask, not from ``pad_token_id`` (which is unreliable when the
pad token equals the EOS token that ends every chat turn). Encoder models
(BERT/DeBERTa heads pool their own first token) use the model's logits.
Long inputs are truncated from the left so the end of the response is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class RewardModelRanker:
    """A scalar ranker: ``score`` gives one reward per candidate; ``compare``
    turns them into the matrix ``M[i, j] = r_i - r_j`` (Bradley-Terry logits)."""

    def __init__(
        self,
        path: str | Path,
        *,
        batch_size: int = 8,
        max_length: int = 2048,
        device: str | None = None,
        dtype: str = "float32",
        label_index: int = 0,
        use_chat_template: bool | None = None,
    ):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.path = str(path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = AutoTokenizer.from_pretrained(self.path)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "right"
        self.tok.truncation_side = "left"
        self.model = AutoModelForSequenceClassification.from_pretrained(
            self.path, dtype=getattr(torch, dtype)
        ).to(self.device)
        self.model.eval()
        if label_index >= self.model.config.num_labels:
            raise ValueError(f"{self.path}: label_index {label_index} but the model has "
                             f"{self.model.config.num_labels} output label(s)")
        self.label_index = label_index
        self.batch_size = batch_size
        self.max_length = max_length
        has_tpl = getattr(self.tok, "chat_template", None) is not None
        self.use_chat_template = has_tpl if use_chat_template is None else use_chat_template
        if self.use_chat_template and not has_tpl:
            raise ValueError(f"{self.path}: use_chat_template=true but the tokenizer has no chat template")
        self.name = f"reward_model:{Path(self.path).name}"

    def text(self, prompt: str, response: str) -> str:
        if self.use_chat_template:
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            return self.tok.apply_chat_template(msgs, tokenize=False)
        return f"{prompt}\n\n{response}"

    def _rewards(self, texts: list[str]) -> list[float]:
        torch = self.torch
        head = getattr(self.model, "score", None)
        out: list[float] = []
        for b in range(0, len(texts), self.batch_size):
            enc = self.tok(
                texts[b:b + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=not self.use_chat_template,
                return_tensors="pt",
            ).to(self.device)
            with torch.no_grad():
                if isinstance(head, torch.nn.Module):
                    hidden = self.model.base_model(input_ids=enc["input_ids"],
                                                   attention_mask=enc["attention_mask"]).last_hidden_state
                    last = enc["attention_mask"].sum(-1) - 1
                    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
                    logits = head(h)
                else:
                    logits = self.model(**enc).logits
            out.extend(float(x) for x in logits[:, self.label_index].float().cpu())
        return out

    def score(self, prompts: list[str], candidates: list[list[str]]) -> list[np.ndarray]:
        """One reward per candidate, per prompt (all prompts batched together)."""
        if len(prompts) != len(candidates):
            raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
        texts = [self.text(p, c) for p, cs in zip(prompts, candidates) for c in cs]
        flat = self._rewards(texts)
        out, k = [], 0
        for cs in candidates:
            out.append(np.array(flat[k:k + len(cs)], dtype=np.float64))
            k += len(cs)
        return out

    def compare(self, prompts: list[str], candidates: list[list[str]]) -> list[np.ndarray]:
        return [r[:, None] - r[None, :] for r in self.score(prompts, candidates)]

    def close(self) -> None:
        self.model = None


def matrix_from_scores(r: Any) -> np.ndarray:
    """``M[i, j] = r_i - r_j`` for a vector of scalar rewards."""
    r = np.asarray(r, dtype=np.float64)
    return r[:, None] - r[None, :]
