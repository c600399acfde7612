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


# -- what a preference-ending stage emits -----------------------------------------------

EMITS = ("pairs", "unpaired", "ranked")
"""``emit`` values of the stages that end a preference dataset:

* ``pairs`` (default): one row per prompt, ``prompt``/``chosen``/``rejected``
  (:func:`trl_pair`; TRL's DPOTrainer / RewardTrainer);
* ``unpaired``: two rows per prompt, ``prompt``/``completion``/``label``
  (:func:`trl_unpaired`; TRL's unpaired preference format, KTOTrainer):
  the chosen response with ``label`` true, the rejected one with false;
* ``ranked``: one row per prompt with every scored candidate,
  ``prompt``/``completions``/``scores``/``ranks`` (:func:`trl_ranked`; a
  K-way reward model)."""

UNPAIRED_COLUMNS = ("prompt", "completion", "label")
RANKED_COLUMNS = ("prompt", "completions", "scores", "ranks")


def check_emit(emit: str, allowed: tuple[str, ...] = EMITS) -> str:
    """``emit`` itself, or a one-line ValueError naming the allowed values."""
    if emit not in allowed:
        raise ValueError(f"emit: expected one of {list(allowed)}, got {emit!r}")
    return emit


def _messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def _response(text: str, fmt: str) -> Any:
    if fmt == "conversational":
        return [{"role": "assistant", "content": text}]
    if fmt == "standard":
        return text
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def trl_unpaired(prompt: str, chosen: str, rejected: str,
                 fmt: Literal["conversational", "standard"] = "conversational",
                 system: str | None = None) -> list[dict[str, Any]]:
    """A preference pair as two unpaired rows ``prompt``/``completion``/``label``
    (TRL's unpaired preference format, read by KTOTrainer): the chosen
    response with ``label=True`` (desirable), then the rejected one with
    ``label=False``. Conversational: ``prompt`` a message list, ``completion``
    one assistant message; standard: plain strings (``system`` then dropped,
    as in :func:`trl_pair`)."""
    pair = trl_pair(prompt, chosen, rejected, fmt, system)
    return [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
            {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]


def ranks_of(scores: list[float]) -> list[int]:
    """Rank 1 = best (highest score); equal scores share the best rank of
    their group (1 + the number of strictly higher scores: [3, 5, 3] ->
    [2, 1, 2]). NaN scores are refused."""
    vals = [float(s) for s in scores]
    if any(v != v for v in vals):
        raise ValueError(f"ranks_of: scores contain NaN: {vals}")
    return [1 + sum(o > v for o in vals) for v in vals]


def trl_ranked(prompt: str, completions: list[str], scores: list[float],
               fmt: Literal["conversational", "standard"] = "conversational",
               system: str | None = None) -> dict[str, Any]:
    """One ranked row: ``prompt``, ``completions`` (the K responses, each in
    the form ``chosen`` has in :func:`trl_pair`), ``scores`` (floats, higher
    is better) and ``ranks`` (:func:`ranks_of`; 1 = best, ties share a rank)."""
    if len(completions) != len(scores) or len(completions) < 2:
        raise ValueError(f"a ranked row needs >= 2 completions with one score each, got {len(completions)} "
                         f"completions and {len(scores)} scores")
    if not all(isinstance(c, str) for c in completions):
        raise ValueError("a ranked row's completions must be strings")
    vals = [float(s) for s in scores]
    return {"prompt": _messages(prompt, system) if fmt == "conversational" else _response(prompt, fmt),
            "completions": [_response(c, fmt) for c in completions], "scores": vals, "ranks": ranks_of(vals)}
