"""Batched log-probabilities of completion tokens given their prompt.

Works for left- and right-padded batches alike: position ids are derived
from the attention mask (``cumsum - 1``), so a padded row sees the same
positions as the row would alone, and masked positions are removed with
``torch.where`` (padding logits may be NaN on some attention kernels; a
multiply-by-zero would let the NaN through).

The vocabulary projection is applied only where a log-prob is needed (the
``loss_mask`` positions), which is what keeps memory low on long prompts and
large vocabularies.
"""

from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens of each row (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


MASK_ATTENTION = ("sdpa", "flex_attention")
"""Attention implementations that read a 4D boolean ``attention_mask`` as a mask (eager attention would add it
as 0/1 and mask nothing; flash-attention takes no 4D mask)."""


def takes_4d_mask(model) -> bool:
    """Whether ``model``'s attention applies a 4D boolean mask (packed SFT rows, prefix-shared pairs)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) in MASK_ATTENTION


def _needs_full_logits(model) -> bool:
    cfg = getattr(model, "config", None)
    return bool(getattr(cfg, "final_logit_softcapping", None)) or not hasattr(model, "get_decoder")


def hidden_states(model, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
    """Last hidden states of a causal LM's decoder (no vocabulary projection).

    ``attention_mask`` may be 2D (B, T) or a 4D block mask (B, 1, T, T) for
    packed sequences; in the 2D case position ids default to the mask's.
    """
    if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
        position_ids = position_ids_from_mask(attention_mask)
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _logps_at(model, input_ids, attention_mask, position_ids, rows, src, cols):
    """Log-prob of token ``input_ids[rows, cols]`` under the prediction of the hidden state at
    (``rows``, ``src``); the vocabulary projection only there. Returns (log-probs, float logits, logsumexp)."""
    if _needs_full_logits(model):
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            position_ids = position_ids_from_mask(attention_mask)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits[rows, src].float()
    else:
        h = hidden_states(model, input_ids, attention_mask, position_ids)
        logits = model.get_output_embeddings()(h[rows, src]).float()
    lse = torch.logsumexp(logits, dim=-1)
    return logits.gather(-1, input_ids[rows, cols][:, None])[:, 0] - lse, logits, lse


def token_logps(model, input_ids, attention_mask, loss_mask, position_ids=None, return_entropy=False):
    """Log-prob of each ``input_ids[:, t]`` under the model, for t where ``loss_mask`` is 1.

    Returns a (B, T) float32 tensor, zero where ``loss_mask`` is 0 (and at
    t = 0, which has no context); with ``return_entropy`` also the (B, T)
    entropy of the predictive distribution at those positions.
    """
    B, T = input_ids.shape
    target = loss_mask.bool().clone()
    target[:, 0] = False
    rows, cols = target.nonzero(as_tuple=True)
    out = torch.zeros(B, T, dtype=torch.float32, device=input_ids.device)
    ent = torch.zeros_like(out) if return_entropy else None
    lp, logits, lse = _logps_at(model, input_ids, attention_mask, position_ids, rows, cols - 1, cols)
    out = out.index_put((rows, cols), lp)
    if return_entropy:
        p = torch.softmax(logits, dim=-1)
        ent = ent.index_put((rows, cols), (lse - (p * logits).sum(-1)).detach())
        return out, ent
    return out


def sequence_logps(model, input_ids, attention_mask, loss_mask, position_ids=None, average=False):
    """Sum (or mean with ``average``) of completion-token log-probs per row.

    Returns ``(logps (B,), num_tokens (B,))``.
    """
    lp = token_logps(model, input_ids, attention_mask, loss_mask, position_ids)
    m = loss_mask.clone()
    m[:, 0] = 0
    n = m.sum(-1)
    s = lp.sum(-1)
    if average:
        s = s / n.clamp(min=1)
    return s, n


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Column of the last real token of each row, for any padding side.

    Reads the attention mask, never the pad id, so it is right even when
    pad == eos and the sequence really ends in eos.
    """
    T = attention_mask.shape[-1]
    cols = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), cols, torch.full_like(cols, -1)).max(-1).values


def shared_prompt_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of a prefix-shared pair batch
    (:func:`synthfb.train.collate.collate_shared_prompt`).

    Returns ``(logps (2B,), num_tokens (2B,))``: the B chosen rows first,
    then the B rejected rows — the order :func:`sequence_logps` gives for a
    batch with the prompt repeated (``prompts * 2``), and the same values up
    to float rounding.
    """
    ids, prev, side = batch["input_ids"], batch["prev"], batch["side"]
    B = ids.shape[0]
    target = (prev >= 0) & (side > 0)
    rows, cols = target.nonzero(as_tuple=True)
    lp, _, _ = _logps_at(model, ids, batch["attention_mask"], batch["position_ids"], rows, prev[rows, cols], cols)
    slot = rows + B * (side[rows, cols] - 1)  # chosen -> row, rejected -> B + row
    out = torch.zeros(2 * B, dtype=lp.dtype, device=lp.device).index_add(0, slot, lp)
    n = torch.zeros(2 * B, dtype=torch.long, device=lp.device).index_add(0, slot, torch.ones_like(slot))
    return out, n
