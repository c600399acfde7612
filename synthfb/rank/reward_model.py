"""Scalar reward from a Hugging Face sequence-classification checkpoint.

:class:`RewardScorer` is THE reward-model scorer: the ``reward_model`` ranker
(:class:`RewardModelRanker`, used by the ``onpolicy_pairs`` stage) and PPO
(``synthfb.train.ppo``) both score through it, so one checkpoint gives one
number for one (prompt, response) wherever it is read.

Tokenization: exactly what the RM trainer (``synthfb train rm``) trains on,
i.e. ``synthfb.train.collate.Tokenizer.preference_example`` + ``collate_sequences``
(re-stated here because ``rank`` may not import ``train``; tests/test_rank.py
checks the two agree token for token and score for score):

- conversational (``prompt`` is a list of {role, content} messages): the prompt
  is the chat template with the generation prompt, the response is the rest of
  the template's rendering of ``prompt + [assistant turn]`` (its end-of-turn
  included; a plain string response is that assistant turn); no special
  tokens are added by the tokenizer (the template writes its own);
- standard (``prompt`` a string): ``tok(prompt)`` with the tokenizer's special
  tokens (e.g. BOS) followed directly by ``tok(response)`` without them, and an
  EOS appended unless the response already ends with one. No separator is
  inserted: the response is the continuation of the prompt text;
- truncation (the trainer's rule, not a left cut of the whole text): the
  prompt keeps its last ``max_prompt_length`` tokens, then the response keeps
  its first ``max(1, max_length - len(prompt))`` tokens. The limits default to
  those the checkpoint was trained with (its ``train_config.yaml``), else the
  tokenizer's ``model_max_length`` when it declares one, else none;
- rows are right-padded and the score is read at the LAST REAL TOKEN (found
  from the attention mask, with position ids from the mask) of decoder reward
  models (a ``score`` head, as ``LlamaForSequenceClassification``): the same
  forward as ``synthfb.train.rm.reward_scores``. ``pad_token_id`` is never
  used to find the end (it is wrong when pad == EOS). Encoder checkpoints
  (BERT/DeBERTa heads pool their own first token) use the model's logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.io import InputError


def _is_messages(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m for m in x)


def training_limits(path: str | Path) -> tuple[int | None, int | None]:
    """``(max_length, max_prompt_length)`` a synthfb-trained checkpoint was trained
    with (from its ``train_config.yaml``), or ``(None, None)``."""
    f = Path(path) / "train_config.yaml"
    if not f.is_file():
        return None, None
    import yaml

    try:
        cfg = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None, None
    if not isinstance(cfg, dict):
        return None, None

    def num(k):
        v = cfg.get(k)
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else None

    return num("max_length"), num("max_prompt_length")


class RewardScorer:
    """One scalar reward per (prompt, response), tokenized as the RM trainer
    tokenizes (module doc). ``score(prompts, responses) -> (N,) float32 tensor``;
    calling the scorer returns a list of floats (PPO's ``reward_fn`` protocol).

    ``prompts[i]`` is a string or a list of chat messages; ``responses[i]`` a
    string (or assistant messages after a conversational prompt).
    """

    def __init__(self, model, tokenizer, *, max_length: int | None = None, max_prompt_length: int | None = None,
                 batch_size: int = 8, label_index: int = 0):
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        num_labels = getattr(getattr(model, "config", None), "num_labels", 1)
        if label_index >= num_labels:
            raise ValueError(f"label_index {label_index} but the model has {num_labels} output label(s)")
        self.model = model
        self.tok = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.batch_size = batch_size
        self.label_index = label_index

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: str = "float32", device: Any = None,
                        max_length: int | None = None, max_prompt_length: int | None = None,
                        batch_size: int = 8, label_index: int = 0) -> RewardScorer:
        """Load a checkpoint folder (ours or a public reward model). Unset limits
        come from its ``train_config.yaml``, else ``tokenizer.model_max_length``."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=getattr(torch, dtype))
        model.config.pad_token_id = tok.pad_token_id
        if device is not None:
            model.to(device)
        model.eval()
        if max_length is None and max_prompt_length is None:
            max_length, max_prompt_length = training_limits(path)
            if max_length is None:
                m = getattr(tok, "model_max_length", None)
                max_length = m if isinstance(m, int) and 0 < m < 10**7 else None
        return cls(model, tok, max_length=max_length, max_prompt_length=max_prompt_length, batch_size=batch_size,
                   label_index=label_index)

    # -- tokenization (= synthfb.train.collate.Tokenizer) --------------------
    def _chat(self, messages, add_generation_prompt: bool) -> str:
        if getattr(self.tok, "chat_template", None) is None:
            raise InputError("conversational rows need a tokenizer with a chat template")
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def prompt_ids(self, prompt: Any) -> list[int]:
        if _is_messages(prompt):
            return self._ids(self._chat(prompt, True), False)
        if isinstance(prompt, str):
            return self._ids(prompt, True)
        raise InputError(f"prompt must be a string or a list of messages, got {type(prompt).__name__}")

    def response_ids(self, prompt: Any, response: Any) -> list[int]:
        if _is_messages(prompt) and isinstance(response, str):
            response = [{"role": "assistant", "content": response}]
        if _is_messages(prompt) or _is_messages(response):
            if not (_is_messages(prompt) and _is_messages(response)):
                raise InputError("conversational prompt and completion must both be message lists")
            head = self._chat(prompt, True)
            full = self._chat(list(prompt) + list(response), False)
            if not full.startswith(head):
                raise InputError("the chat template does not render the prompt as a prefix of the conversation")
            return self._ids(full[len(head):], False)
        if not isinstance(response, str):
            raise InputError(f"completion must be a string, got {type(response).__name__}")
        ids = self._ids(response, False)
        eos = self.tok.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return ids

    def token_ids(self, prompt: Any, response: Any) -> list[int]:
        """The scored sequence: prompt ids + response ids, truncated as in RM training."""
        p, r = self.prompt_ids(prompt), self.response_ids(prompt, response)
        if self.max_prompt_length and len(p) > self.max_prompt_length:
            p = p[-self.max_prompt_length:]
        if self.max_length:
            r = r[: max(1, self.max_length - len(p))]
        return p + r

    # -- forward ----------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) float32 scores of a padded batch (any padding side), with grad if enabled."""
        model = self.model
        head = getattr(model, "score", None)
        if isinstance(head, torch.nn.Module):
            am = attention_mask
            pos = (am.long().cumsum(-1) - 1).clamp(min=0)
            h = model.base_model(input_ids=input_ids, attention_mask=am, position_ids=pos, use_cache=False)
            h = h.last_hidden_state if hasattr(h, "last_hidden_state") else h[0]
            cols = torch.arange(am.shape[-1], device=am.device).expand_as(am)
            idx = torch.where(am.bool(), cols, torch.full_like(cols, -1)).max(-1).values
            logits = head(h[torch.arange(h.shape[0], device=h.device), idx])
        else:
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits[:, self.label_index].float()

    @torch.no_grad()
    def score(self, prompts: list, responses: list) -> torch.Tensor:
        """(N,) float32 rewards on the CPU, in batches of ``batch_size`` right-padded rows."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        model = self.model
        was = model.training
        model.eval()
        dev = next(model.parameters()).device
        pad_id = self.tok.pad_token_id
        out = []
        try:
            for s in range(0, len(prompts), self.batch_size):
                seqs = [self.token_ids(p, r) for p, r in zip(prompts[s:s + self.batch_size], responses[s:s + self.batch_size])]
                width = max(len(q) for q in seqs)
                ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
                am = torch.zeros((len(seqs), width), dtype=torch.long)
                for i, q in enumerate(seqs):
                    ids[i, : len(q)] = torch.tensor(q, dtype=torch.long)
                    am[i, : len(q)] = 1
                out.append(self.forward(ids.to(dev), am.to(dev)).cpu())
        finally:
            model.train(was)
        return torch.cat(out) if out else torch.zeros(0)

    def __call__(self, prompts: list, responses: list) -> list[float]:
        return self.score(prompts, responses).tolist()


class RewardModelRanker:
    """A scalar ranker over a :class:`RewardScorer`: ``score`` gives one reward
    per candidate; ``compare`` turns them into the matrix ``M[i, j] = r_i - r_j``
    (Bradley-Terry logits).

    A string prompt is scored as a conversational row (user turn + the
    candidate as the assistant turn; what ``onpolicy_pairs`` emits with its
    default ``format: conversational``) when the tokenizer has a chat template
    (or ``use_chat_template``), else as a standard row (prompt text + response
    text + EOS). A prompt given as messages is used as is.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        batch_size: int = 8,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        device: str | None = None,
        dtype: str = "float32",
        label_index: int = 0,
        use_chat_template: bool | None = None,
    ):
        self.path = str(path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.scorer = RewardScorer.from_pretrained(self.path, dtype=dtype, device=self.device, max_length=max_length,
                                                       max_prompt_length=max_prompt_length, batch_size=batch_size,
                                                       label_index=label_index)
        except ValueError as e:
            if "label_index" in str(e):
                raise ValueError(f"{self.path}: {e}") from None
            raise
        self.model, self.tok = self.scorer.model, self.scorer.tok
        self.label_index = label_index
        self.batch_size = batch_size
        self.max_length = self.scorer.max_length
        has_tpl = getattr(self.tok, "chat_template", None) is not None
        self.use_chat_template = has_tpl if use_chat_template is None else use_chat_template
        if self.use_chat_template and not has_tpl:
            raise ValueError(f"{self.path}: use_chat_template=true but the tokenizer has no chat template")
        self.name = f"reward_model:{Path(self.path).name}"

    def row(self, prompt: Any, response: str) -> tuple[Any, Any]:
        """The (prompt, response) row the scorer sees for this candidate."""
        if self.use_chat_template and isinstance(prompt, str):
            return [{"role": "user", "content": prompt}], [{"role": "assistant", "content": response}]
        return prompt, response

    def text(self, prompt: Any, response: str) -> str:
        """The scored sequence as text (before truncation)."""
        p, r = self.row(prompt, response)
        if _is_messages(p):
            return self.tok.apply_chat_template(list(p) + list(r), tokenize=False)
        return self.tok.decode(self.scorer.prompt_ids(p) + self.scorer.response_ids(p, r))

    def score(self, prompts: list[str], candidates: list[list[str]]) -> list[np.ndarray]:
        """One reward per candidate, per prompt (all prompts batched together)."""
        if len(prompts) != len(candidates):
            raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
        rows = [self.row(p, c) for p, cs in zip(prompts, candidates) for c in cs]
        flat = self.scorer.score([p for p, _ in rows], [r for _, r in rows]).tolist()
        out, k = [], 0
        for cs in candidates:
            out.append(np.array(flat[k:k + len(cs)], dtype=np.float64))
            k += len(cs)
        return out

    def compare(self, prompts: list[str], candidates: list[list[str]]) -> list[np.ndarray]:
        return [r[:, None] - r[None, :] for r in self.score(prompts, candidates)]

    def close(self) -> None:
        self.model = None
        self.scorer = None


def matrix_from_scores(r: Any) -> np.ndarray:
    """``M[i, j] = r_i - r_j`` for a vector of scalar rewards."""
    r = np.asarray(r, dtype=np.float64)
    return r[:, None] - r[None, :]
