"""Direct preference optimization and its variants.

:func:`dpo_loss` is a plain function on sequence log-probs; :func:`train_dpo`
runs it over preference rows. The reference model's log-probs are computed
once before training and cached to ``output_dir`` (keyed by a hash of the
reference weights and the tokenized data), so training holds one model: when
the reference is the starting model, the untrained policy computes them
itself; a separate ``ref_model`` is loaded, used once and freed.
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
import torch.nn.functional as F

from . import loop
from .collate import Tokenizer, collate_sequences, load_rows
from .config import TrainConfig, _f
from .logprobs import sequence_logps

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float | torch.Tensor = 0.0,
    *,
    gamma: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example preference losses (shape (B,)); average them yourself.

    With h = (pi_c - ref_c) - (pi_r - ref_r) (sequence log-prob ratios):

    - ``sigmoid``: DPO, Rafailov et al. 2023, "Direct Preference Optimization:
      Your Language Model is Secretly a Reward Model" (arXiv 2305.18290):
      ``-log sigmoid(beta h)``. With ``label_smoothing`` eps > 0 it is
      conservative DPO (cDPO, Mitchell 2023, "A note on DPO with noisy
      preferences & relationship to IPO"): ``-(1-eps) log sigmoid(beta h) -
      eps log sigmoid(-beta h)``, i.e. a soft label p(chosen) = 1 - eps (e.g.
      from Constitutional AI's ``p_chosen``). ``label_smoothing`` may be a
      per-example tensor.
    - ``ipo``: IPO, Azar et al. 2023, "A General Theoretical Paradigm to
      Understand Learning from Human Preferences" (arXiv 2310.12036):
      ``(h - 1/(2 beta))^2`` (beta plays the role of tau). Our trainer feeds it
      length-averaged log-probs, as TRL does.
    - ``hinge``: SLiC-HF, Zhao et al. 2023, "SLiC-HF: Sequence Likelihood
      Calibration with Human Feedback" (arXiv 2305.10425): ``relu(1 - beta h)``.
    - ``simpo``: SimPO, Meng et al. 2024, "SimPO: Simple Preference
      Optimization with a Reference-Free Reward" (arXiv 2405.14734):
      reference-free, length-normalized:
      ``-log sigmoid(beta (pi_c / |y_c| - pi_r / |y_r|) - gamma)``.
      Extra arguments: ``gamma`` is the target reward margin (the paper uses
      beta 2 to 2.5 and gamma/beta around 0.5); ``chosen_lengths`` /
      ``rejected_lengths`` are the completion token counts used to average the
      summed log-probs (leave them None if the log-probs are already averages).
      The reference log-probs are ignored (may be None). Label smoothing
      applies as in cDPO.
    """
    eps = label_smoothing
    if loss_type == "simpo":
        pc, pr = policy_chosen_logps, policy_rejected_logps
        if chosen_lengths is not None:
            pc = pc / chosen_lengths.clamp(min=1)
        if rejected_lengths is not None:
            pr = pr / rejected_lengths.clamp(min=1)
        z = beta * (pc - pr) - gamma
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"loss_type {loss_type!r} needs reference log-probs")
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")


@dataclass
class DPOConfig(TrainConfig):
    """Preference optimization (``synthfb train dpo``): DPO, cDPO, IPO, hinge, SimPO."""

    beta: float = _f(0.1, "inverse temperature of the implicit reward (SimPO: 2.0 to 2.5)")
    loss_type: Literal["sigmoid", "ipo", "hinge", "simpo"] = _f("sigmoid", "sigmoid = DPO, ipo, hinge = SLiC, simpo = reference-free")
    label_smoothing: float = _f(0.0, "cDPO: probability that a preference label is flipped (0 = plain DPO)")
    soft_label_column: str | None = _f(None, "column with p(chosen preferred) per row (e.g. p_chosen); sets label smoothing to 1 - p per example")
    simpo_gamma: float = _f(0.5, "SimPO target reward margin gamma")
    ref_model: str | None = _f(None, "reference model path; none = the starting model", path=True)
    ref_batch_size: int = _f(16, "batch size for the one-time reference log-prob pass", ge=1)
    learning_rate: float = _f(5e-7, "peak learning rate (AdamW)", gt=0)

    def check(self) -> None:
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError("field `label_smoothing` must be in [0, 0.5)")
        if self.beta <= 0:
            raise ValueError("field `beta` must be > 0")


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


def _pair_batch(items: list[dict], pad_id: int) -> dict:
    prompts = [e["prompt_ids"] for e in items] * 2
    comps = [e["chosen_ids"] for e in items] + [e["rejected_ids"] for e in items]
    b = collate_sequences(prompts, comps, pad_id, "right")
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
        b = _pair_batch([examples[i] for i in idx], tok.pad_token_id)
        lp, n = sequence_logps(model, b["input_ids"].to(dev), b["attention_mask"].to(dev), b["loss_mask"].to(dev))
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


def dpo_task(tok, cfg: DPOConfig) -> loop.Task:
    def loss(model, b):
        lp, n = sequence_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"])
        k = lp.shape[0] // 2
        pc, pr, nc, nr = lp[:k], lp[k:], n[:k].float(), n[k:].float()
        rc, rr = b.get("ref_chosen"), b.get("ref_rejected")
        if cfg.loss_type == "ipo":
            pc, pr = pc / nc.clamp(min=1), pr / nr.clamp(min=1)
            rc, rr = b["ref_chosen"] / nc.clamp(min=1), b["ref_rejected"] / nr.clamp(min=1)
        losses = dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.loss_type, b["eps"], gamma=cfg.simpo_gamma,
                          chosen_lengths=nc, rejected_lengths=nr)
        with torch.no_grad():
            if cfg.loss_type == "simpo":
                wc, wr = cfg.beta * pc / nc.clamp(min=1), cfg.beta * pr / nr.clamp(min=1)
            else:
                wc, wr = cfg.beta * (pc - rc), cfg.beta * (pr - rr)
            ms = {"rewards_chosen": float(wc.sum()), "rewards_rejected": float(wr.sum()),
                  "reward_margin": float((wc - wr).sum()), "reward_accuracy": float((wc > wr).float().sum()),
                  "logps_chosen": float(pc.detach().sum()), "logps_rejected": float(pr.detach().sum())}
        return losses.sum(), ms

    return loop.Task(
        collate=lambda items: _pair_batch(items, tok.pad_token_id),
        count=lambda b: float(b["eps"].shape[0]),
        loss=loss,
        tokens=lambda b: int(b["attention_mask"].sum()),
    )


def prepare(cfg: DPOConfig, rows: list[dict] | None = None, model=None):
    """Tokenizer and examples with cached reference log-probs attached.

    ``model`` (optional): the untrained policy, reused as the reference when
    ``cfg.ref_model`` is unset.
    """
    tok = loop.load_tokenizer(cfg.model)
    ex = build_examples(cfg, tok, rows)
    if cfg.loss_type != "simpo":
        logps, _ = reference_logps(cfg, ex, tok, model)
        for e, (c, r) in zip(ex, logps.tolist()):
            e["ref_chosen"], e["ref_rejected"] = c, r
    return tok, ex


@torch.no_grad()
def preference_accuracy(model, tok, examples: list[dict], cfg: DPOConfig, batch_size: int = 16) -> float:
    """Fraction of pairs whose implicit reward ranks chosen above rejected."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    right = 0
    for s in range(0, len(examples), batch_size):
        items = examples[s:s + batch_size]
        b = _pair_batch(items, tok.pad_token_id)
        lp, n = sequence_logps(model, b["input_ids"].to(dev), b["attention_mask"].to(dev), b["loss_mask"].to(dev))
        k = len(items)
        if cfg.loss_type == "simpo":
            wc, wr = lp[:k] / n[:k].clamp(min=1), lp[k:] / n[k:].clamp(min=1)
        else:
            wc = lp[:k].cpu() - b["ref_chosen"]
            wr = lp[k:].cpu() - b["ref_rejected"]
        right += int((wc > wr).sum())
    model.train(was)
    return right / max(1, len(examples))


@loop.owns_output
def train_dpo(cfg: DPOConfig, rows: list[dict] | None = None) -> dict:
    """Run DPO (or a variant); the model ends up in ``cfg.output_dir``."""
    loop.seed_all(cfg.seed)
    rows = load_rows(cfg.dataset) if rows is None else rows  # data errors before the model loads
    model = loop.load_causal_lm(cfg.model, cfg)
    resuming = loop.resume_path(cfg) is not None
    # before any update the policy is the reference; after a resume it is not, so load the reference
    tok, ex = prepare(cfg, rows, None if resuming else model)
    summary = loop.run(cfg, model, tok, ex, dpo_task(tok, cfg))
    summary["model"] = model
    summary["examples"] = ex
    summary["tokenizer"] = tok
    return summary
