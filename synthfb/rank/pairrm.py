"""PairRM-style pairwise cross-encoder (LLM-Blender, spec 5.1).

One DeBERTa-v2 encoder reads a JOINT sequence: the source (prompt) and both
candidates, each segment opened by a special prefix token
(``<|source|>``, ``<|candidate1|>``, ``<|candidate2|>``) and encoded with the
tokenizer's own special tokens, as on the PairRM-hf model card. The
last-layer hidden states at the three prefix tokens feed a shared head
``[h_src; h_cand] -> Linear(2H, H) -> Tanh -> Linear(H, n_tasks)``; the pair
logit is ``s1 - s2`` (> 0: candidate 1 is better), averaged over tasks.

Parameter names match the published ``llm-blender/PairRM-hf`` checkpoint
(``pretrained_model.*``, ``head_layer.*``), so a user's local copy of it loads
with :class:`PairRMRanker`. Nothing is downloaded here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoTokenizer, DebertaV2Config
from transformers.models.deberta_v2.modeling_deberta_v2 import DebertaV2Model, DebertaV2PreTrainedModel

SOURCE_PREFIX = "<|source|>"
CAND_PREFIX = "<|candidate|>"
CAND1_PREFIX = "<|candidate1|>"
CAND2_PREFIX = "<|candidate2|>"
PREFIX_TOKENS = (SOURCE_PREFIX, CAND_PREFIX, CAND1_PREFIX, CAND2_PREFIX)


class DebertaV2PairRM(DebertaV2PreTrainedModel):
    """The cross-encoder. ``forward`` returns the pair logits ``s1 - s2``
    (shape ``[batch]``); ``candidate_scores`` returns ``(s1, s2)``."""

    def __init__(self, config: DebertaV2Config):
        super().__init__(config)
        for attr in ("source_prefix_id", "cand1_prefix_id", "cand2_prefix_id"):
            if getattr(config, attr, None) is None:
                raise ValueError(f"PairRM config needs {attr!r} (the token id of its prefix token)")
        self.n_tasks = getattr(config, "n_tasks", 1)
        drop = getattr(config, "drop_out", 0.05)
        h = config.hidden_size
        self.pretrained_model = DebertaV2Model(config)
        self.head_layer = nn.Sequential(
            nn.Dropout(drop), nn.Linear(2 * h, h), nn.Tanh(), nn.Dropout(drop), nn.Linear(h, self.n_tasks)
        )
        self.post_init()

    def _prefix_states(self, enc: torch.Tensor, ids: torch.Tensor, token_id: int, what: str) -> torch.Tensor:
        hit = ids == token_id
        counts = hit.sum(-1)
        if not bool((counts == 1).all()):
            bad = int((counts != 1).nonzero()[0, 0])
            raise ValueError(f"PairRM input {bad}: expected exactly one {what} prefix token, found {int(counts[bad])}")
        pos = hit.float().argmax(-1)
        return enc[torch.arange(enc.shape[0], device=enc.device), pos]

    def candidate_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = attention_mask.ne(0).any(dim=0)  # drop all-padding columns
        input_ids, attention_mask = input_ids[:, keep], attention_mask[:, keep]
        enc = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        c = self.config
        src = self._prefix_states(enc, input_ids, c.source_prefix_id, "source")
        c1 = self._prefix_states(enc, input_ids, c.cand1_prefix_id, "candidate1")
        c2 = self._prefix_states(enc, input_ids, c.cand2_prefix_id, "candidate2")
        s1 = self.head_layer(torch.cat([src, c1], dim=-1))
        s2 = self.head_layer(torch.cat([src, c2], dim=-1))
        return s1, s2

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> torch.Tensor:
        s1, s2 = self.candidate_scores(input_ids, attention_mask)
        return (s1 - s2).mean(dim=-1)


def init_pairrm(config: DebertaV2Config, tokenizer: Any, out_dir: str | Path | None = None,
                seed: int = 0) -> DebertaV2PairRM:
    """A freshly initialised PairRM-style model for ``config`` (e.g. a tiny
    one for tests, or deberta-v3 sizes before training). Adds the prefix
    tokens to ``tokenizer`` when missing and records their ids in the config.
    Saves model + tokenizer to ``out_dir`` when given."""
    missing = [t for t in PREFIX_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    config.vocab_size = max(config.vocab_size, len(tokenizer))
    config.source_prefix_id = tokenizer.convert_tokens_to_ids(SOURCE_PREFIX)
    config.cand_prefix_id = tokenizer.convert_tokens_to_ids(CAND_PREFIX)
    config.cand1_prefix_id = tokenizer.convert_tokens_to_ids(CAND1_PREFIX)
    config.cand2_prefix_id = tokenizer.convert_tokens_to_ids(CAND2_PREFIX)
    config.sep_token_id = tokenizer.sep_token_id
    config.n_tasks = getattr(config, "n_tasks", 1) or 1
    config.drop_out = getattr(config, "drop_out", 0.05)
    config.architectures = ["DebertaV2PairRM"]
    torch.manual_seed(seed)
    model = DebertaV2PairRM(config)
    if out_dir is not None:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return model


class PairRMRanker:
    """A :class:`~synthfb.rank.PairwiseRanker` over a local PairRM checkpoint
    folder (config + weights + tokenizer). ``compare`` runs every ordered
    pair (N(N-1) passes per prompt, the full matrix of spec 5.2)."""

    def __init__(
        self,
        path: str | Path,
        *,
        batch_size: int = 8,
        source_max_length: int = 1224,
        candidate_max_length: int = 412,
        device: str | None = None,
        dtype: str = "float32",
    ):
        self.path = str(path)
        if not Path(self.path).is_dir():
            raise FileNotFoundError(f"PairRM checkpoint folder {self.path!r} not found (no hub downloads here)")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = AutoTokenizer.from_pretrained(self.path)
        absent = [t for t in (SOURCE_PREFIX, CAND1_PREFIX, CAND2_PREFIX) if t not in self.tok.get_vocab()]
        if absent:
            raise ValueError(f"{self.path}: tokenizer lacks the PairRM prefix token(s) {absent}")
        self.model = DebertaV2PairRM.from_pretrained(self.path, dtype=getattr(torch, dtype)).to(self.device)
        self.model.eval()
        self.batch_size = batch_size
        self.source_max_length = source_max_length
        self.candidate_max_length = candidate_max_length
        self.name = f"pairrm:{Path(self.path).name}"

    def _clean(self, text: str) -> str:
        sep = self.tok.sep_token
        return text.replace(sep, " ") if sep else text

    def encode_pair(self, source: str, cand1: str, cand2: str) -> list[int]:
        """Token ids of the joint sequence; each candidate gets half of what
        the source leaves of ``source_max_length + 2 * candidate_max_length``."""
        total = self.source_max_length + 2 * self.candidate_max_length
        src = self.tok.encode(SOURCE_PREFIX + self._clean(source), max_length=self.source_max_length, truncation=True)
        room = (total - len(src)) // 2
        a = self.tok.encode(CAND1_PREFIX + self._clean(cand1), max_length=room, truncation=True)
        b = self.tok.encode(CAND2_PREFIX + self._clean(cand2), max_length=room, truncation=True)
        return src + a + b

    def pair_logits(self, triples: list[tuple[str, str, str]]) -> np.ndarray:
        """``s1 - s2`` for each (source, candidate1, candidate2)."""
        out: list[float] = []
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        for b in range(0, len(triples), self.batch_size):
            seqs = [self.encode_pair(*t) for t in triples[b:b + self.batch_size]]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
            with torch.no_grad():
                logits = self.model(ids.to(self.device), mask.to(self.device))
            out.extend(float(x) for x in logits.float().cpu())
        return np.array(out, dtype=np.float64)

    def compare(self, prompts: list[str], candidates: list[list[str]]) -> list[np.ndarray]:
        if len(prompts) != len(candidates):
            raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
        triples, index = [], []
        for k, (p, cands) in enumerate(zip(prompts, candidates)):
            for i, a in enumerate(cands):
                for j, b in enumerate(cands):
                    if i != j:
                        triples.append((p, a, b))
                        index.append((k, i, j))
        logits = self.pair_logits(triples) if triples else np.zeros(0)
        mats = [np.zeros((len(c), len(c))) for c in candidates]
        for (k, i, j), x in zip(index, logits):
            mats[k][i, j] = x
        return mats

    def close(self) -> None:
        self.model = None
