"""Tokenization and batching of the rows our stages emit (TRL column names).

Row formats:

- SFT, standard: ``prompt`` (str) + ``completion`` (str).
- SFT, conversational: ``messages`` (list of {role, content}); or ``prompt``
  (list of messages) + ``completion`` (list of assistant messages).
- Preference, standard: ``prompt`` + ``chosen`` + ``rejected`` (strings).
- Preference, conversational: ``prompt`` (messages) + ``chosen`` / ``rejected``
  (lists of assistant messages); without ``prompt`` the shared leading turns of
  ``chosen`` and ``rejected`` are taken as the prompt (TRL's implicit prompt).
- Ranked lists (K-way reward models: InstructGPT pairs or Plackett-Luce):
  ``prompt`` (a string or messages, as in preference rows) + ``completions``
  (K >= 2 responses, each in the form of a preference row's ``chosen``) +
  ``ranks`` (K integers, 1 = best, equal ranks = a tie) and/or ``scores`` (K
  numbers, higher is better). ``ranks`` wins when both are present; from
  ``scores`` the rank of a completion is 1 + the number of completions scored
  strictly higher (equal scores tie). K may differ from row to row.

Loss masks are 1 on completion / assistant tokens only (including the end of
turn token, so the model learns to stop) and 0 on prompt, template and pad
tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from ..data.io import InputError, read_user_file
from ..data.trl import ranks_of as trl_ranks_of


# The columns that make a row's training format (TRL's names); the datasets of a `dataset:` list must agree on them.
FORMAT_COLUMNS = ("prompt", "completion", "messages", "chosen", "rejected", "label", "completions", "ranks")


def load_rows(path: str | list[str]) -> list[dict[str, Any]]:
    """Rows of a ``save_to_disk`` folder, a .jsonl/.json/.csv or a .parquet
    file, or of a list of them (concatenated in order; see
    :func:`concat_rows`); an empty dataset is an error (there is nothing to
    train on), said before any model is loaded."""
    if isinstance(path, (list, tuple)):
        # an empty part (e.g. an iteration that kept no row) adds nothing; all of them empty is an error
        parts = [(str(p), read_user_file(p).to_pylist()) for p in path]
        if not any(rows for _, rows in parts):
            raise InputError(f"{', '.join(str(p) for p in path)}: every dataset of the list is empty (0 rows); "
                             "nothing to train on (config field `dataset`)")
        return concat_rows([(name, rows) for name, rows in parts if rows])
    table = read_user_file(path)
    if table.num_rows == 0:
        raise InputError(f"{path}: the dataset is empty (0 rows); nothing to train on (config field `dataset`)")
    return table.to_pylist()


def concat_rows(parts: list[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """The rows of several datasets ``(name, rows)`` as one, in order. Every
    dataset must have the same training columns (:data:`FORMAT_COLUMNS`:
    prompt/completion, messages, chosen/rejected, ...), so two formats are
    never mixed silently; other columns may differ (a row keeps its own)."""
    if not parts:
        raise InputError("dataset: an empty list; name at least one dataset")

    def fmt(rows: list[dict[str, Any]]) -> list[str]:
        return sorted({c for r in rows for c in r} & set(FORMAT_COLUMNS))

    first, want = parts[0][0], fmt(parts[0][1])
    for name, rows in parts[1:]:
        got = fmt(rows)
        if got != want:
            raise InputError(f"{name}: training columns {got} differ from {want} of {first}; every dataset of the "
                             f"`dataset` list must hold the same format")
    return [r for _, rows in parts for r in rows]


def _is_messages(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m for m in x)


def _row_err(i: int, msg: str) -> InputError:
    return InputError(f"row {i}: {msg}")


class Tokenizer:
    """Wraps a HF tokenizer with the prompt/completion rules of this module."""

    def __init__(self, tok, max_length: int | None = None, max_prompt_length: int | None = None):
        self.tok = tok
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self.pad_id = tok.pad_token_id
        self.eos_id = tok.eos_token_id

    # -- pieces -------------------------------------------------------
    def _chat(self, messages, add_generation_prompt: bool) -> str:
        if getattr(self.tok, "chat_template", None) is None:
            raise InputError("conversational rows need a tokenizer with a chat template")
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def prompt_ids(self, prompt: Any) -> list[int]:
        """Token ids of a prompt: chat-rendered messages, or a plain string."""
        if _is_messages(prompt):
            return self._ids(self._chat(prompt, True), False)
        if isinstance(prompt, str):
            return self._ids(prompt, True)
        raise InputError(f"prompt must be a string or a list of messages, got {type(prompt).__name__}")

    def completion_ids(self, prompt: Any, completion: Any) -> list[int]:
        """Ids of ``completion`` as it follows ``prompt``, ending with end-of-turn/eos."""
        if _is_messages(prompt) or _is_messages(completion):
            if not (_is_messages(prompt) and _is_messages(completion)):
                raise InputError("conversational prompt and completion must both be message lists")
            head = self._chat(prompt, True)
            full = self._chat(list(prompt) + list(completion), False)
            if not full.startswith(head):
                raise InputError("the chat template does not render the prompt as a prefix of the conversation")
            ids = self._ids(full[len(head):], False)
            return ids
        if not isinstance(completion, str):
            raise InputError(f"completion must be a string, got {type(completion).__name__}")
        ids = self._ids(completion, False)
        if self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids.append(self.eos_id)
        return ids

    def _truncate(self, p: list[int], c: list[int]) -> tuple[list[int], list[int]]:
        if self.max_prompt_length and len(p) > self.max_prompt_length:
            p = p[-self.max_prompt_length:]
        if self.max_length and len(p) + len(c) > self.max_length:
            keep = self.max_length - len(c)
            if keep < 1:
                p, c = p[-1:], c[: self.max_length - 1]
            else:
                p = p[-keep:]
        return p, c

    # -- examples -----------------------------------------------------
    def sft_example(self, row: dict, i: int = 0) -> dict[str, list[int]]:
        """``input_ids`` + ``loss_mask`` for one SFT row."""
        try:
            if "messages" in row and row["messages"] is not None:
                return self._messages_example(row["messages"])
            if "prompt" in row and "completion" in row:
                p = self.prompt_ids(row["prompt"])
                c = self.completion_ids(row["prompt"], row["completion"])
                p, c = self._truncate(p, c)
                return {"input_ids": p + c, "loss_mask": [0] * len(p) + [1] * len(c)}
        except InputError as e:
            raise _row_err(i, str(e)) from None
        raise _row_err(i, f"SFT rows need `messages` or `prompt` + `completion`; got columns {sorted(row)}")

    def _messages_example(self, messages: list[dict]) -> dict[str, list[int]]:
        if not _is_messages(messages):
            raise InputError("`messages` must be a list of {role, content} dicts")
        if not any(m["role"] == "assistant" for m in messages):
            raise InputError("`messages` has no assistant turn to train on")
        full = self._chat(messages, False)
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = self._chat(messages[:k], True) if k else ""
            upto = self._chat(messages[: k + 1], False)
            if not full.startswith(upto) or not upto.startswith(head):
                raise InputError("the chat template does not render conversations prefix by prefix")
            spans.append((len(head), len(upto)))
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [1 if any(a <= s and e <= b and e > s for a, b in spans) else 0 for s, e in enc["offset_mapping"]]
        if self.max_length and len(ids) > self.max_length:
            ids, mask = ids[: self.max_length], mask[: self.max_length]
        if not any(mask[1:]):
            raise InputError("no assistant tokens left after truncation")
        return {"input_ids": ids, "loss_mask": mask}

    def preference_example(self, row: dict, i: int = 0) -> dict[str, list[int]]:
        """``prompt_ids``, ``chosen_ids``, ``rejected_ids`` for one preference row."""
        for k in ("chosen", "rejected"):
            if k not in row or row[k] is None:
                raise _row_err(i, f"preference rows need `chosen` and `rejected`; missing `{k}` (columns {sorted(row)})")
        try:
            prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
            if prompt is None:
                if not (_is_messages(chosen) and _is_messages(rejected)):
                    raise InputError("without `prompt`, `chosen`/`rejected` must be conversations")
                n = 0
                while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                    n += 1
                prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
                if not prompt:
                    raise InputError("`chosen` and `rejected` share no leading turns to use as the prompt")
            p = self.prompt_ids(prompt)
            c = self.completion_ids(prompt, chosen)
            r = self.completion_ids(prompt, rejected)
        except InputError as e:
            raise _row_err(i, str(e)) from None
        if self.max_prompt_length and len(p) > self.max_prompt_length:
            p = p[-self.max_prompt_length:]
        if self.max_length:
            room = max(1, self.max_length - len(p))
            c, r = c[:room], r[:room]
        return {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}

    def ranked_example(self, row: dict, i: int = 0) -> dict[str, Any]:
        """``prompt_ids``, ``completion_ids`` sorted best first and their ``ranks``
        (1 = best, equal = tie; see :func:`ranks_of`). The sort is stable, so
        tied completions keep their order in the row."""
        comps = row.get("completions")
        if not isinstance(comps, list) or len(comps) < 2:
            raise _row_err(i, f"ranked rows need `completions`, a list of >= 2 responses; got {_kind(comps)}")
        ranks = ranks_of(row, len(comps), i)
        try:
            p = self.prompt_ids(row["prompt"])
            order = sorted(range(len(comps)), key=lambda k: ranks[k])
            cs = [self.completion_ids(row["prompt"], comps[k]) for k in order]
        except (InputError, KeyError, TypeError, ValueError) as e:
            raise _row_err(i, f"bad ranked row ({e})") from None
        if self.max_length:
            room = max(1, self.max_length - len(p))
            cs = [c[:room] for c in cs]
        return {"prompt_ids": p, "completion_ids": cs, "ranks": [ranks[k] for k in order]}


def _kind(x: Any) -> str:
    return f"{type(x).__name__} of {len(x)}" if isinstance(x, list) else type(x).__name__


def ranks_of(row: dict, k: int, i: int = 0) -> list[int]:
    """Ranks (1 = best) of the ``k`` completions of ranked row ``i``: its
    ``ranks`` column when present (K integers >= 1; equal = tie), else derived
    from ``scores`` (K finite numbers, higher is better) as 1 + the number of
    completions scored strictly higher, so equal scores tie."""
    import math

    ranks, scores = row.get("ranks"), row.get("scores")
    if ranks is not None:
        if (not isinstance(ranks, list) or len(ranks) != k
                or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks)):
            raise _row_err(i, f"`ranks` must be a list of {k} integers >= 1 (1 = best), one per completion; got {ranks!r}")
        return list(ranks)
    if scores is None:
        raise _row_err(i, f"ranked rows need `ranks` (1 = best) or `scores` (higher = better); got columns {sorted(row)}")
    if (not isinstance(scores, list) or len(scores) != k
            or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) for s in scores)):
        raise _row_err(i, f"`scores` must be a list of {k} finite numbers (higher = better), one per completion; "
                          f"got {scores!r}")
    return trl_ranks_of(scores)


def pad(seqs: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    """Pad lists of ints into a (B, T) long tensor on the given side."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        if side == "right":
            out[i, : len(s)] = torch.tensor(s)
        else:
            out[i, width - len(s):] = torch.tensor(s)
    return out


def collate_sft(examples: list[dict], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad SFT examples into ``input_ids``, ``attention_mask``, ``loss_mask``."""
    ids = [e["input_ids"] for e in examples]
    return {
        "input_ids": pad(ids, pad_id, side),
        "attention_mask": pad([[1] * len(s) for s in ids], 0, side),
        "loss_mask": pad([e["loss_mask"] for e in examples], 0, side),
    }


def collate_sequences(prompts: list[list[int]], completions: list[list[int]], pad_id: int, side: str = "right"):
    """Join prompt + completion per row and pad; loss mask on the completion."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    return {
        "input_ids": pad(seqs, pad_id, side),
        "attention_mask": pad([[1] * len(s) for s in seqs], 0, side),
        "loss_mask": pad([[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)], 0, side),
    }


def pack(examples: list[dict], max_length: int) -> list[list[int]]:
    """Greedy first-fit-decreasing bins of example indices, each <= ``max_length`` tokens."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i]["input_ids"])
        for b in range(len(bins)):
            if room[b] >= n:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_length - n)
    return bins


def collate_packed(groups: list[list[dict]], pad_id: int) -> dict[str, torch.Tensor]:
    """Each group of examples becomes one row; no attention crosses examples.

    Returns ``input_ids``, ``loss_mask``, ``position_ids`` (restarting at 0 for
    each example) and a 4D boolean ``attention_mask`` (B, 1, T, T) that is
    causal within each example and blocks every other pair (padding included).
    """
    rows, segs, pos, lm = [], [], [], []
    for g in groups:
        r, s, p, m = [], [], [], []
        for k, e in enumerate(g):
            n = len(e["input_ids"])
            r += e["input_ids"]
            s += [k] * n
            p += list(range(n))
            m += [0] + list(e["loss_mask"][1:])
        rows.append(r), segs.append(s), pos.append(p), lm.append(m)
    ids = pad(rows, pad_id)
    seg = pad(segs, -1)
    T = ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    mask4 = (same & causal)[:, None]
    # a fully masked pad row would make softmax NaN on some kernels: let pads see themselves
    eye = torch.eye(T, dtype=torch.bool)[None, None]
    mask4 = mask4 | (eye & (seg < 0)[:, None, :, None])
    return {"input_ids": ids, "attention_mask": mask4, "position_ids": pad(pos, 0), "loss_mask": pad(lm, 0)}


def collate_shared_prompt(prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]],
                          pad_id: int) -> dict[str, torch.Tensor]:
    """One row per pair, ``prompt + chosen + rejected``, the prompt computed once.

    Prefix sharing (Wang et al. 2024, "Accelerating Direct Preference
    Optimization with Prefix Sharing", arXiv 2410.20305): the rejected tokens
    attend to the prompt and to themselves but never to the chosen tokens,
    and their position ids continue from the prompt, so each completion sees
    exactly the context it would see alone. Returns ``input_ids``,
    ``position_ids``, a 4D boolean ``attention_mask`` (B, 1, T, T), ``prev``
    (B, T): the column whose hidden state predicts each token (the last
    prompt token for the first token of either completion; -1 where no
    log-prob is taken), ``side`` (B, T): 1 on chosen tokens, 2 on
    rejected ones, 0 elsewhere (right padding), and ``ends`` (B, 2): the
    column of the last token of prompt + chosen and of prompt + rejected
    (where a reward model reads each sequence's score).
    """
    rows, segs, pos, prev, side, ends = [], [], [], [], [], []
    for p, c, r in zip(prompts, chosen, rejected):
        P, C, R = len(p), len(c), len(r)
        rows.append(p + c + r)
        segs.append([0] * P + [1] * C + [2] * R)
        pos.append(list(range(P + C)) + list(range(P, P + R)))
        # token t is predicted by t - 1, except the first rejected token: by the last prompt token
        prev.append([-1] * P + [P - 1 + k for k in range(C)] + [P + C - 1 + k if k else P - 1 for k in range(R)])
        side.append([0] * P + [1] * C + [2] * R)
        ends.append([P + C - 1 if C else P - 1, P + C + R - 1 if R else P - 1])
    ids = pad(rows, pad_id)
    seg = pad(segs, -1)
    T = ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    real = seg >= 0
    # a query sees causal keys of the same completion or of the prompt; chosen never sees rejected
    # (causal order) and rejected never sees chosen
    ok = (seg[:, :, None] == seg[:, None, :]) | (seg[:, None, :] == 0)
    mask4 = (ok & causal & real[:, :, None] & real[:, None, :])[:, None]
    eye = torch.eye(T, dtype=torch.bool)[None, None]
    mask4 = mask4 | (eye & (~real)[:, None, :, None])  # pads see themselves (no all-masked softmax row)
    return {"input_ids": ids, "attention_mask": mask4, "position_ids": pad(pos, 0), "prev": pad(prev, -1),
            "side": pad(side, 0), "ends": torch.tensor(ends, dtype=torch.long)}


def collate_pairs(items: list[dict], pad_id: int, share_prompt: bool) -> dict[str, torch.Tensor]:
    """A batch of preference examples (``prompt_ids``, ``chosen_ids``, ``rejected_ids``): with
    ``share_prompt`` one row per pair (:func:`collate_shared_prompt`), else the B chosen rows then the
    B rejected rows, each with its own copy of the prompt (right padding). ``pair_tokens``: the pairs'
    tokens counted with the prompt twice (the same figure either way)."""
    prompts = [e["prompt_ids"] for e in items]
    chosen, rejected = [e["chosen_ids"] for e in items], [e["rejected_ids"] for e in items]
    if share_prompt:
        b = collate_shared_prompt(prompts, chosen, rejected, pad_id)
    else:
        b = collate_sequences(prompts * 2, chosen + rejected, pad_id, "right")
    b["pair_tokens"] = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected))
    return b
