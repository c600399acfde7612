"""Our preference rows in TRL's format.

Two checks: (1) a check written from TRL's documented dataset formats
(preference = ``prompt``/``chosen``/``rejected``; conversational = lists of
``{"role", "content"}`` messages, standard = strings; never mixed), used by the
other feedback tests too; (2) TRL's own helpers (``trl.data_utils``), when TRL is
installed (trl 1.16 installs next to our pins without changing them).
"""

from __future__ import annotations

import json

import datasets
import pytest

ROLES = {"system", "user", "assistant"}


def _is_messages(v) -> bool:
    return (isinstance(v, list) and len(v) > 0
            and all(isinstance(m, dict) and set(m) >= {"role", "content"} and m["role"] in ROLES
                    and isinstance(m["content"], str) for m in v))


def assert_trl_preference(ds, fmt: str) -> None:
    """Every row of ``ds`` is a TRL preference example of format ``fmt``."""
    assert {"prompt", "chosen", "rejected"} <= set(ds.column_names)
    for row in ds:
        p, c, r = row["prompt"], row["chosen"], row["rejected"]
        if fmt == "conversational":
            assert _is_messages(p) and _is_messages(c) and _is_messages(r), row["row_id"]
            assert p[-1]["role"] == "user"
            assert [m["role"] for m in c] == ["assistant"] and [m["role"] for m in r] == ["assistant"]
        else:
            assert all(isinstance(x, str) for x in (p, c, r)), row["row_id"]
        assert c != r
        for col in ("score_chosen", "score_rejected", "score_margin"):
            assert isinstance(row[col], float) and row[col] == row[col]
        assert row["score_margin"] > 0


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tiny_model):
    """Preference datasets from the on-policy stage ranking given candidates with a
    tiny reward model (no engine needed), in both formats."""
    from feedback_models import make_tiny_reward_model
    from synthfb.engine import Pipeline, run_pipeline

    tmp = tmp_path_factory.mktemp("trl")
    rm = make_tiny_reward_model(tmp / "rm", tiny_model)
    data = tmp / "c.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Question {i}?",
                                        "cands": [f"answer {j} to {i}" for j in range(3)]}) + "\n" for i in range(4)))
    out = {}
    for fmt in ("conversational", "standard"):
        pipe = Pipeline.from_dict({"name": "trl", "stages": [
            {"stage": "load", "path": str(data), "id_column": "id"},
            {"stage": "onpolicy_pairs", "candidates_column": "cands", "ranker": "reward_model",
             "ranker_path": str(rm), "format": fmt}]}, tmp)
        res = run_pipeline(pipe, tmp / fmt, progress=False)
        out[fmt] = datasets.load_from_disk(str(res.dataset_dir))
    return out


def test_documented_trl_columns(pairs):
    assert len(pairs["conversational"]) == 4
    assert_trl_preference(pairs["conversational"], "conversational")
    assert_trl_preference(pairs["standard"], "standard")
    with pytest.raises(AssertionError):
        assert_trl_preference(pairs["standard"], "conversational")


def test_trl_helpers_accept_our_rows(pairs, tiny_model):
    trl_data = pytest.importorskip("trl.data_utils", reason="TRL not installed (optional)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    conv, std = pairs["conversational"], pairs["standard"]
    for row in conv:
        assert trl_data.is_conversational(row)
        assert trl_data.maybe_extract_prompt(row)["prompt"] == row["prompt"]
        out = trl_data.maybe_apply_chat_template(row, tok)
        assert out["prompt"].endswith("<|im_start|>assistant\n")
        assert out["chosen"].startswith(row["chosen"][0]["content"])
        assert out["rejected"].startswith(row["rejected"][0]["content"])
    for row in std:
        assert not trl_data.is_conversational(row)
        out = trl_data.maybe_apply_chat_template(row, tok)
        assert (out["prompt"], out["chosen"], out["rejected"]) == (row["prompt"], row["chosen"], row["rejected"])
    # the whole dataset through TRL's map-style helper, unchanged columns
    mapped = conv.map(trl_data.maybe_apply_chat_template, fn_kwargs={"processing_class": tok},
                      remove_columns=["prompt", "chosen", "rejected"])
    assert set(mapped.column_names) >= {"prompt", "chosen", "rejected"}
