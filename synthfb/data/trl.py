"""Rows in TRL's dataset formats (the column names TRL's trainers read).

Every dataset-ending stage writes these shapes, so its output trains in TRL
(and ``synthfb train``) unchanged; see https://huggingface.co/docs/trl/dataset_formats.

The SFT contract (:func:`sft_row`), one for every stage that ends an SFT
dataset: ``prompt`` + ``completion`` in TRL's prompt-completion format.
Conversational (the default): ``prompt`` is a list of messages, an optional
``system`` message then one ``user`` turn, and ``completion`` one
``assistant`` message. Standard: two plain strings, the system text (if any)
a paragraph before the user text, as a completion-mode request sends it
(:func:`synthfb.llm.prompts.text_request`). The method's own columns
(instruction, input, output, scores, tags, ...) stay on the row as metadata.
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


SFT_COLUMNS = ("prompt", "completion")
"""The columns :func:`sft_row` writes."""


def sft_row(user: str, completion: str, system: str | None = None,
            fmt: Literal["conversational", "standard"] = "conversational") -> dict[str, Any]:
    """One SFT example: ``prompt``/``completion`` in TRL's prompt-completion format.

    conversational: ``prompt`` = [system message (when ``system`` is
    non-empty), user message ``user``], ``completion`` = [assistant message];
    standard: plain strings, ``prompt`` = ``system`` + blank line + ``user``
    (or ``user`` alone)."""
    if not isinstance(user, str) or not isinstance(completion, str):
        raise ValueError(f"an SFT row needs text: got a user turn of type {type(user).__name__} and a completion "
                         f"of type {type(completion).__name__}")
    if fmt == "conversational":
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return {"prompt": msgs, "completion": [{"role": "assistant", "content": completion}]}
    if fmt == "standard":
        return {"prompt": f"{system}\n\n{user}" if system else user, "completion": completion}
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def trl_completion(prompt: str, completion: str, fmt: str = "conversational") -> dict[str, Any]:
    """``prompt``/``completion`` in TRL's prompt-completion (SFT) format
    (:func:`sft_row` without a system message)."""
    return sft_row(prompt, completion, None, fmt)  # type: ignore[arg-type]
