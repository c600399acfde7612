"""Tiny local rankers for the feedback tests (no hub downloads): a random
Llama sequence-classification reward model and a PairRM-style DeBERTa-v2
cross-encoder with a WordPiece tokenizer trained here on text we write."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = ("the a cat dog sat ran on mat good bad answer question why how water sky blue "
         "is was tips health sleep food kind rude help safe yes no").split()


def make_tiny_reward_model(out: Path, tiny_llama: Path, seed: int = 0) -> Path:
    """A random LlamaForSequenceClassification (1 label) with the tiny Llama's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    out = Path(out)
    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    cfg = AutoConfig.from_pretrained(tiny_llama)
    cfg.num_labels = 1
    cfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_wordpiece_tokenizer(seed: int = 0):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(500)]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(lines, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def make_tiny_pairrm(out: Path, seed: int = 0) -> Path:
    """A random PairRM-style checkpoint folder (hidden 32, 2 layers)."""
    from transformers import DebertaV2Config

    from synthfb.rank.pairrm import init_pairrm

    out = Path(out)
    if (out / "config.json").exists():
        return out
    tok = make_wordpiece_tokenizer(seed)
    cfg = DebertaV2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=512, relative_attention=True,
                          position_buckets=32, pos_att_type=["p2c", "c2p"], type_vocab_size=0)
    init_pairrm(cfg, tok, out, seed=seed)
    return out
