"""The optimizer loop shared by the SFT, RM and DPO trainers (PPO reuses the pieces).

- Gradient accumulation equals one larger batch: the loss of every
  micro-batch is a *sum* divided by the normalizer of the whole accumulated
  step (tokens for SFT, examples for RM/DPO), counted before any backward.
- Data order is a pure function of (seed, epoch), so a resumed run sees the
  same batches as an uninterrupted one.
- Checkpoints are HF folders (``save_pretrained``) plus ``trainer_state.pt``
  (optimizer, scheduler, step), written to a temporary name and renamed.
  :func:`checkpoint` writes one when ``save_steps`` says so and
  :func:`restore` continues from one; every trainer (SFT/RM/DPO through
  :func:`run`, PPO directly) uses this pair, so they resume alike.
- Metrics go to ``output_dir/metrics.jsonl``, one line per logged step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..data.owned import FolderError, OwnedFolder
from .config import TrainConfig


def device_of(cfg: TrainConfig) -> torch.device:
    return torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def to_device(b: dict, dev) -> dict:
    """A batch with its tensors on ``dev`` (other values as they are)."""
    return {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, cfg: TrainConfig):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.dtype))
    model.to(device_of(cfg))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model


def make_optimizer(params, cfg: TrainConfig, total_steps: int):
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    # the fused kernel updates each parameter in place (no temporary copies of the
    # whole parameter set, as the default multi-tensor path makes); HF Trainer's default too
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), fused=fused or None,
    )

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_scheduler == "constant":
            return 1.0
        span = max(1, total_steps - cfg.warmup_steps)
        frac = min(1.0, (step - cfg.warmup_steps) / span)
        if cfg.lr_scheduler == "linear":
            return 1.0 - frac
        return 0.5 * (1 + math.cos(math.pi * frac))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


class MetricsLog:
    """Appends JSON lines to ``metrics.jsonl``; on resume drops lines past the resumed step."""

    def __init__(self, out_dir: Path, resume_step: int = 0):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep = []
        if resume_step and self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
        self.path.write_text("".join(ln + "\n" for ln in keep))
        self.history: list[dict] = [json.loads(ln) for ln in keep]

    def write(self, rec: dict) -> None:
        rec = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in rec.items()}
        self.history.append(rec)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def load_weights(model, folder: Path) -> None:
    """Load a ``save_pretrained`` folder's safetensors (one file or shards) into ``model``."""
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors weights to resume from")
    dev = next(model.parameters()).device
    for f in files:
        missing_ok = model.load_state_dict(load_file(str(f), device=str(dev)), strict=False)
        if missing_ok.unexpected_keys:
            raise ValueError(f"{f}: weights do not fit this model (unexpected {missing_ok.unexpected_keys[:3]})")


def _checkpoints(out_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders (N digits only: a user's ``checkpoint-3.bak`` is not one)."""
    return [p for p in Path(out_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]


def latest_checkpoint(out_dir: Path) -> Path | None:
    cks = [p for p in _checkpoints(out_dir) if (p / "trainer_state.pt").exists()]
    return max(cks, key=lambda p: int(p.name.split("-")[1])) if cks else None


def resume_path(cfg: TrainConfig) -> Path | None:
    if cfg.resume_from:
        p = Path(cfg.resume_from)
        if not (p / "trainer_state.pt").exists():
            raise FileNotFoundError(f"resume_from: {p} is not a checkpoint folder (no trainer_state.pt)")
        return p
    if cfg.resume:
        return latest_checkpoint(Path(cfg.output_dir))
    return None


def save_checkpoint(out_dir: Path, step: int, model, tok, state: dict, limit: int | None, extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``checkpoint-STEP`` atomically; prune old ones beyond ``limit``."""
    out_dir = Path(out_dir)
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".checkpoint-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if extra:
        extra(tmp)
    torch.save(state, tmp / "trainer_state.pt")
    with OwnedFolder(out_dir, "train", "resume") as folder:
        folder.add(final.name)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if limit:
        cks = sorted(_checkpoints(out_dir), key=lambda p: int(p.name.split("-")[1]))
        for p in cks[:-limit]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def restore(cfg: TrainConfig, model, opt, sched, extra: Callable[[Path, dict], None] | None = None) -> int:
    """Continue a run from :func:`resume_path` (``resume`` / ``resume_from``).

    Loads the checkpoint's weights into ``model`` (in place), the optimizer
    and scheduler states, then calls ``extra(folder, trainer_state)`` for
    whatever else the trainer saved (PPO: its value head). Returns the step
    to continue from: 0 when there is nothing to resume. Build ``opt`` and
    ``sched`` over the same parameters, in the same order, as the run that
    wrote the checkpoint.
    """
    rp = resume_path(cfg)
    if rp is None:
        return 0
    st = torch.load(rp / "trainer_state.pt", weights_only=False)
    load_weights(model, rp)
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    if extra:
        extra(rp, st)
    return st["step"]


def checkpoint(cfg: TrainConfig, out_dir: Path, step: int, total: int, model, tok, opt, sched,
               extra_state: dict | None = None, extra: Callable[[Path], None] | None = None) -> Path | None:
    """Write ``checkpoint-STEP`` (weights, tokenizer, ``trainer_state.pt`` with the
    optimizer, scheduler, step and ``extra_state``; ``extra(folder)`` adds files)
    when ``cfg.save_steps`` divides ``step``, never after the last step (the final
    model is saved instead). What :func:`restore` reads back. Returns the folder
    or None."""
    if not (cfg.save_steps and step % cfg.save_steps == 0 and step < total):
        return None
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, **(extra_state or {})}
    return save_checkpoint(out_dir, step, model, tok, state, cfg.save_total_limit, extra)


def output_folder(cfg: TrainConfig) -> OwnedFolder:
    """Claim ``cfg.output_dir`` for training (see :mod:`synthfb.data.owned`):
    a new or empty folder, or an earlier synthfb training output (continued
    with ``resume``, otherwise cleared of what synthfb wrote there). A
    non-empty folder synthfb did not write is refused, never overwritten.
    Re-entrant: trainers and the CLI may both claim it."""
    mode = "resume" if (cfg.resume or cfg.resume_from) else "replace"
    try:
        return OwnedFolder(cfg.output_dir, "train", mode).acquire()
    except FolderError as e:
        raise FolderError(f"output_dir: {e}") from None


def owns_output(train_fn: Callable) -> Callable:
    """Decorator of a trainer ``fn(cfg, ...)``: its ``output_dir`` is claimed
    (:func:`output_folder`) before anything is read or written, and held
    until it returns."""
    import functools

    @functools.wraps(train_fn)
    def wrapper(cfg, *args, **kwargs):
        folder = output_folder(cfg)
        try:
            out = train_fn(cfg, *args, **kwargs)
        except BaseException:
            folder.release(discard_if_unused=True)
            raise
        folder.release()
        return out

    return wrapper


def save_final(out_dir: Path, model, tok, cfg: TrainConfig) -> None:
    """The trained model as an HF folder in ``output_dir`` itself."""
    import yaml

    out_dir = Path(out_dir)
    with OwnedFolder(out_dir, "train", "resume") as folder, folder.track():
        model.save_pretrained(out_dir, safe_serialization=True)
        tok.save_pretrained(out_dir)
        (out_dir / "train_config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


@dataclasses.dataclass
class Task:
    """What a trainer plugs into :func:`run`.

    ``collate(items) -> batch``; ``count(batch) -> float`` (the normalizer
    units in the batch); ``loss(model, batch) -> (loss_sum, metric_sums)``
    where every metric is a sum over the same units (divided by the step's
    count when logged); ``tokens(batch)`` for the tokens/s figure.
    """

    collate: Callable[[list], Any]
    count: Callable[[Any], float]
    loss: Callable[[Any, Any], tuple[torch.Tensor, dict[str, float]]]
    tokens: Callable[[Any], int]


def accumulate(model, task: Task, batches: list, dev) -> tuple[float, float, dict[str, float], int]:
    """Backward over micro-batches so the gradient equals one batch of all of them.

    Each micro-batch's summed loss is divided by the normalizer of the whole
    group (counted first). Returns (normalizer, loss sum, metric sums, tokens).
    """
    norm = sum(task.count(b) for b in batches)
    sums: dict[str, float] = {}
    loss_total = 0.0
    ntok = 0
    for b in batches:
        b = to_device(b, dev)
        loss_sum, ms = task.loss(model, b)
        (loss_sum / max(norm, 1e-8)).backward()
        loss_total += float(loss_sum.detach())
        for k, v in ms.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        ntok += task.tokens(b)
    return norm, loss_total, sums, ntok


def run(cfg: TrainConfig, model, tok, items: list, task: Task, extra_state: dict | None = None) -> dict:
    """Train ``model`` on ``items``; returns a summary (steps, last metrics, seconds)."""
    out = Path(cfg.output_dir)
    folder = output_folder(cfg)
    try:
        return _run(cfg, out, model, tok, items, task, extra_state)
    finally:
        folder.release()


def _run(cfg: TrainConfig, out: Path, model, tok, items: list, task: Task, extra_state: dict | None) -> dict:
    dev = next(model.parameters()).device
    n_micro = math.ceil(len(items) / cfg.batch_size)
    if n_micro == 0:
        raise ValueError("no training examples")
    steps_per_epoch = math.ceil(n_micro / cfg.grad_accum)
    total = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * steps_per_epoch))
    opt, sched = make_optimizer(model.parameters(), cfg, total)
    step = restore(cfg, model, opt, sched)
    log = MetricsLog(out, step)
    cache: dict[int, list[list[int]]] = {}

    def micro(m: int) -> list[int]:
        e = m // n_micro
        if e not in cache:
            cache.clear()
            cache[e] = epoch_batches(len(items), cfg.batch_size, cfg.seed, e)
        return cache[e][m % n_micro]

    model.train()
    t0 = time.perf_counter()
    tokens_total = 0
    last: dict = {}
    while step < total:
        ts = time.perf_counter()
        batches = [task.collate([items[i] for i in micro(step * cfg.grad_accum + k)]) for k in range(cfg.grad_accum)]
        norm, loss_total, sums, ntok = accumulate(model, task, batches, dev)
        gnorm = None
        if cfg.max_grad_norm:
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_total += ntok
        dt = time.perf_counter() - ts
        last = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": loss_total / max(norm, 1e-8), "lr": lr,
                "grad_norm": gnorm, "tokens": ntok, "tokens_per_s": ntok / max(dt, 1e-9)}
        last.update({k: v / max(norm, 1e-8) for k, v in sums.items()})
        if step % cfg.logging_steps == 0 or step == total:
            log.write(last)
        checkpoint(cfg, out, step, total, model, tok, opt, sched, extra_state)
    save_final(out, model, tok, cfg)
    return {"steps": step, "last": last, "seconds": time.perf_counter() - t0, "tokens": tokens_total, "history": log.history}
