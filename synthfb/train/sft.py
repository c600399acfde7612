"""Supervised fine-tuning on prompt/completion or conversational rows.

The loss is the mean negative log-likelihood over completion / assistant
tokens only, normalized by the token count of the whole accumulated step (so
``grad_accum`` reproduces the larger batch exactly). With ``packing`` several
examples share one row of ``max_length`` tokens without attending to each
other (position ids restart per example; a 4D block-causal mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from . import loop
from .collate import Tokenizer, collate_packed, collate_sft, load_rows, pack
from .config import TrainConfig, _f
from .logprobs import takes_4d_mask, token_logps


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning (``synthfb train sft``)."""

    packing: bool = _f(False, "pack several examples per row of max_length tokens (no cross-example attention)")
    padding_side: Literal["right", "left"] = _f("right", "side to pad on when not packing")


def sft_task(tok, cfg: SFTConfig) -> loop.Task:
    def collate(items):
        if cfg.packing:
            return collate_packed(items, tok.pad_token_id)
        return collate_sft(items, tok.pad_token_id, cfg.padding_side)

    def count(b):
        return float(b["loss_mask"][:, 1:].sum())

    def loss(model, b):
        lp = token_logps(model, b["input_ids"], b["attention_mask"], b["loss_mask"], b.get("position_ids"))
        nll = -lp.sum()
        return nll, {}

    def tokens(b):
        m = b["attention_mask"]
        return int((b["input_ids"] != tok.pad_token_id).sum()) if m.dim() == 4 else int(m.sum())

    return loop.Task(collate, count, loss, tokens)


def build_examples(cfg: SFTConfig, tok, rows: list[dict] | None = None) -> list:
    t = Tokenizer(tok, cfg.max_length, cfg.max_prompt_length)
    rows = load_rows(cfg.dataset) if rows is None else rows
    ex = [t.sft_example(r, i) for i, r in enumerate(rows)]
    if cfg.packing:
        ex = [[ex[i] for i in g] for g in pack(ex, cfg.max_length)]
    return ex


@loop.owns_output
def train_sft(cfg: SFTConfig, rows: list[dict] | None = None) -> dict:
    """Run SFT; the model ends up in ``cfg.output_dir``. Returns the loop summary."""
    loop.seed_all(cfg.seed)
    rows = load_rows(cfg.dataset) if rows is None else rows  # data errors before the model loads
    tok = loop.load_tokenizer(cfg.model)
    items = build_examples(cfg, tok, rows)
    model = loop.load_causal_lm(cfg.model, cfg)
    if cfg.packing and not takes_4d_mask(model):
        from .config import ConfigError

        raise ConfigError(f"packing: {cfg.model} uses {model.config._attn_implementation} attention, which cannot "
                          "keep packed examples apart (it needs sdpa or flex_attention); set packing: false")
    return loop.run(cfg, model, tok, items, sft_task(tok, cfg))


