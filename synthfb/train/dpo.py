"""Pairwise preference optimization: DPO and the objectives of its family.

The objectives are plain functions on sequence log-probs in
:mod:`synthfb.train.losses`; :func:`pair_losses` picks one by
``DPOConfig.loss_type`` and :func:`train_dpo` runs it over preference rows.
For reference-based objectives the reference model's log-probs are computed
once before training and cached to ``output_dir`` (keyed by a hash of the
reference weights and the tokenized data), so training holds one model: when
the reference is the starting model, the untrained policy computes them
itself; a separate ``ref_model`` is loaded, used once and freed.
Reference-free objectives (SimPO, CPO, SLiC-HF, RRHF, ORPO) load no reference.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from . import loop
from .collate import Tokenizer, collate_pairs, load_rows
from .config import TrainConfig, _f
from . import losses as L
from .logprobs import sequence_logps, shared_prompt_logps, takes_4d_mask

from .losses import dpo_loss  # noqa: F401  (its public home used to be here)

# loss_type -> (what it is, needs the reference model's log-probs)
OBJECTIVES = {
    "sigmoid": ("DPO (cDPO with label smoothing)", True),
    "ipo": ("IPO", True),
    "hinge": ("relu(1 - beta h) on reference log-ratios (RSO hinge-norm; not SLiC-HF)", True),
    "rdpo": ("R-DPO (length-regularised DPO)", True),
    "simpo": ("SimPO", False),
    "cpo": ("CPO", False),
    "slic": ("SLiC-HF", False),
    "rrhf": ("RRHF", False),
    "orpo": ("ORPO", False),
}
LOSS_TYPES = tuple(OBJECTIVES)
REFERENCE_FREE = frozenset(k for k, (_, ref) in OBJECTIVES.items() if not ref)
# objectives with a Bradley-Terry logistic margin, where a soft label (cDPO) is defined
SOFT_LABEL_TYPES = frozenset({"sigmoid", "rdpo", "simpo", "cpo"})
DEFAULT_BETA = {"simpo": 2.0}  # SimPO paper: beta 2.0-2.5; 0.1 for the rest (DPO paper, IPO tau, CPO, R-DPO)


def pair_losses(cfg: DPOConfig, pc, pr, nc, nr, rc=None, rr=None, eps=0.0):
    """Per-pair losses (B,) of ``cfg.loss_type`` (:mod:`synthfb.train.losses`) from
    summed policy log-probs ``pc``/``pr``, response token counts ``nc``/``nr``,
    summed reference log-probs ``rc``/``rr`` (None for reference-free types) and
    the soft-label ``eps`` (cDPO) per pair."""
    t, beta = cfg.loss_type, cfg.beta_value
    if t == "sigmoid":
        return L.sigmoid_loss(pc, pr, rc, rr, beta, eps)
    if t == "ipo":  # length-averaged log-ratios, as TRL (see losses.ipo_loss)
        return L.ipo_loss(pc, pr, rc, rr, beta, nc, nr)
    if t == "hinge":
        return L.hinge_loss(pc, pr, rc, rr, beta)
    if t == "rdpo":
        return L.rdpo_loss(chosen_logps=pc, rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr,
                           chosen_lengths=nc, rejected_lengths=nr, beta=beta, alpha=cfg.rdpo_alpha,
                           label_smoothing=eps)
    if t == "simpo":
        return L.simpo_loss(chosen_logps=pc, rejected_logps=pr, chosen_lengths=nc, rejected_lengths=nr, beta=beta,
                            gamma=cfg.simpo_gamma_value, label_smoothing=eps)
    if t == "cpo":
        return L.cpo_loss(chosen_logps=pc, rejected_logps=pr, beta=beta, lam=cfg.cpo_lambda, label_smoothing=eps)
    if t == "slic":
        return L.slic_loss(chosen_logps=pc, rejected_logps=pr, delta=cfg.slic_delta, lam=cfg.slic_lambda)
    if t == "rrhf":
        return L.rrhf_loss(chosen_logps=pc, rejected_logps=pr, chosen_lengths=nc, rejected_lengths=nr,
                           lam=cfg.rrhf_lambda)
    if t == "orpo":
        return L.orpo_loss(chosen_logps=pc, rejected_logps=pr, chosen_lengths=nc, rejected_lengths=nr,
                           lam=cfg.orpo_lambda)
    raise ValueError(f"unknown loss_type {t!r}; expected one of {', '.join(LOSS_TYPES)}")


def implicit_rewards(cfg: DPOConfig, pc, pr, nc, nr, rc=None, rr=None):
    """(chosen, rejected) rewards each objective ranks by, for the logged
    ``rewards_*`` / ``reward_accuracy`` and :func:`preference_accuracy`:
    beta * log-ratio (reference-based types), beta * mean log-prob (SimPO),
    beta * summed log-prob (CPO, as TRL logs it), summed log-prob (SLiC-HF) and
    mean log-prob (RRHF, ORPO: their ranking terms compare means)."""
    t = cfg.loss_type
    if t not in REFERENCE_FREE:
        return cfg.beta_value * (pc - rc), cfg.beta_value * (pr - rr)
    if t == "simpo":
        return cfg.beta_value * pc / nc.clamp(min=1), cfg.beta_value * pr / nr.clamp(min=1)
    if t == "cpo":
        return cfg.beta_value * pc, cfg.beta_value * pr
    if t == "slic":
        return pc, pr
    return pc / nc.clamp(min=1), pr / nr.clamp(min=1)


@dataclass
class DPOConfig(TrainConfig):
    """Pairwise preference optimization (``synthfb train dpo``): DPO, cDPO, IPO,
    hinge, R-DPO (reference-based) and SimPO, CPO, SLiC-HF, RRHF, ORPO
    (reference-free); formulas and papers in :mod:`synthfb.train.losses`."""

    loss_type: Literal["sigmoid", "ipo", "hinge", "rdpo", "simpo", "cpo", "slic", "rrhf", "orpo"] = _f(
        "sigmoid", "the objective: sigmoid = DPO (cDPO with label_smoothing), ipo, hinge = relu(1 - beta h) on "
        "reference log-ratios (RSO's hinge-norm, not SLiC-HF), rdpo = R-DPO (length-regularised DPO), all with a "
        "reference model; simpo, cpo, slic = SLiC-HF, rrhf, orpo are reference-free (no reference model is loaded)")
    beta: float | None = _f(None, "inverse temperature of the implicit reward (sigmoid, ipo = IPO's tau, hinge, rdpo, "
                                  "simpo, cpo); none = 2.0 for simpo (SimPO paper: 2.0 to 2.5), 0.1 otherwise "
                                  "(DPO paper's grid 0.01-0.1); rrhf, slic and orpo have no beta")
    label_smoothing: float = _f(0.0, "cDPO: probability that a preference label is flipped (0 = plain DPO); for the "
                                     "logistic objectives sigmoid, rdpo, simpo, cpo")
    soft_label_column: str | None = _f(None, "column with p(chosen preferred) per row (e.g. p_chosen); sets label "
                                             "smoothing to 1 - p per example (sigmoid, rdpo, simpo, cpo)")
    simpo_gamma: float | None = _f(None, "SimPO target reward margin gamma (in reward units: the loss is -log "
                                         "sigmoid(beta a_w - beta a_l - gamma)); none = beta / 2, the paper's "
                                         "gamma/beta of about 0.5 (Table 8: beta 2.0, gamma 1.0 for Llama-3-Base)", ge=0)
    rdpo_alpha: float = _f(0.05, "R-DPO length coefficient alpha: the margin gains alpha * (|y_w| - |y_l|) (response "
                                 "tokens); SimPO paper's grid 0.05, 0.1, 0.5, 1", ge=0)
    cpo_lambda: float = _f(1.0, "CPO weight lambda of the NLL term -lambda * log pi(y_w) (summed over response "
                                "tokens); 1 in the CPO paper", ge=0)
    slic_delta: float = _f(1.0, "SLiC-HF margin delta of max(0, delta - log pi(y_w) + log pi(y_l)); SimPO paper's "
                                "grid 0.1, 0.5, 1, 2", ge=0)
    slic_lambda: float = _f(0.1, "SLiC-HF weight lambda of the regulariser -lambda * log pi(y_w); SimPO paper's "
                                 "grid 0.1, 0.5, 1, 10", ge=0)
    rrhf_lambda: float = _f(1.0, "RRHF weight lambda of the fine-tuning term -lambda * log pi(y_w) (1 in the RRHF "
                                 "paper; SimPO paper's grid 0.1, 0.5, 1, 10)", ge=0)
    orpo_lambda: float = _f(0.1, "ORPO weight lambda of the odds-ratio term (TRL's ORPO beta; 0.1 is TRL's default; "
                                 "SimPO paper's grid 0.1, 0.5, 1, 2)", ge=0)
    ref_model: str | None = _f(None, "reference model path; none = the starting model (unused by reference-free "
                                     "loss types)", path=True)
    ref_batch_size: int = _f(16, "batch size for the one-time reference log-prob pass", ge=1)
    share_prompt: bool = _f(True, "compute each pair's prompt once: chosen and rejected attend to one copy of it "
                                  "(prefix sharing, Wang et al. 2024; decoder-only models with sdpa or flex "
                                  "attention, others repeat the prompt); false: the prompt is repeated per "
                                  "completion, as TRL does (same log-probs up to float rounding)")
    learning_rate: float = _f(5e-7, "peak learning rate (AdamW)", gt=0)

    @property
    def beta_value(self) -> float:
        """``beta``, or the loss type's default when it is unset."""
        return self.beta if self.beta is not None else DEFAULT_BETA.get(self.loss_type, 0.1)

    @property
    def simpo_gamma_value(self) -> float:
        """``simpo_gamma``, or beta / 2 when it is unset."""
        return self.simpo_gamma if self.simpo_gamma is not None else self.beta_value / 2

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in REFERENCE_FREE

    def check(self) -> None:
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError("field `label_smoothing` must be in [0, 0.5)")
        if self.beta is not None and self.beta <= 0:
            raise ValueError("field `beta` must be > 0")
        if (self.label_smoothing or self.soft_label_column) and self.loss_type not in SOFT_LABEL_TYPES:
            raise ValueError(f"fields `label_smoothing` / `soft_label_column` need a logistic loss_type "
                             f"({', '.join(sorted(SOFT_LABEL_TYPES))}); loss_type {self.loss_type!r} has no soft label")


def build_examples(cfg: DPOConfig, tok, rows: list[dict] | None = None) -> list[dict]:
    t = Tokenizer(tok, cfg.max_length, cfg.max_prompt_length)
    rows = load_rows(cfg.dataset) if rows is None else rows
    out = []
    for i, r in enumerate(rows):
        ex = t.preference_example(r, i)
        eps = cfg.label_smoothing
        if cfg.soft_label_column:
            p = r.get(cfg.soft_label_column)
            if not isinstance(p, (int, float)) or not 0 <= p <= 1:
                from ..data.io import InputError

                raise InputError(f"row {i}: `{cfg.soft_label_column}` must be a probability in [0, 1], got {p!r}")
            eps = 1.0 - float(p)
        ex["eps"] = eps
        out.append(ex)
    return out


def _pair_batch(items: list[dict], pad_id: int, share_prompt: bool = False) -> dict:
    """:func:`~.collate.collate_pairs` plus the cached reference log-probs and the label smoothing."""
    b = collate_pairs(items, pad_id, share_prompt)
    for k in ("ref_chosen", "ref_rejected"):
        if k in items[0]:
            b[k] = torch.tensor([e[k] for e in items], dtype=torch.float32)
    b["eps"] = torch.tensor([e["eps"] for e in items], dtype=torch.float32)
    return b


def _fingerprint(ref_path: str, examples: list[dict]) -> str:
    h = hashlib.sha256()
    h.update(str(Path(ref_path).resolve()).encode())
    for name in sorted(os.listdir(ref_path)):
        if name.endswith((".safetensors", ".bin", "config.json")):
            st = os.stat(Path(ref_path) / name)
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    for e in examples:
        h.update(json.dumps([e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]]).encode())
    return h.hexdigest()[:16]


def pair_logps(model, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps (2B,), token counts (2B,)) of a :func:`_pair_batch`: the chosen rows first, then the rejected."""
    if "prev" in b:
        return shared_prompt_logps(model, b)
    return sequence_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"])


@torch.no_grad()
def reference_logps(cfg: DPOConfig, examples: list[dict], tok, model=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2) summed reference log-probs [chosen, rejected] and token counts, cached on disk.

    ``model``: the policy before any update, used as the reference when
    ``cfg.ref_model`` is unset (saves loading the same weights twice).
    Otherwise the reference is loaded, used once and freed.
    """
    ref_path = cfg.ref_model or cfg.model
    cache = Path(cfg.output_dir) / f"ref_logps-{_fingerprint(ref_path, examples)}.pt"
    if cache.exists():
        d = torch.load(cache)
        return d["logps"], d["lengths"]
    own = model is None or cfg.ref_model is not None
    if own:
        model = loop.load_causal_lm(ref_path, cfg)
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    logps = torch.zeros(len(examples), 2)
    lengths = torch.zeros(len(examples), 2)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["prompt_ids"]) + len(examples[i]["chosen_ids"]))
    for s in range(0, len(order), cfg.ref_batch_size):
        idx = order[s:s + cfg.ref_batch_size]
        b = _pair_batch([examples[i] for i in idx], tok.pad_token_id, cfg.share_prompt and takes_4d_mask(model))
        lp, n = pair_logps(model, loop.to_device(b, dev))
        k = len(idx)
        logps[idx, 0], logps[idx, 1] = lp[:k].float().cpu(), lp[k:].float().cpu()
        lengths[idx, 0], lengths[idx, 1] = n[:k].float().cpu(), n[k:].float().cpu()
    if own:
        del model
        gc.collect()
    else:
        model.train(was_training)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp-{os.getpid()}")
    torch.save({"logps": logps, "lengths": lengths}, tmp)
    os.replace(tmp, cache)
    return logps, lengths


def dpo_task(tok, cfg: DPOConfig, share_prompt: bool | None = None) -> loop.Task:
    """The DPO-family training task; ``share_prompt`` (default ``cfg.share_prompt``): the batch layout, which
    the caller turns off for a model whose attention cannot take the shared row's mask."""
    share = cfg.share_prompt if share_prompt is None else share_prompt

    def loss(model, b):
        lp, n = pair_logps(model, b)
        k = lp.shape[0] // 2
        pc, pr, nc, nr = lp[:k], lp[k:], n[:k].float(), n[k:].float()
        rc, rr = b.get("ref_chosen"), b.get("ref_rejected")
        losses = pair_losses(cfg, pc, pr, nc, nr, rc, rr, b["eps"])
        with torch.no_grad():
            wc, wr = implicit_rewards(cfg, pc, pr, nc, nr, rc, rr)
            ms = {"rewards_chosen": float(wc.sum()), "rewards_rejected": float(wr.sum()),
                  "reward_margin": float((wc - wr).sum()), "reward_accuracy": float((wc > wr).float().sum()),
                  "logps_chosen": float(pc.detach().sum()), "logps_rejected": float(pr.detach().sum())}
        return losses.sum(), ms

    return loop.Task(
        collate=lambda items: _pair_batch(items, tok.pad_token_id, share),
        count=lambda b: float(b["eps"].shape[0]),
        loss=loss,
        tokens=lambda b: int(b["pair_tokens"]),
    )


def prepare(cfg: DPOConfig, rows: list[dict] | None = None, model=None):
    """Tokenizer and examples with cached reference log-probs attached.

    ``model`` (optional): the untrained policy, reused as the reference when
    ``cfg.ref_model`` is unset.
    """
    tok = loop.load_tokenizer(cfg.model)
    ex = build_examples(cfg, tok, rows)
    if cfg.needs_reference:  # reference-free objectives never load or run a reference model
        logps, _ = reference_logps(cfg, ex, tok, model)
        for e, (c, r) in zip(ex, logps.tolist()):
            e["ref_chosen"], e["ref_rejected"] = c, r
    return tok, ex


@torch.no_grad()
def preference_accuracy(model, tok, examples: list[dict], cfg: DPOConfig, batch_size: int = 16) -> float:
    """Fraction of pairs whose implicit reward (:func:`implicit_rewards`) ranks chosen above rejected."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    right = 0
    for s in range(0, len(examples), batch_size):
        items = examples[s:s + batch_size]
        b = _pair_batch(items, tok.pad_token_id, cfg.share_prompt and takes_4d_mask(model))
        lp, n = pair_logps(model, loop.to_device(b, dev))
        k = len(items)
        lp, n = lp.float().cpu(), n.float().cpu()
        wc, wr = implicit_rewards(cfg, lp[:k], lp[k:], n[:k], n[k:], b.get("ref_chosen"), b.get("ref_rejected"))
        right += int((wc > wr).sum())
    model.train(was)
    return right / max(1, len(examples))


@loop.owns_output
def train_dpo(cfg: DPOConfig, rows: list[dict] | None = None) -> dict:
    """Run DPO (or another pairwise objective, ``cfg.loss_type``); the model ends up in ``cfg.output_dir``."""
    loop.seed_all(cfg.seed)
    rows = load_rows(cfg.dataset) if rows is None else rows  # data errors before the model loads
    model = loop.load_causal_lm(cfg.model, cfg)
    resuming = loop.resume_path(cfg) is not None
    # before any update the policy is the reference; after a resume it is not, so load the reference
    tok, ex = prepare(cfg, rows, None if resuming else model)
    summary = loop.run(cfg, model, tok, ex, dpo_task(tok, cfg, cfg.share_prompt and takes_4d_mask(model)))
    summary["model"] = model
    summary["examples"] = ex
    summary["tokenizer"] = tok
    return summary
