"""Rows in TRL's dataset formats (the column names TRL's trainers read).

Every dataset-ending stage writes these shapes, so its output trains in TRL
unchanged; see https://huggingface.co/docs/trl/dataset_formats.
"""

from __future__ import annotations

from typing import Any, Literal

FORMATS = ("conversational", "standard")


def trl_pair(
    prompt: str,
    chosen: str,
    rejected: str,
    fmt: Literal["conversational", "standard"] = "conversational",
    system: str | None = None,
) -> dict[str, Any]:
    """``prompt``/``chosen``/``rejected`` in TRL's preference format.

    conversational: ``prompt`` is a list of messages ending with the user
    turn, ``chosen``/``rejected`` are one-message assistant lists;
    standard: three plain strings (``system`` is then not representable).
    """
    if fmt == "conversational":
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return {
            "prompt": msgs,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
    if fmt == "standard":
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    raise ValueError(f"unknown preference format {fmt!r}; expected one of {FORMATS}")


def trl_completion(prompt: str, completion: str, fmt: str = "conversational") -> dict[str, Any]:
    """``prompt``/``completion`` in TRL's prompt-completion (SFT) format."""
    if fmt == "conversational":
        return {"prompt": [{"role": "user", "content": prompt}],
                "completion": [{"role": "assistant", "content": completion}]}
    if fmt == "standard":
        return {"prompt": prompt, "completion": completion}
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
