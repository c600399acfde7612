"""Every shipped pipeline's output trains as it is (issue #15).

For each pipeline file in ``pipelines/`` (loop files aside: the ones
``synthfb.loop.config.looks_like_loop`` accepts; ``pipelines/train/`` holds
trainer configs, not pipelines) the test

1. runs it on the scripted fake model of ``tests/scripted_runs.py`` (the
   file as it ships with a small input; a tiny random model's gibberish would
   fail the parsers and drop every row) into a run folder;
2. trains 1 step on ``RUN/dataset`` unchanged (``datasets.load_from_disk``,
   no column removed or renamed) with TRL 1.16's trainer for the rows' type,
   on the tiny random model: ``SFTTrainer`` for prompt/completion rows,
   ``DPOTrainer``, ``RewardTrainer`` and ``KTOTrainer`` (which unpairs
   preference rows itself) for prompt/chosen/rejected rows. The pipelines'
   metadata columns (``row_id``, ``provenance``, scores, ...) stay in the
   dataset: the trainers tokenize ``prompt``/``completion``/``chosen``/
   ``rejected`` and drop the columns their collator does not take
   (``remove_unused_columns``, default True), as TRL documents;
3. trains 1 step with ``synthfb train sft`` (SFT rows) or ``synthfb train
   dpo`` and ``synthfb train rm`` (preference rows) from the shipped
   ``pipelines/train/*_tiny.yaml`` with ``--set`` overrides (model, dataset =
   ``RUN/dataset``, output folder, 1 step, batch 2, short sequences);
4. runs ``synthfb card RUN`` and ``synthfb publish RUN --to DIR`` and checks
   that ``datasets.load_dataset(DIR)`` loads the run's rows, column for
   column.

The ``synthfb`` commands go through the CLI's entry point
(``synthfb.cli.main(argv)``, what the installed script calls) in this
process; ``tests/test_no_data_loss.py`` and ``tests/test_pipeline_validation.py``
run the CLI in subprocesses.

Unpaired rows (``emit: unpaired``: ``prompt``/``completion``/``label``)
train in TRL's ``KTOTrainer`` as they are, on judge_pairs' scripted run with
that option (``test_unpaired_output_trains_in_kto``).

A pipeline file without an entry in ``scripted_runs.SCRIPTED_RUNS`` fails
here, naming the file. Marked ``engine``: it trains models (5-8 s per SFT
pipeline, 20-30 s per preference pipeline on a busy 2-core machine).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import datasets
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ has no __init__.py
from scripted_runs import PIPELINES, SCRIPTED_RUNS, run, shipped_pipeline_files

PIPELINE_FILES = shipped_pipeline_files()

MAX_LENGTH = 128
BATCH = 2


def test_every_pipeline_file_has_a_scripted_run():
    """Fast-tier guard for the parametrized test below: each pipeline file has its scripted run,
    and each scripted run its file."""
    names = {f.stem for f in PIPELINE_FILES}
    missing = sorted(f"pipelines/{f.name}" for f in PIPELINE_FILES if f.stem not in SCRIPTED_RUNS)
    assert not missing, f"no scripted run in tests/scripted_runs.py (SCRIPTED_RUNS) for {missing}"
    assert set(SCRIPTED_RUNS) <= names, f"scripted runs without a pipeline file: {sorted(set(SCRIPTED_RUNS) - names)}"


# -- what the rows are -------------------------------------------------------------------------------------------

def row_kind(ds: datasets.Dataset) -> str:
    cols = set(ds.column_names)
    if {"prompt", "completion", "label"} <= cols:
        return "unpaired"
    if {"prompt", "chosen", "rejected"} <= cols:
        return "preference"
    if {"prompt", "completion"} <= cols:
        return "sft"
    raise AssertionError(f"neither TRL prompt/completion nor prompt/chosen/rejected columns: {sorted(cols)}")


# -- TRL ---------------------------------------------------------------------------------------------------------

def trl_args(config_cls, out: Path, **kw):
    """1 optimizer step on batches of 2, short sequences, no checkpoint, no reporting, float32."""
    return config_cls(output_dir=str(out), max_steps=1, per_device_train_batch_size=BATCH,
                      gradient_accumulation_steps=1, max_length=MAX_LENGTH, learning_rate=1e-4, logging_steps=1,
                      save_strategy="no", report_to="none", bf16=False, seed=0, **kw)


def train_trl(kind: str, ds: datasets.Dataset, model: Path, out: Path) -> dict[str, float]:
    """One step of each TRL trainer for rows of ``kind`` on ``ds`` as loaded; the training loss of each."""
    trl = pytest.importorskip("trl", reason="TRL not installed (optional)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    if kind == "sft":
        trainers = {"SFTTrainer": (trl.SFTTrainer, trl.SFTConfig)}
    elif kind == "unpaired":
        trainers = {"KTOTrainer": (trl.KTOTrainer, trl.KTOConfig)}
    else:
        trainers = {"DPOTrainer": (trl.DPOTrainer, trl.DPOConfig),
                    "RewardTrainer": (trl.RewardTrainer, trl.RewardConfig),
                    "KTOTrainer": (trl.KTOTrainer, trl.KTOConfig)}  # KTO unpairs preference rows itself
    losses = {}
    for name, (trainer_cls, config_cls) in trainers.items():
        trainer = trainer_cls(model=str(model), args=trl_args(config_cls, out / name), train_dataset=ds,
                              processing_class=tok)
        result = trainer.train()
        assert trainer.state.global_step == 1, name
        assert math.isfinite(result.training_loss), (name, result.training_loss)
        losses[name] = result.training_loss
    return losses


# -- the CLI -----------------------------------------------------------------------------------------------------

def synthfb(*args: Any) -> str:
    """``synthfb ARGS`` through the CLI's entry point (``synthfb.cli:main``, what the ``synthfb`` script
    runs) in this process: a subprocess per command would add ~5 s of imports each, 30 times. Its stdout."""
    from synthfb.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    assert code == 0, f"synthfb {' '.join(map(str, args))} exited {code}:\n{err.getvalue()[-4000:]}"
    return out.getvalue()


def train_synthfb(trainer: str, dataset: Path, model: Path, out: Path, *sets: str) -> dict[str, Any]:
    """``synthfb train TRAINER`` for 1 step from the shipped ``pipelines/train/TRAINER_tiny.yaml``
    (``sets``: more ``FIELD=VALUE`` overrides)."""
    overrides = [f"model={model}", f"dataset={dataset}", f"output_dir={out}", "max_steps=1", f"batch_size={BATCH}",
                 "grad_accum=1", f"max_length={MAX_LENGTH}", "save_steps=null", *sets]
    res = synthfb("train", trainer, "--config", PIPELINES / "train" / f"{trainer}_tiny.yaml",
                  *(x for kv in overrides for x in ("--set", kv)))
    summary = json.loads(res.strip().splitlines()[-1])
    assert summary["steps"] == 1, summary
    for key, v in summary["last"].items():
        assert not isinstance(v, float) or math.isfinite(v), (trainer, summary)
    assert (out / "config.json").exists() and (out / "metrics.jsonl").exists(), sorted(p.name for p in out.iterdir())
    return summary


# -- the test ----------------------------------------------------------------------------------------------------

@pytest.mark.engine
@pytest.mark.parametrize("path", PIPELINE_FILES, ids=lambda p: p.stem)
def test_pipeline_output_trains_and_publishes(path: Path, tmp_path: Path, tiny_model: Path):
    if path.stem not in SCRIPTED_RUNS:
        pytest.fail(f"pipelines/{path.name} has no scripted run: add `{path.stem}` to SCRIPTED_RUNS in "
                    f"tests/scripted_runs.py (the file made small and a fake that answers its prompts)")
    times = {}
    t0 = time.perf_counter()
    d, fake = SCRIPTED_RUNS[path.stem]()
    assert d["name"] == path.stem
    out = tmp_path / "run"
    res = run(d, out, fake)
    assert res.manifest["status"] == "finished" and res.num_rows > 0
    ds = datasets.load_from_disk(str(out / "dataset"))
    assert len(ds) == res.num_rows >= BATCH
    kind = row_kind(ds)
    times["run"] = time.perf_counter() - t0

    # (a) TRL, on the rows as they are
    t0 = time.perf_counter()
    losses = train_trl(kind, ds, tiny_model, tmp_path / "trl")
    times["trl"] = time.perf_counter() - t0

    # (b) synthfb train on the run's dataset folder
    t0 = time.perf_counter()
    for trainer in (["sft"] if kind == "sft" else ["dpo", "rm"]):
        train_synthfb(trainer, out / "dataset", tiny_model, tmp_path / f"synthfb-{trainer}")
        if kind == "preference" and "p_chosen" in ds.column_names:  # CAI's soft label, as the configs suggest
            train_synthfb(trainer, out / "dataset", tiny_model, tmp_path / f"synthfb-{trainer}-soft",
                          "soft_label_column=p_chosen")
    times["synthfb_train"] = time.perf_counter() - t0

    # (c) the card, the published folder, and datasets.load_dataset on it
    t0 = time.perf_counter()
    synthfb("card", out)
    assert (out / "README.md").read_text().startswith("---\n")
    pub = tmp_path / "published"
    synthfb("publish", out, "--to", pub)
    assert (pub / "README.md").exists()
    loaded = datasets.load_dataset(str(pub), cache_dir=str(tmp_path / "hf-cache"))
    assert list(loaded) == ["train"]
    assert loaded["train"].column_names == ds.column_names
    assert loaded["train"].to_list() == ds.to_list()
    times["card_publish"] = time.perf_counter() - t0
    print(f"\n{path.stem}: {len(ds)} {kind} rows; losses {losses}; seconds "
          + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))


@pytest.mark.engine
def test_unpaired_output_trains_in_kto(tmp_path: Path, tiny_model: Path):
    """judge_pairs with ``emit: unpaired``: TRL's KTOTrainer takes the rows as they are (1 step), with
    desirable and undesirable rows in equal numbers; card and publish work on the folder."""
    from scripted_runs import stage_cfg

    d, fake = SCRIPTED_RUNS["judge_pairs"]()
    stage_cfg(d, "judge_pairs")["emit"] = "unpaired"
    out = tmp_path / "run"
    res = run(d, out, fake)
    assert res.manifest["status"] == "finished" and res.num_rows >= BATCH
    ds = datasets.load_from_disk(str(out / "dataset"))
    assert row_kind(ds) == "unpaired" and ds.features["label"].dtype == "bool"
    assert sum(ds["label"]) == len(ds) - sum(ds["label"]) > 0
    losses = train_trl("unpaired", ds, tiny_model, tmp_path / "trl")
    assert set(losses) == {"KTOTrainer"}
    synthfb("card", out)
    pub = tmp_path / "published"
    synthfb("publish", out, "--to", pub)
    loaded = datasets.load_dataset(str(pub), cache_dir=str(tmp_path / "hf-cache"))
    assert loaded["train"].to_list() == ds.to_list()
