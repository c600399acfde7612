"""Tiny random Llama checkpoints for fast tests and benchmarks.

The model is random (its text is gibberish) but it is a real HF checkpoint
that vLLM, transformers and ``vllm serve`` load like any other: Llama
architecture, head_dim 64 (the vLLM CPU build rejects head_dim 16), a
byte-level BPE tokenizer trained here on text we write, and a ChatML chat
template.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = (
    "the a an of to and in is it for on with as at by from this that be are was were "
    "write explain list give describe summarize translate classify answer question story poem "
    "email code python function data model task example input output instruction response "
    "good bad better best short long simple clear helpful honest harmless three five tips "
    "health water sleep food exercise science history math language music art city river "
    "why how what when where who which please make find compare create improve rewrite"
).split()


def _corpus(num_lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        k = rng.randint(4, 20)
        words = [rng.choice(_WORDS) for _ in range(k)]
        sep = rng.choice([" ", " ", " ", ", "])
        lines.append(sep.join(words).capitalize() + rng.choice([".", "?", "!", ":", ""]))
    # digits, punctuation and JSON so the tokenizer can spell structured output
    lines += ['{"label": "yes", "score": 3}', '{"a": [1, 2, 3], "b": null, "c": true}'] * 50
    lines += ["0 1 2 3 4 5 6 7 8 9 10 42 100", "Score: 4", "(A) (B) Options:"] * 50
    return lines


def make_tiny_model(
    out_dir: str | Path,
    *,
    vocab_size: int = 1024,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    max_position_embeddings: int = 2048,
    seed: int = 0,
) -> Path:
    """Write a tiny random Llama checkpoint with tokenizer and chat template.

    Idempotent: if ``out_dir`` already holds a finished checkpoint it is
    returned unchanged.
    """
    out = Path(out_dir)
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if hidden_size // num_heads < 32:
        raise ValueError("head_dim must be >= 32 (the vLLM CPU build rejects smaller heads)")
    out.mkdir(parents=True, exist_ok=True)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(4000, seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
        model_max_length=max_position_embeddings,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id
    tmp = out / ".partial"
    model.save_pretrained(tmp, safe_serialization=True)
    for f in tmp.iterdir():
        f.replace(out / f.name)
    tmp.rmdir()
    (out / "synthfb_tiny.json").write_text(json.dumps({"seed": seed, "kind": "tiny-random-llama"}))
    return out
