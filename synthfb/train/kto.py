"""KTO: alignment from unpaired desirable / undesirable completions.

Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic
Optimization" (arXiv 2402.01306); the loss is
:func:`synthfb.train.losses.kto_loss`. Rows, in TRL's unpaired format:
``prompt`` + ``completion`` + ``label`` (bool: True = desirable), standard
(strings) or conversational (message lists). Preference rows
(``prompt``/``chosen``/``rejected``, what our pipelines and the loop emit) are
split as TRL's ``unpair_preference_dataset`` does: every chosen completion
becomes a desirable row, every rejected one an undesirable row (all chosen
rows first, then all rejected rows).

The reference point z_ref is estimated as TRL 1.16's ``KTOTrainer`` does:
each example also carries a *mismatched* completion (the completions are
rotated by one within consecutive groups of ``batch_size`` examples, so
prompt i is paired with completion i-1 of its group), and a batch's estimate
is the mean of log pi - log pi_ref over those mismatched pairs, detached and
clamped at 0 (:func:`synthfb.train.losses.kto_kl`). The pairing is fixed when
the examples are built and travels with each example, so shuffled batches
(our loop shuffles every epoch, as TRL 1.16 does with transformers >= 5.2)
still estimate from mismatched pairs. Reference log-probs of
both the matched and the mismatched pairs are computed once and cached in
``output_dir``, as for DPO, so training holds one model.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.io import InputError
from . import loop
from .collate import Tokenizer, collate_sequences, load_rows
from .config import TrainConfig, _f
from .dpo import _fingerprint
from .logprobs import sequence_logps
from .losses import kto_kl, kto_loss


@dataclass
class KTOConfig(TrainConfig):
    """KTO (``synthfb train kto``) on unpaired prompt/completion/label rows or preference pairs."""

    beta: float = _f(0.1, "KTO beta: scale of the implicit reward log pi/pi_ref inside the sigmoid (KTO paper "
                          "and TRL default 0.1)", gt=0)
    desirable_weight: float = _f(1.0, "lambda_D, weight of the desirable rows' losses; the KTO paper suggests "
                                      "lambda_D n_D / (lambda_U n_U) in [1, 4/3] for n_D desirable and n_U "
                                      "undesirable rows", gt=0)
    undesirable_weight: float = _f(1.0, "lambda_U, weight of the undesirable rows' losses", gt=0)
    ref_model: str | None = _f(None, "reference model path; none = the starting model", path=True)
    ref_batch_size: int = _f(16, "batch size for the one-time reference log-prob pass", ge=1)
    learning_rate: float = _f(1e-6, "peak learning rate (AdamW); TRL's KTO default 1e-6", gt=0)


def _label(v, i: int) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise InputError(f"row {i}: `label` must be a bool (True = desirable completion), got {v!r}")


def unpair_rows(rows: list[dict]) -> list[dict]:
    """``prompt``/``completion``/``label`` rows as they are; preference rows split
    into a desirable row per ``chosen`` and an undesirable row per ``rejected``
    (chosen rows first, as TRL's ``unpair_preference_dataset``). The format is
    read from the first row, as TRL does; a row of the other format is an error."""
    if not rows:
        raise InputError("no rows to train on")
    paired = "chosen" in rows[0] or "rejected" in rows[0]
    if not paired:
        for i, r in enumerate(rows):
            missing = [k for k in ("prompt", "completion", "label") if r.get(k) is None]
            if missing:
                raise InputError(f"row {i}: KTO rows need `prompt`, `completion` and `label` (or preference rows "
                                 f"with `chosen` and `rejected`); missing {', '.join(f'`{k}`' for k in missing)} "
                                 f"(columns {sorted(r)})")
        return [{"prompt": r["prompt"], "completion": r["completion"], "label": _label(r["label"], i), "row": i}
                for i, r in enumerate(rows)]
    for i, r in enumerate(rows):
        if "completion" in r and "chosen" not in r:
            raise InputError(f"row {i}: an unpaired row (`completion`) among preference rows (row 0 has `chosen`)")
    return [{"pair": r, "side": side, "label": side == "chosen", "row": i}
            for side in ("chosen", "rejected") for i, r in enumerate(rows)]


def build_examples(cfg: KTOConfig, tok, rows: list[dict] | None = None) -> list[dict]:
    """Tokenized examples: ``prompt_ids``, ``completion_ids``, ``label`` and the
    mismatched ``kl_completion_ids`` (completions rotated by one within each
    group of ``batch_size`` consecutive examples, as TRL does)."""
    t = Tokenizer(tok, cfg.max_length, cfg.max_prompt_length)
    rows = load_rows(cfg.dataset) if rows is None else rows
    out = []
    for u in unpair_rows(rows):
        if "pair" in u:
            ex = t.preference_example(u["pair"], u["row"])
            p, c = ex["prompt_ids"], ex[f"{u['side']}_ids"]
        else:
            try:
                p = t.prompt_ids(u["prompt"])
                c = t.completion_ids(u["prompt"], u["completion"])
            except InputError as e:
                raise InputError(f"row {u['row']}: {e}") from None
            if cfg.max_prompt_length and len(p) > cfg.max_prompt_length:
                p = p[-cfg.max_prompt_length:]
            if cfg.max_length:
                c = c[:max(1, cfg.max_length - len(p))]
        out.append({"prompt_ids": p, "completion_ids": c, "label": u["label"]})
    for s in range(0, len(out), cfg.batch_size):
        group = out[s:s + cfg.batch_size]
        for k, e in enumerate(group):
            kl = group[k - 1]["completion_ids"]  # k = 0 takes the group's last completion
            e["kl_completion_ids"] = kl[:max(1, cfg.max_length - len(e["prompt_ids"]))] if cfg.max_length else kl
    return out


def _batch(items: list[dict], pad_id: int) -> dict:
    prompts = [e["prompt_ids"] for e in items]
    b = collate_sequences(prompts, [e["completion_ids"] for e in items], pad_id, "right")
    kl = collate_sequences(prompts, [e["kl_completion_ids"] for e in items], pad_id, "right")
    b.update({f"kl_{k}": v for k, v in kl.items()})
    b["label"] = torch.tensor([e["label"] for e in items], dtype=torch.bool)
    for k in ("ref", "ref_kl"):
        if k in items[0]:
            b[k] = torch.tensor([e[k] for e in items], dtype=torch.float32)
    return b


@torch.no_grad()
def reference_logps(cfg: KTOConfig, examples: list[dict], tok, model=None) -> torch.Tensor:
    """(N, 2) summed reference log-probs [completion, mismatched completion], cached on disk.

    ``model``: the policy before any update, used as the reference when
    ``cfg.ref_model`` is unset; otherwise the reference is loaded, used once
    and freed."""
    ref_path = cfg.ref_model or cfg.model
    view = [{"prompt_ids": e["prompt_ids"], "chosen_ids": e["completion_ids"], "rejected_ids": e["kl_completion_ids"]}
            for e in examples]
    cache = Path(cfg.output_dir) / f"kto_ref_logps-{_fingerprint(ref_path, view)}.pt"
    if cache.exists():
        return torch.load(cache)["logps"]
    own = model is None or cfg.ref_model is not None
    if own:
        model = loop.load_causal_lm(ref_path, cfg)
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    logps = torch.zeros(len(examples), 2)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["prompt_ids"]) + len(examples[i]["completion_ids"]))
    for s in range(0, len(order), cfg.ref_batch_size):
        idx = order[s:s + cfg.ref_batch_size]
        b = _batch([examples[i] for i in idx], tok.pad_token_id)
        for col, prefix in ((0, ""), (1, "kl_")):
            lp, _ = sequence_logps(model, *(b[f"{prefix}{k}"].to(dev) for k in ("input_ids", "attention_mask",
                                                                               "loss_mask")))
            logps[idx, col] = lp.float().cpu()
    if own:
        del model
        gc.collect()
    else:
        model.train(was_training)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp-{os.getpid()}")
    torch.save({"logps": logps}, tmp)
    os.replace(tmp, cache)
    return logps


def kto_task(tok, cfg: KTOConfig) -> loop.Task:
    def loss(model, b):
        lp, _ = sequence_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"])
        with torch.no_grad():  # the reference point gets no gradient (TRL: computed under no_grad, detached)
            kl_lp, _ = sequence_logps(model, b["kl_input_ids"], b["kl_attention_mask"], b["kl_loss_mask"])
        kl = kto_kl(kl_lp, b["ref_kl"])
        losses = kto_loss(policy_logps=lp, ref_logps=b["ref"], desirable=b["label"], kl=kl, beta=cfg.beta,
                          lambda_w=cfg.desirable_weight, lambda_l=cfg.undesirable_weight)
        with torch.no_grad():
            r = lp.detach() - b["ref"]
            sign = torch.where(b["label"], 1.0, -1.0)
            ms = {"kl": float(kl) * len(lp),
                  # rows on the label's side of the reference point: r > kl when desirable, r < kl when not
                  "label_accuracy": float((sign * (r - kl) > 0).float().sum()),
                  "signed_reward": float((sign * cfg.beta * r).sum()),  # beta r, negated on undesirable rows
                  "desirable": float(b["label"].float().sum())}
        return losses.sum(), ms

    return loop.Task(
        collate=lambda items: _batch(items, tok.pad_token_id),
        count=lambda b: float(b["label"].shape[0]),
        loss=loss,
        tokens=lambda b: int(b["attention_mask"].sum() + b["kl_attention_mask"].sum()),
    )


def check_balance(cfg: KTOConfig, examples: list[dict]) -> str | None:
    """A warning when lambda_D n_D / (lambda_U n_U) lies outside [1, 4/3], the range
    the KTO paper recommends (§4.2; TRL 1.16 warns on the same condition); None when inside."""
    n_d = sum(e["label"] for e in examples)
    n_u = len(examples) - n_d
    if not n_d or not n_u:
        return f"KTO: all {len(examples)} rows are {'desirable' if n_d else 'undesirable'}; the loss has one side only"
    ratio = cfg.desirable_weight * n_d / (cfg.undesirable_weight * n_u)
    if 1 <= ratio <= 4 / 3:
        return None
    lo, hi = n_u * cfg.undesirable_weight / n_d, 4 / 3 * n_u * cfg.undesirable_weight / n_d
    return (f"KTO: desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = {ratio:.2f} with "
            f"{n_d} desirable and {n_u} undesirable rows; the KTO paper recommends [1, 4/3], e.g. "
            f"desirable_weight in [{lo:.2f}, {hi:.2f}]")


def prepare(cfg: KTOConfig, rows: list[dict] | None = None, model=None):
    """Tokenizer and examples with cached reference log-probs attached."""
    import warnings

    tok = loop.load_tokenizer(cfg.model)
    ex = build_examples(cfg, tok, rows)
    note = check_balance(cfg, ex)
    if note:
        warnings.warn(note, stacklevel=2)
    for e, (r, rk) in zip(ex, reference_logps(cfg, ex, tok, model).tolist()):
        e["ref"], e["ref_kl"] = r, rk
    return tok, ex


@torch.no_grad()
def label_accuracy(model, tok, examples: list[dict], batch_size: int = 16) -> float:
    """Fraction of rows whose log-ratio log pi/pi_ref has the label's sign
    (raised on desirable rows, lowered on undesirable ones)."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    right = 0
    for s in range(0, len(examples), batch_size):
        b = _batch(examples[s:s + batch_size], tok.pad_token_id)
        lp, _ = sequence_logps(model, b["input_ids"].to(dev), b["attention_mask"].to(dev), b["loss_mask"].to(dev))
        r = lp.float().cpu() - b["ref"]
        right += int(torch.where(b["label"], r > 0, r < 0).sum())
    model.train(was)
    return right / max(1, len(examples))


@loop.owns_output
def train_kto(cfg: KTOConfig, rows: list[dict] | None = None) -> dict:
    """Run KTO; the model ends up in ``cfg.output_dir``."""
    loop.seed_all(cfg.seed)
    rows = load_rows(cfg.dataset) if rows is None else rows  # data errors before the model loads
    model = loop.load_causal_lm(cfg.model, cfg)
    resuming = loop.resume_path(cfg) is not None
    tok, ex = prepare(cfg, rows, None if resuming else model)
    summary = loop.run(cfg, model, tok, ex, kto_task(tok, cfg))
    summary.update(model=model, examples=ex, tokenizer=tok)
    return summary
