"""Reward model training: Bradley-Terry pairs, or ranked lists of K completions
(InstructGPT's loss over all C(K,2) pairs of a ranking, or Plackett-Luce).

The model is ``AutoModelForSequenceClassification`` with one label (a fresh
linear ``score`` head on the LM's last hidden state). The score is read at
the last *real* token of each row, found from the attention mask, so it is
right for left or right padding and when pad == eos (transformers' own
pooling looks for the pad id and gets that case wrong).

Ranked rows (``ranked: true``; columns in :mod:`synthfb.train.collate`:
``prompt``, ``completions``, ``ranks`` and/or ``scores``) put all K
completions of one prompt in the same batch: one forward per completion, and
every pair of the ranking is built from those K scores (Ouyang et al. 2022,
section 3.5: feeding the C(K,2) pairs as separate examples overfits within an
epoch, since each completion then gets K - 1 separate updates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from . import loop
from .collate import Tokenizer, collate_pairs, collate_sequences, load_rows
from .config import TrainConfig, _f
from .logprobs import last_token_index, position_ids_from_mask, takes_4d_mask


@dataclass
class RMConfig(TrainConfig):
    """Reward model (``synthfb train rm``)."""

    margin_column: str | None = _f(None, "column with a per-pair margin m: loss -log sigmoid(r_c - r_r - m) (Llama 2); "
                                         "none by default: the pipelines' `score_margin` is in the ranker's own unit")
    soft_label_column: str | None = _f(None, "column with p(chosen preferred) per row (e.g. CAI's `p_chosen`): BT loss "
                                             "on the soft target, -(p log s(d) + (1-p) log s(-d)) (Bai et al. 2022)")
    center_rewards_coef: float = _f(0.0, "reward centering (Eisenstein et al. 2023): adds coef * mean((r_c + r_r)^2)", ge=0)
    share_prompt: bool = _f(True, "pairwise rows: compute each pair's prompt once, the rejected tokens masked from "
                                  "the chosen ones (prefix sharing, Wang et al. 2024; decoder-only models with sdpa "
                                  "or flex attention, others repeat the prompt); false: the prompt repeated per "
                                  "completion, as TRL does (same scores up to float rounding)")
    ranked: bool = _f(False, "rows are ranked lists of K >= 2 completions per prompt (`prompt`, `completions`, and "
                             "`ranks` (1 = best, equal = tie) or `scores` (higher = better)); the loss is `ranked_loss`")
    ranked_loss: Literal["instructgpt", "plackett_luce"] = _f(
        "plackett_luce", "loss on ranked rows (with ranked: true): `instructgpt` = -log sigmoid(r_w - r_l) averaged over "
                         "the C(K,2) pairs of each prompt's ranking, tied pairs skipped (Ouyang et al. 2022, Eq. 1; the "
                         "paper's K is 4-9); `plackett_luce` = the likelihood of the whole order (ties kept in row order)")
    learning_rate: float = _f(1e-5, "peak learning rate (AdamW)", gt=0)

    def check(self) -> None:
        if self.ranked and (self.margin_column or self.soft_label_column):
            raise ValueError("fields `margin_column` and `soft_label_column` are for pairs; ranked lists (ranked: "
                             "true) use neither")
        if self.ranked and self.center_rewards_coef:
            raise ValueError("field `center_rewards_coef` is for pairs; ranked lists (ranked: true) do not use it")


def load_reward_model(path: str, dtype: str = "float32", device=None):
    """A one-label sequence classifier from an LM or RM checkpoint, plus its tokenizer."""
    from transformers import AutoModelForSequenceClassification

    tok = loop.load_tokenizer(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=getattr(torch, dtype))
    model.config.pad_token_id = tok.pad_token_id
    if device is not None:
        model.to(device)
    return model, tok


def _scores_at(model, input_ids, attention_mask, position_ids, rows, cols) -> torch.Tensor:
    """The score head on the last hidden states at (``rows``, ``cols``)."""
    h = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False)
    h = h.last_hidden_state if hasattr(h, "last_hidden_state") else h[0]
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no `score` head")
    return head(h[rows.to(h.device), cols.to(h.device)])[:, 0].float()


def reward_scores(model, input_ids, attention_mask) -> torch.Tensor:
    """(B,) scores at the last real token of each row (any padding side)."""
    rows = torch.arange(input_ids.shape[0])
    return _scores_at(model, input_ids, attention_mask, position_ids_from_mask(attention_mask), rows,
                      last_token_index(attention_mask))


def shared_prompt_scores(model, b: dict) -> torch.Tensor:
    """(2B,) scores of a prefix-shared pair batch (:func:`~.collate.collate_shared_prompt`): the B chosen
    sequences first, then the B rejected, as :func:`reward_scores` gives them for the prompt repeated."""
    ends = b["ends"]
    rows = torch.arange(ends.shape[0])
    return _scores_at(model, b["input_ids"], b["attention_mask"], b["position_ids"], torch.cat([rows, rows]),
                      torch.cat([ends[:, 0], ends[:, 1]]))


def pair_scores(model, b: dict) -> torch.Tensor:
    """Scores of a pairwise :func:`_batch`, chosen rows first (shared prompt or repeated)."""
    if "ends" in b:
        return shared_prompt_scores(model, b)
    return reward_scores(model, b["input_ids"], b["attention_mask"])


def bt_loss(r_chosen, r_rejected, margin=None, center_coef: float = 0.0, p_chosen=None) -> torch.Tensor:
    """Per-pair Bradley-Terry loss ``-log sigmoid(r_c - r_r - margin)`` (+ centering).

    Bradley & Terry 1952; the margin term follows Llama 2 (Touvron et al.
    2023); centering follows Eisenstein et al. 2023 ("Helping or Herding?").

    ``p_chosen`` (per pair, in [0, 1]) makes the target soft: with
    ``d = r_c - r_r - margin`` the loss is the cross-entropy
    ``-(p log sigmoid(d) + (1 - p) log sigmoid(-d))``, as Constitutional AI
    trains its preference model on the feedback model's probabilities
    (Bai et al. 2022, arXiv:2212.08073). ``p = 1`` is the hard loss.
    """
    d = r_chosen - r_rejected
    if margin is not None:
        d = d - margin
    loss = -F.logsigmoid(d)
    if p_chosen is not None:
        loss = p_chosen * loss - (1.0 - p_chosen) * F.logsigmoid(-d)
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected) ** 2
    return loss


def plackett_luce_loss(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-list Plackett-Luce negative log-likelihood of the order best-first.

    ``scores`` (B, K) are in the ranked order (column 0 = best); ``mask`` (B, K)
    marks real entries. -sum_i [s_i - logsumexp(s_i..s_K)] (Plackett 1975,
    Luce 1959); K = 2 gives Bradley-Terry.
    """
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    s = scores.masked_fill(~mask.bool(), float("-inf"))
    tail = torch.logcumsumexp(s.flip(-1), -1).flip(-1)
    terms = torch.where(mask.bool(), s - tail, torch.zeros_like(s))
    return -terms[:, :-1].sum(-1)


def ranking_pairs(ranks: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K, K) bool: ``[b, w, l]`` is True when completion w is ranked strictly
    better than completion l (``ranks`` (B, K): 1 = best); equal ranks (ties) and
    entries outside ``mask`` (B, K) make no pair."""
    better = ranks[:, :, None] < ranks[:, None, :]
    if mask is not None:
        m = mask.bool()
        better = better & m[:, :, None] & m[:, None, :]
    return better


def instructgpt_loss(scores: torch.Tensor, ranks: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-prompt K-way reward-model loss of InstructGPT (Ouyang et al. 2022, Eq. 1).

    ``loss(theta) = -1/C(K,2) E_{(x, y_w, y_l) ~ D}[log sigmoid(r(x, y_w) - r(x, y_l))]``:
    for each prompt, the mean over every pair (w, l) of its ranking with w
    ranked better than l. ``scores`` (B, K) are the rewards of the K
    completions of each prompt (any order), ``ranks`` (B, K) their ranks (1 =
    best), ``mask`` (B, K) marks real entries (K may differ between prompts).
    Returns (B,). A tie is not a comparison, so a prompt with ties averages over
    its untied pairs (C(K,2) of them when there are no ties); a prompt with
    no untied pair gives 0. K = 2 is the Bradley-Terry loss of the pair.
    """
    pairs = ranking_pairs(ranks, mask)
    d = scores[:, :, None] - scores[:, None, :]
    per_pair = torch.where(pairs, -F.logsigmoid(d), torch.zeros_like(d))
    return per_pair.sum((1, 2)) / pairs.sum((1, 2)).clamp(min=1)


def _batch(items: list[dict], pad_id: int, ranked: bool, share_prompt: bool = False) -> dict:
    if ranked:
        K = max(len(e["completion_ids"]) for e in items)
        prompts, comps, real, ranks = [], [], [], []
        for e in items:
            rk = e.get("ranks") or list(range(1, len(e["completion_ids"]) + 1))
            for k in range(K):
                has = k < len(e["completion_ids"])
                prompts.append(e["prompt_ids"])
                comps.append(e["completion_ids"][k] if has else e["completion_ids"][-1])
                real.append(has)
                ranks.append(rk[k] if has else 0)
        b = collate_sequences(prompts, comps, pad_id, "right")
        b["list_mask"] = torch.tensor(real).view(len(items), K)
        b["ranks"] = torch.tensor(ranks, dtype=torch.long).view(len(items), K)
        return b
    b = collate_pairs(items, pad_id, share_prompt)
    b["margin"] = torch.tensor([e.get("margin", 0.0) for e in items], dtype=torch.float32)
    b["p_chosen"] = torch.tensor([e.get("p_chosen", 1.0) for e in items], dtype=torch.float32)
    return b


def rm_task(tok, cfg: RMConfig, share_prompt: bool | None = None) -> loop.Task:
    share = cfg.share_prompt if share_prompt is None else share_prompt

    def loss(model, b):
        if cfg.ranked:
            r = reward_scores(model, b["input_ids"], b["attention_mask"])
        if cfg.ranked and cfg.ranked_loss == "instructgpt":
            s = r.view(b["list_mask"].shape)
            losses = instructgpt_loss(s, b["ranks"], b["list_mask"])
            with torch.no_grad():
                pairs = ranking_pairs(b["ranks"], b["list_mask"]).float()
                n = pairs.sum((1, 2)).clamp(min=1)
                d = s[:, :, None] - s[:, None, :]
                m = b["list_mask"].float()
                ms = {"reward_accuracy": float((((d > 0).float() * pairs).sum((1, 2)) / n).sum()),
                      "reward_margin": float(((d * pairs).sum((1, 2)) / n).sum()),
                      "reward_mean": float(((s * m).sum(-1) / m.sum(-1)).sum())}
            return losses.sum(), ms
        if cfg.ranked:
            s = r.view(b["list_mask"].shape)
            losses = plackett_luce_loss(s, b["list_mask"])
            with torch.no_grad():
                acc = (s[:, 0] > s[:, 1]).float()
                ms = {"reward_accuracy": float(acc.sum()), "reward_margin": float((s[:, 0] - s[:, 1]).sum()),
                      "reward_mean": float(s[b["list_mask"]].mean()) * s.shape[0]}
            return losses.sum(), ms
        r = pair_scores(model, b)
        k = r.shape[0] // 2
        rc, rr = r[:k], r[k:]
        losses = bt_loss(rc, rr, b["margin"], cfg.center_rewards_coef,
                         b["p_chosen"] if cfg.soft_label_column else None)
        with torch.no_grad():
            ms = {"reward_accuracy": float((rc > rr).float().sum()), "reward_margin": float((rc - rr).sum()),
                  "reward_mean": float(((rc + rr) / 2).sum())}
        return losses.sum(), ms

    def count(b):
        return float(b["list_mask"].shape[0] if cfg.ranked else b["margin"].shape[0])

    return loop.Task(lambda items: _batch(items, tok.pad_token_id, cfg.ranked, share), count, loss,
                     lambda b: int(b["pair_tokens"]) if "pair_tokens" in b else int(b["attention_mask"].sum()))


def build_examples(cfg: RMConfig, tok, rows: list[dict] | None = None) -> list[dict]:
    """Tokenized examples of ``rows``. With the ``instructgpt`` ranked loss, a
    row whose completions all tie holds no comparison and is left out (how
    many: ``skipped_all_tied`` in :func:`train_rm`'s summary); an error when
    no row is left."""
    from ..data.io import InputError

    t = Tokenizer(tok, cfg.max_length, cfg.max_prompt_length)
    rows = load_rows(cfg.dataset) if rows is None else rows
    out = []
    for i, r in enumerate(rows):
        if cfg.ranked:
            ex = t.ranked_example(r, i)
            if cfg.ranked_loss == "instructgpt" and len(set(ex["ranks"])) == 1:
                continue
            out.append(ex)
            continue
        ex = t.preference_example(r, i)
        if cfg.margin_column and r.get(cfg.margin_column) is not None:
            m = r[cfg.margin_column]
            if not isinstance(m, (int, float)) or isinstance(m, bool):
                raise InputError(f"row {i}: `{cfg.margin_column}` must be a number, got {m!r}")
            ex["margin"] = float(m)
        if cfg.soft_label_column:
            p = r.get(cfg.soft_label_column)
            if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
                raise InputError(f"row {i}: `{cfg.soft_label_column}` (soft_label_column) must be a probability "
                                 f"in [0, 1], got {p!r}")
            ex["p_chosen"] = float(p)
        out.append(ex)
    if cfg.ranked and rows and not out:
        raise InputError(f"{cfg.dataset}: no ranked row has two completions of different rank; nothing to train on")
    return out


@torch.no_grad()
def pair_accuracy(model, tok, examples: list[dict], batch_size: int = 16) -> float:
    """Fraction of (chosen, rejected) pairs scored chosen > rejected; for ranked
    examples, of all untied pairs of every ranking scored in rank order
    (:func:`ranked_pair_accuracy`)."""
    if examples and "completion_ids" in examples[0]:
        return ranked_pair_accuracy(model, tok, examples, batch_size)
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    right = 0
    for s in range(0, len(examples), batch_size):
        items = examples[s:s + batch_size]
        b = _batch(items, tok.pad_token_id, False)
        r = pair_scores(model, loop.to_device(b, dev))
        right += int((r[: len(items)] > r[len(items):]).sum())
    model.train(was)
    return right / max(1, len(examples))


@torch.no_grad()
def ranked_pair_accuracy(model, tok, examples: list[dict], batch_size: int = 16) -> float:
    """Over every untied pair (w ranked better than l) of every ranked example,
    the fraction with r(x, y_w) > r(x, y_l) (pairs pooled over prompts)."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    right = total = 0
    for s in range(0, len(examples), batch_size):
        b = _batch(examples[s:s + batch_size], tok.pad_token_id, True)
        r = reward_scores(model, b["input_ids"].to(dev), b["attention_mask"].to(dev)).cpu()
        sc = r.view(b["list_mask"].shape)
        pairs = ranking_pairs(b["ranks"], b["list_mask"])
        right += int(((sc[:, :, None] > sc[:, None, :]) & pairs).sum())
        total += int(pairs.sum())
    model.train(was)
    return right / max(1, total)


@loop.owns_output
def train_rm(cfg: RMConfig, rows: list[dict] | None = None) -> dict:
    """Train a reward model; it ends up in ``cfg.output_dir`` (a sequence-classification checkpoint)."""
    loop.seed_all(cfg.seed)
    rows = load_rows(cfg.dataset) if rows is None else rows  # data errors before the model loads
    model, tok = load_reward_model(cfg.model, cfg.dtype, loop.device_of(cfg))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    ex = build_examples(cfg, tok, rows)
    summary = loop.run(cfg, model, tok, ex, rm_task(tok, cfg, cfg.share_prompt and takes_4d_mask(model)))
    summary.update(model=model, tokenizer=tok, examples=ex, skipped_all_tied=len(rows) - len(ex))
    return summary
